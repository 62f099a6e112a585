"""A refused write is never verified: what the far account leaves in the
archive (a symlink at any depth below the base, to a decoy with the right
content, to /dev/null, to a directory outside) never passes for a copy, and
a far rsync old enough to write through such links is refused.

The far account is played for real: links are made by the ssh login user
on the test sshd (or in a local archive), and an old rsync is a fake one
first on that account's PATH, in a second sshd of its own. What is tested,
the transfer and its checks, runs unmocked: real rsync, ssh, md5sum.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.hostile_names import hostile_names
from tests.sshd import SshServer
from tests.ssh_support import Sleeps, destination_maker, md5, register, row, ssh_archive
from watcher.config import Archive
from watcher.health import read_health
from watcher.rsync import (Destination, Item, TransferError, inode_generation, reported_names,
                           rsync_escaped, ship_batch)

DECOY = b"the content the file is known to have\n"


def as_far_account(sshd: SshServer, *argv: str | os.PathLike) -> None:
    """Run a command as the ssh login user (the far account)."""
    kwargs = {"user": sshd.pw.pw_uid, "group": sshd.pw.pw_gid} if sshd.is_root else {}
    subprocess.run([os.fspath(a) for a in argv], check=True, capture_output=True, **kwargs)


def _maker(sshd: SshServer | None):
    """Run commands as the far account: the ssh login, or (a local archive) us."""
    if sshd is None:
        return lambda *argv: subprocess.run([os.fspath(a) for a in argv], check=True)
    return lambda *argv: as_far_account(sshd, *argv)


@pytest.fixture
def destinations(tmp_path):
    """Make Destinations (destination_maker) that may send files below ``tmp_path`` only."""
    with destination_maker((str(tmp_path),)) as make:
        yield make


def fake_rsync(bin_dir: Path, version: str) -> Path:
    """An `rsync` that says it is ``version`` and otherwise runs the real one."""
    real = subprocess.run(["sh", "-c", "command -v rsync"], capture_output=True, text=True).stdout.strip()
    bin_dir.mkdir(parents=True, exist_ok=True)
    bin_dir.chmod(0o755)
    script = bin_dir / "rsync"
    script.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then\n'
                      f'  echo "rsync  version {version}  protocol version 31"; exit 0\nfi\n'
                      f'exec {real} "$@"\n')
    script.chmod(0o755)
    return bin_dir


# -- links planted below the base --------------------------------------------

# (name, remote path, local content, what the far account plants, relative to
# the far base B and the directory outside O (which holds decoys of the right
# content): (link path, target))
LINKS = [
    ("timecode directory to a decoy directory", "17000/f.dat", DECOY, ("17000", "{O}/decoy")),
    ("deeper directory to a decoy directory", "17000/sub/f.dat", DECOY, ("17000/sub", "{O}/decoy")),
    ("deeper directory to /dev, file named null", "17000/dev/null", b"", ("17000/dev", "/dev")),
    ("timecode directory to an empty directory outside", "17000/g.dat", b"g", ("17000", "{O}/empty")),
    ("directory to a directory inside the base", "17000/h.dat", b"h", ("17000", "other")),
]
# The last component a link: rsync replaces the link with the file, so the
# file may be verified, but only as a regular file holding what was sent.
FILE_LINKS = [
    ("the file to a decoy of the right content", "17000/f.dat", DECOY, ("17000/f.dat", "{O}/decoy/f.dat")),
    ("the file to /dev/null, an empty file sent", "17000/e.dat", b"", ("17000/e.dat", "/dev/null")),
]


def _plant(sshd: SshServer | None, base: Path, outside: Path, link: tuple[str, str]) -> Path:
    """Make the far account's decoys and the link; returns the link's path."""
    path, target = link
    make = _maker(sshd)
    for d in (outside / "decoy" / "sub", outside / "empty", base / "other", base / "17000"):
        make("mkdir", "-p", d)
    (outside / "decoy-content").write_bytes(DECOY)
    make("cp", outside / "decoy-content", outside / "decoy" / "f.dat")
    make("cp", outside / "decoy-content", outside / "decoy" / "sub" / "f.dat")
    link_path = base / path
    if path == "17000":
        make("rmdir", link_path)
    make("ln", "-s", target.format(O=outside), link_path)
    return link_path


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every regular file below ``root`` with its content (links not followed)."""
    found = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            if p.is_file() and not p.is_symlink():
                found[str(p.relative_to(root))] = p.read_bytes()
    return found


