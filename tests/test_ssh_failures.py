"""How shipping over ssh fails, and what each failure costs: a lost server
backs off without charging the files, a bad file is charged alone, a far copy
that is not what was sent is never trusted, stalls and slow commands are
abandoned and retried, and hopeless files stop after max_copy_attempts.

Real sshd, real rsync; failures are made real too (a stopped server, a
root-owned far directory, a full tmpfs, a stopped sshd session, a FIFO that
blocks md5sum).
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

import pytest

from tests.sshd import _process_tree
from tests.ssh_support import Sleeps, api_roots_config, md5, register, row, ssh_archive, unwritable_far_dir
from tests.waiting import wait_until
from watcher.config import Config
from watcher.health import read_health
from watcher.retention import delete_expired
from watcher.rsync import TransferError

HOUR = 3600.0


def config_for(archive, tmp_path) -> Config:
    return api_roots_config(archive, tmp_path)  # files are registered below tmp_path/src


def test_a_stopped_server_makes_the_worker_back_off_without_charging_and_recover_when_it_returns(
        sshd, remote_dir, tmp_path, catalog, make_worker):
    archive = ssh_archive(sshd, remote_dir)
    src = tmp_path / "src"
    seen_during_outage = []

    def during_outage(n: int) -> None:
        seen_during_outage.append(read_health(catalog.path)["archives"]["arch"])
        if n == 4:
            sshd.start()

    sleeps = Sleeps(during_outage)
    worker = make_worker(archive, sleep=sleeps, max_backoff=2)
    register(catalog, "arch", {"before.dat": b"before"}, src)
    assert worker.step() is True  # the shared connection is up
    ids = register(catalog, "arch", {"b.dat": b"b" * 1000, "sub/c.dat": b"c"}, src)

    sshd.stop()
    assert worker.step() is True

    assert len(sleeps.delays) == 4
    assert sleeps.delays == sorted(sleeps.delays) and sleeps.delays[0] < sleeps.delays[-1] <= 2
    for state in seen_during_outage:
        assert state["degraded"] is True
        assert "rsync exited" in state["last_error"]
    assert read_health(catalog.path)["archives"]["arch"] == \
        {"degraded": False, "last_error": None, "since": None}
    for remote, file_id in ids.items():
        r = row(catalog, file_id)
        assert r.verified and r.failed_copy_attempts == 0, remote
    assert (remote_dir / "sub" / "c.dat").read_bytes() == b"c"


def test_a_far_directory_the_ssh_user_cannot_write_charges_only_its_file(
        sshd, remote_dir, tmp_path, catalog, make_worker):
    unwritable_far_dir(sshd, remote_dir / "locked")
    archive = ssh_archive(sshd, remote_dir)
    ids = register(catalog, "arch", {"a.dat": b"a", "locked/x.dat": b"x", "z/b.dat": b"b"},
                   tmp_path / "src")

    assert make_worker(archive).step() is True

    assert row(catalog, ids["a.dat"]).verified
    assert row(catalog, ids["z/b.dat"]).verified
    assert row(catalog, ids["a.dat"]).failed_copy_attempts == 0
    assert row(catalog, ids["z/b.dat"]).failed_copy_attempts == 0
    locked = row(catalog, ids["locked/x.dat"])
    assert not locked.verified and locked.failed_copy_attempts == 1
    assert not (remote_dir / "locked" / "x.dat").exists()


def test_a_far_copy_that_differs_stays_pending_and_its_local_file_is_never_deleted(
        sshd, remote_dir, tmp_path, catalog, make_worker, destinations):
    # A stale far copy rsync cannot replace: its directory is not writable.
    stale = remote_dir / "stale"
    stale.mkdir()
    (stale / "f.dat").write_bytes(b"old and wrong")
    unwritable_far_dir(sshd, stale)
    archive = ssh_archive(sshd, remote_dir, delete_local_after=60)
    src = tmp_path / "src"
    ids = register(catalog, "arch", {"stale/f.dat": b"new and right", "ok.dat": b"ok"}, src,
                   timestamp=time.time() - HOUR)
    worker = make_worker(archive)

    assert worker.step() is True

    r = row(catalog, ids["stale/f.dat"])
    assert r.remote_md5sum == md5(b"old and wrong") and not r.verified
    assert r.failed_copy_attempts == 1
    assert catalog.reports.stats("arch", archive.max_copy_attempts, time.time())["pending"] == 1
    deleted = delete_expired(catalog, config_for(archive, tmp_path), "arch",
                             destinations(archive), now=time.time() + 30 * 86400)
    assert deleted == 1  # ok.dat: retention did run
    assert not (src / "ok.dat").exists()
    assert (src / "stale" / "f.dat").read_bytes() == b"new and right"
    assert row(catalog, ids["stale/f.dat"]).removed is None


def test_a_full_far_disk_leaves_no_partial_file_and_the_local_copy_in_place(
        sshd, remote_dir, tmp_path, catalog, make_worker, destinations, tiny_far_disk):
    """A full far disk is the archive's trouble, not the file's: nothing is
    charged, the worker backs off, and the file ships once there is room."""
    archive = ssh_archive(sshd, remote_dir, delete_local_after=60)
    data = os.urandom(300_000)
    src = tmp_path / "src"
    ids = register(catalog, "arch", {"tiny/big.dat": data}, src, timestamp=time.time() - HOUR)
    seen = []

    def while_full(n: int) -> None:
        if n > 1:
            return
        r = row(catalog, ids["tiny/big.dat"])
        seen.append((r.verified, r.failed_copy_attempts,
                     read_health(catalog.path)["archives"]["arch"]["last_error"],
                     "big.dat" in os.listdir(tiny_far_disk),  # a partial file under the final name?
                     delete_expired(catalog, config_for(archive, tmp_path), "arch",
                                    destinations(archive), now=time.time() + 30 * 86400),
                     (src / "tiny" / "big.dat").read_bytes() == data))
        # Room is made on the far side: the next try ships it.
        subprocess.run(["mount", "-o", "remount,size=1m", str(tiny_far_disk)], check=True)

    worker = make_worker(archive, sleep=Sleeps(while_full))
    assert worker.step() is True

    (verified, attempts, error, partial, deleted, intact), = seen
    assert not verified and attempts == 0
    assert "No space left on device" in error
    assert not partial and deleted == 0 and intact
    r = row(catalog, ids["tiny/big.dat"])
    assert r.verified and r.failed_copy_attempts == 0
    assert (tiny_far_disk / "big.dat").read_bytes() == data


def _session_processes(sshd) -> set[int]:
    """The far side's per-connection sshd processes (not the listener)."""
    listener = sshd._proc.pid
    return _process_tree({listener}) - {listener}


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_a_transfer_stalled_longer_than_copy_timeout_is_abandoned_and_retried(
        sshd, remote_dir, tmp_path, catalog, make_worker):
    archive = ssh_archive(sshd, remote_dir, copy_timeout=2)
    src = tmp_path / "src"
    errors = []
    sleeps = Sleeps(lambda n: errors.append(read_health(catalog.path)["archives"]["arch"]["last_error"]))
    worker = make_worker(archive, sleep=sleeps)
    register(catalog, "arch", {"first.dat": b"first"}, src)
    assert worker.step() is True  # the shared connection is up
    ids = register(catalog, "arch", {"second.dat": os.urandom(100_000)}, src)

    frozen = _session_processes(sshd)
    assert frozen
    for pid in frozen:  # the far side stops answering on the shared connection
        os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert worker.step() is True
        elapsed = time.monotonic() - started
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    assert sleeps.delays, "the stalled transfer was not retried"
    assert "timeout" in errors[0].lower()
    assert elapsed < 20
    r = row(catalog, ids["second.dat"])
    assert r.verified and r.failed_copy_attempts == 0
    assert (remote_dir / "second.dat").read_bytes() == (src / "second.dat").read_bytes()


