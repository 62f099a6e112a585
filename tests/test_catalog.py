"""The catalog's per-cycle queries use indexes and cost in proportion to the
batch, not the table: checked on the SQL peewee generates (EXPLAIN QUERY PLAN)
and by counting SQLite virtual-machine steps on a 200,000-row catalog."""

from __future__ import annotations

import sqlite3
import time

import pytest

from watcher.catalog import Catalog
from watcher.catalog.files import _active_rows_sql
from watcher.catalog.reports import LAST_VERIFIED_SQL
from watcher.catalog.schema import SOCS_DDL
from watcher.catalog.shipping import PENDING_SQL

ROWS = 200_000
PENDING = (7, 50_000, 123_456, 150_001, 199_999)  # row numbers never copied
FAILED = (1_000, 60_000)                          # copied wrong, attempts exhausted
IGNORED = 3_000
PER_DIR = 20_000                                  # rows per timecode directory
BASE_TS = 1_600_000_000.0
MAX_ATTEMPTS = 10


def _rows():
    for i in range(ROWS):
        md5 = f"{i:032x}"
        waiting = i in PENDING or i == IGNORED
        far = None if waiting else ("f" * 32 if i in FAILED else md5)
        yield (f"/data/big/{i}.dat", md5, "big", f"{16000 + i // PER_DIR}/f{i}.dat", BASE_TS + i,
               far, None if far is None else BASE_TS + ROWS, None, MAX_ATTEMPTS if i in FAILED else 0,
               1, 1 if i == IGNORED else 0)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Catalog:
    """A socs catalog of 200,000 rows of one archive, all verified but a few, opened by watcher."""
    path = tmp_path_factory.mktemp("big") / "catalog.db"
    with sqlite3.connect(path) as db:
        for ddl in SOCS_DDL:
            db.execute(ddl)
        db.executemany(
            "INSERT INTO supersync_v0 (local_path, local_md5sum, archive_name, remote_path, timestamp, "
            'remote_md5sum, copied, removed, failed_copy_attempts, deletable, "ignore") '
            "VALUES (?,?,?,?,?,?,?,?,?,?,?)", _rows())
    db.close()
    catalog = Catalog(path)  # adds watcher's columns and builds its indexes
    yield catalog
    catalog.close()


def vm_steps(catalog: Catalog, work) -> tuple[object, int]:
    """Run ``work`` and count (in hundreds) the SQLite VM instructions it took."""
    conn = catalog.db.connection()
    ticks = 0

    def tick():
        nonlocal ticks
        ticks += 1
        return 0

    conn.set_progress_handler(tick, 100)
    try:
        result = work()
    finally:
        conn.set_progress_handler(None, 0)
    return result, ticks


@pytest.fixture(scope="module")
def full_scan(big) -> int:
    """What one pass over the table costs, for scale."""
    _, steps = vm_steps(big, lambda: big.db.execute_sql(
        "SELECT count(*) FROM supersync_v0 WHERE local_md5sum = 'nothing'").fetchall())
    assert steps > 1000, steps  # the table is big enough for the comparisons below to mean something
    return steps


class PlainSql:
    """A query the catalog runs as plain SQL, shaped like a peewee query for plan_of."""

    def __init__(self, sql: str, params: list):
        self._sql, self._params = sql, params

    def sql(self) -> tuple[str, list]:
        return self._sql, self._params


def plan_of(catalog: Catalog, query) -> list[str]:
    sql, params = query.sql()
    return [row[3] for row in catalog.db.execute_sql("EXPLAIN QUERY PLAN " + sql, params)]


def assert_uses_index(plan: list[str], index: str, sorted_by_index: bool = True) -> None:
    assert any(f"USING INDEX {index}" in step or f"USING COVERING INDEX {index}" in step
               for step in plan), plan
    assert not [step for step in plan if step.startswith("SCAN") and "INDEX" not in step], plan
    if sorted_by_index:  # a LIMIT that stops early needs rows already in order
        assert not [step for step in plan if "TEMP B-TREE" in step], plan


# -- plans --------------------------------------------------------------------------------


def test_the_next_batch_walks_the_index_of_unverified_files_in_order(big):
    """The very text the transfer worker runs, every cycle."""
    assert_uses_index(plan_of(big, PlainSql(PENDING_SQL, ["big", MAX_ATTEMPTS, 1000])), "watcher_pending")


def test_files_past_retention_are_found_through_the_index_of_deletable_files(big):
    for default, index in ((3600.0, "watcher_deletable"), (None, "watcher_deletable_by_rule")):
        query = big.removals.deletable_query("big", time.time(), default, 3600.0, 500)
        assert_uses_index(plan_of(big, query), index)


def test_finalized_until_reads_the_first_entry_of_the_pending_index(big):
    assert_uses_index(plan_of(big, big.reports.finalized_until_query("big")), "watcher_pending")


def test_a_timecode_dirs_unverified_files_are_found_through_an_index(big):
    assert_uses_index(plan_of(big, big.timecode_dirs.unverified_query("big", 16002)), "watcher_unverified_path")


def test_a_status_finds_the_last_file_added_and_verified_at_an_end_of_an_index(big):
    assert_uses_index(plan_of(big, big.reports.last_added_query("big")), "watcher_archive_rows")
    assert_uses_index(plan_of(big, PlainSql(LAST_VERIFIED_SQL, ["big"])), "watcher_verified_copied")


