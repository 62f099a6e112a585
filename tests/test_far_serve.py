"""A key that can only deliver: `watcher serve` as the forced command of a key
in the test sshd's authorized_keys (``command="...",restrict``).

Driven with the real ssh and rsync, as an attacker holding the key would,
and by the real agent's TransferWorker with ``far_side: serve``; what
counts is what lands on (or stays off) the far file system.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.hostile_names import canary_fired, hostile_names
from tests.ssh_support import md5, register, row, ssh_archive
from tests.waiting import wait_until
from watcher.rsync import Item, TransferError, ship_batch


def serve_command(sshd, root: Path, *options: str) -> str:
    """The forced command: this checkout's `watcher serve`, run by the far login."""
    return shlex.join([*sshd.login_python(), "-m", "watcher.serve", "--root", str(root), *options])


class Served:
    """A key whose every connection runs `watcher serve --root ROOT`."""

    def __init__(self, sshd, tmp_path: Path, root: Path, outside: Path, wrapper: tuple[str, ...] = (),
                 serve_options: tuple[str, ...] = ()):
        self.sshd, self.root, self.outside = sshd, root, outside
        self.key = tmp_path / "served_key"
        command = shlex.join(wrapper) + " " + serve_command(sshd, root, "--min-temp-age", "0", *serve_options)
        self.line = sshd.add_forced_key(self.key, command.strip())
        self.control = tmp_path / "served.sock"

    def remove(self) -> None:
        subprocess.run(["ssh", *self.options(), "-O", "exit", "--", self.sshd.ssh_target], capture_output=True)
        self.sshd.remove_key(self.line)

    def options(self) -> list[str]:
        """ssh's options for this key (one shared connection: each request still
        runs the forced command)."""
        opts = self.sshd.ssh_options()
        opts[opts.index("-i") + 1] = str(self.key)
        return opts + ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.control}",
                       "-o", "ControlPersist=30"]

    def ssh(self, request: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", *self.options(), "--", self.sshd.ssh_target, request],
                              input=stdin, capture_output=True, timeout=60)

    def rsync(self, *args: str) -> subprocess.CompletedProcess:
        rsh = shlex.join(["ssh", *self.options()])
        return subprocess.run(["rsync", "-e", rsh, *args], capture_output=True, timeout=60)

    def archive(self, base: str = "arch", **options):
        return replace(ssh_archive(self.sshd, base, ssh_key=str(self.key), **options), far_side="serve")


@pytest.fixture
def served(sshd, remote_dir, tmp_path):
    root = remote_dir / "root"
    outside = remote_dir / "outside"
    for d in (root, outside):
        sshd.make_remote_dir(d)
    (outside / "secret").write_bytes(b"secret\n")
    s = Served(sshd, tmp_path, root, outside)
    yield s
    s.remove()


def far_files(top: Path) -> set[str]:
    return {str(p.relative_to(top)) for p in top.rglob("*") if not p.is_dir() or p.is_symlink()}


def serve_here(root: Path, request: str, stdin: bytes = b"", **env: str) -> subprocess.CompletedProcess:
    """`python -m watcher.serve --root ROOT` run directly, as sshd would run it."""
    env = {**{k: v for k, v in os.environ.items() if k != "SSH_ORIGINAL_COMMAND"},
           "SSH_ORIGINAL_COMMAND": request, **env}
    return subprocess.run([sys.executable, "-m", "watcher.serve", "--root", str(root), "--min-temp-age", "0"],
                          input=stdin, env=env, capture_output=True, timeout=60)


def refused_in_one_line(done: subprocess.CompletedProcess, said: str) -> bool:
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    return (done.returncode == 1 and len(lines) == 1 and lines[0].startswith("watcher serve: refused: ")
            and said in lines[0])


@pytest.mark.parametrize("home", ["root", "root/home", "elsewhere"], ids=["the home", "below", "~/.ssh linked"])
def test_a_root_holding_the_far_accounts_home_is_refused_whatever_the_request(tmp_path, home):
    """Finding 2: a key that may write ~/.ssh/authorized_keys or ~/.bashrc gets a shell."""
    root = tmp_path / "root"
    (tmp_path / home).mkdir(parents=True, exist_ok=True)
    if home == "elsewhere":
        (root / "keys").mkdir(parents=True)
        (tmp_path / home / ".ssh").symlink_to(root / "keys")
    for request in ("watcher-serve version", "rsync --server -tIRe.LsfxCIvu --no-implied-dirs . ./"):
        done = serve_here(root, request, HOME=str(tmp_path / home))
        assert refused_in_one_line(done, "the far account's own"), done
    assert serve_here(root, "watcher-serve version", HOME=str(tmp_path)).returncode == 0


