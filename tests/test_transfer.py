"""The transfer worker (watcher/transfer.py) step by step on a local
archive: how batches are sized, and who is blamed (the archive or a file)
when a batch does not arrive. Back-off pauses are recorded, not slept."""

from __future__ import annotations

import os
import threading

from tests.undeletable import allow_deletion, refuse_deletion
from tests.waiting import wait_until


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
    refuse_deletion(far / "x")  # the archive's base directory takes no new entry
    try:
        assert worker.step()
        assert pauses == [1.0, 2.0]
        assert pauses.seen == [[0, 0, 0, 0]] * 2  # two batches (4, then 2 files) charged nothing
        # then a batch of one, the file's own: charged
        assert sorted(r.failed_copy_attempts for r in catalog.reports.known_files("arch", 0)) == [0, 0, 0, 1]
    finally:
        allow_deletion(far / "x")
    def everything_shipped():  # room again; the charged file waits its 1 s after a mismatch
        worker.step()
        return all(r.verified for r in catalog.reports.known_files("arch", 0))

    wait_until(everything_shipped, timeout=10)
    assert worker._batch_size == 4


def test_a_stop_during_the_wait_after_nothing_arrived_takes_no_further_batch(setup, tmp_path):
    """The agent stopping while the worker waits out an archive in trouble:
    the step ends there, as it did before the retry policy took the wait
    over (no rows fetched, claimed or sent after the stop)."""
    far, catalog, worker, pauses = _worker_with_pending(
        setup, tmp_path, {f"d/f{i}.dat": 100 for i in range(4)})
    pauses.look = worker.stop.set  # the stop comes during the first wait
    fetched = []
    fetch = worker._fetch
    worker._fetch = lambda *a: fetched.append(1) or fetch(*a)
    refuse_deletion(far / "x")
    try:
        assert worker.step()
        assert pauses == [1.0] and len(fetched) == 1, (pauses, fetched)
        assert sorted(_attempts(catalog).values()) == [0, 0, 0, 0]
    finally:
        allow_deletion(far / "x")


def _big_files_worker(setup, tmp_path, monkeypatch):
    """Two files pending, each above a lowered BATCH_BYTES."""
    import watcher.transfer

    monkeypatch.setattr(watcher.transfer, "BATCH_BYTES", 1000)
    return _worker_with_pending(setup, tmp_path, {"d/big0.dat": 2000, "d/big1.dat": 2000})


def test_a_big_file_alone_in_its_batch_is_tried_with_the_next_before_the_archive_is_blamed(
        setup, tmp_path, monkeypatch):
    far, catalog, worker, pauses = _big_files_worker(setup, tmp_path, monkeypatch)
    refuse_deletion(far / "x")  # the archive's base directory takes no new entry
    try:
        assert worker.step()  # big0 alone (the byte cap): nothing charged, tried again at once
        assert _attempts(catalog) == {"big0.dat": 0, "big1.dat": 0} and pauses == []
        pauses.look = lambda: _attempts(catalog)
        assert worker.step()  # with big1: nothing arrives, the archive is blamed
        assert pauses == [1.0] and pauses.seen == [{"big0.dat": 0, "big1.dat": 0}]
        # then a batch of one, the file's own: charged
        assert _attempts(catalog) == {"big0.dat": 1, "big1.dat": 0}
    finally:
        allow_deletion(far / "x")


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
    refuse_deletion(far / "x")
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
        allow_deletion(far / "x")
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


def test_files_whose_directory_went_away_are_kept_not_marked_removed(setup, tmp_path):
    """A disk not mounted takes whole directories away: files registered
    through the API (which no scan finds again) must stay pending, counted
    as unreachable, and ship once the directory is back. A file gone from a
    directory that is there is gone for good, as before."""
    far, catalog, worker, pauses = _worker_with_pending(
        setup, tmp_path, {f"run/f{i}.dat": 100 for i in range(1)} | {"solo.dat": 100}, files_per_batch=1)
    src = tmp_path / "src"
    run = src / "run"
    run.mkdir()
    os.rename(src / "f0.dat", run / "f0.dat")
    catalog.db.execute_sql("UPDATE supersync_v0 SET local_path = ? WHERE remote_path = 'run/f0.dat'",
                           (str(run / "f0.dat"),))
    away = tmp_path / "unmounted"
    os.rename(run, away)  # the directory is not there for now
    (src / "solo.dat").unlink()  # gone from a directory that is there
    for _ in range(4):
        worker.step()
    rows = {r.remote_path: r for r in catalog.reports.known_files("arch", 0)}
    assert rows["run/f0.dat"].removed is None, "a file of a missing directory was marked removed"
    assert rows["solo.dat"].removed is not None
    os.rename(away, run)  # mounted again
    later = worker._clock() + 61  # its wait (a minute) is over
    worker._clock = lambda: later
    wait_until(lambda: worker.step() is not None and catalog.files.rows_for_path(str(run / "f0.dat"))[0].verified,
               timeout=10)
