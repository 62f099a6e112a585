"""A drop-in for socs' SupRsync: its catalog, its API, its writers.

The catalog tests work on a copy of tests/fixtures/socs_suprsync_v0.db (from shared/fixtures), written by
socs 0.6.4 itself (see that directory's README for what each row is). The last ones run socs 0.6.4's
own code (tests/real_socs.py; they skip, saying what to install, without it) against watcher's:
the same answers, its producers' writes, its far modes, and its agent loop after watcher (rollback)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.catalog_rows import rows as catalog_rows, verified
from tests.real_socs import socs_iteration
from tests.ssh_support import ssh_archive
from tests.waiting import wait_until
from watcher import suprsync as watcher_suprsync
from watcher.agent import Agent
from watcher.catalog.schema import from_db_path
from watcher.config import Archive
from watcher.db import Catalog, SupRsyncFilesManager, create_file
from watcher.rsync import far_dir_mode

# A copy of shared/fixtures (see tests/fixtures/README.md), so a clone tests on its own.
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "socs_suprsync_v0.db"

SOCS_TABLES = ("supersync_v0", "timecode_dirs_v0")
SOCS_FILE_COLUMNS = ("id", "local_path", "local_md5sum", "archive_name", "remote_path", "timestamp",
                     "remote_md5sum", "copied", "removed", "failed_copy_attempts", "deletable", "ignore")
SOCS_TCDIR_COLUMNS = ("id", "timecode", "archive_name", "completed", "synced", "finalized", "finalize_file_id")

# Row ids in the fixture (its README lists them).
TS_PENDING = {24, 25, 26, 27}       # timestreams 16752, never copied
TS_MISSING = 11                     # timestreams, local file never existed, 4 failed attempts
TS_IGNORED = 10
TS_REMOVED = 1
SMURF_PENDING = {28, 29, 30}        # smurf 16752, never copied
SMURF_SPACE = 19                    # smurf, a space in the name, 2 failed attempts
SMURF_MISSING = 21                  # smurf, local file never existed, 4 failed attempts
SMURF_KEEP = 20                     # smurf, deletable = 0
FINALIZE_FILE = 23                  # the finalization file socs registered for timestreams 16750
YEAR = 365 * 86400


@pytest.fixture
def socs_db(tmp_path) -> Path:
    """A writable copy of the fixture (socs and watcher switch it to WAL, which needs the directory)."""
    path = tmp_path / "suprsync.db"
    shutil.copyfile(FIXTURE, path)
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return path


@pytest.fixture
def srfm(socs_db):
    manager = SupRsyncFilesManager(str(socs_db))
    yield manager
    manager.catalog.close()


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(path), isolation_level=None)


def table_info(path: Path, table: str) -> list[tuple]:
    with raw(path) as db:
        return list(db.execute(f"PRAGMA table_info({table})"))


def contents(path: Path, table: str, columns: tuple[str, ...]) -> list[tuple]:
    cols = ", ".join(f'"{c}"' for c in columns)
    with raw(path) as db:
        return list(db.execute(f"SELECT {cols} FROM {table} ORDER BY id"))


def ids(rows) -> set[int]:
    return {r.id for r in rows}


# -- the catalog file --------------------------------------------------------------------


def test_opening_a_socs_catalog_keeps_every_column_and_only_adds(socs_db):
    before = {t: table_info(socs_db, t) for t in SOCS_TABLES}
    Catalog(socs_db).close()
    for table in SOCS_TABLES:
        after = table_info(socs_db, table)
        # (cid, name, type, notnull, default, pk): socs' columns first, unchanged
        assert after[:len(before[table])] == before[table]
        for added in after[len(before[table]):]:
            assert added[3] == 0, f"{table}.{added[1]} must be nullable so socs can still insert"
    assert [c[1] for c in before["supersync_v0"]] == list(SOCS_FILE_COLUMNS)


def test_opening_a_socs_catalog_changes_no_row_and_adds_only_watcher_objects(socs_db):
    with raw(socs_db) as db:
        objects_before = set(db.execute("SELECT type, name FROM sqlite_master"))
    files = contents(socs_db, "supersync_v0", SOCS_FILE_COLUMNS)
    tcdirs = contents(socs_db, "timecode_dirs_v0", SOCS_TCDIR_COLUMNS)
    assert len(files) == 30 and len(tcdirs) == 7
    catalog = Catalog(socs_db)
    catalog.timecode_dirs.derive()  # what the agent does first on every cycle
    catalog.close()
    assert contents(socs_db, "supersync_v0", SOCS_FILE_COLUMNS) == files
    assert contents(socs_db, "timecode_dirs_v0", SOCS_TCDIR_COLUMNS) == tcdirs
    with raw(socs_db) as db:
        objects_after = set(db.execute("SELECT type, name FROM sqlite_master"))
    assert objects_before <= objects_after
    added = objects_after - objects_before
    assert added and all(name.startswith(("watcher_", "sqlite_autoindex_watcher_")) for _kind, name in added), added
    assert {kind for kind, _name in added} <= {"index", "table", "trigger"}  # triggers: watcher_counts


def test_socs_can_keep_inserting_with_its_own_columns_after_watcher_migrated(socs_db, tmp_path):
    Catalog(socs_db).close()
    # What SQLAlchemy sends for socs' create_file + add_file (Python-side defaults filled in),
    # and for its _add_file_tcdir: socs' columns only, nothing of watcher's.
    with raw(socs_db) as db:
        db.execute("BEGIN")
        db.execute(
            "INSERT INTO supersync_v0 (local_path, local_md5sum, archive_name, remote_path, timestamp, "
            "remote_md5sum, copied, removed, failed_copy_attempts, deletable, \"ignore\") "
            "VALUES (?, ?, ?, ?, ?, NULL, NULL, NULL, 0, 1, 0)",
            (str(tmp_path / "new.g3"), "a" * 32, "timestreams", "16753/obs/new.g3", 1675300000.0))
        db.execute("INSERT INTO timecode_dirs_v0 (timecode, archive_name, completed, synced, finalized, "
                   "finalize_file_id) VALUES (16753, 'timestreams', 0, 0, 0, NULL)")
        db.execute("COMMIT")
    catalog = Catalog(socs_db)
    try:
        pending = catalog.shipping.pending("timestreams", 100, 10)
        new = [r for r in pending if r.remote_path == "16753/obs/new.g3"]
        assert len(new) == 1 and new[0].size is None
        assert catalog.File.get_by_id(new[0].id).retain is None
        catalog.timecode_dirs.derive()
        assert catalog.TimecodeDir.select().where(catalog.TimecodeDir.timecode == 16753).count() == 1
    finally:
        catalog.close()


# -- SupRsyncFilesManager, with socs' meaning ---------------------------------------------------


def test_copyable_files_are_the_unverified_not_removed_not_ignored_ones_below_the_attempt_limit(srfm):
    assert ids(srfm.get_copyable_files("timestreams")) == TS_PENDING | {TS_MISSING}
    assert ids(srfm.get_copyable_files("timestreams", max_copy_attempts=4)) == TS_PENDING
    assert ids(srfm.get_copyable_files("smurf")) == SMURF_PENDING | {SMURF_SPACE, SMURF_MISSING}
    assert ids(srfm.get_copyable_files("smurf", max_copy_attempts=3)) == SMURF_PENDING | {SMURF_SPACE}
    assert ids(srfm.get_copyable_files("smurf", max_copy_attempts=2)) == SMURF_PENDING
    assert len(srfm.get_copyable_files("smurf", num_files=2)) == 2
    assert srfm.get_copyable_files("no-such-archive") == []


def test_a_removed_file_is_not_copyable_even_when_its_far_copy_differs(srfm, socs_db):
    with raw(socs_db) as db:
        db.execute("UPDATE supersync_v0 SET remote_md5sum = NULL WHERE id = ?", (TS_REMOVED,))
    assert TS_REMOVED not in ids(srfm.get_copyable_files("timestreams"))


def test_an_ignored_file_is_not_copyable_until_it_is_no_longer_ignored(srfm, socs_db):
    assert TS_IGNORED not in ids(srfm.get_copyable_files("timestreams"))
    with raw(socs_db) as db:
        db.execute('UPDATE supersync_v0 SET "ignore" = 0 WHERE id = ?', (TS_IGNORED,))
    assert TS_IGNORED in ids(srfm.get_copyable_files("timestreams"))


def test_deletable_files_are_verified_deletable_not_removed_and_old_enough(srfm):
    assert ids(srfm.get_deletable_files("timestreams", YEAR)) == {2, 3, 4, 5, 6, 7, 8, 9, 12, 13}
    assert ids(srfm.get_deletable_files("smurf", YEAR)) == {14, 15, 16, 17, 18, 22}
    # the finalization file was registered at generation time: young, until delete_after is 0
    assert FINALIZE_FILE in ids(srfm.get_deletable_files("timestreams", 0))
    assert SMURF_KEEP not in ids(srfm.get_deletable_files("smurf", 0))


def test_known_files_are_every_row_of_an_archive_after_a_time_oldest_first(srfm):
    assert len(srfm.get_known_files("timestreams")) == 18
    assert len(srfm.get_known_files("smurf")) == 12
    later = srfm.get_known_files("timestreams", min_ctime=1675100000)
    assert ids(later) == {6, 7, 8, 9, 10, 11, 23, 24, 25, 26, 27}
    assert [r.timestamp for r in later] == sorted(r.timestamp for r in later)


def test_finalized_until_is_just_before_the_oldest_unverified_file_not_ignored(srfm):
    assert srfm.get_finalized_until("timestreams") == 1675105600.0 - 1  # the missing file
    assert srfm.get_finalized_until("smurf") == 1675103100.0 - 1        # the file with a space


def test_archive_stats_match_what_socs_reports(srfm):
    assert srfm.get_archive_stats("timestreams") == {
        "finalized_until": 1675105599.0,
        "num_files": 18,
        "uncopied_files": 5,  # 4 never copied + the missing one; not the ignored one
        "last_file_added": "/data/so/suprsync_files/17958/timestream-sync/1795840304_timestreams_16750_finalized.yaml",
        "last_file_copied": "/data/so/suprsync_files/17958/timestream-sync/1795840304_timestreams_16750_finalized.yaml",
    }
    assert srfm.get_archive_stats("smurf") == {
        "finalized_until": 1675103099.0,
        "num_files": 12,
        "uncopied_files": 5,
        "last_file_added": "/data/so/data/smurf/16752/crate1slot2/1675200002_bias.txt",
        "last_file_copied": "/data/so/data/smurf/16751/crate1slot2/1675100200_iv.npy",
    }


def test_an_ignored_file_that_was_verified_is_not_counted_as_uncopied(srfm, socs_db):
    with raw(socs_db) as db:
        db.execute('UPDATE supersync_v0 SET "ignore" = 1 WHERE id = 2')
    assert srfm.get_archive_stats("timestreams")["uncopied_files"] == 5


def test_rows_a_method_returned_into_a_session_are_saved_when_it_commits(srfm):
    # SupRsyncFileHandler.copy_files' pattern: change the rows, let the session commit them.
    with srfm.Session.begin() as session:
        files = srfm.get_copyable_files("smurf", session=session, max_copy_attempts=3)
        for f in files:
            f.failed_copy_attempts += 1
            f.copied = 1800000000.0
    attempts = {r.id: r.failed_copy_attempts for r in srfm.get_known_files("smurf")}
    assert attempts[SMURF_SPACE] == 3 and all(attempts[i] == 1 for i in SMURF_PENDING)
    assert attempts[SMURF_MISSING] == 4  # not returned (over the limit), not touched


def test_add_file_registers_a_file_and_its_timecode_dir(srfm, tmp_path):
    local = tmp_path / "1675300000_tune.npy"
    local.write_bytes(b"tune")
    row = srfm.add_file(str(local), "16753/crate1slot2/1675300000_tune.npy", "smurf")
    assert row.local_md5sum == hashlib.md5(b"tune").hexdigest()
    assert ids(srfm.get_copyable_files("smurf")) >= {row.id}
    srfm.create_all_timecode_dirs("smurf")
    TC = srfm.catalog.TimecodeDir
    assert TC.select().where(TC.archive_name == "smurf", TC.timecode == 16753).count() == 1


def test_files_inserted_in_bulk_like_pysmurf_monitor_get_timecode_dirs_without_add_file(srfm, tmp_path):
    files = []
    for i in range(3):
        local = tmp_path / f"1675400{i:03d}_x.dat"
        local.write_bytes(b"x" * i)
        files.append(create_file(str(local), f"16754/crate1slot2/{local.name}", "smurf",
                                 timestamp=1675400000.0 + i))
    files.append(create_file(str(tmp_path / "other"), "16755/crate1slot2/other", "timestreams",
                             local_md5sum="b" * 32, deletable=False))
    with srfm.Session.begin() as s:
        s.add_all(files)
    assert all(f.id is not None for f in files)
    TC = srfm.catalog.TimecodeDir
    assert TC.select().where(TC.timecode.in_([16754, 16755])).count() == 0  # no add_file ran
    known = {r.remote_path: r for r in srfm.get_known_files("smurf", min_ctime=1675399999)}
    assert set(known) == {f"16754/crate1slot2/{f.local_path.rsplit('/', 1)[1]}" for f in files[:3]}
    assert known["16754/crate1slot2/1675400002_x.dat"].local_md5sum == hashlib.md5(b"xx").hexdigest()
    srfm.create_all_timecode_dirs("smurf")
    found = {(t.archive_name, t.timecode) for t in TC.select()}
    assert {("smurf", 16754), ("timestreams", 16755)} <= found
    assert len(found) == 9  # the fixture's 7 and these two; none twice


def test_timecode_dirs_are_derived_by_the_agents_step_from_rows_whoever_wrote_them(socs_db, tmp_path):
    srfm = SupRsyncFilesManager(str(socs_db))
    with srfm.Session.begin() as s:
        s.add(create_file(str(tmp_path / "z"), "16756/z", "smurf", local_md5sum="c" * 32))
    srfm.catalog.close()
    catalog = Catalog(socs_db)  # a different process's view: the agent
    try:
        catalog.timecode_dirs.derive()
        TC = catalog.TimecodeDir
        assert TC.select().where(TC.archive_name == "smurf", TC.timecode == 16756).count() == 1
        assert catalog.timecode_dirs.derive() == 0  # nothing new: nothing walked
    finally:
        catalog.close()


def test_update_all_timecode_dirs_finalizes_only_complete_synced_dirs_of_that_archive(srfm, tmp_path):
    file_root = tmp_path / "suprsync_files"
    srfm.update_all_timecode_dirs("smurf", str(file_root), "smurf-sync")
    TC = srfm.catalog.TimecodeDir
    state = {(t.archive_name, t.timecode): (t.completed, t.synced, t.finalized) for t in TC.select()}
    # smurf 16750 is all verified; 16751 waits for two files; 16752 was never copied
    assert state[("smurf", 16750)] == (True, True, True)
    assert state[("smurf", 16751)][2] is False and state[("smurf", 16752)][2] is False
    # socs' finalization of timestreams 16750 stands; that archive was not asked about
    assert state[("timestreams", 16750)] == (True, True, True)
    assert TC.get(TC.archive_name == "timestreams", TC.timecode == 16750).finalize_file_id == FINALIZE_FILE
    [written] = list(file_root.rglob("*_finalized.yaml"))
    assert written.name.endswith("_smurf_16750_finalized.yaml")
    assert written.parent.name == "smurf-sync"
    summary = yaml.safe_load(written.read_text())
    assert {k: summary[k] for k in ("timecode", "num_files", "subdirs", "archive_name", "instance_id")} == {
        "timecode": 16750, "num_files": 4, "subdirs": ["crate1slot2"], "archive_name": "smurf",
        "instance_id": "smurf-sync"}
    row = srfm.catalog.File.get(srfm.catalog.File.local_path == str(written))
    assert row.archive_name == "smurf"
    assert row.remote_path == f"{int(time.time() // 1e5)}/suprsync/smurf-sync/{written.name}"
    srfm.update_all_timecode_dirs("smurf", str(file_root), "smurf-sync")
    assert len(list(file_root.rglob("*_finalized.yaml"))) == 1  # finalized once


# -- the agent on a socs catalog ---------------------------------------------------------


def recreate_local_files(db: Path, root: Path, row_ids: set[int]) -> dict[int, bytes]:
    """Move the fixture's /data/so/ prefix under ``root`` (as its README says) and write the
    files of ``row_ids`` there. The generator's file contents are not kept, so each file gets
    new content and its row the md5 of it, as socs' add_file would have recorded."""
    written = {}
    with raw(db) as conn:
        conn.execute("BEGIN")
        conn.execute("UPDATE supersync_v0 SET local_path = ? || substr(local_path, length('/data/so/') + 1) "
                     "WHERE local_path LIKE '/data/so/%'", (f"{root}/",))
        for file_id, local in conn.execute(
                f"SELECT id, local_path FROM supersync_v0 WHERE id IN ({','.join('?' * len(row_ids))})",
                sorted(row_ids)).fetchall():
            content = f"row {file_id}: {local}\n".encode() * (file_id + 1)
            Path(local).parent.mkdir(parents=True, exist_ok=True)
            Path(local).write_bytes(content)
            conn.execute("UPDATE supersync_v0 SET local_md5sum = ? WHERE id = ?",
                         (hashlib.md5(content).hexdigest(), file_id))
            written[file_id] = content
        conn.execute("COMMIT")
    return written


