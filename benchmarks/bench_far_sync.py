#!/usr/bin/env python3
"""Benchmark: what the far sync (issue 14, "durable before deleted") adds to
the far md5 command, on freshly written (dirty) files.

    .venv/bin/python benchmarks/bench_far_sync.py --dir /var/tmp --count 2000 --size 16384
    .venv/bin/python benchmarks/bench_far_sync.py --dir /dev/shm --count 1 --size 268435456

Each repeat writes COUNT files of SIZE random bytes (1,000 to a directory)
in a fresh directory below DIR, then runs the agent's own far md5 script
(``Destination.remote_md5_args``, through ``sh -c`` here instead of ssh)
with and without its sync part, in alternating order. It prints both
times of every repeat. No ssh: the command alone, as the far host runs it.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from watcher.config import Archive  # noqa: E402
from watcher.rsync import MD5_CHUNK, SYNC_CHUNK, Destination  # noqa: E402


def far_script(base: str, with_sync: bool) -> str:
    script = Destination(Archive(name="a", remote_basedir=base, ssh_host="x")).remote_md5_args()[-1]
    return script if with_sync else script.replace(shlex.quote(MD5_CHUNK),
                                                   shlex.quote(MD5_CHUNK[len(SYNC_CHUNK):]))


def one(where: str, count: int, size: int, with_sync: bool) -> float:
    base = tempfile.mkdtemp(prefix="watcher-far-sync-", dir=where)
    try:
        names = []
        for i in range(count):
            sub = f"d{i // 1000:03d}"
            os.makedirs(f"{base}/{sub}", exist_ok=True)
            with open(f"{base}/{sub}/f{i:06d}", "wb") as f:
                f.write(os.urandom(size))
            names.append(f"./{sub}/f{i:06d}")
        t0 = time.monotonic()
        out = subprocess.run(["sh", "-c", far_script(base, with_sync)], capture_output=True,
                             input=b"".join(os.fsencode(n) + b"\0" for n in names))
        took = time.monotonic() - t0
        if out.returncode != 0 or out.stdout.count(b"  ./") != count:
            raise RuntimeError(f"the far md5 command failed: {out.stderr[:300]!r}")
        return took
    finally:
        shutil.rmtree(base)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/var/tmp", help="where the far files are written")
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--size", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.repeats):
        for with_sync in ((False, True) if r % 2 == 0 else (True, False)):
            times[with_sync].append(one(args.dir, args.count, args.size, with_sync))
    for with_sync, label in ((False, "no sync"), (True, "with sync")):
        t = times[with_sync]
        print(f"{args.dir} {args.count} x {args.size} B, {label:9s}: "
              + " ".join(f"{x:.3f}" for x in t) + f"  median {statistics.median(t):.3f} s")
    print(f"the sync adds {statistics.median(times[True]) - statistics.median(times[False]):+.3f} s (medians)")


if __name__ == "__main__":
    main()
