"""Durable before deleted: a far copy counts as verified only once it and
the directory entries above it (up to the base, and those above the base
that rsync's --mkpath may have made) are on stable storage.

Observed, never mocked: over ssh, a `sync` first on the far account's PATH
logs its arguments and runs the real one (or fails, as a far disk with I/O
errors makes it); for a local archive, strace shows the agent's and rsync's
fsync calls. rsync, ssh, sshd, md5sum and the catalog are the real ones.
"""
from __future__ import annotations

import errno
import itertools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hostile_names import hostile_names
from tests.ssh_support import Sleeps, md5, mounted_tmpfs, register, row, ssh_archive
from watcher.health import read_health
from watcher.config import Archive
from watcher.rsync import (
    REPLACED_DIR, SYNCFS_FILES, Destination, Item, TransferError, parse_far_md5, ship_batch,
)

# A name of each family that breaks shell or line-based code, in new
# directories (which rsync's --mkpath makes, so their entries need syncing too).
NAMES = ["top file", "-rf", "new/line\nbreak", "new/deeper/" + os.fsdecode(b"\xff\xfe non-utf8"),
         "new/deeper/--help"]
NEW_DIRS = ["new", "new/deeper"]


def logging_sync(bin_dir: Path) -> tuple[Path, Path]:
    """A far `sync` that logs each call (its arguments NUL-terminated, then an
    empty record) and runs the real one; it fails (exit 1, as coreutils'
    sync on an I/O error) while the returned flag file exists, and for the
    directories above the base only (absolute paths) while the flag's name
    with ``.above`` added does."""
    real = shutil.which("sync")
    bin_dir.mkdir(parents=True, exist_ok=True)
    bin_dir.chmod(0o777)  # the far account writes the log here
    log, flag = bin_dir / "sync.log", bin_dir / "sync.fails"
    script = bin_dir / "sync"
    script.write_text(f'#!/bin/sh\n{{ printf "%s\\0" "$@"; printf "\\0"; }} >> {log}\n'
                      f'f={flag}; case $2 in /*) f={flag}.above;; esac\n'
                      f'if [ -e "$f" ]; then echo "sync: error syncing \'$2\': Input/output error" >&2; '
                      f'exit 1; fi\nexec {real} "$@"\n')
    script.chmod(0o755)
    return log, flag


def sync_calls(log: Path) -> list[list[bytes]]:
    if not log.exists():
        return []
    calls, call = [], []
    for arg in log.read_bytes().split(b"\0")[:-1]:  # no argument is empty: an empty record ends a call
        if arg:
            call.append(arg)
        else:
            calls.append(call)
            call = []
    return calls


@pytest.fixture
def far_sync(far_server, shared_dir):
    """(server, base, sync log, failure flag): a second sshd whose login finds the logging sync first."""
    log, flag = logging_sync(shared_dir / "bin")
    server = far_server(PATH=f"{shared_dir / 'bin'}:/usr/local/bin:/usr/bin:/bin")
    return server, server.remote_root(), log, flag


def test_one_far_sync_per_batch_covers_every_file_and_each_directory_up_to_the_base_then_above_it(
        far_sync, tmp_path, destinations):
    server, base, log, _ = far_sync
    src = tmp_path / "src"
    names = list(dict.fromkeys(NAMES + [os.fsdecode(n) for n in hostile_names(str(tmp_path / "canary"))
                                     if b"/" not in n]))
    items = []
    for i, name in enumerate(names):
        local = src / f"{i}.dat"
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(b"%d" % i)
        items.append(Item(i, str(local), name, md5(b"%d" % i)))
    made = base / "made" / "by mkpath"  # the base and its parent: made by the first batch
    dest = destinations(ssh_archive(server, made))

    results, _ = ship_batch(dest, items)

    assert all(found == sent for sent, found in results.values()) and len(results) == len(items)
    # one call for the whole batch, after a syncfs of the base's file system (many files)
    assert len(names) >= SYNCFS_FILES
    [whole, call, above] = sync_calls(log)
    assert whole == [b"-f", b"."]
    assert call[0] == b"--"
    expected = {b"./" + os.fsencode(n) for n in names} | {b"./" + d.encode() for d in NEW_DIRS} | {b"."}
    assert set(call[1:]) == expected  # every file, each directory up to the base
    files = {b"./" + os.fsencode(n) for n in names}
    assert sorted(x for x in call[1:] if x in files) == sorted(files)  # each file once
    # then the directories above the base --mkpath may have made (they hold the base's
    # entry), nearest first, up to the first the far account may not write (the
    # server's directory of far bases, root's when the tests run as root)
    real = Path(os.path.realpath(made))
    assert above == [b"--", os.fsencode(real.parent), os.fsencode(real.parent.parent)]


