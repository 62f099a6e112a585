"""`watcher status` reads counts SQLite keeps with triggers (schema.COUNT_KEYS):
they must equal what a pass over the table counts, for every state of
watcher.catalog.states, any attempt limit and every combination of the
columns, whoever writes the rows (plain SQL as socs does, socs' own code)
and however (insert, update, delete); and the other numbers of a status
must be what the one-pass query of before gave."""

from __future__ import annotations

import itertools
import random
import sqlite3
import time

import pytest
from peewee import Case, fn

from tests.real_socs import socs_iteration
from watcher.catalog import Catalog
from watcher.catalog.schema import SOCS_DDL, raw
from watcher.catalog.states import STATES
from tests.varied_catalogs import LIMITS, varied

COLUMNS = {  # every value each column the states read takes in practice, socs' NULLs included
    "archive_name": ("a", "b"),
    "remote_md5sum": (None, "a" * 32, "b" * 32),
    "removed": (None, 0.0, 5.0),
    "ignore": (None, 0, 1),
    "refused": (None, 1),
    "failed_copy_attempts": (None, 0, 2, 3, 7),
    "size": (None, 0, 1000),
}
INSERT = ('INSERT INTO supersync_v0 (local_path, local_md5sum, remote_path, "timestamp", '
          + ", ".join(f'"{c}"' for c in COLUMNS) + f") VALUES (?, ?, ?, ?, {', '.join('?' * len(COLUMNS))})")


def old_stats(catalog: Catalog, archive: str, max_attempts: int, now: float) -> dict:
    """Reports.stats as it was before the counts table, verbatim: one pass
    over the archive's rows. The reference."""
    File = catalog.File

    def case(cond, then):
        return Case(None, [(cond, then)], 0)

    def count(name: str, then=1):
        return fn.SUM(case(raw(STATES[name].sql(max_attempts)), then)).alias(name)

    row = (File.select(
        fn.COUNT(File.id).alias("files"),
        *(count(name) for name in ("pending", "verified", "failed", "removed", "ignored", "refused")),
        fn.SUM(case(raw(STATES["pending"].sql(max_attempts)), fn.coalesce(File.size, 0))).alias("bytes_pending"),
    ).where(File.archive_name == archive).dicts().get())
    stats = {k: int(v or 0) for k, v in row.items()}
    oldest = catalog.shipping.pending(archive, 1, max_attempts)
    stats["oldest_pending_age"] = (now - oldest[0].timestamp) if oldest else None
    stats["finalized_until"] = catalog.reports.finalized_until(archive, now)
    last = File.select().where(File.archive_name == archive).order_by(File.id.desc()).first()
    stats["last_file_added"] = last.local_path if last else None
    done = (File.select().where(File.archive_name == archive, File.remote_md5sum == File.local_md5sum)
            .order_by(File.copied.desc(nulls="LAST")).first())
    stats["last_file_verified"] = done.local_path if done else None
    return stats


COUNTS = ("files", "pending", "verified", "failed", "removed", "ignored", "refused", "bytes_pending")


def assert_counts_are_full_counts(catalog: Catalog) -> None:
    now = time.time()
    for archive, limit in itertools.product(("a", "b", "nowhere"), LIMITS):
        new, old = catalog.reports.stats(archive, limit, now), old_stats(catalog, archive, limit, now)
        assert {k: new[k] for k in COUNTS} == {k: old[k] for k in COUNTS}, (archive, limit)


@pytest.fixture
def every_row(tmp_path) -> Catalog:
    """A catalog with a row for each combination of COLUMNS, written by plain SQL after watcher migrated."""
    catalog = Catalog(tmp_path / "catalog.db")
    with catalog.db.atomic():
        for n, values in enumerate(itertools.product(*COLUMNS.values())):
            catalog.db.execute_sql(INSERT, (f"/data/{n}", "a" * 32, f"{n}", 1.7e9 + n, *values))
    yield catalog
    catalog.close()


def test_the_counts_of_every_combination_of_the_columns_are_the_full_counts(every_row):
    assert_counts_are_full_counts(every_row)
    stats = every_row.reports.stats("a", 3, time.time())
    assert all(stats[k] for k in COUNTS), stats  # every state occurs: the comparison proves something