def test_registered_paths_are_looked_up_by_the_local_path_index(big):
    plan = plan_of(big, PlainSql(_active_rows_sql(2), ["/data/big/1.dat", "/data/big/2.dat"]))
    assert_uses_index(plan, "watcher_local_path", sorted_by_index=False)


# -- costs on 200,000 rows ------------------------------------------------------------------


def test_the_next_batch_of_a_mostly_verified_catalog_costs_almost_nothing(big, full_scan):
    rows, steps = vm_steps(big, lambda: big.shipping.pending("big", 1000, MAX_ATTEMPTS))
    assert [int(r.local_path.rsplit("/", 1)[1].split(".")[0]) for r in rows] == list(PENDING)
    assert steps * 100 < full_scan, (steps, full_scan)
    found, steps = vm_steps(big, lambda: bool(big.shipping.pending("big", 1, MAX_ATTEMPTS)))
    assert found and steps * 100 < full_scan


def test_finalized_until_costs_almost_nothing(big, full_scan):
    until, steps = vm_steps(big, lambda: big.reports.finalized_until("big", time.time()))
    # the oldest file not yet verified (row 7) holds it back
    assert until == BASE_TS + 7 - 1
    assert steps * 100 < full_scan, (steps, full_scan)


def test_a_status_costs_almost_nothing(big, full_scan):
    stats, steps = vm_steps(big, lambda: big.reports.stats("big", MAX_ATTEMPTS, time.time()))
    assert (stats["files"], stats["pending"], stats["failed"], stats["ignored"]) == (ROWS, len(PENDING), len(FAILED), 1)
    assert stats["last_file_added"] == f"/data/big/{ROWS - 1}.dat"
    assert stats["last_file_verified"] == f"/data/big/{ROWS - 2}.dat"  # copied at once: the last added (not pending)
    assert steps * 100 < full_scan, (steps, full_scan)


def test_deleting_costs_in_proportion_to_the_batch(big, full_scan):
    now = BASE_TS + ROWS + 10 * 86400
    small, small_steps = vm_steps(big, lambda: big.removals.deletable("big", now, 3600.0, 3600.0, 50))
    large, large_steps = vm_steps(big, lambda: big.removals.deletable("big", now, 3600.0, 3600.0, 500))
    assert (len(small), len(large)) == (50, 500)
    assert large_steps * 10 < full_scan, (large_steps, full_scan)
    assert small_steps * 4 < large_steps, (small_steps, large_steps)


def test_a_timecode_dirs_check_costs_nothing_however_many_files_it_holds(big, full_scan):
    expected = {16000 + i // PER_DIR for i in (*PENDING, *FAILED)}
    for timecode in range(16000, 16000 + ROWS // PER_DIR):
        waiting, steps = vm_steps(big, lambda: big.timecode_dirs.has_unverified("big", timecode))
        assert waiting == (timecode in expected), timecode
        assert steps * 100 < full_scan, (timecode, steps, full_scan)


def test_looking_up_registered_paths_costs_in_proportion_to_the_paths(big, full_scan):
    paths = [f"/data/big/{i}.dat" for i in range(0, ROWS, ROWS // 500)]
    found, steps = vm_steps(big, lambda: big.files.active_rows(paths))
    assert len(found) == 500
    assert steps * 10 < full_scan, (steps, full_scan)


def test_looking_up_far_names_costs_in_proportion_to_the_names(big, full_scan):
    """Not a walk of a status index (watcher_archive_rows) in id order over the archive's rows."""
    names = [f"{16000 + i // PER_DIR}/f{i}.dat" for i in range(0, ROWS, ROWS // 500)]
    claims, steps = vm_steps(big, lambda: big.far_names._holders("big", names))
    assert len(claims[0]) == 500
    assert steps * 10 < full_scan, (steps, full_scan)


def test_deriving_timecode_dirs_walks_only_rows_added_since_the_last_time(big, full_scan):
    statements = []
    big.db.connection().set_trace_callback(statements.append)
    try:
        assert big.timecode_dirs.derive() == ROWS  # the first time: every row, once
    finally:
        big.db.connection().set_trace_callback(None)
    # a few statements per chunk of rows, not one per row
    assert len(statements) < ROWS / 1000, len(statements)
    assert big.TimecodeDir.select().count() == ROWS // PER_DIR
    walked, steps = vm_steps(big, big.timecode_dirs.derive)
    assert walked == 0 and steps * 100 < full_scan, steps
    late = big.add_file("/data/big/late.dat", "16009/late.dat", "big", local_md5sum="e" * 32)
    try:
        assert big.timecode_dirs.derive() == 1
    finally:
        big.File.delete().where(big.File.id == late.id).execute()


def test_registering_many_files_commits_them_in_one_transaction(tmp_path):
    from watcher.catalog import NewFile

    catalog = Catalog(tmp_path / "c.db")
    try:
        files = [NewFile(f"/x/{i}", f"16000/{i}", "a", "0" * 32, float(i)) for i in range(500)]
        commits = []
        catalog.db.connection().set_trace_callback(
            lambda sql: commits.append(sql) if sql.strip().upper().startswith("COMMIT") else None)
        catalog.add_files(files)
        catalog.db.connection().set_trace_callback(None)
        assert len(commits) == 1, commits
        assert catalog.File.select().count() == 500
    finally:
        catalog.close()


def test_a_catalog_file_in_a_new_directory_is_created_with_socs_tables(tmp_path):
    path = tmp_path / "new" / "deeper" / "catalog.db"
    Catalog(path).close()
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"supersync_v0", "timecode_dirs_v0"} <= tables
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
