"""Errors are classified by their cause: what the archive does wrong (a login
shell that prints text, a full disk, a base directory it may not write)
charges no file, degrades the archive and says why; what one file meets (a
far directory it may not write for a while) charges that file alone, its
attempts spaced out until it ships.

All real: a second sshd logging in as an account of its own whose
~/.bashrc prints (the sshd fixture's login serves every other test running
at the same time; bash started by sshd reads ~/.bashrc, never BASH_ENV), a
tmpfs that fills, directories owned by root that the ssh login user cannot
write.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.ssh_support import Sleeps, make_far_dir_writable, register, row, ssh_archive, unwritable_far_dir
from tests.waiting import wait_until
from watcher.health import read_health


def _status(catalog) -> dict:
    return read_health(catalog.path)["archives"]["arch"]


def _backs_off_without_charging(catalog, make_worker, archive, ids, on_sleep=None, limit=2):
    """Step a worker until it has backed off ``limit`` times; return the
    archive's health seen at each back-off. Asserts nothing was charged."""
    seen = []

    def during(n: int) -> None:
        seen.append(_status(catalog))
        if on_sleep:
            on_sleep(n)

    sleeps = Sleeps(during, limit=limit)
    with pytest.raises(AssertionError, match="backed off"):
        make_worker(archive, sleep=sleeps).step()
    for file_id in ids.values():
        r = row(catalog, file_id)
        assert r.failed_copy_attempts == 0 and not r.verified, r.remote_path
    assert seen and all(state["degraded"] for state in seen)
    return seen


# -- a login shell that prints text --------------------------------------------

BANNERS = {
    # every session: the version check before the first copy sees it
    "every command": 'echo "Welcome to the archive host"\n',
    # only rsync's own session: rsync's "is your shell clean?" (exit 2)
    "rsync's session": 'case "$BASH_EXECUTION_STRING" in *--server*) echo "Welcome";; esac\n',
    # only the md5 command: its output cannot be read
    "the md5 command": 'case "$BASH_EXECUTION_STRING" in *md5sum*) echo "Welcome";; esac\n',
}


@pytest.fixture
def far_bashrc(far_server):
    """(a FarServer logging in as an account of its own, that account's
    ~/.bashrc), the file restored afterwards."""
    server = far_server(own_account=True)
    bashrc = Path(server.pw.pw_dir) / ".bashrc"
    before = bashrc.read_bytes() if bashrc.exists() else None
    yield server, bashrc
    if before is None:
        bashrc.unlink(missing_ok=True)
    else:
        bashrc.write_bytes(before)


@pytest.mark.parametrize("when", list(BANNERS))
def test_a_login_shell_that_prints_text_degrades_the_archive_and_charges_nothing(
        far_bashrc, tmp_path, catalog, make_worker, when):
    server, bashrc = far_bashrc
    quiet = bashrc.read_bytes() if bashrc.exists() else b""
    bashrc.write_bytes(BANNERS[when].encode() + quiet)  # before the "not interactive: return"
    base = server.remote_root()
    archive = ssh_archive(server, base)
    ids = register(catalog, "arch", {"a.dat": b"a"}, tmp_path / "src")

    seen = _backs_off_without_charging(catalog, make_worker, archive, ids)

    assert "login shell prints text" in seen[-1]["last_error"]
    # Once the start-up file is quiet, the next try ships it.
    bashrc.write_bytes(quiet)
    assert make_worker(archive).step() is True
    assert row(catalog, ids["a.dat"]).verified
    assert row(catalog, ids["a.dat"]).failed_copy_attempts == 0


# -- a full far disk -----------------------------------------------------------

def test_a_full_far_disk_charges_nothing_and_the_files_ship_once_there_is_room(
        sshd, tiny_far_disk, tmp_path, catalog, make_worker):
    archive = ssh_archive(sshd, tiny_far_disk)
    data = os.urandom(300_000)
    ids = register(catalog, "arch", {"big.dat": data}, tmp_path / "src")

    seen = _backs_off_without_charging(catalog, make_worker, archive, ids)

    assert "disk is full" in seen[-1]["last_error"]
    assert "No space left on device" in seen[-1]["last_error"]
    assert "big.dat" not in os.listdir(tiny_far_disk)
    subprocess.run(["mount", "-o", "remount,size=1m", str(tiny_far_disk)], check=True)
    assert make_worker(archive).step() is True
    assert row(catalog, ids["big.dat"]).verified
    assert row(catalog, ids["big.dat"]).failed_copy_attempts == 0