def test_a_failing_far_sync_leaves_the_batch_unverified_uncharged_and_it_is_verified_once_sync_works(
        far_sync, tmp_path, catalog, make_worker):
    server, base, log, flag = far_sync
    flag.write_text("")
    ids = register(catalog, "arch", {"a.dat": b"a", "d/b.dat": b"b"}, tmp_path / "src")
    seen = []

    def during_outage(n):
        if not seen:
            seen.append([(row(catalog, i).verified, row(catalog, i).failed_copy_attempts) for i in ids.values()])
            seen.append(read_health(catalog.path)["archives"]["arch"]["last_error"])
            seen.append((base / "a.dat").read_bytes() + (base / "d" / "b.dat").read_bytes())  # they did arrive
        else:  # a second batch sent while sync still fails, then it works again
            flag.unlink()

    make_worker(ssh_archive(server, base), sleep=Sleeps(during_outage, limit=2)).step()

    assert seen[0] == [(False, 0), (False, 0)]  # copied, not durable: not verified (not deletable), nothing charged
    assert "sync failed" in seen[1] and "Input/output error" in seen[1] and seen[2] == b"ab"
    assert all(row(catalog, i).verified for i in ids.values())
    # few files: no syncfs; nothing above the base, whose parent the far account may not write
    assert [call[:2] for call in sync_calls(log)] == [[b"--", b"./a.dat"]] * 3
    # each batch sent again moved the earlier, identical far copies aside; none is left there
    kept = [os.path.join(top, f) for top, _, files in os.walk(base / REPLACED_DIR) for f in files]
    assert kept == []


def test_a_failing_sync_of_the_directories_above_the_base_leaves_the_batch_unverified(
        far_sync, tmp_path, destinations):
    server, base, log, flag = far_sync
    made = base / "made"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    items = [Item(1, str(src / "a"), "a.dat", md5(b"a"))]
    dest = destinations(ssh_archive(server, made))
    Path(f"{flag}.above").write_text("")

    with pytest.raises(TransferError) as raised:
        ship_batch(dest, items)
    assert raised.value.kind == "archive" and "sync failed" in str(raised.value)
    assert sync_calls(log)[-1] == [b"--", os.fsencode(os.path.realpath(base))]

    Path(f"{flag}.above").unlink()
    results, _ = ship_batch(dest, items)
    assert results == {1: (md5(b"a"), md5(b"a"))}


STRACE_SHIP = """
import sys
from watcher.config import Archive
from watcher.rsync import Destination, Item, ship_batch
base, src, mode = sys.argv[1:4]
items = [Item(i, f"{src}/{i}", name, md5) for i, (name, md5) in enumerate(zip(sys.argv[4::2], sys.argv[5::2]))]
results, _ = ship_batch(Destination(Archive(name="a", remote_basedir=base, fsync=mode), None, (src,)), items)
assert all(sent == found for sent, found in results.values()), results
"""


@pytest.mark.parametrize("mode", ["batch", "file"])
def test_a_local_archive_fsyncs_each_file_each_directory_up_to_the_base_and_those_above_it(tmp_path, mode):
    if shutil.which("strace") is None:
        pytest.fail("strace is not installed (apt-get install strace)")
    base, src = tmp_path / "archive" / "made", tmp_path / "src"  # the base and its parent: made by rsync
    src.mkdir()
    names = ["top file", "-rf", "new/deeper/--help", "new/x"]
    args = []
    for i, name in enumerate(names):
        (src / str(i)).write_bytes(b"%d" % i)
        args += [name, md5(b"%d" % i)]
    trace = tmp_path / "strace.log"

    subprocess.run(["strace", "-f", "-qq", "-y", "-e", "trace=fsync,fdatasync", "-o", str(trace),
                    sys.executable, "-c", STRACE_SHIP, str(base), str(src), mode, *args], check=True)

    synced: dict[str, int] = {}
    for line in trace.read_text().splitlines():
        if "fsync(" in line and "= 0" in line:
            path = line.split("<", 1)[1].rsplit(">", 1)[0]
            synced[path] = synced.get(path, 0) + 1
    expected = {str(base / n) for n in names} | {str(base / "new"), str(base / "new/deeper"), str(base)}
    below = {p for p in synced if p.startswith(str(base) + "/") or p == str(base)}
    in_place = {p for p in below if "/." not in p[len(str(base)):]}  # not rsync's temporary files
    assert in_place == expected and all(synced[p] == 1 for p in expected)
    above = set(synced) - below  # those above the base the agent may write on its file system, once
    device = base.stat().st_dev
    expected_above = itertools.takewhile(
        lambda p: os.access(p, os.R_OK | os.W_OK) and p.stat().st_dev == device, base.parents)
    assert above == {str(p) for p in expected_above} >= {str(base.parent)}
    assert all(synced[p] == 1 for p in above)
    temporaries = below - in_place  # rsync's own --fsync, of each file before its rename
    assert len(temporaries) == (len(names) if mode == "file" else 0)