def test_a_remote_md5_command_slower_than_cmd_timeout_is_killed_and_deletes_nothing(
        sshd, remote_dir, tmp_path, catalog, make_worker, destinations):
    """md5sum of a FIFO blocks until someone writes to it: a far command that
    hangs. Retention's far check meets one where a verified far copy was
    replaced; it is killed after cmd_timeout and nothing is deleted."""
    archive = ssh_archive(sshd, remote_dir, cmd_timeout=1, delete_local_after=60)
    src = tmp_path / "src"
    ids = register(catalog, "arch", {"a.dat": b"a"}, src, timestamp=time.time() - HOUR)
    assert make_worker(archive).step() is True
    assert row(catalog, ids["a.dat"]).verified

    fifo = remote_dir / "a.dat"
    fifo.unlink()
    os.mkfifo(fifo, 0o644)
    os.chown(fifo, sshd.pw.pw_uid, sshd.pw.pw_gid)
    started = time.monotonic()
    with pytest.raises(TransferError, match=r"ran longer than 1(\.05)?s and was killed"):  # +50 ms: its sync
        delete_expired(catalog, config_for(archive, tmp_path), "arch", destinations(archive),
                       now=time.time() + 30 * 86400)  # the agent logs it and tries next round
    elapsed = time.monotonic() - started

    assert (src / "a.dat").read_bytes() == b"a"
    assert elapsed < 15
    try:  # let the abandoned far md5sum finish and exit
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError as exc:
        assert exc.errno == errno.ENXIO  # no reader left
    wait_until(lambda: not [p for p in _session_processes(sshd) if b"md5sum" in _cmdline(p)],
               timeout=10, message="the abandoned far md5sum to exit")