# -- a base directory the far account may not write ----------------------------

@pytest.fixture(params=["absolute", "relative"])
def far_base_path(request, sshd, remote_dir):
    """(the base as remote_basedir says it, its path here): an absolute one,
    or one relative to the login's home (rsync names it from its working
    directory there)."""
    if request.param == "absolute":
        yield str(remote_dir / "base"), remote_dir / "base"
        return
    name = f"watcher-test-base-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path = Path(sshd.pw.pw_dir) / name
    try:
        yield name, path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("remote", ["a.dat", "17000/a.dat"], ids=["file in the base", "new directory"])
def test_a_base_directory_that_cannot_be_written_is_the_archive_s_trouble(
        sshd, far_base_path, tmp_path, catalog, make_worker, remote):
    basedir, base = far_base_path
    unwritable_far_dir(sshd, base)
    archive = ssh_archive(sshd, basedir)
    ids = register(catalog, "arch", {remote: b"a"}, tmp_path / "src")

    seen = _backs_off_without_charging(catalog, make_worker, archive, ids)

    assert "base directory cannot be written" in seen[-1]["last_error"]
    make_far_dir_writable(sshd, base)
    assert make_worker(archive).step() is True
    assert row(catalog, ids[remote]).verified
    assert (base / remote).read_bytes() == b"a"


# -- one far directory unwritable for a while ----------------------------------

UNWRITABLE_FOR = 5.0


def test_a_far_directory_unwritable_for_seconds_spaces_its_file_s_attempts_and_ships_it(
        sshd, remote_dir, tmp_path, catalog, make_worker):
    locked = unwritable_far_dir(sshd, remote_dir / "locked")
    archive = ssh_archive(sshd, remote_dir)
    ids = register(catalog, "arch", {"locked/x.dat": b"x", "ok.dat": b"ok"}, tmp_path / "src")
    stop = threading.Event()
    worker = make_worker(archive, stop=stop)
    thread = threading.Thread(target=worker.run)
    started = time.monotonic()
    attempts: list[float] = []  # when each charge was seen
    opened = []
    thread.start()
    try:
        def shipped() -> bool:
            r = row(catalog, ids["locked/x.dat"])
            if r.failed_copy_attempts > len(attempts):
                attempts.extend([time.monotonic() - started] * (r.failed_copy_attempts - len(attempts)))
            if not opened and time.monotonic() - started > UNWRITABLE_FOR:
                make_far_dir_writable(sshd, locked)
                opened.append(True)
            return r.verified
        wait_until(shipped, timeout=40, interval=0.02, message="locked/x.dat to ship")
    finally:
        stop.set()
        worker.wake.set()
        thread.join(10)
    assert not thread.is_alive()

    r = row(catalog, ids["locked/x.dat"])
    assert r.verified and r.failed_copy_attempts < archive.max_copy_attempts
    assert row(catalog, ids["ok.dat"]).verified and row(catalog, ids["ok.dat"]).failed_copy_attempts == 0
    # Charged once per back-off (1 s, 2 s, 4 s ...), not all at once: within
    # 5 s, at most 4 attempts (at 0, 1, 3 and 7 s give 3 before the directory opens).
    assert 2 <= len(attempts) <= 4, attempts
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert all(g >= 0.8 for g in gaps), attempts
    print(f"attempts charged at {['%.1f' % t for t in attempts]} s; verified after "
          f"{time.monotonic() - started:.1f} s with {r.failed_copy_attempts} attempts")


@pytest.mark.parametrize("name", ['x": No space left on device (28)', "y: Disk quota exceeded (122)",
                                  "No space left on device"])