def test_the_counts_follow_updates_of_every_column_by_plain_sql(every_row):
    rows = [r for (r,) in every_row.db.execute_sql("SELECT id FROM supersync_v0")]
    combos = list(itertools.product(*COLUMNS.values()))
    rng = random.Random(12)
    shuffled = rng.sample(combos, len(combos))
    for column, values in COLUMNS.items():  # one column at a time, as socs' updates are
        with every_row.db.atomic():
            for row_id in rows:
                every_row.db.execute_sql(f'UPDATE supersync_v0 SET "{column}" = ? WHERE id = ?',
                                         (rng.choice(values), row_id))
        assert_counts_are_full_counts(every_row)
        stats = every_row.reports.stats("a", 3, 0)
        assert stats["bytes_pending"] and stats["failed"], (column, stats)  # something left to count
    with every_row.db.atomic():  # every row to another combination at once
        for row_id, values in zip(rows, shuffled):
            every_row.db.execute_sql(
                "UPDATE supersync_v0 SET " + ", ".join(f'"{c}" = ?' for c in COLUMNS) + " WHERE id = ?",
                (*values, row_id))
    assert_counts_are_full_counts(every_row)
    # the same values written again (a whole-row save), and columns the states do not read
    every_row.db.execute_sql('UPDATE supersync_v0 SET "ignore" = "ignore", copied = 1.0, deleting = 1')
    every_row.db.execute_sql("UPDATE supersync_v0 SET local_md5sum = 'b' || substr(local_md5sum, 2) WHERE id % 3 = 0")
    assert_counts_are_full_counts(every_row)


def test_the_counts_follow_deletes_and_inserts_by_plain_sql(every_row):
    every_row.db.execute_sql("DELETE FROM supersync_v0 WHERE id % 4 = 1")
    assert_counts_are_full_counts(every_row)
    every_row.db.execute_sql("INSERT INTO supersync_v0 (local_path, local_md5sum, archive_name, remote_path, "
                             '"timestamp") SELECT local_path, local_md5sum, archive_name, remote_path, '
                             '"timestamp" FROM supersync_v0 WHERE id % 4 = 2')
    assert_counts_are_full_counts(every_row)
    every_row.db.execute_sql("DELETE FROM supersync_v0")
    assert_counts_are_full_counts(every_row)
    assert every_row.reports.stats("a", 3, time.time())["files"] == 0


def test_a_catalog_is_counted_once_when_the_triggers_are_made_and_never_again(tmp_path):
    path = tmp_path / "suprsync.db"
    socs_columns = {c: v for c, v in COLUMNS.items() if c not in ("refused", "size")}
    with sqlite3.connect(path) as db:  # a socs catalog from before watcher
        for ddl in SOCS_DDL:
            db.execute(ddl)
        for n, values in enumerate(itertools.product(*socs_columns.values())):
            db.execute('INSERT INTO supersync_v0 (local_path, local_md5sum, remote_path, "timestamp", '
                       + ", ".join(f'"{c}"' for c in socs_columns) + ") VALUES (?, ?, ?, ?, "
                       + ", ".join("?" * len(socs_columns)) + ")", (f"/data/{n}", "a" * 32, f"{n}", 1.7e9 + n, *values))
    db.close()
    catalog = Catalog(path)
    assert_counts_are_full_counts(catalog)
    catalog.db.execute_sql("UPDATE watcher_counts SET files = files + 1000 "  # a writer tampers
                           "WHERE rowid = (SELECT min(rowid) FROM watcher_counts WHERE archive_name = 'a')")
    catalog.close()
    catalog = Catalog(path)  # opening it again counts nothing again: the tampered number stays
    assert catalog.reports.stats("a", 3, 0)["files"] == old_stats(catalog, "a", 3, 0)["files"] + 1000
    catalog.db.execute_sql("UPDATE supersync_v0 SET size = id * 10")
    catalog.db.execute_sql("DROP TRIGGER watcher_counts_delete")  # triggers not as this watcher makes them
    catalog.close()
    catalog = Catalog(path)  # are made again, and every row counted afresh
    assert_counts_are_full_counts(catalog)
    catalog.db.execute_sql("DELETE FROM supersync_v0 WHERE id % 2 = 0")
    assert_counts_are_full_counts(catalog)
    catalog.close()