def test_the_agent_ships_the_pending_rows_of_a_socs_catalog_whose_files_exist(setup, start_agent, socs_db, tmp_path):
    shippable = TS_PENDING | SMURF_PENDING | {SMURF_SPACE}
    content = recreate_local_files(socs_db, tmp_path / "so", shippable | {TS_IGNORED})
    verified_before = contents(socs_db, "supersync_v0", ("id", "remote_md5sum", "copied"))
    setup.database = socs_db
    # socs producers register files under their data directories: the archives' API roots
    far = {name: setup.archive(name, api_roots=[str(tmp_path / "so" / "data" / name)])
           for name in ("timestreams", "smurf")}
    agent = start_agent(setup)
    catalog = agent.catalog
    F = catalog.File

    def shipped():
        rows = list(F.select().where(F.id.in_(sorted(shippable))))
        return all(r.remote_md5sum == r.local_md5sum for r in rows) and rows

    rows = wait_until(shipped, timeout=30, message="the socs catalog's pending rows to be verified")
    for row in rows:
        assert (far[row.archive_name] / row.remote_path).read_bytes() == content[row.id]
    assert (far["smurf"] / "16751/crate1slot3/1675100400_plot final.png").exists()
    # rows whose files never existed: in a directory that is there, found gone
    # (holding nothing up); in one that is not (it may be a disk not mounted),
    # kept, counted as unreachable, until the operator says they are gone for good
    from watcher.health import read_health
    missing = {i: F.get_by_id(i).local_path for i in (TS_MISSING, SMURF_MISSING)}
    away = [p for p in missing.values() if not Path(p).parent.is_dir()]
    assert away and len(away) < len(missing), "the fixture has one of each"

    def settled():
        unreachable = sum((read_health(socs_db) or {}).get("problems", {}).get(a, {})
                          .get("unreachable files", {}).get("count", 0) for a in ("timestreams", "smurf"))
        return unreachable == len(away) and all(
            F.get_by_id(i).removed == (None if p in away else 0) for i, p in missing.items())

    wait_until(settled, message="the missing files to be found gone, or kept as unreachable")
    catalog.files.ignore(away)
    # the ignored row is not shipped; verified rows are not shipped again
    assert not (far["timestreams"] / F.get_by_id(TS_IGNORED).remote_path).exists()
    assert not (far["timestreams"] / "16750").exists()
    after = {r[0]: r[1:] for r in contents(socs_db, "supersync_v0", ("id", "remote_md5sum", "copied"))}
    for file_id, remote_md5, copied in verified_before:
        if file_id not in shippable | {TS_MISSING, SMURF_MISSING}:
            assert after[file_id] == (remote_md5, copied), file_id
    # now every old timecode dir is whole and finalized once; socs' own finalization stands
    TC = catalog.TimecodeDir

    def old_dirs_finalized():
        old = list(TC.select().where(TC.timecode < 17000))
        return all(t.finalized for t in old) and old

    wait_until(old_dirs_finalized, timeout=20, message="the fixture's timecode dirs to be finalized")
    assert TC.get(TC.archive_name == "timestreams", TC.timecode == 16750).finalize_file_id == FINALIZE_FILE
    assert F.select().where(F.remote_path.endswith("_timestreams_16750_finalized.yaml")).count() == 1


