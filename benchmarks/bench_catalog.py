#!/usr/bin/env python3
"""Benchmark: `watcher status` and the catalog's writes on a huge catalog.

Run from the repository root (not part of the test suite):

    .venv/bin/python benchmarks/bench_catalog.py                 # 10,000,000 rows, a few minutes
    .venv/bin/python benchmarks/bench_catalog.py --rows 1000000

It builds a socs catalog (socs' own DDL, one INSERT ... SELECT over a
recursive CTE) of two archives as a year or more of service leaves it:
almost every row verified and removed, the newest ones verified and still
here, a few pending, failed, ignored and refused. Then it opens it with
watcher (the migration: watcher's columns, indexes and counts, timed), and
measures, printing each number as it goes:

- `watcher status --db` and `watcher status --json --db`, the real command
  as a subprocess (median of --runs), and the same command on an empty
  catalog (what starting Python and importing watcher cost);
- Reports.stats in-process (median), and the one-pass full count it
  replaced, for scale;
- registering --writes files (Files.register, 1000 per transaction, as the
  registrar commits) and recording as many verifications
  (Shipping.record, 1000 per batch), without the counting triggers and
  with them (the triggers are dropped, then migrate() makes them again and
  refills the counts: that refill is timed too).

Everything goes in a temporary directory under --workdir (default
/var/tmp: on disk), removed at the end unless --keep. WATCHER_SRC=DIR
measures another copy of the package (e.g. `git archive <commit> watcher |
tar -x -C DIR`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = os.environ.get("WATCHER_SRC")
sys.path.insert(0, str(REPO))
if SRC:
    sys.path.insert(0, SRC)

from watcher.catalog import Catalog, NewFile  # noqa: E402
from watcher.catalog.schema import SOCS_DDL  # noqa: E402
from watcher.catalog.states import STATES  # noqa: E402

MAX_ATTEMPTS = 10
COUNTED = ("pending", "verified", "failed", "removed", "ignored", "refused")

# Row n (1..rows): archive smurf for every third, else timestreams; a file
# every 3 s from 2020 on; md5 = n in hex. The newest 0.1% are pending (never
# copied); every 10,007th failed (a wrong far md5, attempts used up), every
# 50,021st ignored; all but the newest 5% removed by retention.
BUILD = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :rows)
INSERT INTO supersync_v0 (id, local_path, local_md5sum, archive_name, remote_path, "timestamp",
                          remote_md5sum, copied, removed, failed_copy_attempts, deletable, "ignore")
SELECT i, '/data/' || a || '/' || tc || '/' || i || '.g3', md5, a, tc || '/' || i || '.g3', ts,
       CASE WHEN i > :rows * 0.999 THEN NULL WHEN i % 10007 = 0 THEN 'f' || substr(md5, 2) ELSE md5 END,
       CASE WHEN i > :rows * 0.999 THEN NULL ELSE ts + 60 END,
       CASE WHEN i <= :rows * 0.95 AND i % 10007 != 0 THEN ts + 7 * 86400 END,
       CASE WHEN i % 10007 = 0 THEN :max ELSE 0 END,
       1,
       i % 50021 = 0
FROM (SELECT i, CASE WHEN i % 3 = 0 THEN 'smurf' ELSE 'timestreams' END AS a,
             printf('%032x', i) AS md5, 1600000000.0 + 3 * i AS ts,
             CAST((1600000000 + 3 * i) / 100000 AS INTEGER) AS tc FROM n)
"""


def say(*parts) -> None:
    print(*parts, flush=True)


def timed(work) -> tuple[object, float]:
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def median_time(work, runs: int) -> float:
    return statistics.median(timed(work)[1] for _ in range(runs))


def build(path: Path, rows: int) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode = OFF")
    db.execute("PRAGMA synchronous = OFF")
    for ddl in SOCS_DDL:
        db.execute(ddl)
    db.execute(BUILD, {"rows": rows, "max": MAX_ATTEMPTS})
    db.commit()
    db.close()


def watcher_command() -> list[str]:
    found = Path(sys.executable).parent / "watcher"
    return [str(found)] if found.exists() else [sys.executable, "-m", "watcher.cli"]


def status_time(db: Path, extra: list[str], runs: int) -> float:
    env = dict(os.environ)
    # Bytecode as an installed package has it (pip compiles at install): the
    # warm-up run below writes it, unless this variable forbids it.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if SRC:
        env["PYTHONPATH"] = SRC
    command = [*watcher_command(), "status", *extra, "--db", str(db)]

    def once():
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode not in (0, 3, 4):  # 3, 4: a report (attention needed, no agent running)
            raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip()}")
        return done.stdout

    once()  # warm the page cache, as on a host where the agent runs
    return median_time(once, runs)


def one_pass(catalog: Catalog, archive: str) -> tuple:
    """What Reports.stats ran before the counts table: one pass over the archive's rows."""
    sums = ", ".join(f"SUM(CASE WHEN {STATES[n].sql(MAX_ATTEMPTS)} THEN 1 ELSE 0 END)" for n in COUNTED)
    return catalog.db.execute_sql(f"SELECT COUNT(*), {sums} FROM supersync_v0 WHERE archive_name = ?",
                                  (archive,)).fetchone()


