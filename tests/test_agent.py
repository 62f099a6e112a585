"""The agent end to end on a local destination: watch, register, copy,
verify, retain, finalize. Real watchdog observers on temporary directories,
real rsync, real SQLite; each test waits on a condition with a deadline."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import threading
import time

import pytest
import yaml

from tests import md5_audit
from tests.waiting import wait_until
from watcher.catalog import Catalog


def verified(catalog: Catalog, path) -> bool:
    rows = catalog.files.rows_for_path(str(path))
    return len(rows) == 1 and rows[0].verified


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_nested_directories_created_and_filled_at_once_are_shipped(setup, start_agent):
    far = setup.archive()
    inbox = setup.rule()
    start_agent(setup)
    paths = []
    for i in range(5):
        d = inbox / f"run{i}" / "deep" / "er"
        d.mkdir(parents=True)
        for j in range(4):
            p = d / f"f{j}.dat"
            p.write_bytes(os.urandom(1000 + j))
            paths.append(p)
    catalog = setup.catalog()
    wait_until(lambda: all(verified(catalog, p) for p in paths), timeout=20)
    for p in paths:
        assert (far / p.relative_to(inbox)).read_bytes() == p.read_bytes()


def test_a_file_written_with_pauses_shorter_than_settle_has_only_its_final_md5_recorded(setup, start_agent):
    """Promise 1, the settle rule: a writer that keeps the file open and pauses less
    than ``settle`` between chunks is not registered until it is done; the catalog
    never held another md5 for the file (a partial file registered, then shipped
    again, would leave the same end state)."""
    far = setup.archive()
    inbox = setup.rule(settle=1)
    md5_audit.install(setup.database)
    start_agent(setup)
    target = inbox / "slow.bin"
    chunks = [os.urandom(4096) for _ in range(6)]
    with open(target, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
            f.flush()
            time.sleep(0.4)  # the writer is slow on purpose
    final = b"".join(chunks)
    catalog = setup.catalog()
    wait_until(lambda: verified(catalog, target)
               and catalog.files.rows_for_path(str(target))[0].local_md5sum == md5(final), timeout=15)
    assert (far / "slow.bin").read_bytes() == final
    assert set(md5_audit.md5s_recorded(setup.database, target)) == {md5(final)}


def test_a_file_renamed_into_the_watched_tree_is_shipped(setup, start_agent, tmp_path):
    far = setup.archive()
    inbox = setup.rule(settle=30)  # only the move may complete it in time
    start_agent(setup)
    outside = tmp_path / "outside.dat"
    outside.write_bytes(b"moved in")
    os.rename(outside, inbox / "moved.dat")
    catalog = setup.catalog()
    wait_until(lambda: verified(catalog, inbox / "moved.dat"), timeout=10)
    assert (far / "moved.dat").read_bytes() == b"moved in"


def test_excluded_names_are_not_shipped_until_renamed_to_an_included_name(setup, start_agent):
    far = setup.archive()
    inbox = setup.rule(settle=30)
    start_agent(setup)
    (inbox / ".hidden").write_text("no")
    (inbox / "sub").mkdir()
    (inbox / "sub" / ".also-hidden").write_text("no")
    (inbox / "data.tmp").write_text("partial")
    os.rename(inbox / "data.tmp", inbox / "data.txt")
    (inbox / "marker.txt").write_text("done")
    catalog = setup.catalog()
    wait_until(lambda: verified(catalog, inbox / "data.txt") and verified(catalog, inbox / "marker.txt"))
    assert sorted(p.name for p in far.rglob("*") if p.is_file()) == ["data.txt", "marker.txt"]
    assert catalog.files.rows_for_path(str(inbox / ".hidden")) == []
    assert catalog.files.rows_for_path(str(inbox / "data.tmp")) == []


def test_two_rules_ship_to_two_archives(setup, start_agent):
    far_a = setup.archive("alpha")
    far_b = setup.archive("beta")
    inbox_a = setup.rule("in-a", "alpha", remote_path="a/{name}")
    inbox_b = setup.rule("in-b", "beta", remote_path="b/{parent}/{stem}{suffix}")
    start_agent(setup)
    (inbox_a / "one.txt").write_text("1")
    (inbox_b / "x").mkdir()
    (inbox_b / "x" / "two.txt").write_text("2")
    catalog = setup.catalog()
    wait_until(lambda: verified(catalog, inbox_a / "one.txt") and verified(catalog, inbox_b / "x" / "two.txt"))
    assert (far_a / "a" / "one.txt").read_text() == "1"
    assert (far_b / "b" / "x" / "two.txt").read_text() == "2"
    assert catalog.files.rows_for_path(str(inbox_a / "one.txt"))[0].archive_name == "alpha"
    assert catalog.files.rows_for_path(str(inbox_b / "x" / "two.txt"))[0].archive_name == "beta"


def test_files_added_by_another_process_are_shipped_without_a_restart(setup, start_agent, tmp_path):
    elsewhere = tmp_path / "produced"  # where producers put files: an API root
    elsewhere.mkdir()
    far = setup.archive(api_roots=[str(elsewhere)])
    setup.rule()
    start_agent(setup)
    files = []
    for i in range(3):
        p = elsewhere / f"p{i}.g3"
        p.write_bytes(os.urandom(100))
        files.append(p)
    other = Catalog(setup.database)  # as a producer would, through add_file
    for p in files:
        other.add_file(str(p), f"produced/{p.name}", "arch")
    wait_until(lambda: all(verified(other, p) for p in files), timeout=10)
    assert all((far / "produced" / p.name).read_bytes() == p.read_bytes() for p in files)


def test_retention_deletes_only_verified_deletable_files_past_their_time(setup, start_agent, tmp_path):
    far = setup.archive(delete_local_after=1)
    inbox = setup.rule("inbox")
    keep = setup.rule("keep", deletable=False)
    forever = setup.rule("forever", delete_local_after="never")
    longer = setup.rule("longer", delete_local_after="1h")
    agent = start_agent(setup)
    files = {name: d / f"{name}.dat" for name, d in
             [("inbox", inbox), ("keep", keep), ("forever", forever), ("longer", longer)]}
    for p in files.values():
        p.write_bytes(os.urandom(64))
    # A file registered by a producer but never copied (its archive row stays pending).
    unshipped = tmp_path / "unshipped.dat"
    unshipped.write_bytes(b"x")
    catalog = setup.catalog()
    # A wrong md5: its copy never verifies, so it must never be deleted.
    catalog.add_file(str(unshipped), "unshipped.dat", "arch", local_md5sum="0" * 32)
    wait_until(lambda: [r for r in catalog.files.rows_for_path(str(files["inbox"])) if (r.removed or 0) > 0],
               timeout=15, message="expired file not deleted")
    assert not files["inbox"].exists()
    assert (far / "inbox.dat").exists()
    wait_until(lambda: all(verified(catalog, files[n]) for n in ("keep", "forever", "longer")))
    for _ in range(3):  # a few more housekeeping rounds must not delete them
        agent.housekeep_once()
    for name in ("keep", "forever", "longer"):
        assert files[name].exists(), name
    assert unshipped.exists()
    assert catalog.files.rows_for_path(str(unshipped))[0].removed is None


def test_a_timecode_directory_is_finalized_exactly_once_and_again_for_a_late_file(setup, start_agent, tmp_path):
    far = setup.archive()
    inbox = setup.rule(remote_path="{timecode}/{relpath}")
    # Housekeeping runs only when the test says, so that what is finalized is known.
    agent = start_agent(setup, housekeeping_interval=3600)
    # A directory of an old timecode (complete at once), moved in whole.
    staged = tmp_path / "staged"
    obs = staged / "obs_1600000000"
    obs.mkdir(parents=True)
    for i in range(3):
        (obs / f"1600000{i:03d}_data.g3").write_bytes(os.urandom(200))
    (staged / "plots").mkdir()
    (staged / "plots" / "1600000500_p.png").write_bytes(b"png")
    os.rename(staged, inbox / "batch")
    obs = inbox / "batch" / "obs_1600000000"
    catalog = setup.catalog()

    def finalizations():
        return [r for r in catalog.reports.known_files("arch", 0) if r.remote_path.endswith("_16000_finalized.yaml")]

    wait_until(lambda: len(catalog.reports.known_files("arch", 0)) == 4
               and all(r.verified for r in catalog.reports.known_files("arch", 0)), timeout=20)
    wait_until(agent.timecodes_once, message="housekeeping while nothing waits to be registered")
    wait_until(lambda: len(finalizations()) == 1 and finalizations()[0].verified, timeout=20)
    for _ in range(3):
        agent.housekeep_once()
    assert len(finalizations()) == 1
    fin = finalizations()[0]
    summary = yaml.safe_load((far / fin.remote_path).read_text())
    assert set(summary) == {"timecode", "num_files", "subdirs", "finalized_at", "finalized_until",
                            "archive_name", "instance_id"}
    assert summary["timecode"] == 16000
    assert summary["num_files"] == 4
    assert summary["subdirs"] == ["batch"]
    assert summary["archive_name"] == "arch"
    assert summary["instance_id"] == "test-instance"
    tc_now = int(time.time() // 1e5)
    assert fin.remote_path.startswith(f"{tc_now}/suprsync/test-instance/")
    assert fin.local_path.startswith(str(setup.file_root / str(tc_now) / "test-instance"))

    # A late file reopens the directory: a newer finalization counts it.
    (obs / "1600000999_late.g3").write_bytes(b"late")
    wait_until(lambda: verified(catalog, obs / "1600000999_late.g3"), timeout=20)
    wait_until(agent.timecodes_once, message="housekeeping while nothing waits to be registered")
    wait_until(lambda: len(finalizations()) == 2 and all(r.verified for r in finalizations()), timeout=20)
    newest = max(finalizations(), key=lambda r: r.id)
    assert yaml.safe_load((far / newest.remote_path).read_text())["num_files"] == 5
    tcdir = [t for t in catalog.TimecodeDir.select() if t.timecode == 16000 and t.archive_name == "arch"]
    assert len(tcdir) == 1 and tcdir[0].finalized and tcdir[0].finalize_file_id == newest.id


def test_the_agent_stops_cleanly_on_sigterm_and_exits_zero(setup, tmp_path):
    import signal
    import subprocess
    import sys

    setup.archive()
    inbox = setup.rule()
    config = setup.write()
    proc = subprocess.Popen([sys.executable, "-m", "watcher.cli", "run", "--config", str(config)],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: setup.database.exists(), timeout=10)
        (inbox / "f.txt").write_text("x")
        catalog = Catalog(setup.database)
        wait_until(lambda: verified(catalog, inbox / "f.txt"), timeout=15)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in proc.stderr.read()


def _inotify_instances() -> int:
    fds = "/proc/self/fd"
    return sum(1 for fd in os.listdir(fds) if _readlink(f"{fds}/{fd}") == "anon_inode:inotify")


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def test_a_rule_that_asks_for_polling_ships_without_inotify(setup, start_agent):
    far = setup.archive()
    inbox = setup.rule(poll=True)
    before = _inotify_instances()
    start_agent(setup)
    assert _inotify_instances() == before
    (inbox / "nfs.dat").write_bytes(b"polled")
    catalog = setup.catalog()
    wait_until(lambda: verified(catalog, inbox / "nfs.dat"), timeout=15)
    assert (far / "nfs.dat").read_bytes() == b"polled"


def _refuse_deletion(path) -> None:
    """Make unlinking ``path`` (or creating it) fail, for root too (which ignores directory modes)."""
    path.parent.chmod(0o555)
    target = path if path.exists() else path.parent
    if os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(target)], capture_output=True).returncode:
        path.parent.chmod(0o755)
        pytest.skip("this file system cannot refuse root a deletion (no chattr +i)")


def _allow_deletion(path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path if path.exists() else path.parent)], capture_output=True)
    path.parent.chmod(0o755)


def test_a_file_that_cannot_be_deleted_is_reported_once_and_left(setup, start_agent, caplog):
    setup.archive(delete_local_after=0.5)
    inbox = setup.rule()
    (inbox / "locked").mkdir()
    keep, goes = inbox / "locked" / "keep.dat", inbox / "goes.dat"
    keep.write_bytes(b"k")
    goes.write_bytes(b"g")
    agent = start_agent(setup)
    catalog = setup.catalog()
    wait_until(lambda: verified(catalog, keep))
    _refuse_deletion(keep)
    try:
        with caplog.at_level(logging.ERROR, logger="watcher.retention"):
            wait_until(lambda: not goes.exists(), timeout=15)
            for _ in range(3):
                agent.housekeep_once()
        assert keep.exists()
        assert catalog.files.rows_for_path(str(keep))[0].removed is None
        assert len([r for r in caplog.records if "cannot delete" in r.getMessage()]) == 1
    finally:
        _allow_deletion(keep)


def test_a_second_file_under_a_taken_far_name_is_not_registered_and_stays(setup, start_agent, caplog):
    far = setup.archive(delete_local_after=0.5)
    inbox = setup.rule(remote_path="{name}")  # a template that can collide
    start_agent(setup)
    (inbox / "a").mkdir()
    (inbox / "b").mkdir()
    first, second = inbox / "a" / "same.dat", inbox / "b" / "same.dat"
    first.write_bytes(b"first")
    catalog = setup.catalog()
    wait_until(lambda: catalog.files.rows_for_path(str(first)))
    with caplog.at_level(logging.WARNING):
        second.write_bytes(b"second")
        wait_until(lambda: any("already taken" in r.getMessage() for r in caplog.records))
    wait_until(lambda: not first.exists())  # shipped, verified, past retention: deleted
    assert (far / "same.dat").read_bytes() == b"first"
    assert second.read_bytes() == b"second"
    assert catalog.files.rows_for_path(str(second)) == []


def test_one_registration_batch_keeps_the_first_file_of_a_far_name_and_skips_a_fifo(setup, caplog):
    from watcher.handlers import SettleTracker
    from watcher.registrar import Registrar

    setup.archive()
    inbox = setup.rule(remote_path="{name}")  # a template that can collide
    (inbox / "a").mkdir()
    (inbox / "b").mkdir()
    first, second, fifo = inbox / "a" / "same.dat", inbox / "b" / "same.dat", inbox / "pipe.dat"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    os.mkfifo(fifo)  # reading it would block the registrar for good
    catalog = setup.catalog()
    registrar = Registrar(catalog, setup.config(), SettleTracker(lambda path: None),
                          lambda archives: None, threading.Event())
    with caplog.at_level(logging.WARNING, logger="watcher.registrar"):
        assert registrar.register([str(first), str(second), str(fifo)]) == 1
    [row] = catalog.files.rows_for_path(str(first))
    assert row.remote_path == "same.dat"
    assert catalog.files.rows_for_path(str(second)) == [] and catalog.files.rows_for_path(str(fifo)) == []
    assert any(f"already taken by {first}" in r.getMessage() for r in caplog.records)


def test_a_file_under_nested_watched_directories_is_registered_once(setup, start_agent):
    setup.archive()
    setup.rule("data")
    inner = setup.rule("data/inner")  # the start-up scan walks both roots: it meets the file twice
    path = inner / "x.dat"
    path.write_bytes(b"once")
    start_agent(setup)
    catalog = setup.catalog()
    wait_until(lambda: [r.verified for r in catalog.files.rows_for_path(str(path))] == [True],
               message="x.dat shipped")
    assert len(catalog.files.rows_for_path(str(path))) == 1


def test_a_second_agent_on_the_same_catalog_refuses_to_start(setup, start_agent):
    import sys
    setup.archive()
    setup.rule()
    start_agent(setup)
    proc = subprocess.run([sys.executable, "-m", "watcher.cli", "run", "--config", str(setup.write())],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("watcher: another watcher agent (pid ")
    assert "Traceback" not in proc.stderr


class _Pauses(list):
    """A worker's back-off pauses, recorded instead of slept. A step goes on
    after a batch of which nothing arrived (the retry policy's result), so
    ``look()``, when set, is asked at each pause: its answers are ``seen``."""

    def __init__(self):
        super().__init__()
        self.look = None
        self.seen = []

    def __call__(self, seconds: float) -> None:
        self.append(seconds)
        if self.look is not None:
            self.seen.append(self.look())


def _worker_with_pending(setup, tmp_path, files: dict[str, int], files_per_batch: int = 4):
    """A local archive and a rule; ``files`` ({remote path: size}) written under
    tmp_path/src (the archive's API root) and registered, oldest first; a
    transfer worker whose back-off pauses are recorded instead of slept (_Pauses).
    Returns (far, catalog, worker, pauses)."""
    from watcher.roots import Roots
    from watcher.rsync import Destination
    from watcher.transfer import TransferWorker

    src = tmp_path / "src"
    src.mkdir()
    far = setup.archive(files_per_batch=files_per_batch, api_roots=[str(src)])
    far.mkdir()
    setup.rule()
    config = setup.config()
    catalog = setup.catalog()
    for i, (remote, size) in enumerate(files.items()):
        p = src / os.path.basename(remote)
        p.write_bytes(os.urandom(size))
        catalog.add_file(str(p), remote, "arch", timestamp=1000.0 + i)
    pauses = _Pauses()
    roots = Roots(config)
    worker = TransferWorker(catalog, config.archives["arch"],
                            Destination(config.archives["arch"], None, roots.of("arch")),
                            threading.Event(), sleep=pauses, roots=roots)
    return far, catalog, worker, pauses


def _attempts(catalog) -> dict[str, int]:
    return {os.path.basename(r.local_path): r.failed_copy_attempts for r in catalog.reports.known_files("arch", 0)}


def test_a_batch_of_which_nothing_arrives_blames_the_archive_and_charges_no_file(setup, tmp_path):
    far, catalog, worker, pauses = _worker_with_pending(
        setup, tmp_path, {f"d/f{i}.dat": 100 for i in range(4)})
    pauses.look = lambda: sorted(_attempts(catalog).values())
    _refuse_deletion(far / "x")  # the archive's base directory takes no new entry
    try:
        assert worker.step()
        assert pauses == [1.0, 2.0]
        assert pauses.seen == [[0, 0, 0, 0]] * 2  # two batches (4, then 2 files) charged nothing
        # then a batch of one, the file's own: charged
        assert sorted(r.failed_copy_attempts for r in catalog.reports.known_files("arch", 0)) == [0, 0, 0, 1]
    finally:
        _allow_deletion(far / "x")
    def everything_shipped():  # room again; the charged file waits its 1 s after a mismatch
        worker.step()
        return all(r.verified for r in catalog.reports.known_files("arch", 0))

    wait_until(everything_shipped, timeout=10)
    assert worker._batch_size == 4


def _big_files_worker(setup, tmp_path, monkeypatch):
    """Two files pending, each above a lowered BATCH_BYTES."""
    import watcher.transfer

    monkeypatch.setattr(watcher.transfer, "BATCH_BYTES", 1000)
    return _worker_with_pending(setup, tmp_path, {"d/big0.dat": 2000, "d/big1.dat": 2000})


def test_a_big_file_alone_in_its_batch_is_tried_with_the_next_before_the_archive_is_blamed(
        setup, tmp_path, monkeypatch):
    far, catalog, worker, pauses = _big_files_worker(setup, tmp_path, monkeypatch)
    _refuse_deletion(far / "x")  # the archive's base directory takes no new entry
    try:
        assert worker.step()  # big0 alone (the byte cap): nothing charged, tried again at once
        assert _attempts(catalog) == {"big0.dat": 0, "big1.dat": 0} and pauses == []
        pauses.look = lambda: _attempts(catalog)
        assert worker.step()  # with big1: nothing arrives, the archive is blamed
        assert pauses == [1.0] and pauses.seen == [{"big0.dat": 0, "big1.dat": 0}]
        # then a batch of one, the file's own: charged
        assert _attempts(catalog) == {"big0.dat": 1, "big1.dat": 0}
    finally:
        _allow_deletion(far / "x")


def test_a_big_file_that_fails_alone_while_the_next_arrives_is_charged_without_a_pause(
        setup, tmp_path, monkeypatch):
    far, catalog, worker, pauses = _big_files_worker(setup, tmp_path, monkeypatch)
    (far / "d" / "big0.dat").mkdir(parents=True)  # a directory in the way of big0 only
    (far / "d" / "big0.dat" / "keep").write_bytes(b"")
    assert worker.step()  # big0 alone: not charged yet
    assert _attempts(catalog) == {"big0.dat": 0, "big1.dat": 0}
    assert worker.step()  # with big1, which arrives: big0's failure is its own
    assert _attempts(catalog) == {"big0.dat": 1, "big1.dat": 0}
    assert [r.verified for r in catalog.reports.known_files("arch", 0)] == [False, True]
    assert pauses == []


def test_the_running_worker_also_tries_a_failed_big_file_with_the_next_before_blaming_the_archive(
        setup, tmp_path, monkeypatch):
    far, catalog, worker, pauses = _big_files_worker(setup, tmp_path, monkeypatch)
    _refuse_deletion(far / "x")
    try:
        for _ in range(20):  # run()'s steps: a batch is copied while the one before is checked
            worker._pipelined_step()
            if any(_attempts(catalog).values()):
                break
        # Blamed once both failed together; the first charge is then the
        # oldest file's, alone in a batch of one.
        assert pauses == [1.0]
        assert _attempts(catalog) == {"big0.dat": 1, "big1.dat": 0}
    finally:
        _allow_deletion(far / "x")
        if worker._checker is not None:
            worker._checker.shutdown(wait=True)


def test_a_batch_stops_growing_at_batch_bytes_yet_always_holds_one_file(setup, tmp_path, monkeypatch):
    import watcher.transfer

    monkeypatch.setattr(watcher.transfer, "BATCH_BYTES", 150_000)
    _, catalog, worker, _ = _worker_with_pending(
        setup, tmp_path, {"f0.dat": 400_000, "f1.dat": 100_000, "f2.dat": 100_000, "f3.dat": 100_000},
        files_per_batch=100)
    verified = []
    while worker.step():
        verified.append(sum(r.verified for r in catalog.reports.known_files("arch", 0)))
    # The big file alone, then two small ones (200,000 bytes reach the cap), then the last.
    assert verified == [1, 3, 4]


def test_a_batch_missing_locally_save_a_row_held_back_is_not_marked_gone_at_once(setup, tmp_path):
    _, catalog, worker, pauses = _worker_with_pending(setup, tmp_path, {"x.dat": 1, "y.dat": 1})
    # Another writer (socs) gave x.dat's far name to a second row: the batch holds it back.
    catalog.db.execute_sql(
        "INSERT INTO supersync_v0 (local_path, local_md5sum, archive_name, remote_path, timestamp) "
        "VALUES (?, ?, 'arch', 'x.dat', 1)", (str(tmp_path / "src" / "x2.dat"), "1" * 32))
    for name in ("x.dat", "y.dat"):
        (tmp_path / "src" / name).unlink()
    pauses.look = lambda: [r.removed for r in catalog.reports.known_files("arch", 0)]
    assert worker.step()  # every file handed to rsync is gone: an unmounted disk, not deleted data
    assert pauses == [1.0] and pauses.seen == [[None] * 3]


def test_a_whole_batch_missing_locally_is_not_marked_gone_at_once(setup, tmp_path):
    _, catalog, worker, pauses = _worker_with_pending(setup, tmp_path, {f"m{i}.dat": 1 for i in range(4)})
    for i in range(4):  # registered, then their disk "goes away"
        (tmp_path / "src" / f"m{i}.dat").unlink()
    pauses.look = lambda: [r.removed for r in catalog.reports.known_files("arch", 0)]
    assert worker.step()  # 4, then 2 missing: an unmounted disk, not deleted data
    assert pauses.seen == [[None] * 4] * 2
    # then a batch of one is marked as before
    assert sorted(r.removed is not None for r in catalog.reports.known_files("arch", 0)) == [False] * 3 + [True]
    assert worker.step()  # and the next whole batch waits longer: the trouble goes on
    assert pauses == [1.0, 2.0, 4.0]