# -- against socs 0.6.4's own code (tests/real_socs.py) ---------------------------------


def test_socs_and_watcher_give_the_same_answers_on_the_same_catalog(socs, socs_db):
    Catalog(socs_db).close()  # a catalog watcher has opened (migrated)
    theirs, ours = socs.SupRsyncFilesManager(str(socs_db)), SupRsyncFilesManager(str(socs_db))

    def socs_ids(method, *args, **kwargs) -> list[int]:
        with theirs.Session() as session:  # its rows are read while their session lives
            return [r.id for r in getattr(theirs, method)(*args, session=session, **kwargs)]

    try:
        for archive in ("timestreams", "smurf", "no-such-archive"):
            for attempts in (None, 0, 1, 3, 4, 5):
                assert (ids(ours.get_copyable_files(archive, max_copy_attempts=attempts))
                        == set(socs_ids("get_copyable_files", archive, max_copy_attempts=attempts))), (archive, attempts)
            for after in (0, YEAR):
                assert (ids(ours.get_deletable_files(archive, after))
                        == set(socs_ids("get_deletable_files", archive, after))), (archive, after)
            for since in (None, 1675100000):
                assert ([r.id for r in ours.get_known_files(archive, min_ctime=since)]
                        == socs_ids("get_known_files", archive, min_ctime=since))
            mine, socs_stats = ours.get_archive_stats(archive), theirs.get_archive_stats(archive)
            if archive == "no-such-archive":  # "now" for both, a moment apart
                assert abs(mine.pop("finalized_until") - socs_stats.pop("finalized_until")) < 60
            assert mine == socs_stats
    finally:
        ours.catalog.close()
        theirs._engine.dispose()


