"""Retention (watcher/retention.py) in a running agent: a local file is
deleted only when verified, deletable and past its time, and one that
cannot be deleted is left, held back rather than tried every round."""

from __future__ import annotations

import os

from tests.catalog_rows import verified_once
from tests.undeletable import allow_deletion, refuse_deletion
from tests.waiting import wait_until


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
    wait_until(lambda: all(verified_once(catalog, files[n]) for n in ("keep", "forever", "longer")))
    for _ in range(3):  # a few more housekeeping rounds must not delete them
        agent.housekeep_once()
    for name in ("keep", "forever", "longer"):
        assert files[name].exists(), name
    assert unshipped.exists()
    assert catalog.files.rows_for_path(str(unshipped))[0].removed is None


def test_a_file_that_cannot_be_deleted_is_reported_once_and_left(setup, start_agent):
    setup.archive(delete_local_after=0.5)
    inbox = setup.rule()
    (inbox / "locked").mkdir()
    keep, goes = inbox / "locked" / "keep.dat", inbox / "goes.dat"
    keep.write_bytes(b"k")
    goes.write_bytes(b"g")
    agent = start_agent(setup)
    catalog = setup.catalog()
    wait_until(lambda: verified_once(catalog, keep))
    refuse_deletion(keep)
    try:
        wait_until(lambda: not goes.exists(), timeout=15)
        for _ in range(3):
            agent.housekeep_once()
        assert keep.exists()
        assert catalog.files.rows_for_path(str(keep))[0].removed is None
    finally:
        allow_deletion(keep)
    # Held back after its failure, not tried (and reported) again each round:
    # it stays even now that it could be deleted.
    for _ in range(3):
        agent.housekeep_once()
    assert keep.exists()
    assert catalog.files.rows_for_path(str(keep))[0].removed is None


def _shipped_by_a_producer(setup, tmp_path, count: int):
    """``count`` files registered as socs' producers do (an md5, no seal: retention
    hashes each before deleting it), shipped; returns (catalog, config, destination)."""
    import threading

    from watcher.roots import Roots
    from watcher.rsync import Destination
    from watcher.transfer import TransferWorker

    src = tmp_path / "src"
    src.mkdir()
    far = setup.archive(api_roots=[str(src)], delete_local_after=60)
    far.mkdir()
    setup.rule()
    config, catalog = setup.config(), setup.catalog()
    for i in range(count):
        p = src / f"f{i}.dat"
        p.write_bytes(os.urandom(1000))
        catalog.add_file(str(p), f"f{i}.dat", "arch", timestamp=1000.0 + i)
    roots = Roots(config)
    destination = Destination(config.archives["arch"], None, roots.of("arch"))
    worker = TransferWorker(catalog, config.archives["arch"], destination, threading.Event(),
                            sleep=lambda s: None, roots=roots)
    while worker.step():
        pass
    assert all(r.verified and r.seal is None for r in catalog.reports.known_files("arch", 0))
    return catalog, config, destination


def test_a_long_retention_round_shows_the_watchdog_it_is_working(setup, tmp_path, monkeypatch):
    """A round that hashes many producers' files (each hashed before it may be
    deleted) takes longer than the retention thread's allowance: it shows
    progress per file (and per 64 MiB read), so a healthy agent is not
    restarted by systemd. The hashing is slowed to 0.3 s a file, as a 60 MB
    file at 200 MB/s."""
    import threading
    import time

    import watcher.retention
    from watcher import service
    from watcher.retention import delete_expired

    catalog, config, destination = _shipped_by_a_producer(setup, tmp_path, 8)
    real = watcher.retention.md5_of_fd

    def slow(fd, progress=None):
        time.sleep(0.3)
        return real(fd, progress)

    monkeypatch.setattr(watcher.retention, "md5_of_fd", slow)
    hearts = service.Heartbeats(margin=0.0)
    stop = service.ProgressEvent(hearts)
    hearts.register("watcher-retention", 1.0)  # the round takes 2.4 s in all
    stalls = []
    round_ = threading.Thread(target=lambda: delete_expired(catalog, config, "arch", destination, stop=stop,
                                                            now=time.time() + 400 * 86400),
                              name="watcher-retention")
    round_.start()
    while round_.is_alive():
        stalls.append(hearts.stalled())
        time.sleep(0.1)
    assert not any(stalls), [s for s in stalls if s][:1]
    assert not any((tmp_path / "src" / f"f{i}.dat").exists() for i in range(8)), "the round deleted them"


def test_a_retention_round_keeps_the_rows_of_files_whose_directory_went_away(setup, tmp_path):
    """An unmounted disk at retention time: its files' rows stay (not marked
    removed, so they are deleted once the disk is back), counted as
    unreachable; a file gone from a directory that is there is removed."""
    import time

    from watcher.health import Health, read_health
    from watcher.retention import delete_expired

    catalog, config, destination = _shipped_by_a_producer(setup, tmp_path, 3)
    src = tmp_path / "src"
    (src / "run").mkdir()
    for i in (0, 1):
        os.rename(src / f"f{i}.dat", src / "run" / f"f{i}.dat")
        catalog.db.execute_sql("UPDATE supersync_v0 SET local_path = ? WHERE remote_path = ?",
                               (str(src / "run" / f"f{i}.dat"), f"f{i}.dat"))
    os.rename(src / "run", tmp_path / "unmounted")
    (src / "f2.dat").unlink()
    health = Health(setup.database, ["arch"])
    try:
        delete_expired(catalog, config, "arch", destination, health=health, now=time.time() + 400 * 86400)
        removed = {r.remote_path: r.removed is not None for r in catalog.reports.known_files("arch", 0)}
        assert removed == {"f0.dat": False, "f1.dat": False, "f2.dat": True}, removed
        assert read_health(setup.database)["problems"]["arch"]["unreachable files"]["count"] == 2
    finally:
        health.close()