def test_the_receiver_needs_rsync_3_5_and_no_implied_dirs(tmp_path):
    """Finding 3: the confinement of -R names below the destination is rsync's
    own (CVE-2026-53785), and a thief never runs the agent's version check."""
    old = tmp_path / "bin"
    old.mkdir()
    (old / "rsync").write_text("#!/bin/sh\necho 'rsync  version 3.4.1  protocol version 32'\n")
    (old / "rsync").chmod(0o755)
    request = "rsync --server -tIRe.LsfxCIvu --no-implied-dirs . x/"
    done = serve_here(tmp_path, request, PATH=f"{old}:{os.environ['PATH']}")
    assert refused_in_one_line(done, "is 3.4.1; watcher serve needs rsync 3.5.0 or later"), done
    done = serve_here(tmp_path, request.replace(" --no-implied-dirs", ""))
    assert refused_in_one_line(done, "--relative without --no-implied-dirs"), done
    assert not (tmp_path / "x").exists()


def test_the_agent_refuses_a_serving_host_whose_rsync_serve_would_refuse(sshd, remote_dir, tmp_path, destinations):
    """Finding 3, the agent's side: told at its start-up check, not by each batch."""
    root, old = sshd.make_remote_dir(remote_dir / "root"), sshd.make_remote_dir(remote_dir / "bin")
    (old / "rsync").write_text("#!/bin/sh\necho 'rsync  version 3.4.1  protocol version 32'\n")
    (old / "rsync").chmod(0o755)
    served = Served(sshd, tmp_path, root, remote_dir, ("env", f"PATH={old}:/usr/bin:/bin"))
    try:
        with pytest.raises(TransferError, match="runs rsync 3.4.1; watcher serve needs rsync 3.5.0") as caught:
            destinations(served.archive("arch")).check_rsync()
        assert caught.value.kind == "archive"
    finally:
        served.remove()


@pytest.mark.parametrize("entry", [["-m", "watcher.cli", "serve"], ["-m", "watcher.serve"]],
                         ids=["watcher serve", "python -m watcher.serve"])
def test_both_entry_points_serve_the_same_and_say_a_refusal_in_one_line(tmp_path, entry):
    def serve(request: str | None, *options: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "SSH_ORIGINAL_COMMAND"}
        if request is not None:
            env["SSH_ORIGINAL_COMMAND"] = request
        return subprocess.run([sys.executable, *entry, "--root", str(tmp_path), *options], env=env,
                              capture_output=True, text=True, timeout=30)

    version = serve("watcher-serve version")
    assert version.returncode == 0 and version.stdout.startswith(f"{os.path.realpath(tmp_path)}\nrsync ")
    for request, options, said in [(None, (), "SSH_ORIGINAL_COMMAND is not set"),
                                   ("id", (), "not a request this key may make"),
                                   ("watcher-serve version", ("--min-temp-age", "3x"), "--min-temp-age")]:
        done = serve(request, *options)
        assert done.returncode in (1, 2) and said in done.stderr and len(done.stderr.splitlines()) == 1, done
    missing = subprocess.run([sys.executable, *entry, "--root", str(tmp_path / "none")], capture_output=True,
                             text=True, env=dict(os.environ, SSH_ORIGINAL_COMMAND="watcher-serve version"))
    assert missing.returncode == 1 and missing.stderr.strip().endswith("No such file or directory")


@pytest.mark.parametrize("options, said", [
    ({"far_side": "serve"}, "far_side: serve is for an archive reached over ssh"),
    ({"far_side": "rrsync", "ssh_host": "u@h"}, "far_side: expected shell (the far login runs a shell) or serve"),
    ({"far_side": "serve", "ssh_host": "u@h", "files_per_batch": 250_001},
     "files_per_batch: 250001 is more than watcher serve hashes in one request (far_side: serve): at most 250000"),
])
def test_far_side_is_shell_or_serve_and_serve_only_over_ssh(setup, options, said):
    from watcher.config import ConfigError
    setup.archive("arch", **options)
    setup.rule()
    with pytest.raises(ConfigError) as caught:
        setup.config()
    assert len(caught.value.problems) == 1 and said in caught.value.problems[0], caught.value.problems


