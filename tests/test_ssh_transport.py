"""Shipping to an archive over ssh: where files land, host keys, how many
commands a batch costs, and the rsync options that reach the far side.

Everything runs against the real sshd of tests/sshd.py with the real rsync.
"""
from __future__ import annotations

import os
import subprocess
import threading

import pytest

from tests.ssh_support import Sleeps, md5, register, row, ssh_archive, ssh_archive_options
from tests.waiting import wait_until
from watcher.health import read_health
from watcher.rsync import Item, TransferError, _Listing, ship_batch


def test_ssh_archive_ships_into_a_missing_remote_basedir_creating_its_directories(
        sshd, remote_dir, tmp_path, catalog, make_worker):
    base = remote_dir / "not" / "there" / "yet"
    archive = ssh_archive(sshd, base)
    files = {"top.dat": os.urandom(3000), "a/b/c/deep.dat": os.urandom(100),
             "a/other dir/x.dat": b"", "a/b/sibling.dat": b"sibling\n"}
    ids = register(catalog, "arch", files, tmp_path / "src")
    worker = make_worker(archive)

    assert worker.step() is True
    assert worker.step() is False  # nothing left

    for remote, data in files.items():
        far = base / remote
        assert far.read_bytes() == data, remote
        assert far.stat().st_uid == sshd.pw.pw_uid  # written by the ssh login user
        r = row(catalog, ids[remote])
        assert r.verified and r.remote_md5sum == md5(data)
        assert r.failed_copy_attempts == 0 and r.copied is not None


def test_every_listed_file_is_a_link_to_a_descriptor_of_the_file_opened_without_following_links(tmp_path):
    inbox = tmp_path / "inbox"
    here, hashed, elsewhere = inbox / "1700000000" / "a.dat", inbox / "#b.dat", inbox / "c.dat"
    for path in (here, hashed, elsewhere):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (tmp_path / "secret").write_bytes(b"secret")
    (inbox / "link.dat").symlink_to(tmp_path / "secret")
    (inbox / "linked_dir").symlink_to(inbox / "1700000000")
    items = [Item(1, str(here), "1700000000/a.dat", md5(b"x")),
             Item(2, str(hashed), "#b.dat", md5(b"x")),
             Item(3, str(elsewhere), "renamed/c.dat", md5(b"x")),
             Item(4, str(inbox / "link.dat"), "link.dat", md5(b"x")),
             Item(5, str(inbox / "linked_dir" / "a.dat"), "d/a.dat", md5(b"x"))]

    with _Listing((str(inbox),)) as listing:
        sent, refused = listing.add_all(items)
        source, data = listing.source_and_data()
        assert source.endswith("/t/") and os.path.isdir(source), source
        tree = source[:-len("/t/")]
        assert data == b"1700000000/a.dat\0./#b.dat\0renamed/c.dat\0"  # '#' would be a comment
        for fd, remote, path in zip(listing.fds, ["1700000000/a.dat", "#b.dat", "renamed/c.dat"],
                                    [here, hashed, elsewhere]):
            assert os.readlink(os.path.join(tree, "t", remote)) == f"/proc/self/fd/{fd}"
            assert os.path.samestat(os.fstat(fd), os.stat(path))
    assert [i.id for i in sent] == [1, 2, 3]
    assert [i.id for i in refused] == [4, 5]  # a symlink, and a path through one
    assert not os.path.exists(tree)


def test_one_rsync_call_ships_files_listed_where_they_lie_and_renamed_ones_together(
        sshd, remote_dir, tmp_path, catalog, make_worker, tool_log):
    src = tmp_path / "src"
    same = {"a/same.dat": os.urandom(1000), "#b.dat": b"hash", "-c.dat": b"dash"}
    ids = register(catalog, "arch", same, src)
    (src / "x").mkdir()
    (src / "x" / "local.dat").write_bytes(b"renamed")
    renamed = catalog.add_file(str(src / "x" / "local.dat"), "y/far.dat", "arch").id

    assert make_worker(ssh_archive(sshd, remote_dir)).step() is True

    for remote, data in same.items():
        assert (remote_dir / remote).read_bytes() == data
        assert row(catalog, ids[remote]).verified
    assert (remote_dir / "y" / "far.dat").read_bytes() == b"renamed"
    assert row(catalog, renamed).verified
    assert sorted(os.listdir(remote_dir)) == sorted(["#b.dat", "-c.dat", "a", "y"])
    assert len(tool_log.rsync_calls()) == 1


class GaveUp(Exception):
    """Raised by the injected sleep: the test has seen the worker back off."""


def _give_up(n: int) -> None:
    raise GaveUp