def _ship_with_a_control(dest: Destination, src: Path, remote: str, content: bytes):
    """Ship ``remote`` and a control file in one batch; return (file's result, control's)."""
    src.mkdir(parents=True, exist_ok=True)
    local = src / "file"
    local.write_bytes(content)
    control = src / "control"
    control.write_bytes(b"control")
    items = [Item(1, str(local), remote, md5(content)),
             Item(2, str(control), "control.dat", md5(b"control"))]
    results, missing = ship_batch(dest, items)
    assert missing == []
    return results[1], results[2]


@pytest.fixture(params=["ssh", "local"])
def far_base(request, tmp_path):
    """(the far sshd or None, a far base, a directory outside it, an Archive)."""
    if request.param == "ssh":
        sshd = request.getfixturevalue("sshd")
        remote_dir = request.getfixturevalue("remote_dir")
        base = sshd.make_remote_dir(remote_dir / "base")
        outside = sshd.make_remote_dir(remote_dir / "outside")
        return sshd, base, outside, ssh_archive(sshd, base)
    base, outside = tmp_path / "base", tmp_path / "outside"
    base.mkdir()
    outside.mkdir()
    return None, base, outside, Archive(name="arch", remote_basedir=str(base))


@pytest.mark.parametrize("case", LINKS, ids=[c[0] for c in LINKS])
def test_a_link_below_the_base_is_never_written_through_nor_verified(
        far_base, destinations, tmp_path, case):
    sshd, base, outside, archive = far_base
    _name, remote, content, link = case
    link_path = _plant(sshd, base, outside, link)
    before = _snapshot(outside)

    (sent, found), (control_sent, control_found) = _ship_with_a_control(
        destinations(archive), tmp_path / "src", remote, content)

    assert control_found == control_sent  # the batch did ship: this file alone failed
    assert found != sent, f"{remote} verified through {link_path} -> {os.readlink(link_path)}"
    assert found is None  # not even read: rsync did not report it sent
    assert _snapshot(outside) == before  # nothing written outside the base
    assert os.path.islink(link_path)


@pytest.mark.parametrize("case", FILE_LINKS, ids=[c[0] for c in FILE_LINKS])
def test_a_link_in_place_of_the_file_is_verified_only_once_replaced_by_the_file(
        far_base, destinations, tmp_path, case):
    sshd, base, outside, archive = far_base
    _name, remote, content, link = case
    _plant(sshd, base, outside, link)
    before = _snapshot(outside)

    (sent, found), _control = _ship_with_a_control(destinations(archive), tmp_path / "src",
                                                   remote, content)

    assert _snapshot(outside) == before
    if found == sent:  # verified: the far name now holds a regular file with what was sent
        assert not (base / remote).is_symlink()
        assert (base / remote).read_bytes() == content


def test_the_far_md5_reads_nothing_through_a_link_at_any_depth(far_base, destinations):
    """The check itself (also retention's, just before a deletion): links the
    far account made after the copy, at each depth, to content that matches."""
    sshd, base, outside, archive = far_base
    make = _maker(sshd)
    make("mkdir", "-p", outside / "decoy" / "sub", base / "real" / "sub", base / "17000")
    (outside / "decoy-content").write_bytes(DECOY)
    for target in ("decoy/f.dat", "decoy/sub/f.dat"):
        make("cp", outside / "decoy-content", outside / target)
    make("cp", outside / "decoy-content", base / "real" / "sub" / "f.dat")
    make("ln", "-s", outside / "decoy", base / "top")                 # timecode directory
    make("ln", "-s", outside / "decoy", base / "17000" / "deep")      # a deeper directory
    make("ln", "-s", outside / "decoy" / "f.dat", base / "17000" / "file.dat")  # the file
    make("ln", "-s", "/dev/null", base / "17000" / "null.dat")        # /dev/null
    make("ln", "-s", "real", base / "inside")                          # a directory inside the base
    make("ln", "-s", "loop", base / "loop")                            # a loop
    dest = destinations(archive)

    far = dest.far_md5(["top/f.dat", "top/sub/f.dat", "17000/deep/f.dat", "17000/file.dat",
                        "17000/null.dat", "inside/sub/f.dat", "loop", "real/sub/f.dat"])

    assert far == {"real/sub/f.dat": md5(DECOY)}