REFUSED_REQUESTS = [
    "cat /etc/passwd", "sh -c id", "touch {out}/CANARY", "", "exec rsync --version",
    "rsync --server --sender -logDtpre.iLsfxCIvu . /etc/passwd",
    "rsync --server --sender -tIRe.LsfxCIvu . ./",
    "rsync --server -tIRe.LsfxCIvu --temp-dir={out} . x/",
    "rsync --server -tIRe.LsfxCIvu --log-file={out}/CANARY . x/",
    "rsync --server -btIRe.LsfxCIvu --backup-dir={out}/CANARY . x/",
    "rsync --server -btIRe.LsfxCIvu --backup-dir .watcher-replaced/../../x . x/",
    "rsync --server -tIRe.LsfxCIvu --delete . x/",
    "rsync --server -tIRe.LsfxCIvu --remove-source-files . x/",
    "rsync --server -tIRe.LsfxCIvu --files-from=/etc/passwd . x/",
    "rsync --server -tIRe.LsfxCIvu . ../outside/",
    "rsync --server -tIRe.LsfxCIvu . {out}/",
    "rsync --server -tlIRe.LsfxCIvu --no-implied-dirs . x/",  # -l: it would make symlinks
    "rsync --server -tIRe.LsfxCIvu . x/",  # without --no-implied-dirs
    "umask 0002; rsync --server -tIRe.LsfxCIvu . x/",
    "umask 0002 && rsync --server -tIRe.LsfxCIvu . x/ && cat /etc/passwd",
    "watcher-serve md5 ../outside", "watcher-serve md5 /etc", "watcher-serve rm x",
    "watcher-serve md5 . ../../x", "watcher-serve clean . nan",
]


@pytest.mark.parametrize("request_", REFUSED_REQUESTS)
def test_the_key_can_run_nothing_but_its_requests(served, request_):
    done = served.ssh(request_.format(out=served.outside), stdin=b"./secret\0")
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    assert done.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("watcher serve: refused: "), lines
    assert b"root:" not in done.stdout and b"secret" not in done.stdout
    assert far_files(served.root) == set() and far_files(served.outside) == {"secret"}


def test_sftp_scp_and_forwarding_get_nothing_through_the_key(served, tmp_path):
    """Each attempt works with the unrestricted key of the test sshd, and
    fails with the served one."""
    (served.root / "f").write_bytes(b"in the root")
    target, port = served.sshd.ssh_target, served.sshd.port

    def attempts(key: Path) -> dict[str, list[str]]:
        ssh = served.sshd.ssh_options()
        ssh[ssh.index("-i") + 1] = str(key)
        copy = [("-P" if o == "-p" else o) for o in ssh]  # scp and sftp spell the port -P
        got = tmp_path / "got"
        return {
            "sftp": ["sftp", *copy, "-b", "-", target],
            "scp (sftp protocol)": ["scp", *copy, f"{target}:{served.outside}/secret", str(got)],
            "scp -O (scp -f on the far side)": ["scp", "-O", *copy, f"{target}:{served.root}/f", str(got)],
            "a tunnel": ["ssh", *ssh, "-W", f"127.0.0.1:{port}", target],  # to the sshd itself
        }

    for key, works in ((served.sshd.client_key, True), (served.key, False)):
        for what, argv in attempts(key).items():
            done = subprocess.run(argv, input=f"get {served.outside}/secret {tmp_path}/got\n".encode(),
                                  capture_output=True, timeout=30)
            assert (done.returncode == 0) == works or what == "a tunnel", (what, works, done)
            if what == "a tunnel":
                assert done.stdout.startswith(b"SSH-") == works, (what, works, done)
            else:
                assert (tmp_path / "got").exists() == works, (what, works)
                (tmp_path / "got").unlink(missing_ok=True)