def test_session_add_all_inserts_two_files_of_one_far_name_as_socs_does_and_the_later_waits(
        socs, tmp_path, catalog, make_worker):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.dat").write_bytes(b"first")
    (src / "b.dat").write_bytes(b"second")

    def monitor_batch(module, db):  # the pysmurf monitor's write, through `module`'s API
        srfm = module.SupRsyncFilesManager(str(db))
        files = [module.create_file(str(src / n), "16800/x.dat", "arch", timestamp=1680000000.0 + i)
                 for i, n in enumerate(("a.dat", "b.dat"))]
        with srfm.Session.begin() as s:
            s.add_all(files)
        return srfm

    socs_db = tmp_path / "socs.db"
    monitor_batch(socs, socs_db)._engine.dispose()
    monitor_batch(watcher_suprsync, catalog.path).catalog.close()
    cols = ("local_path", "remote_path", "archive_name", "local_md5sum", "timestamp", "deletable")
    assert contents(catalog.path, "supersync_v0", ("id", *cols)) == contents(socs_db, "supersync_v0", ("id", *cols))
    # the agent ships the first row under the name; the later one waits for it
    far = tmp_path / "far"
    worker = make_worker(Archive(name="arch", remote_basedir=str(far)))
    assert worker.step() is True
    first, second = catalog.reports.known_files("arch", 0)
    assert first.verified and not second.verified and second.failed_copy_attempts == 0
    assert (far / "16800" / "x.dat").read_bytes() == b"first"