def test_max_copy_attempts_stops_a_hopeless_file_which_then_counts_as_failed(
        sshd, remote_dir, tmp_path, catalog, make_worker):
    unwritable_far_dir(sshd, remote_dir / "locked")
    archive = ssh_archive(sshd, remote_dir, max_copy_attempts=2)
    ids = register(catalog, "arch", {"locked/x.dat": b"x", "ok.dat": b"ok"}, tmp_path / "src")
    worker = make_worker(archive)

    assert worker.step() is True
    # Its second attempt comes after a 1 s back-off (and the other file is not held up).
    wait_until(lambda: worker.step() and row(catalog, ids["locked/x.dat"]).failed_copy_attempts == 2,
               timeout=10)
    assert worker.step() is False  # the hopeless file is no longer offered

    assert row(catalog, ids["locked/x.dat"]).failed_copy_attempts == 2
    stats = catalog.reports.stats("arch", archive.max_copy_attempts, time.time())
    assert (stats["failed"], stats["pending"], stats["verified"]) == (1, 0, 1)
    [failed] = catalog.reports.list_files("arch", "failed", archive.max_copy_attempts)
    assert failed.id == ids["locked/x.dat"]


def test_retention_checks_the_far_md5_over_ssh_and_keeps_a_file_whose_far_copy_changed(
        sshd, remote_dir, tmp_path, catalog, make_worker, destinations, tool_log):
    archive = ssh_archive(sshd, remote_dir, delete_local_after=60)
    src = tmp_path / "src"
    ids = register(catalog, "arch", {"intact.dat": b"intact", "altered.dat": b"original"}, src,
                   timestamp=time.time() - HOUR)
    worker = make_worker(archive)
    assert worker.step() is True
    assert all(row(catalog, i).verified for i in ids.values())
    (remote_dir / "altered.dat").write_bytes(b"tampered")
    tool_log.clear()

    deleted = delete_expired(catalog, config_for(archive, tmp_path), "arch", destinations(archive))

    assert deleted == 1
    assert len(tool_log.md5_calls()) == 1  # one batched far md5, over ssh
    assert not (src / "intact.dat").exists()
    assert row(catalog, ids["intact.dat"]).removed is not None
    assert (src / "altered.dat").read_bytes() == b"original"
    altered = row(catalog, ids["altered.dat"])
    assert altered.removed is None and altered.remote_md5sum == md5(b"tampered")
    assert catalog.reports.stats("arch", archive.max_copy_attempts, time.time())["pending"] == 1

    assert worker.step() is True  # shipped again
    assert row(catalog, ids["altered.dat"]).verified
    assert (remote_dir / "altered.dat").read_bytes() == b"original"