def test_rsync_reports_every_hostile_name_as_escaped_and_all_are_verified(
        sshd, remote_dir, tmp_path, destinations, canary_dir):
    """rsync escapes control characters (and a backslash before '#ddd') in
    --out-format names: each expected form is checked against real rsync."""
    names = hostile_names(canary_dir) + [b"bs\\#123", b"bs\\#12", b"\\#0001", b"tab\t\\#x", b"\x7f\x1f"]
    src = tmp_path / "src"
    src.mkdir()
    items = []
    for i, name in enumerate(names):
        local = os.path.join(os.fsencode(src), b"f%d" % i)
        content = b"content of %d" % i
        with open(local, "wb") as f:
            f.write(content)
        items.append(Item(i, os.fsdecode(local), os.fsdecode(b"d/" + name), md5(content)))
    dest = destinations(ssh_archive(sshd, remote_dir))

    results, missing = ship_batch(dest, items)

    assert missing == []
    not_verified = [names[i] for i, (sent, found) in results.items() if sent != found]
    assert not_verified == []
    assert len(results) == len(names)


def test_rsync_escaped_matches_what_a_local_rsync_prints(tmp_path):
    """The same escaping, for the local receiver's lines ('>f')."""
    names = [n for n in hostile_names(str(tmp_path)) if not n.startswith(b"-")] + [b"a\\#123", b"\x1b"]
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for name in names:
        with open(os.path.join(os.fsencode(src), name), "wb") as f:
            f.write(b"x")
    out = subprocess.run(["rsync", "-s", "--files-from=-", "--from0", "--8-bit-output",
                          "--out-format=%i %n", "--", f"{src}/", f"{dst}/"],
                         input=b"".join(b"./" + n + b"\0" for n in names), capture_output=True,
                         check=True)
    assert reported_names(out.stdout) == {rsync_escaped(n) for n in names}


# -- the far rsync's version ---------------------------------------------------

@pytest.fixture
def far_bin(shared_dir):
    """A directory first on the far account's PATH (reachable by that account)."""
    return shared_dir / "bin"


def test_an_old_far_rsync_degrades_the_archive_and_nothing_is_written_or_charged(
        far_server, far_bin, tmp_path, catalog, make_worker):
    fake_rsync(far_bin, "3.2.7")
    server = far_server(PATH=f"{far_bin}:/usr/local/bin:/usr/bin:/bin")
    base = server.remote_root()
    archive = ssh_archive(server, base)
    ids = register(catalog, "arch", {"a.dat": b"a", "b.dat": b"b"}, tmp_path / "src")
    errors = []
    sleeps = Sleeps(lambda n: errors.append(read_health(catalog.path)["archives"]["arch"]), limit=2)

    with pytest.raises(AssertionError, match="backed off"):
        make_worker(archive, sleep=sleeps).step()

    assert os.listdir(base) == []
    for file_id in ids.values():
        r = row(catalog, file_id)
        assert r.failed_copy_attempts == 0 and r.remote_md5sum is None
    assert errors and all(e["degraded"] for e in errors)
    assert "rsync 3.2.7" in errors[-1]["last_error"] and "3.5 or later" in errors[-1]["last_error"]


def test_the_far_rsync_is_checked_once_per_destination(sshd, remote_dir, tmp_path, destinations, tool_log):
    dest = destinations(ssh_archive(sshd, remote_dir))
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}").write_bytes(b"%d" % i)
        results, _ = ship_batch(dest, [Item(i, str(src / f"f{i}"), f"f{i}", md5(b"%d" % i))])
        assert results[i][0] == results[i][1]
    checks = [c for c in tool_log.ssh_calls() if b"rsync --version" in c]
    assert len(checks) == 1


@pytest.mark.parametrize("version", ["3.3.0", "3.4.1"])  # 3.4: CVE-2026-53785, parents made through a link
def test_an_old_local_rsync_refuses_a_local_archive(tmp_path, monkeypatch, destinations, version):
    bin_dir = fake_rsync(tmp_path / "bin", version)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    base = tmp_path / "base"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    dest = destinations(Archive(name="arch", remote_basedir=str(base)))

    with pytest.raises(TransferError) as raised:
        ship_batch(dest, [Item(1, str(src / "a"), "a", md5(b"a"))])

    assert raised.value.kind == "archive"
    assert f"this host runs rsync {version}" in str(raised.value) and "3.5 or later" in str(raised.value)
    assert not base.exists()


# -- a far file a copy replaces is kept -------------------------------------------