def test_add_file_writes_its_timecode_dir_row_at_once_and_never_a_second(socs, socs_db, tmp_path):
    ours = SupRsyncFilesManager(str(socs_db))
    theirs = socs.SupRsyncFilesManager(str(socs_db))
    TC = ours.catalog.TimecodeDir

    def dirs(timecode: int) -> list[tuple[str, int]]:
        return [(t.archive_name, t.timecode) for t in TC.select().where(TC.timecode == timecode)]

    try:
        ours.catalog.timecode_dirs.derive()
        for name in ("a", "b", "c", "d"):
            (tmp_path / name).write_bytes(name.encode())
        # in the catalog with the file, before any derivation, as socs' add_file does
        ours.add_file(str(tmp_path / "a"), "16801/c1/a", "smurf")
        assert dirs(16801) == [("smurf", 16801)]
        theirs.add_file(str(tmp_path / "b"), "16801/c1/b", "smurf")  # socs' one_or_none finds it
        theirs.add_file(str(tmp_path / "c"), "16803/c1/c", "smurf")
        ours.add_file(str(tmp_path / "d"), "16803/c1/d", "smurf")    # and watcher finds socs' row
        ours.catalog.timecode_dirs.derive()
        theirs.create_all_timecode_dirs("smurf")  # would raise MultipleResultsFound on a second row
        assert dirs(16801) == [("smurf", 16801)] and dirs(16803) == [("smurf", 16803)]
    finally:
        ours.catalog.close()
        theirs._engine.dispose()