def _refused(remote_dir, tmp_path, catalog, make_worker, destinations, archive) -> TransferError:
    """Ship one file to an archive whose host key check must fail; check that
    nothing was charged or written, and return the error."""
    with pytest.raises(TransferError) as raised:
        ship_batch(destinations(archive), [Item(0, __file__, "probe.py", md5(b""))])
    ids = register(catalog, "arch", {"a.dat": b"a"}, tmp_path / "src")
    sleeps = Sleeps(_give_up)
    with pytest.raises(GaveUp):
        make_worker(archive, sleep=sleeps).step()  # backs off instead of charging
    assert len(sleeps.delays) == 1
    r = row(catalog, ids["a.dat"])
    assert r.failed_copy_attempts == 0 and r.remote_md5sum is None
    assert os.listdir(remote_dir) == []
    state = read_health(catalog.path)["archives"]["arch"]
    assert state["degraded"] and "Host key verification failed" in state["last_error"]
    return raised.value


def test_a_host_key_missing_from_known_hosts_is_a_connection_error_that_charges_nothing(
        sshd, remote_dir, tmp_path, catalog, make_worker, destinations):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    archive = ssh_archive(sshd, remote_dir, known_hosts=str(known_hosts))

    error = _refused(remote_dir, tmp_path, catalog, make_worker, destinations, archive)

    assert error.kind == "connection"
    assert "Host key verification failed" in str(error)
    assert known_hosts.read_text() == ""  # nothing was accepted


def test_accept_new_host_keys_ships_and_adds_the_key_to_known_hosts(
        sshd, remote_dir, tmp_path, setup, catalog, make_worker):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    setup.archive("arch", **ssh_archive_options(sshd, remote_dir, accept_new_host_keys=True)
                  | {"known_hosts": str(known_hosts)})
    archive = setup.config().archives["arch"]
    assert archive.accept_new_host_keys
    ids = register(catalog, "arch", {"a.dat": b"first"}, tmp_path / "src")

    assert make_worker(archive).step() is True

    assert row(catalog, ids["a.dat"]).verified
    assert (remote_dir / "a.dat").read_bytes() == b"first"
    host_key_blob = (sshd.host_key.parent / (sshd.host_key.name + ".pub")).read_text().split()[1]
    assert host_key_blob in known_hosts.read_text()
    # The key it wrote is good enough for strict checking from now on.
    strict = ssh_archive(sshd, remote_dir, known_hosts=str(known_hosts))
    ids = register(catalog, "arch", {"b.dat": b"second"}, tmp_path / "src")
    assert make_worker(strict).step() is True
    assert row(catalog, ids["b.dat"]).verified


def test_a_wrong_host_key_is_refused_even_when_accepting_new_keys(
        sshd, remote_dir, tmp_path, catalog, make_worker, destinations):
    impostor = tmp_path / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)], check=True)
    blob = " ".join((tmp_path / "impostor.pub").read_text().split()[:2])
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{sshd.host}]:{sshd.port} {blob}\n")
    before = known_hosts.read_text()
    archive = ssh_archive(sshd, remote_dir, known_hosts=str(known_hosts), accept_new_host_keys=True)

    error = _refused(remote_dir, tmp_path, catalog, make_worker, destinations, archive)

    assert error.kind == "connection"
    assert "has changed" in str(error) and "Host key verification failed" in str(error)
    assert known_hosts.read_text() == before


def test_each_batch_costs_one_rsync_call_and_one_remote_md5_command(
        sshd, remote_dir, tmp_path, catalog, make_worker, tool_log):
    archive = ssh_archive(sshd, remote_dir, files_per_batch=3)
    files = {f"d{i % 3}/f{i}.dat": os.urandom(200) for i in range(6)}
    ids = register(catalog, "arch", files, tmp_path / "src")
    worker = make_worker(archive)

    assert worker.step() is True
    assert len(tool_log.rsync_calls()) == 1
    assert len(tool_log.md5_calls()) == 1
    # rsync's own ssh plus the md5 command, and once per destination the far
    # rsync's version (it must refuse to write through links): nothing else.
    version_checks = [c for c in tool_log.ssh_calls() if b"rsync --version" in c]
    assert len(version_checks) == 1
    assert len(tool_log.ssh_calls()) == 3

    assert worker.step() is True
    assert worker.step() is False
    assert len(tool_log.rsync_calls()) == 2
    assert len(tool_log.md5_calls()) == 2
    assert len(tool_log.ssh_calls()) == 5  # no second version check
    assert all(row(catalog, i).verified for i in ids.values())
    # File names travel on standard input, never on a command line.
    assert not any(b"f1.dat" in call for call in tool_log.calls())


def test_the_running_worker_overlaps_batches_yet_copies_and_checks_each_row_once(
        sshd, remote_dir, tmp_path, catalog, make_worker, tool_log):
    archive = ssh_archive(sshd, remote_dir, files_per_batch=2)
    files = {f"d{i % 2}/f{i}.dat": os.urandom(300) for i in range(7)}
    ids = register(catalog, "arch", files, tmp_path / "src")
    stop = threading.Event()
    worker = make_worker(archive, stop=stop)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_until(lambda: all(row(catalog, i).verified for i in ids.values()), timeout=20,
                   message="not every file was verified")
    finally:
        stop.set()
        worker.wake.set()
        thread.join(10)
    assert not thread.is_alive()
    # Batches of 2, 2, 2, 1: a row in flight is never fetched again, none is left out.
    assert len(tool_log.rsync_calls()) == 4
    assert len(tool_log.md5_calls()) == 4
    for remote, data in files.items():
        assert (remote_dir / remote).read_bytes() == data
        assert row(catalog, ids[remote]).failed_copy_attempts == 0