def test_a_local_archive_of_many_files_syncs_its_file_system_once_then_each_file(tmp_path):
    """More files than SYNCFS_FILES: one syncfs first, then each file fsynced once, all verified."""
    if shutil.which("strace") is None:
        pytest.fail("strace is not installed (apt-get install strace)")
    base, src = tmp_path / "archive", tmp_path / "src"
    src.mkdir()
    count = 300
    args = []
    for i in range(count):
        (src / str(i)).write_bytes(b"%d" % i)
        args += [f"d{i % 7}/f{i}", md5(b"%d" % i)]
    trace = tmp_path / "strace.log"

    subprocess.run(["strace", "-f", "-qq", "-y", "-e", "trace=fsync,syncfs", "-o", str(trace),
                    sys.executable, "-c", STRACE_SHIP, str(base), str(src), "batch", *args], check=True)

    lines = [line for line in trace.read_text().splitlines() if "= 0" in line]
    assert sum("syncfs(" in line for line in lines) == 1
    assert "syncfs(" in [line for line in lines if "sync" in line][0]  # before any file's fsync
    synced = [line.split("<", 1)[1].rsplit(">", 1)[0] for line in lines if "fsync(" in line]
    files = [p for p in synced if p.startswith(str(base) + "/") and os.path.basename(p).startswith("f")]
    assert sorted(files) == sorted(str(base / name) for name in args[::2])


def test_the_descriptors_waiting_to_be_synced_stay_under_the_limit_and_each_is_synced_once(
        tmp_path, monkeypatch):
    """The hashing waits for the syncer (a slow disk) rather than open more
    descriptors than its limit: under sshd's usual 1,024, a batch of many
    files in many directories must not run out of them."""
    from watcher.durable import hash_durably
    from watcher.safefs import Beneath
    names = [f"d{i % 20}/f{i}" for i in range(200)]
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    synced, most_open = [], []
    real_fsync = os.fsync

    def slow_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        most_open.append(len(os.listdir("/proc/self/fd")))
        time.sleep(0.002)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    before = len(os.listdir("/proc/self/fd"))
    with Beneath(str(tmp_path)) as tree:
        found, failed = hash_durably(tree, names, limit=4)

    assert failed == "" and found == {name: md5(name.encode()) for name in names}
    assert sorted(p for p in synced if "/f" in p) == sorted(str(tmp_path / name) for name in names)
    # the syncer's 4, the tree's 21 directories, the file being hashed and listdir's own
    assert max(most_open) <= before + 4 + 21 + 2