def _tree_modes(base: Path) -> dict[str, int]:
    return {str(p.relative_to(base)): p.stat().st_mode & 0o7777 for p in sorted(base.rglob("*"))}


@pytest.mark.parametrize("where", ["local", "ssh"])
def test_far_directories_and_files_get_the_modes_socs_gave_them(
        socs, where, request, tmp_path, catalog, make_worker):
    src = tmp_path / "src"
    files = {"16802/c1/a.dat": b"a", "16802/c2/deep/b.dat": b"b"}
    for remote, data in files.items():
        (src / remote).parent.mkdir(parents=True, exist_ok=True)
        (src / remote).write_bytes(data)
        catalog.add_file(str(src / remote), remote, "arch")
    (src / "16802" / "c1" / "a.dat").chmod(0o600)
    # socs' own agent, with its default chmod, on a local archive
    socs_db, socs_far = tmp_path / "socs.db", tmp_path / "socs-far"
    srfm = socs.SupRsyncFilesManager(str(socs_db))
    for remote in files:
        srfm.add_file(str(src / remote), remote, "arch")
    socs.SupRsyncFileHandler(srfm, "arch", str(socs_far), cmd_timeout=5, copy_timeout=20,
                             chmod="g+rwX,o+rX").copy_files()
    srfm._engine.dispose()
    if where == "ssh":
        sshd = request.getfixturevalue("sshd")
        far = request.getfixturevalue("remote_dir") / "base"
        archive = ssh_archive(sshd, far)
    else:
        far = tmp_path / "far"
        archive = Archive(name="arch", remote_basedir=str(far))
    assert archive.chmod == "g+rwX,o+rX"  # socs' default is the default
    assert make_worker(archive).step() is True
    assert all(r.verified for r in catalog.reports.known_files("arch", 0))
    assert _tree_modes(far) == _tree_modes(socs_far)
    assert _tree_modes(far)["16802/c2/deep"] == 0o775