def drop_triggers(catalog: Catalog) -> list[str]:
    names = [name for (name,) in catalog.db.execute_sql(
        "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'supersync_v0'")]
    with catalog.db.atomic("IMMEDIATE"):
        for name in names:
            catalog.db.execute_sql(f'DROP TRIGGER "{name}"')
    return names


def writes(catalog: Catalog, count: int, tag: str) -> tuple[float, float]:
    """Seconds to register ``count`` files, and to record them verified."""
    files = [NewFile(f"/data/bench/{tag}/{i}.g3", f"{tag}/{i}.g3", "timestreams", f"{i:032x}",
                     1900000000.0 + i, size=1_000_000) for i in range(count)]
    chunk = 1000

    def register():
        for start in range(0, count, chunk):
            catalog.files.register(files[start:start + chunk])

    _, registered = timed(register)
    ids = [i for (i,) in catalog.db.execute_sql(
        "SELECT id FROM supersync_v0 WHERE local_path >= ? AND local_path < ?",
        (f"/data/bench/{tag}/", f"/data/bench/{tag}0"))]
    md5 = dict(catalog.db.execute_sql(
        f"SELECT id, local_md5sum FROM supersync_v0 WHERE id >= {min(ids)} AND id <= {max(ids)}").fetchall())

    def record():
        for start in range(0, len(ids), chunk):
            catalog.shipping.record({i: (md5[i], md5[i]) for i in ids[start:start + chunk]}, time.time())

    _, recorded = timed(record)
    assert len(ids) == count
    return registered, recorded


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--runs", type=int, default=7, help="runs per timing (median)")
    p.add_argument("--writes", type=int, default=100_000, help="files registered and verified per mode")
    p.add_argument("--workdir", default="/var/tmp")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-catalog-", dir=args.workdir))
    try:
        db = work / "catalog.db"
        _, took = timed(lambda: build(db, args.rows))
        say(f"built {args.rows:,} socs rows in {took:.1f} s ({db.stat().st_size / 1e9:.2f} GB) at {db}")
        _, took = timed(lambda: Catalog(db).close())
        say(f"watcher's migration (columns, indexes, counts): {took:.1f} s")
        catalog = Catalog(db)
        with catalog.db.atomic():  # a few refused rows, through the triggers as any writer's update
            catalog.db.execute_sql("UPDATE supersync_v0 SET refused = 1 WHERE id % 100003 = 0")

        empty = work / "empty.db"
        Catalog(empty).close()
        say(f"watcher status, empty catalog (Python and imports): {status_time(empty, [], args.runs) * 1e3:.0f} ms")
        for extra in ([], ["--json"]):
            took = status_time(db, extra, args.runs)
            say(f"watcher status {' '.join([*extra, '--db'])}, {args.rows:,} rows: {took * 1e3:.0f} ms "
                f"(median of {args.runs})")

        names = catalog.reports.archive_names()
        for name in names:
            stats = catalog.reports.stats(name, MAX_ATTEMPTS, time.time())
            took = median_time(lambda: catalog.reports.stats(name, MAX_ATTEMPTS, time.time()), args.runs)
            say(f"Reports.stats({name!r}): {took * 1e3:.2f} ms; "
                + ", ".join(f"{k} {stats[k]:,}" for k in ("files", *COUNTED)))
            reference, took = timed(lambda: one_pass(catalog, name))
            say(f"  the one-pass count it replaced: {took * 1e3:.0f} ms")
            if tuple(reference) != tuple(stats[k] for k in ("files", *COUNTED)):
                raise SystemExit(f"counts differ from the full count: {reference}")

        if args.writes:
            dropped = drop_triggers(catalog)
            registered, recorded = writes(catalog, args.writes, "without")
            say(f"without triggers ({len(dropped)} dropped): {args.writes:,} registrations {registered:.2f} s "
                f"({args.writes / registered:,.0f}/s), {args.writes:,} verifications {recorded:.2f} s "
                f"({args.writes / recorded:,.0f}/s)")
            catalog.close()
            _, took = timed(lambda: Catalog(db).close())
            say(f"migrate() making the triggers again and refilling the counts: {took:.1f} s")
            catalog = Catalog(db)
            registered, recorded = writes(catalog, args.writes, "with")
            say(f"with triggers: {args.writes:,} registrations {registered:.2f} s "
                f"({args.writes / registered:,.0f}/s), {args.writes:,} verifications {recorded:.2f} s "
                f"({args.writes / recorded:,.0f}/s)")
            stats = catalog.reports.stats("timestreams", MAX_ATTEMPTS, time.time())
            if tuple(one_pass(catalog, "timestreams")) != tuple(stats[k] for k in ("files", *COUNTED)):
                raise SystemExit("counts differ from the full count after the writes")
        catalog.close()
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