@pytest.mark.parametrize("remote", [True, False], ids=["ssh", "local"])
def test_a_far_file_a_copy_replaces_is_kept_unless_identical_or_an_edit(
        sshd, remote_dir, tmp_path, destinations, remote):
    """rsync keeps the far file a copy replaces (--backup-dir) below
    .watcher-replaced/; the far md5 step removes the kept copy again when it
    is identical to the new one (a copy repeated after a restart or a lost
    connection); a batch of edits (the far copy is an earlier version of the
    same file, which the worker verified) keeps nothing."""
    archive = ssh_archive(sshd, remote_dir) if remote else Archive("arch", str(tmp_path / "far"))
    far = remote_dir if remote else tmp_path / "far"
    dest = destinations(archive)
    src = tmp_path / "src"
    src.mkdir()

    path = src / "a.dat"

    def ship(data: bytes, new_file: bool) -> None:
        if new_file:
            path.unlink(missing_ok=True)
        path.write_bytes(data)  # else rewritten in place: the same file
        item = Item(1, str(path), "d/a.dat", md5(data), len(data),
                    dest.may_be_edit(1, str(path), "d/a.dat"))
        results, _ = ship_batch(dest, [item])
        assert results[1] == (md5(data), md5(data))
        dest.verified(item)

    def kept() -> list[bytes]:
        return sorted(p.read_bytes() for p in far.glob(".watcher-replaced/*/d/a.dat"))

    ship(b"first", new_file=True)
    ship(b"first", new_file=True)  # another file, the same content: the kept copy is identical, removed
    assert kept() == [] and not (far / ".watcher-replaced").exists()
    ship(b"second", new_file=True)  # another file of other content: the first is kept
    assert kept() == [b"first"]
    ship(b"third", new_file=False)  # an edit of the very file verified: nothing more kept
    assert (far / "d" / "a.dat").read_bytes() == b"third"
    with open(path) as f:
        incarnations = inode_generation(f.fileno()) is not None
    assert kept() == ([b"first"] if incarnations else [b"first", b"second"])


@pytest.mark.parametrize("how", ["rewritten", "deleted and written again"])
def test_a_revived_row_never_replaces_its_far_copy_as_an_edit(setup, tmp_path, how):
    """A catalog writer marks a verified row's file gone, writes other content
    at its path (the file system may give it the same inode number) and
    revives the row: the far copy, now the only one of the first content,
    is kept; only the very file verified (same inode incarnation) is an edit."""
    import sqlite3
    import threading
    from watcher.roots import Roots
    from watcher.transfer import TransferWorker
    src = tmp_path / "src"
    src.mkdir()
    far = setup.archive(api_roots=[str(src)])
    far.mkdir()
    setup.rule()
    config = setup.config()
    catalog = setup.catalog()
    a = src / "a.dat"
    a.write_bytes(b"only copy of the first content")
    catalog.add_file(str(a), "a.dat", "arch", timestamp=1000.0)
    roots = Roots(config)
    dest = Destination(config.archives["arch"], None, roots.of("arch"))
    worker = TransferWorker(catalog, config.archives["arch"], dest, threading.Event(),
                            sleep=lambda s: None, roots=roots)
    assert worker.step()
    assert (far / "a.dat").read_bytes() == b"only copy of the first content"
    con = sqlite3.connect(setup.database)
    [(row_id,)] = con.execute("SELECT id FROM supersync_v0").fetchall()
    if how == "rewritten":  # an edit in place: the same file, replaced as such
        a.write_bytes(b"the same file, edited")
        new = b"the same file, edited"
    else:
        con.execute("UPDATE supersync_v0 SET removed = 1 WHERE id = ?", (row_id,))
        con.commit()
        a.unlink()
        a.write_bytes(b"other content")
        new = b"other content"
        con.execute("UPDATE supersync_v0 SET removed = NULL WHERE id = ?", (row_id,))
    con.execute("UPDATE supersync_v0 SET local_md5sum = ? WHERE id = ?", (md5(new), row_id))
    con.commit()
    con.close()
    assert worker.step()
    assert (far / "a.dat").read_bytes() == new
    kept = sorted(p.read_bytes() for p in far.glob(".watcher-replaced/*/a.dat"))
    with open(a) as f:
        incarnations = inode_generation(f.fileno()) is not None  # else no file is an edit
    if how == "rewritten" and incarnations:
        assert kept == []
    else:
        assert kept == [b"only copy of the first content"]
    catalog.close()