@pytest.mark.parametrize("chmod", ["g+rwX,o+rX", "go-w", "750", "Fu=rw,Dg+w", "o=g,g-w", "Dg=u,o-rwx"])
def test_far_directory_modes_are_what_rsync_gives_a_directory_it_sends_with_that_chmod(chmod, tmp_path):
    (tmp_path / "src" / "d").mkdir(parents=True)
    (tmp_path / "src" / "d").chmod(0o755)
    subprocess.run(["rsync", "-r", "--perms", f"--chmod={chmod}", f"{tmp_path / 'src'}/", f"{tmp_path / 'dst'}/"],
                   check=True)
    assert far_dir_mode(chmod) == (tmp_path / "dst" / "d").stat().st_mode & 0o7777
    assert far_dir_mode(None) is None


def test_socs_own_agent_loop_survives_a_catalog_watcher_ran_on_and_watcher_takes_it_back(
        socs, setup, start_agent, tmp_path):
    """Rollback: socs 0.6.4's agent loop on a catalog watcher has run on, with
    non-UTF-8 names shipped, pending, and stored as BLOBs by an older watcher."""
    tc = int(time.time() // 1e5) - 3
    far = setup.archive("arch")
    inbox = setup.rule(remote_path="{relpath}")
    shipped = {f"{tc}/ok.dat".encode(): b"ok", f"{tc}/bad".encode() + b"\xff.dat": b"bad",
               f"{tc}/dir".encode() + b"\xfe/deep.dat": b"deep"}
    for rel, data in shipped.items():
        path = os.path.join(os.fsencode(inbox), rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    agent = Agent(setup.config(), housekeeping_interval=0.2)
    agent.start()
    try:
        TC = agent.catalog.TimecodeDir
        wait_until(lambda: all(r.verified for r in agent.catalog.reports.known_files("arch", 0))
                   and TC.get_or_none(TC.timecode == tc, TC.finalized == True),  # noqa: E712
                   timeout=30, message="watcher to ship the files and finalize their directory")
    finally:
        agent.stop()
    # pending rows, and one an older watcher wrote with its paths as BLOBs
    late = {f"{tc + 1}/late.dat".encode(): b"late", f"{tc + 1}/late".encode() + b"\xff.dat": b"late bad"}
    old = (f"{tc + 1}/old".encode() + b"\xfd.dat", b"old bad")
    os.mkdir(os.path.join(os.fsencode(inbox), str(tc + 1).encode()))
    for rel, data in [*late.items(), old]:
        with open(os.path.join(os.fsencode(inbox), rel), "wb") as f:
            f.write(data)
    catalog = setup.catalog()
    for rel in late:
        catalog.add_file(os.fsdecode(os.path.join(os.fsencode(inbox), rel)), os.fsdecode(rel), "arch")
    catalog.close()
    with raw(setup.database) as db:
        db.execute("INSERT INTO supersync_v0 (local_path, local_md5sum, archive_name, remote_path, timestamp, "
                   "failed_copy_attempts, deletable, \"ignore\") VALUES (?, ?, 'arch', ?, ?, 0, 1, 0)",
                   (os.path.join(os.fsencode(inbox), old[0]), hashlib.md5(old[1]).hexdigest(), old[0], time.time()))
    Catalog(setup.database).close()  # watcher opens it: the BLOB paths become text
    with raw(setup.database) as db:
        assert {t for (t,) in db.execute("SELECT DISTINCT typeof(local_path) || typeof(remote_path) "
                                         "FROM supersync_v0")} == {"texttext"}

    # socs' own loop: it ships what it can name, charges the rest, and never fails
    args = (socs, setup.database, "arch", far, tmp_path / "socs-finalization", "socs-instance")
    socs_iteration(*args)
    rows = {os.fsencode(from_db_path(r["local_path"])): r for r in catalog_rows(setup.database)}
    by_rel = {rel: rows[os.path.join(os.fsencode(inbox), rel)] for rel in [*shipped, *late, old[0]]}
    assert verified(by_rel[f"{tc + 1}/late.dat".encode()])
    for rel in (f"{tc + 1}/late".encode() + b"\xff.dat", old[0]):
        # socs charges a file it cannot find twice a copy (not found, then no far md5)
        assert by_rel[rel]["failed_copy_attempts"] == 2 and by_rel[rel]["remote_md5sum"] is None
    for rel in shipped:
        assert verified(by_rel[rel]) and by_rel[rel]["failed_copy_attempts"] == 0
    socs_iteration(*args, delete_after=0)  # socs deletes what it can name, never a file it cannot
    for rel in (*shipped, *late, old[0]):
        assert os.path.exists(os.path.join(os.fsencode(inbox), rel)) == (not rel.isascii()), rel
    rows = {os.fsencode(from_db_path(r["local_path"])): r for r in catalog_rows(setup.database)}
    assert rows[os.path.join(os.fsencode(inbox), f"{tc}/bad".encode() + b"\xff.dat")]["removed"] == 0

    # back to watcher: it ships the pending non-UTF-8 files byte-exact, and its
    # start-up scan registers again the files whose rows socs marked removed
    agent = start_agent(setup)
    for rel, data in (*late.items(), old):
        wait_until(lambda: os.path.isfile(os.path.join(os.fsencode(far), rel)), timeout=30,
                   message=f"watcher to ship {rel!r}")
        with open(os.path.join(os.fsencode(far), rel), "rb") as f:
            assert f.read() == data
    for rel in shipped:
        if not rel.isascii():
            path = os.fsdecode(os.path.join(os.fsencode(inbox), rel))
            wait_until(lambda: [r.verified for r in agent.catalog.files.rows_for_path(path)
                                if r.removed is None] == [True], timeout=30,
                       message=f"{rel!r} registered again and verified")


def test_socs_producers_feed_two_agents_one_per_archive_whose_finalization_files_carry_their_ids(
        socs, tmp_path, start_agent):
    """An SO site after the switch: socs' own producer code (the smurf
    streamer's add_file, the pysmurf monitor's create_file + Session.add_all)
    writes one suprsync.db that watcher@timestreams and watcher@smurf serve,
    each with its own instance id; the finalization files each ships say
    their id, archive and subdirs, as sotodlib reads them."""
    from tests.shared_catalog import one_archive_each

    ids = {"timestreams": "timestream-sync-srv20", "smurf": "smurf-sync-srv20"}
    deployments = one_archive_each(tmp_path, ids)
    data = {}
    for archive, (s, _far, _inbox) in deployments.items():
        data[archive] = tmp_path / "data" / archive
        data[archive].mkdir(parents=True)
        s.archives[archive]["api_roots"] = [str(data[archive])]
    agents = {a: start_agent(s, housekeeping_interval=3600) for a, (s, _far, _inbox) in deployments.items()}
    db = str(tmp_path / "state" / "catalog.db")

    streamed = data["timestreams"] / "1600000100_000.g3"
    streamed.write_bytes(b"frames")
    srfm = socs.SupRsyncFilesManager(db)
    srfm.add_file(str(streamed), "16000/obs_1600000000/1600000100_000.g3", "timestreams")
    monitored = []
    for name in ("1600000200_tune.npy", "1600000300_iv.npy"):
        p = data["smurf"] / name
        p.write_bytes(name.encode())
        monitored.append(socs.create_file(str(p), f"16000/outputs/{name}", "smurf"))
    with srfm.Session.begin() as session:
        session.add_all(monitored)
    srfm._engine.dispose()

    catalog = Catalog(db)
    for archive, count in (("timestreams", 1), ("smurf", 2)):
        wait_until(lambda: [r.verified for r in catalog.reports.known_files(archive, 0)] == [True] * count,
                   timeout=30, message=f"{archive}'s files shipped by its own agent")
    for archive, agent in agents.items():
        wait_until(agent.timecodes_once, message="housekeeping while nothing waits to be registered")
    expected = {"timestreams": ["obs_1600000000"], "smurf": ["outputs"]}
    for archive, (_s, far, _inbox) in deployments.items():
        pattern = f"*/suprsync/{ids[archive]}/*_{archive}_16000_finalized.yaml"
        wait_until(lambda: list(far.glob(pattern)), timeout=30, message=f"{archive}'s finalization file")
        [shipped] = far.glob(pattern)
        summary = yaml.safe_load(shipped.read_text())
        assert (summary["instance_id"], summary["archive_name"], summary["timecode"], summary["subdirs"]) == \
            (ids[archive], archive, 16000, expected[archive])
        assert len(list(far.rglob("*_finalized.yaml"))) == 1
    catalog.close()
