#!/usr/bin/env python3
"""Benchmark: what the far sync (issue 14, "durable before deleted") adds to
the far md5 command, on freshly written (dirty) files.

    .venv/bin/python benchmarks/bench_far_sync.py --dir /var/tmp --count 2000 --size 16384
    .venv/bin/python benchmarks/bench_far_sync.py --dir /dev/shm --count 1 --size 268435456

Each repeat writes COUNT files of SIZE random bytes (1,000 to a directory)
in a fresh directory below DIR, then runs the agent's own far md5 script
(``Destination.remote_md5_args``, through ``sh -c`` here instead of ssh)
four ways, in turn: without its sync part; with it but without the syncfs
that comes first for 64 files or more (each file and directory fsynced
alone); with the sync before the hashing instead of beside it; without
the directories above the base (SYNC_ABOVE); and as the agent runs it
(syncfs, then each file, while the files are hashed, then the directories
above the base). It prints the times of every repeat.
No ssh: the command alone, as the far host runs it.
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
from watcher.rsync import MD5_CHUNK, SYNC_ABOVE, SYNC_CHECK, SYNC_START, SYNCFS_PART, Destination  # noqa: E402

BACKGROUND = " & s=$!; "
assert SYNC_START.endswith(BACKGROUND) and " && " + SYNC_ABOVE in SYNC_START, \
    "the far md5 command changed: update this benchmark"


WAYS = ("no sync", "fsync each", "sync, then hash", "nothing above the base", "as shipped")


def far_script(base: str, way: str) -> str:
    script = Destination(Archive(name="a", remote_basedir=base, ssh_host="x")).remote_md5_args()[-1]
    chunk = {"no sync": MD5_CHUNK.replace(SYNC_START, "").replace(SYNC_CHECK, ""),
             "fsync each": MD5_CHUNK.replace(SYNCFS_PART, ""),
             "sync, then hash": MD5_CHUNK.replace(BACKGROUND, '; r=$?; ').replace(
                 SYNC_CHECK, '[ "$r" = 0 ] || exit 1; '),
             "nothing above the base": MD5_CHUNK.replace(" && " + SYNC_ABOVE, ""),
             "as shipped": MD5_CHUNK}[way]
    return script.replace(shlex.quote(MD5_CHUNK), shlex.quote(chunk))


def one(where: str, count: int, size: int, way: str) -> float:
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
        out = subprocess.run(["sh", "-c", far_script(base, way)], capture_output=True,
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
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for r in range(args.repeats):
        for way in (WAYS if r % 2 == 0 else WAYS[::-1]):
            times[way].append(one(args.dir, args.count, args.size, way))
    for way in WAYS:
        t = times[way]
        print(f"{args.dir} {args.count} x {args.size} B, {way:15s}: "
              + " ".join(f"{x:.3f}" for x in t) + f"  median {statistics.median(t):.3f} s")
    print(f"the sync adds {statistics.median(times['as shipped']) - statistics.median(times['no sync']):+.3f} s "
          "(medians)")


if __name__ == "__main__":
    main()