def test_real_rsync_with_the_key_writes_only_below_the_root(served, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    served.sshd.make_remote_dir(served.root / "in")
    (served.root / "in" / "link").symlink_to(served.outside)  # planted by someone on the far side
    (served.root / "in" / "filelink").symlink_to(served.outside / "secret")
    host = served.sshd.ssh_target
    attempts = {
        "a pull": ["-t", f"{host}:in/filelink", str(tmp_path / "got")],
        "a pull of an absolute path": ["-t", f"{host}:/etc/passwd", str(tmp_path / "got")],
        "up and out": ["-t", str(src / "f"), f"{host}:../outside/"],
        "absolute": ["-t", str(src / "f"), f"{host}:{served.outside}/"],
        "through a planted directory link": ["-t", str(src / "f"), f"{host}:in/link/"],
        "a remote --temp-dir": ["-t", f"-M--temp-dir={served.outside}", str(src / "f"), f"{host}:x/"],
        "a remote --log-file": ["-t", f"-M--log-file={served.outside}/log", str(src / "f"), f"{host}:x/"],
        "a --backup-dir outside": ["-t", "--backup", f"--backup-dir={served.outside}", str(src / "f"),
                                   f"{host}:x/"],
        "--delete": ["-t", "-r", "--delete", str(src) + "/", f"{host}:in/"],
        "symlinks": ["-tl", str(src / "f"), f"{host}:x/"],
    }
    for what, args in attempts.items():
        done = served.rsync(*args)
        assert done.returncode != 0, what
        assert b"watcher serve: refused" in done.stderr, (what, done.stderr)
    assert not (tmp_path / "got").exists()
    assert far_files(served.outside) == {"secret"} and (served.outside / "secret").read_bytes() == b"secret\n"
    assert far_files(served.root) == {"in/link", "in/filelink"}
    assert not (served.root / "x").exists()

    # what the key may send lands below the root: -R with an absolute source, a
    # setuid file (never setuid there)
    (src / "f").chmod(0o4755)
    done = served.rsync("-tpR", "--no-implied-dirs", str(src / "f"), f"{served.sshd.ssh_target}:x/")
    assert done.returncode == 0, done.stderr
    landed = served.root / "x" / str(src / "f").lstrip("/")
    assert landed.read_bytes() == b"data" and oct(landed.stat().st_mode & 0o7777) == oct(0o755)

    # nothing that every user of the archive host may write (finding 5), whatever
    # umask and modes the key sends
    (src / "f").chmod(0o666)
    done = served.rsync("-tpR", "--no-implied-dirs", "--rsync-path=umask 000 && rsync", str(src / "f"),
                        f"{served.sshd.ssh_target}:w/x/")
    assert done.returncode == 0, done.stderr
    landed = served.root / "w" / "x" / str(src / "f").lstrip("/")
    modes = {p: p.stat().st_mode & 0o777 for p in [landed, *landed.parents] if served.root in p.parents}
    assert modes[landed] == 0o664 and not [p for p, m in modes.items() if m & 0o002], modes

    # a file written in place of a planted link replaces the link, never its target
    done = served.rsync("-t", "-s", str(src / "f"), f"{served.sshd.ssh_target}:in/filelink")
    assert done.returncode != 0  # -s hides the arguments: refused
    (src / "filelink").write_bytes(b"over")
    done = served.rsync("-t", "--no-implied-dirs", str(src / "filelink"), f"{served.sshd.ssh_target}:in/")
    assert done.returncode == 0, done.stderr
    assert (served.root / "in" / "filelink").read_bytes() == b"over"
    assert not (served.root / "in" / "filelink").is_symlink()
    assert (served.outside / "secret").read_bytes() == b"secret\n"


def test_the_md5_request_reads_nothing_through_a_link(served, tmp_path):
    (served.root / "d").mkdir()
    (served.root / "d" / "real").write_bytes(b"secret\n")
    (served.root / "d" / "link").symlink_to(served.outside / "secret")
    (served.root / "dirlink").symlink_to(served.outside)
    names = [b"./d/real", b"./d/link", b"./dirlink/secret", b"./d/../d/real", b"./missing"]
    done = served.ssh("watcher-serve md5 .", stdin=b"".join(n + b"\0" for n in names))
    assert done.returncode == 0, done.stderr
    from watcher.rsync import parse_far_md5
    assert parse_far_md5(done.stdout) == {b"./d/real": md5(b"secret\n")}
    done = served.ssh("watcher-serve md5 dirlink", stdin=b"./secret\0")
    assert done.returncode != 0 and b"symlink is not followed" in done.stderr


def test_the_far_md5_fsyncs_each_file_its_directories_up_to_the_base_and_the_root_before_answering(
        sshd, remote_dir, tmp_path):
    """Durability (issue 14 section 2): what the agent counts verified is on stable
    storage. Observed with strace around the forced command."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    root, trace = sshd.make_remote_dir(remote_dir / "root"), sshd.make_remote_dir(remote_dir / "trace")
    log = trace / "fsync.log"
    served = Served(sshd, tmp_path, root, remote_dir, ("strace", "-f", "-qq", "-y", "-e", "trace=fsync",
                                                       "-o", str(log)))
    try:
        sshd.make_remote_dir(root / "top" / "arch" / "d" / "e")  # the login's, as --mkpath makes them
        (root / "top" / "arch" / "d" / "e" / "f").write_bytes(b"f")
        (root / "top" / "arch" / "g").write_bytes(b"g")
        done = served.ssh("watcher-serve md5 top/arch", stdin=b"./d/e/f\0./g\0")
        if b"ptrace" in done.stderr:
            pytest.skip(f"strace cannot trace here: {done.stderr.decode(errors='replace').strip()}")
        assert done.returncode == 0, done.stderr
    finally:
        served.remove()
    synced = re.findall(r"fsync\(\d+<(.*?)>\) = 0", log.read_text())
    base = os.path.realpath(root / "top" / "arch")
    # and above the base, the root and each directory up to the base (rsync's --mkpath
    # may have made them: they hold the base's entry), nothing above the root
    assert sorted(synced) == sorted([f"{base}/d/e/f", f"{base}/d/e", f"{base}/d", base, f"{base}/g",
                                     os.path.realpath(root / "top"), os.path.realpath(root)])


def test_the_agent_ships_verifies_and_keeps_replaced_copies_through_the_forced_command(
        served, tmp_path, catalog, make_worker, destinations, canary_dir):
    names = hostile_names(canary_dir)
    files = {os.fsdecode(b"h/" + n): n + b"\n" for n in names}
    files.update({"plain/a.dat": os.urandom(5000), "b.dat": b"b"})
    archive = served.archive("deep/arch", max_copy_attempts=1)
    base = served.sshd.make_remote_dir(served.root / "deep" / "arch")
    (base / "linked").symlink_to(served.outside)  # planted on the far side
    ids = register(catalog, "arch", {**files, "linked/x.dat": b"x"}, tmp_path / "src")
    worker = make_worker(archive)
    while worker.step():
        pass
    for remote, data in files.items():
        assert row(catalog, ids[remote]).verified, remote
        assert (base / remote).read_bytes() == data
    assert not canary_fired(canary_dir)
    assert not row(catalog, ids["linked/x.dat"]).verified and far_files(served.outside) == {"secret"}

    # an absolute remote_basedir inside the root works the same (and rsync's own
    # --fsync, fsync: file, gets through); a replaced far copy of other content
    # is kept, an identical one is not
    dest = destinations(served.archive(str(served.root / "deep" / "arch"), fsync="file"))
    path = tmp_path / "src" / "b.dat"

    def ship(data: bytes) -> None:
        path.unlink()
        path.write_bytes(data)
        results, _ = ship_batch(dest, [Item(1, str(path), "b.dat", md5(data), len(data))])
        assert results[1] == (md5(data), md5(data))

    ship(b"b")
    kept = served.root / "deep" / "arch" / ".watcher-replaced"
    assert not kept.exists()
    ship(b"other")
    assert [p.read_bytes() for p in kept.glob("*/b.dat")] == [b"b"]
    assert far_files(served.outside) == {"secret"}


def test_the_agent_through_serve_sees_an_archive_outside_the_root_as_unwritable(served, destinations):
    from watcher.preflight import far_findings
    dest = destinations(served.archive(str(served.outside / "arch")))
    with pytest.raises(TransferError):
        far_findings(dest)
    assert far_findings(destinations(served.archive("new/arch"))) == []
    assert not (served.root / "new").exists()  # the check made nothing


def test_an_archive_left_in_shell_mode_behind_a_forced_key_is_told_to_set_far_side(served, destinations):
    dest = destinations(replace(served.archive("arch"), far_side="shell"))
    with pytest.raises(TransferError, match="needs far_side: serve") as caught:
        dest.check_rsync()
    assert caught.value.kind == "archive"


@pytest.mark.parametrize("far_side", ["serve", "shell"])
def test_temp_files_left_by_a_cut_copy_are_removed_only_when_stale_and_shipped(
        served, tmp_path, destinations, monkeypatch, far_side):
    base = served.sshd.make_remote_dir(served.root / "arch")
    (base / "d").mkdir()
    stale = {"d/.a.dat.Ab12Cd": b"partial", ".b.dat.x9Y8z7": b"partial", "d/.we*ird [x].Qw12Er": b"p"}
    for name, data in stale.items():
        (base / name).write_bytes(data)
    (base / "d" / ".c.dat.Zz99Zz").symlink_to(served.outside / "secret")  # a link: never removed
    (base / ".kept.backup").write_bytes(b"an archived file named like a temporary one")
    (base / "d" / ".unshipped.dat.Qq11Qq").write_bytes(b"not the agent's")
    (base / ".watcher-replaced" / "x").mkdir(parents=True)
    (base / ".watcher-replaced" / "x" / ".a.dat.Ab12Cd").write_bytes(b"kept")
    if served.sshd.is_root:
        for p in base.rglob("*"):
            os.chown(p, served.sshd.pw.pw_uid, served.sshd.pw.pw_gid, follow_symlinks=False)
    shipped = {"d/a.dat", "b.dat", ".kept.backup", "kept", "d/c.dat", "d/we*ird [x]", "d/fresh.dat"}
    archive = served.archive("arch") if far_side == "serve" else ssh_archive(served.sshd, base)
    dest = destinations(replace(archive, copy_timeout=0.1))
    monkeypatch.setattr("watcher.rsync.TEMP_FILE_AGE", 1.0)  # the serving side's floor is 0 here
    changed = max(os.lstat(base / name).st_ctime for name in stale)
    # a second old, counted in whole seconds (find's -newerct @SECONDS)
    wait_until(lambda: time.time() > changed + 2.1, timeout=5, message="the files to be a second old")
    (base / "d" / ".fresh.dat.Ff00Ff").write_bytes(b"a copy running now")
    if served.sshd.is_root:
        os.chown(base / "d" / ".fresh.dat.Ff00Ff", served.sshd.pw.pw_uid, served.sshd.pw.pw_gid)

    removed = dest.clean_temp_files(lambda paths: {p for p in paths if p in shipped})

    assert sorted(removed) == sorted(stale)
    assert far_files(base) == {"d/.c.dat.Zz99Zz", ".kept.backup", "d/.unshipped.dat.Qq11Qq",
                               ".watcher-replaced/x/.a.dat.Ab12Cd", "d/.fresh.dat.Ff00Ff"}
    assert (served.outside / "secret").read_bytes() == b"secret\n"


def test_the_whole_agent_ships_finalizes_and_deletes_only_far_checked_files_through_the_forced_command(
        served, setup, start_agent, caplog):
    sshd = served.sshd
    setup.archive("arch", remote_basedir="arch", ssh_host=sshd.ssh_target, ssh_port=sshd.port,
                  ssh_key=str(served.key), known_hosts=str(sshd.known_hosts), far_side="serve",
                  delete_local_after="1d")
    inbox = setup.rule(remote_path="{timecode}/{relpath}")
    agent = start_agent(setup, housekeeping_interval=3600)
    obs = inbox / "obs_1600000000"
    obs.mkdir()
    files = {f"obs_1600000000/1600000{i:03d}_data.g3": os.urandom(300) for i in range(3)}
    for name, data in files.items():
        (inbox / name).write_bytes(data)
    base = served.root / "arch"
    catalog = setup.catalog()
    try:
        def rows():
            return {r.remote_path: r for r in catalog.reports.known_files("arch", 0)}

        wait_until(lambda: len(rows()) == 3 and all(r.verified for r in rows().values()), timeout=20,
                   message="the data files verified")
        wait_until(agent.timecodes_once, message="housekeeping while nothing waits to be registered")
        wait_until(lambda: any(p.endswith("_16000_finalized.yaml") and r.verified for p, r in rows().items()),
                   timeout=20, message="the finalization file verified")
        final = next(p for p in rows() if p.endswith("_finalized.yaml"))
        assert (base / final).is_file()
        for name, data in files.items():
            assert (base / "16000" / name).read_bytes() == data
        tampered = next(iter(files))
        (base / "16000" / tampered).write_bytes(b"not what was sent")  # the far copy lost since
        agent.retain_once(now=time.time() + 3 * 86400)
        for name in files:
            assert (inbox / name).exists() == (name == tampered), name
    finally:
        catalog.close()
    assert far_files(served.outside) == {"secret"}
    assert not [r for r in caplog.records if "temporary files" in r.getMessage()]


@pytest.fixture
def deep_tree():
    """make(top, depth): a chain of directories ``d`` that deep below ``top``
    (rsync -R can make one), flattened afterwards: shutil.rmtree, as pytest's
    clean-up, recurses."""
    made = []

    def make(top: Path, depth: int) -> None:
        top.mkdir(parents=True, exist_ok=True)
        made.append(top)
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _ in range(depth):  # os.makedirs recurses too
                os.mkdir("d", dir_fd=fd)
                fd, parent = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
                os.close(parent)
        finally:
            os.close(fd)

    yield make
    for top in made:
        top_fd, at, i = os.open(top, os.O_RDONLY | os.O_DIRECTORY), "d", 0
        try:
            while True:  # move the rest of the chain up to top, one level at a time
                try:
                    fd = os.open(at, os.O_RDONLY | os.O_DIRECTORY, dir_fd=top_fd)
                except FileNotFoundError:
                    break
                try:
                    i += 1
                    os.rename("d", f"flat{i}", src_dir_fd=fd, dst_dir_fd=top_fd)
                except FileNotFoundError:
                    break
                finally:
                    os.close(fd)
                at = f"flat{i}"
        finally:
            os.close(top_fd)


@pytest.mark.parametrize("via", ["serve", "a local archive", "shell over ssh"])
def test_the_clean_up_of_identical_copies_follows_no_planted_link_and_survives_a_deep_tree(
        tmp_path, via, sshd, remote_dir, destinations, deep_tree):  # deep_tree's clean-up first
    """Finding 4: a symlinked .watcher-replaced led the clean-up (serve's and
    a local archive's rmdir, shell mode's rm and find) outside."""
    from watcher.rsync import _local_md5, parse_far_md5
    top = sshd.make_remote_dir(remote_dir / "top") if via == "shell over ssh" else tmp_path
    root, outside = top / "root", top / "outside"
    (root / "arch" / "d").mkdir(parents=True)
    (root / "arch" / "d" / "a.dat").write_bytes(b"a")
    (root / "arch" / "d" / "d").mkdir()
    (root / "arch" / "d" / "d" / "a.dat").write_bytes(b"a")
    (outside / "b1" / "d").mkdir(parents=True)
    (outside / "b1" / "d" / "a.dat").write_bytes(b"a")  # identical: removed, were it in the archive
    (outside / "b1" / "x" / "y").mkdir(parents=True)
    (root / "arch" / ".watcher-replaced").symlink_to(outside)
    (root / "arch" / "d" / ".watcher-replaced" / "b2" / "e").mkdir(parents=True)
    (root / "arch" / "d" / ".watcher-replaced" / "b3").mkdir()
    (root / "arch" / "d" / ".watcher-replaced" / "b3" / "d").symlink_to(outside / "b1" / "d")
    if sshd.is_root and via == "shell over ssh":
        for p in top.rglob("*"):
            os.chown(p, sshd.pw.pw_uid, sshd.pw.pw_gid, follow_symlinks=False)
    deep_tree(root / "arch" / "d" / ".watcher-replaced" / "b2", 1100)

    def md5_request(base: str, replaced: str) -> dict[str, str]:
        names = b"./d/a.dat\0./a.dat\0"
        if via == "a local archive":
            return _local_md5(str(root / base), ["d/a.dat", "a.dat"], replaced)
        if via == "serve":
            done = serve_here(root, f"watcher-serve md5 {base} {replaced}", stdin=names)
        else:
            argv = destinations(ssh_archive(sshd, root / base)).remote_md5_args(replaced)
            done = subprocess.run(argv, input=names, capture_output=True, timeout=60)
        assert done.returncode in (0, 123) and b"Traceback" not in done.stderr, done
        return {k.decode()[2:]: v for k, v in parse_far_md5(done.stdout).items()}

    assert md5_request("arch", ".watcher-replaced/b1") == {"d/a.dat": md5(b"a")}
    assert (outside / "b1" / "x" / "y").is_dir() and (outside / "b1" / "d" / "a.dat").exists()
    both = {"a.dat": md5(b"a"), "d/a.dat": md5(b"a")}
    assert md5_request("arch/d", ".watcher-replaced/b3") == both  # b3/d: a link to outside/b1/d
    assert (outside / "b1" / "d" / "a.dat").exists()
    assert md5_request("arch/d", ".watcher-replaced/b2") == both
    if via != "shell over ssh":  # find walks any depth: all of it is gone there
        # no RecursionError: what is empty is removed, the tree too deep to walk is left
        assert sorted(os.listdir(root / "arch" / "d" / ".watcher-replaced" / "b2")) == ["d"]


def test_the_temp_file_requests_never_reach_kept_copies_at_any_depth_and_survive_deep_trees(tmp_path, deep_tree):
    """Findings 7 and 8: a requester-chosen BASE inside .watcher-replaced, or
    one nested deeper, let `clean` remove a kept copy; a deep tree was a traceback."""
    base = tmp_path / "arch"
    kept = {"sub/.watcher-replaced/b1/.run.log.Ab12Cd", ".watcher-replaced/b1/.run.log.Ab12Cd"}
    for name in [*kept, "sub/.a.dat.Qw12Er"]:
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_bytes(b"x")
    deep_tree(base / "deep", 1100)
    done = serve_here(tmp_path, "watcher-serve temp-files arch 0")
    assert done.returncode == 0 and not done.stderr and done.stdout == b"sub/.a.dat.Qw12Er\0", done
    for request in ("temp-files arch/.watcher-replaced/b1 0", "clean arch/sub/.watcher-replaced/b1 0",
                    "md5 arch/.watcher-replaced", "temp-files " + "/".join(["d"] * 65) + " 0"):
        done = serve_here(tmp_path, "watcher-serve " + request, stdin=b".run.log.Ab12Cd\0")
        assert refused_in_one_line(done, "inside a .watcher-replaced" if "replaced" in request
                                   else "more than 64 directories"), done
    done = serve_here(tmp_path, "watcher-serve clean arch 0", stdin=b"".join(n.encode() + b"\0" for n in kept))
    assert done.returncode == 0 and done.stdout == b"", done
    assert all((base / name).exists() for name in kept)


def test_a_refusal_of_the_batch_by_serve_is_the_archives_trouble_not_the_connections(served, destinations, tmp_path):
    """Finding 10: rsync exits 12 when its receiver is refused."""
    path = tmp_path / "a.dat"
    path.write_bytes(b"a")
    dest = destinations(served.archive(str(served.outside / "arch")))
    with pytest.raises(TransferError) as caught:
        ship_batch(dest, [Item(1, str(path), "a.dat", md5(b"a"), 1)])
    assert caught.value.kind == "archive" and "watcher serve refused" in str(caught.value), caught.value


def test_the_names_a_request_reads_are_capped(tmp_path):
    """Finding 6: md5 and clean held all of standard input, and md5 echoed it."""
    from watcher.serve import MAX_NAMES, MAX_NAMES_BYTES
    (tmp_path / "arch").mkdir()
    too_long = b"./" + b"x" * (MAX_NAMES_BYTES // 2) + b"\0"
    for request, names in [("md5 arch", too_long), ("clean arch 0", too_long),
                           ("md5 arch", b"./x\0" * (MAX_NAMES + 1))]:
        done = serve_here(tmp_path, "watcher-serve " + request, stdin=names * 2)
        assert refused_in_one_line(done, "names on standard input") and not done.stdout, done


def test_append_only_never_changes_a_far_file_whatever_the_client_sends(sshd, remote_dir, tmp_path, destinations):
    """Finding 1: --append-only once let rsync replace a file and put the earlier
    one back, from a directory the client could write into itself. Now the
    receiver skips every name that exists, under a lock of the root."""
    import fcntl
    root = sshd.make_remote_dir(remote_dir / "root")
    served = Served(sshd, tmp_path, root, remote_dir, serve_options=("--append-only",))
    try:
        dest = destinations(served.archive("arch"))
        src = tmp_path / "src"
        (src / "d").mkdir(parents=True)
        path = src / "d" / "a.dat"

        def ship(data: bytes, new_file: bool):
            if new_file:
                path.unlink(missing_ok=True)
            path.write_bytes(data)  # else rewritten in place: an edit, whose batch sends no --backup-dir
            item = Item(1, str(path), "d/a.dat", md5(data), len(data), dest.may_be_edit(1, str(path), "d/a.dat"))
            results, _ = ship_batch(dest, [item])
            dest.verified(item)
            return results[1].found

        assert ship(b"first", new_file=True) == md5(b"first")
        assert ship(b"first", new_file=True) == md5(b"first")  # a retry of the same content is verified
        assert ship(b"second", new_file=True) == md5(b"first")  # not verified: the far copy stays
        assert ship(b"third", new_file=False) == md5(b"first")  # nor an edit
        far = root / "arch" / "d" / "a.dat"
        mode = far.stat().st_mode

        # a thief: other content, modes and umask, a backup dir it wrote into
        # itself (the put-back once renamed its file over the archived one), a
        # directory where the file is
        path.write_bytes(b"garbage")
        path.chmod(0o666)
        (src / ".watcher-replaced" / "evil" / "d").mkdir(parents=True)
        (src / ".watcher-replaced" / "evil" / "d" / "a.dat").write_bytes(b"garbage")
        (tmp_path / "src2" / "d" / "a.dat").mkdir(parents=True)
        (tmp_path / "src2" / "d" / "a.dat" / "x").write_bytes(b"x")
        host = f"{served.sshd.ssh_target}:arch/"
        for args in [("-tpIR", "--rsync-path=umask 000 && rsync", "./d/a.dat"),
                     ("-tRb", "--backup-dir=.watcher-replaced/evil", "./.watcher-replaced/evil/d/a.dat",
                      "./d/a.dat"),
                     ("-tR", "../src2/./d/a.dat/x")]:  # finding 9: the file once hidden for a directory
            done = subprocess.run(["rsync", "-e", shlex.join(["ssh", *served.options()]), "--no-implied-dirs",
                                   *args, host], cwd=src, capture_output=True, timeout=60)
            if "x" not in args[-1]:
                assert done.returncode == 0 and b"d/a.dat exists" in done.stdout, done
        assert far.read_bytes() == b"first" and far.stat().st_mode == mode
        (root / "arch" / ".x.dat.Ab12Cd").write_bytes(b"archived, named like a temporary file")
        (root / "arch" / ".watcher-replaced" / "b" / "d").mkdir(parents=True)
        (root / "arch" / ".watcher-replaced" / "b" / "d" / "a.dat").write_bytes(b"first")
        assert served.ssh("watcher-serve clean arch 0", stdin=b".x.dat.Ab12Cd\0").stdout == b""
        assert served.ssh("watcher-serve md5 arch .watcher-replaced/b", stdin=b"./d/a.dat\0").returncode == 0
        assert (root / "arch" / ".x.dat.Ab12Cd").exists()
        assert (root / "arch" / ".watcher-replaced" / "b" / "d" / "a.dat").exists()

        # two sessions: the second receiver waits for the first to end (between
        # rsync's check that a name is free and its rename, another's could land)
        (src / "d" / "new.dat").write_bytes(b"new")
        lock = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a session running
            waiting = subprocess.Popen(["rsync", "-e", shlex.join(["ssh", *served.options()]), "--no-implied-dirs",
                                        "-tR", "./d/new.dat", host], cwd=src, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE)
            inode = f":{os.stat(root).st_ino} "
            wait_until(lambda: any("->" in line and inode in line for line in open("/proc/locks")),
                       timeout=20, message="the second receiver to wait for the root's lock")
            assert not (root / "arch" / "d" / "new.dat").exists()
        finally:
            os.close(lock)
        assert waiting.wait(timeout=30) == 0, waiting.stderr.read()
        assert (root / "arch" / "d" / "new.dat").read_bytes() == b"new"
    finally:
        served.remove()