def test_a_file_named_like_a_full_disk_is_charged_as_a_file_not_taken_for_the_archive(
        sshd, remote_dir, tmp_path, catalog, make_worker, name):
    """rsync's complaint about one file quotes its name: a name that reads like
    a full disk must not make every batch the archive's trouble (backed off
    for ever, the file never charged, nothing else shipped)."""
    unwritable_far_dir(sshd, remote_dir / "locked")
    archive = ssh_archive(sshd, remote_dir)
    ids = register(catalog, "arch", {f"locked/{name}": b"x", "ok.dat": b"ok"}, tmp_path / "src")
    worker = make_worker(archive, sleep=Sleeps(limit=0))

    assert worker.step() is True

    assert row(catalog, ids["ok.dat"]).verified
    locked = row(catalog, ids[f"locked/{name}"])
    assert not locked.verified and locked.failed_copy_attempts == 1
    assert not _status(catalog).get("degraded")


def test_one_far_file_rsync_cannot_write_is_charged_after_a_few_tries_and_the_rest_ship(
        far_bashrc, tmp_path, catalog, make_worker):
    """rsync's file I/O error (exit 11) ends the whole transfer, and may be the
    archive's (a disk going bad) or one file's: here a far file-size limit
    (EFBIG) that one big file exceeds. The batch is tried a few times, then
    judged as a batch of which nothing arrived, so it is halved until the big
    file alone is charged, and the small file, sorted after it, ships."""
    server, bashrc = far_bashrc
    quiet = bashrc.read_bytes() if bashrc.exists() else b""
    bashrc.write_bytes(b"ulimit -f 64\n" + quiet)  # 64 KiB per file, for every far command
    archive = ssh_archive(server, server.remote_root(), max_copy_attempts=2)
    ids = register(catalog, "arch", {"a-big.dat": os.urandom(200_000), "b-small.dat": b"small"},
                   tmp_path / "src")
    sleeps = Sleeps(limit=40)
    worker = make_worker(archive, sleep=sleeps)

    def done() -> bool:
        worker.step()  # a charged file waits its 1 s back-off in real time
        return (row(catalog, ids["b-small.dat"]).verified
                and row(catalog, ids["a-big.dat"]).failed_copy_attempts >= 2)
    wait_until(done, timeout=30, message="the small file shipped and the big one charged twice")
    big = row(catalog, ids["a-big.dat"])
    assert not big.verified and big.failed_copy_attempts == 2  # then it counts as failed
    assert len(sleeps.delays) < 40


def test_a_replaced_copies_directory_the_archive_cannot_make_is_its_trouble_not_the_files(
        sshd, remote_dir, tmp_path, catalog, make_worker):
    """A copy that replaces a far file keeps it in .watcher-replaced/; when the
    archive cannot make that directory (a file stands there), no file is
    charged, the archive is degraded, and the far file stays."""
    archive = ssh_archive(sshd, remote_dir)
    (remote_dir / "a.dat").write_bytes(b"an earlier copy")  # a far file no row knows
    (remote_dir / ".watcher-replaced").write_bytes(b"")
    ids = register(catalog, "arch", {"a.dat": b"new content"}, tmp_path / "src")
    seen = _backs_off_without_charging(catalog, make_worker, archive, ids)
    assert ".watcher-replaced directory" in seen[-1]["last_error"], seen[-1]
    assert (remote_dir / "a.dat").read_bytes() == b"an earlier copy"


# -- the cause is kept, from the front of what ssh and rsync say -------------------

def test_a_key_that_others_may_read_is_named_with_its_permissions_when_ssh_ignores_it(
        sshd, remote_dir, tmp_path, catalog, make_worker):
    """ssh ignores a key group or others may read, and says why before pages
    of other lines: the cause ("Permissions 0644 ... are too open") is what
    the archive's degraded state shows. (The agent refuses such a key at
    start, watcher/preflight.py; this is one whose mode changed since.)"""
    key = tmp_path / ("a-directory-with-a-long-name-" * 4) / "id_ed25519"
    key.parent.mkdir()
    shutil.copyfile(sshd.client_key, key)
    key.chmod(0o644)
    archive = ssh_archive(sshd, remote_dir, ssh_key=str(key))
    ids = register(catalog, "arch", {"a.dat": b"a"}, tmp_path / "src")

    seen = _backs_off_without_charging(catalog, make_worker, archive, ids)

    error = seen[-1]["last_error"]
    assert f"Permissions 0644 for '{key}' are too open." in error, error
    assert "Permission denied (publickey)" in error, error  # and what came of it