def test_socs_own_writes_keep_the_counts(socs, tmp_path):
    """socs 0.6.4's add_file and its agent loop's copy, failure and deletion, on a catalog watcher migrated."""
    path = tmp_path / "suprsync.db"
    Catalog(path).close()
    srfm = socs.SupRsyncFilesManager(str(path))
    data = tmp_path / "data"
    data.mkdir()
    tc = int(time.time() // 1e5)
    for archive in ("a", "b"):
        for i in range(5):
            local = data / f"{archive}{i}.dat"
            local.write_bytes(f"{archive}{i}".encode())
            srfm.add_file(str(local), f"{tc}/{archive}{i}.dat", archive, deletable=i != 3)
    srfm.add_file(str(data / "gone.dat"), f"{tc}/gone.dat", "a", local_md5sum="c" * 32)  # never existed
    srfm._engine.dispose()
    catalog = Catalog(path)
    assert_counts_are_full_counts(catalog)
    for archive in ("a", "b"):
        far = tmp_path / f"far-{archive}"
        far.mkdir()
        socs_iteration(socs, path, archive, far, tmp_path / "fin", "socs-instance", max_copy_attempts=3)
        assert_counts_are_full_counts(catalog)
        socs_iteration(socs, path, archive, far, tmp_path / "fin", "socs-instance", delete_after=0,
                       max_copy_attempts=3)
        assert_counts_are_full_counts(catalog)
    stats = catalog.reports.stats("a", 3, time.time())
    assert stats["removed"] and stats["verified"] and stats["failed"] + stats["pending"] == 1, stats
    catalog.close()


# -- the other numbers: the same as before ------------------------------------------------


def same_numbers(catalog, archive, limit, now) -> bool:
    """stats as the one-pass query gave them (the holder of finalized_until
    is new since: not part of the comparison)."""
    new = catalog.reports.stats(archive, limit, now)
    new.pop("finalized_until_held_by")
    return new == old_stats(catalog, archive, limit, now)


@pytest.mark.parametrize("seed", range(6))
def test_status_gives_the_same_numbers_as_the_one_pass_query_did(tmp_path, seed):
    catalog = varied(tmp_path / "catalog.db", seed)
    now = 1.6e9 + 200_000
    for archive, limit in itertools.product(("x", "y", "z", "none"), LIMITS):
        assert same_numbers(catalog, archive, limit, now), (archive, limit)
    # and after the agent's own writes: verifications, failures, removals, retries
    rows = [r for (r,) in catalog.db.execute_sql("SELECT id FROM supersync_v0 ORDER BY random()")]
    md5 = dict(catalog.db.execute_sql("SELECT id, local_md5sum FROM supersync_v0").fetchall())
    catalog.shipping.record({i: (md5[i], md5[i]) for i in rows[:100]}, now + 1)
    catalog.shipping.record({i: (md5[i], "e" * 32) for i in rows[100:200]}, now + 2)
    catalog.File.update(removed=now).where(catalog.File.id.in_(rows[200:260])).execute()
    catalog.files.retry("x", None)
    for archive, limit in itertools.product(("x", "y", "z"), LIMITS):
        assert same_numbers(catalog, archive, limit, now), (archive, limit)
    catalog.close()


def test_of_rows_verified_at_the_same_time_the_last_verified_is_the_last_added(tmp_path):
    catalog = Catalog(tmp_path / "catalog.db")
    for name in ("first", "second", "third"):
        catalog.add_file(f"/data/{name}", name, "x", local_md5sum="a" * 32)
    catalog.db.execute_sql("UPDATE supersync_v0 SET remote_md5sum = local_md5sum, copied = 5.0")
    assert catalog.reports.stats("x", 3, 10.0)["last_file_verified"] == "/data/third"
    catalog.close()