def test_a_file_that_cannot_be_handed_to_the_syncer_is_the_archive_s_trouble_not_a_missing_copy(
        tmp_path, monkeypatch):
    """No descriptor left to sync a file with: the batch fails as a whole
    (the archive host's trouble, retried), not that file alone (charged)."""
    from watcher.durable import hash_durably
    from watcher.safefs import Beneath
    for name in ("f0", "f1"):
        (tmp_path / name).write_bytes(name.encode())
    real_dup = os.dup

    def dup(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == str(tmp_path / "f1"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_dup(fd)

    monkeypatch.setattr(os, "dup", dup)
    with Beneath(str(tmp_path)) as tree:
        found, failed = hash_durably(tree, ["f0", "f1"])
    assert failed == "'f1' (Too many open files)" and "f1" not in found


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted in tmp_path: a file system of its own."""
    with mounted_tmpfs(tmp_path / "disk", "size=16m") as path:
        yield path


def test_a_local_archive_syncs_above_the_base_up_to_its_file_system_s_root_only(small_disk, tmp_path):
    """The directories rsync made above the base are synced; the mount point's
    side of the file system above is not (an autofs /home's, for one, cannot be)."""
    if shutil.which("strace") is None:
        pytest.fail("strace is not installed (apt-get install strace)")
    base, src = small_disk / "made" / "by rsync", tmp_path / "src"
    src.mkdir()
    (src / "0").write_bytes(b"0")
    trace = tmp_path / "strace.log"

    subprocess.run(["strace", "-f", "-qq", "-y", "-e", "trace=fsync", "-o", str(trace),
                    sys.executable, "-c", STRACE_SHIP, str(base), str(src), "batch", "f", md5(b"0")], check=True)

    synced = {line.split("<", 1)[1].rsplit(">", 1)[0] for line in trace.read_text().splitlines()
              if "fsync(" in line and "= 0" in line}
    assert synced == {str(base / "f"), str(base), str(small_disk / "made"), str(small_disk)}


@pytest.mark.parametrize("failing", ["a file", "a directory below the base", "the directory above the base",
                                     "the thread that fsyncs"])
def test_a_local_archive_whose_copy_cannot_be_synced_has_nothing_of_its_batch_verified(
        tmp_path, monkeypatch, failing):
    base, src = tmp_path / "archive" / "made", tmp_path / "src"
    src.mkdir()
    items = []
    for i in range(3):
        (src / str(i)).write_bytes(b"%d" % i)
        items.append(Item(i, str(src / str(i)), f"d/f{i}", md5(b"%d" % i)))
    dest = Destination(Archive(name="a", remote_basedir=str(base)), None, (str(src),))
    fails = {"a directory below the base": base / "d", "the directory above the base": base.parent}.get(
        failing, base / "d" / "f1")
    error = RuntimeError("a bug") if failing == "the thread that fsyncs" else OSError(errno.EIO, "Input/output error")
    real_fsync = os.fsync

    def fsync(fd):  # the write-back fails, as a dying disk's would (or the code that runs it)
        if os.readlink(f"/proc/self/fd/{fd}") == str(fails):
            raise error
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(TransferError) as raised:
        ship_batch(dest, items)
    assert raised.value.kind == "archive" and (getattr(error, "strerror", None) or str(error)) in str(raised.value)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert ship_batch(dest, items)[0] == {i: (md5(b"%d" % i),) * 2 for i in range(3)}


SERVE_WITH_FAILING_FSYNC = """
import errno, os, stat, sys
real = os.fsync
def fsync(fd):  # the write-back of one directory fails, as a dying disk's would
    if stat.S_ISDIR(os.fstat(fd).st_mode) and os.readlink(f"/proc/self/fd/{fd}").endswith(sys.argv[2]):
        raise OSError(errno.EIO, "Input/output error")
    return real(fd)
os.fsync = fsync
from watcher.serve import main
sys.exit(main(sys.argv[1], request="watcher-serve md5 base .watcher-replaced/b1"))
"""


def test_a_fsync_that_fails_behind_watcher_serve_makes_the_whole_batch_count_for_nothing(tmp_path):
    """Not only the file whose directory failed: the others of that directory too (its
    sync was not done), and it is the archive's trouble, not a missing copy to charge;
    the copies the batch moved aside that are identical to their file are removed."""
    root = tmp_path / "root"
    (root / "base" / "a").mkdir(parents=True)
    (root / "base" / "b.dat").write_bytes(b"b")
    for name in ("f1", "f2"):
        (root / "base" / "a" / name).write_bytes(name.encode())
    # the far copies an attempt sent again moved aside: one identical to its file, one not
    kept = root / "base" / REPLACED_DIR / "b1" / "a"
    kept.mkdir(parents=True)
    (kept / "f1").write_bytes(b"an earlier f1")
    (kept / "f2").write_bytes(b"f2")
    done = subprocess.run([sys.executable, "-c", SERVE_WITH_FAILING_FSYNC, str(root), "/base/a"],
                          input=b"./a/f1\0./a/f2\0./b.dat\0", capture_output=True)

    assert "sync failed" in done.stderr.decode() and "Input/output error" in done.stderr.decode()
    with pytest.raises(TransferError) as raised:
        parse_far_md5(done.stdout, done.stderr)
    assert raised.value.kind == "archive"
    # the batch will be sent again: the identical copy is gone all the same, the other kept
    assert not (kept / "f2").exists() and (kept / "f1").read_bytes() == b"an earlier f1"


def test_a_fsync_that_fails_above_the_base_behind_watcher_serve_makes_the_batch_count_for_nothing(tmp_path):
    """The serving root holds the base's entry (rsync's --mkpath may have made the base)."""
    root = tmp_path / "root"
    (root / "base").mkdir(parents=True)
    (root / "base" / "b.dat").write_bytes(b"b")
    done = subprocess.run([sys.executable, "-c", SERVE_WITH_FAILING_FSYNC, str(root), "/root"],
                          input=b"./b.dat\0", capture_output=True)

    assert done.returncode != 0 and "Input/output error" in done.stderr.decode()
    with pytest.raises(TransferError) as raised:
        parse_far_md5(done.stdout, done.stderr)
    assert raised.value.kind == "archive" and "sync failed" in str(raised.value)