def test_no_remote_command_runs_for_an_empty_batch_and_files_gone_are_missing_not_charged(
        sshd, remote_dir, tmp_path, catalog, make_worker, destinations, tool_log):
    archive = ssh_archive(sshd, remote_dir)
    dest = destinations(archive)

    assert dest.far_md5([]) == {}
    # A worker with nothing pending runs no command either.
    assert make_worker(archive).step() is False
    assert tool_log.calls() == []

    # A batch whose files are all gone runs no command either (each file
    # is opened before it is listed), and they come back missing, not charged.
    gone = [Item(1, str(tmp_path / "gone-1"), "gone-1", md5(b"")),
            Item(2, str(tmp_path / "gone-2"), "gone-2", md5(b""))]
    results, missing = ship_batch(dest, gone)
    assert results == {} and missing == gone
    assert tool_log.calls() == []
    assert os.listdir(remote_dir) == []


def test_files_that_vanished_are_marked_removed_one_batch_of_one_at_a_time(
        sshd, remote_dir, tmp_path, catalog, make_worker, tool_log):
    archive = ssh_archive(sshd, remote_dir)
    ids = register(catalog, "arch", {"a.dat": b"a", "b.dat": b"b"}, tmp_path / "src")
    for name in ("a.dat", "b.dat"):
        (tmp_path / "src" / name).unlink()
    seen = []
    sleeps = Sleeps(lambda n: seen.append([row(catalog, i).removed for i in ids.values()]))
    worker = make_worker(archive, sleep=sleeps)

    # A whole batch gone looks like an unmounted disk: nothing is marked yet,
    # the worker backs off; then a batch of one is marked as usual, then the other.
    assert worker.step() is True
    assert seen == [[None, None]] and len(sleeps.delays) == 1
    assert worker.step() is True

    # A file that cannot be opened is not sent: no command runs at all.
    assert tool_log.calls() == []
    assert os.listdir(remote_dir) == []
    for file_id in ids.values():
        r = row(catalog, file_id)
        assert r.removed == 0 and r.failed_copy_attempts == 0


def test_compression_bwlimit_and_chmod_reach_rsync_and_chmod_sets_far_permissions(
        sshd, remote_dir, tmp_path, catalog, make_worker, destinations, tool_log):
    base = sshd.make_remote_dir(remote_dir / "base")
    base_mode = base.stat().st_mode & 0o7777
    archive = ssh_archive(sshd, base, compression=True, bwlimit="20m", chmod="u=rw,g=r,o=")
    args = destinations(archive).rsync_args("/")
    for option in ("--compress", "--bwlimit=20m", "--perms", "--chmod=u=rw,g=r,o="):
        assert option in args
    plain = destinations(ssh_archive(sshd, base, chmod=None)).rsync_args("/")
    assert not [a for a in plain if a.startswith(("--compress", "--bwlimit", "--chmod", "--perms"))]

    # All from one directory: rsync's source is that directory, and names
    # starting with "#" or ";" are listed as "./#..." (never a comment).
    ids = register(catalog, "arch", {"open.dat": os.urandom(5000), "sub/deep.dat": b"deep",
                                     "#hash.dat": b"h", ";semi.dat": b"s"}, tmp_path / "src")
    (tmp_path / "src" / "open.dat").chmod(0o606)
    (tmp_path / "src" / "sub").chmod(0o700)
    assert make_worker(archive).step() is True

    assert all(row(catalog, i).verified for i in ids.values())
    assert sorted(os.listdir(base)) == ["#hash.dat", ";semi.dat", "open.dat", "sub"]
    assert (base / "open.dat").stat().st_mode & 0o7777 == 0o640
    assert (base / "sub" / "deep.dat").stat().st_mode & 0o7777 == 0o640
    # The base directory keeps its own permissions; a new one gets chmod's,
    # never the local one's, its owner keeping rwx (u=rw would make it unusable).
    assert base.stat().st_mode & 0o7777 == base_mode
    assert (base / "sub").stat().st_mode & 0o7777 == 0o740
    [call] = tool_log.rsync_calls()
    for option in (b"--compress", b"--bwlimit=20m", b"--chmod=u=rw,g=r,o="):
        assert option in call.split(b" ")


def test_an_ssh_cipher_reaches_every_ssh_call_and_the_files_ship(
        sshd, remote_dir, tmp_path, catalog, make_worker, tool_log):
    cipher = "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com"
    ids = register(catalog, "arch", {"a.dat": b"a", "d/b.dat": b"b"}, tmp_path / "src")

    assert make_worker(ssh_archive(sshd, remote_dir, ssh_cipher=cipher)).step() is True

    assert all(row(catalog, i).verified for i in ids.values())
    calls = tool_log.ssh_calls()
    assert len(calls) >= 2 and all(f"Ciphers={cipher}".encode() in c for c in calls)
