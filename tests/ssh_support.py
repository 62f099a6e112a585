"""Fixtures and helpers for the tests that drive a TransferWorker or ship over ssh
(tests/test_ssh_*.py, tests/test_trust_*.py, tests/test_hostile_names.py): an ssh
Archive for the test sshd, destinations with their own control directory, a
catalog, an injected sleep, and logging wrappers around the real rsync and ssh.

A conftest plugin (tests/conftest.py lists it), so test modules use its fixtures
by name and import only its helpers.

Nothing here replaces a real part: the wrappers append one record to a log and
exec the real binary.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from tests.sshd import SshServer
from tests.waiting import wait_until
from watcher.config import Archive, Config
from watcher.catalog import Catalog
from watcher.health import Health
from watcher.roots import Roots
from watcher.rsync import Destination
from watcher.ssh import make_control_dir, remove_control_dir
from watcher.transfer import TransferWorker


def ssh_archive(sshd: SshServer, basedir: str | os.PathLike, name: str = "arch", **options) -> Archive:
    """An archive that ships to `basedir` on the test sshd."""
    settings = dict(name=name, remote_basedir=str(basedir), ssh_host=sshd.ssh_target,
                    ssh_port=sshd.port, ssh_key=str(sshd.client_key),
                    known_hosts=str(sshd.known_hosts))
    settings.update(options)
    return Archive(**settings)


def ssh_archive_options(sshd: SshServer, basedir: str | os.PathLike, **options) -> dict:
    """The same archive as rules.yaml keys, for the `setup` fixture."""
    return dict(remote_basedir=str(basedir), ssh_host=sshd.ssh_target, ssh_port=sshd.port,
                ssh_key=str(sshd.client_key), known_hosts=str(sshd.known_hosts), **options)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def processes_mentioning(text: str | os.PathLike) -> list[int]:
    """Live (not zombie) processes whose command line contains `text`."""
    needle = os.fsencode(text)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle in cmdline and state != "Z":
            found.append(int(entry))
    return found


def control_sockets(control_dir: str) -> list[str]:
    return [e.path for e in os.scandir(control_dir) if stat.S_ISSOCK(e.stat(follow_symlinks=False).st_mode)]


def unwritable_far_dir(sshd: SshServer, path: Path) -> Path:
    """A far directory the ssh login user can read but not write.

    As root: owned by root, mode 755 (the login user is someone else).
    Otherwise the login user is us, so the best we can do is mode 555.
    """
    path.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, 0, 0)
        path.chmod(0o755)
    else:
        path.chmod(0o555)
    return path


def make_far_dir_writable(sshd: SshServer, path: Path) -> None:
    if os.geteuid() == 0:
        os.chown(path, sshd.pw.pw_uid, sshd.pw.pw_gid)
    path.chmod(0o755)


class Sleeps:
    """An injected sleep for TransferWorker: records each delay, waits for none,
    and calls `on_sleep(n)` (n counts from 1) so a test can act during an outage.

    More than `limit` back-offs fail the test instead of retrying for ever.
    """

    def __init__(self, on_sleep=None, limit: int = 8):
        self.delays: list[float] = []
        self.on_sleep = on_sleep
        self.limit = limit

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if len(self.delays) > self.limit:
            raise AssertionError(f"the worker backed off {len(self.delays)} times")
        if self.on_sleep:
            self.on_sleep(len(self.delays))


@contextlib.contextmanager
def destination_maker(local_roots: tuple[str, ...]):
    """``make(archive)`` -> a Destination that may send files below
    ``local_roots``, each with its own ssh control directory (so no test
    reuses another's connection); their masters are stopped on exit."""
    made: list[tuple[Destination, str]] = []

    def make(archive: Archive) -> Destination:
        control = make_control_dir()
        dest = Destination(archive, control, local_roots)
        made.append((dest, control))
        return dest

    try:
        yield make
    finally:
        for dest, control in made:
            dest.close()
            remove_control_dir(control)


@pytest.fixture
def destinations():
    """Make Destinations (destination_maker) that may send any file ("/" is
    their one root, nothing below it followed): which rows a worker ships is
    its own roots' say (see make_worker)."""
    with destination_maker(("/",)) as make:
        yield make


@pytest.fixture
def catalog(tmp_path):
    cat = Catalog(tmp_path / "catalog.db")
    yield cat
    cat.close()


@pytest.fixture
def health(catalog):
    h = Health(catalog.path)
    yield h
    h.close()


def api_roots_config(archive: Archive, tmp_path: Path) -> Config:
    """A configuration with this archive alone, whose API root is tmp_path/src
    (where `register` writes files) and no rules."""
    archive = replace(archive, api_roots=(str(tmp_path / "src"),))
    return Config(instance_id="test", database=tmp_path / "catalog.db",
                  file_root=tmp_path / "finalization", archives={archive.name: archive}, rules=())


@pytest.fixture
def make_worker(catalog, health, destinations, tmp_path):
    """A TransferWorker driven step by step from the test thread; it ships
    rows whose files lie below tmp_path/src."""
    def make(archive: Archive, sleep=None, max_backoff: float = 60.0, stop=None) -> TransferWorker:
        return TransferWorker(catalog, archive, destinations(archive), stop or threading.Event(),
                              health, sleep=sleep or Sleeps(), max_backoff=max_backoff,
                              roots=Roots(api_roots_config(archive, tmp_path)))
    return make


def register(catalog: Catalog, archive: str, files: dict[str, bytes], src: Path,
             timestamp: float | None = None) -> dict[str, int]:
    """Write each file under `src` (named by its remote path) and register it.

    Returns {remote path: row id}.
    """
    ids = {}
    for remote, data in files.items():
        local = src / remote
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        ids[remote] = catalog.add_file(str(local), remote, archive, timestamp=timestamp).id
    return ids


def row(catalog: Catalog, file_id: int):
    return catalog.File.get_by_id(file_id)


class ToolLog:
    """Logging wrappers for `rsync` and `ssh` first on PATH.

    Each call appends its argv (NUL-terminated) to a log and execs the real
    tool, so the real rsync and ssh still run.
    """

    def __init__(self, root: Path, monkeypatch):
        self.bin = root / "logged-bin"
        self.bin.mkdir()
        self.path = root / "tools.log"
        self.path.write_bytes(b"")
        for tool in ("rsync", "ssh"):
            real = shutil.which(tool)
            assert real, f"{tool} not installed"
            script = self.bin / tool
            script.write_text(f'#!/bin/sh\nprintf \'%s\\0\' "{tool} $*" >> "$WATCHER_TOOL_LOG"\n'
                              f'exec {real} "$@"\n')
            script.chmod(0o755)
        monkeypatch.setenv("WATCHER_TOOL_LOG", str(self.path))
        monkeypatch.setenv("PATH", f"{self.bin}{os.pathsep}{os.environ['PATH']}")

    def calls(self) -> list[bytes]:
        return [c for c in self.path.read_bytes().split(b"\0") if c]

    def rsync_calls(self) -> list[bytes]:
        return [c for c in self.calls() if c.startswith(b"rsync ")]

    def ssh_calls(self) -> list[bytes]:
        return [c for c in self.calls() if c.startswith(b"ssh ")]

    def md5_calls(self) -> list[bytes]:
        """ssh calls that run the far md5 command (not the ones rsync starts)."""
        return [c for c in self.ssh_calls() if b"md5sum" in c]

    def clear(self) -> None:
        self.path.write_bytes(b"")


@pytest.fixture
def tool_log(tmp_path, monkeypatch) -> ToolLog:
    return ToolLog(tmp_path, monkeypatch)


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str):
    """A tmpfs mounted at ``path`` (made), unmounted afterwards: a file system
    of its own. Mounting needs root (and a container may forbid it): the
    test is skipped then, saying so."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        wait_until(lambda: subprocess.run(["umount", str(path)], capture_output=True).returncode == 0,
                   timeout=10, message=f"umount {path}")


@pytest.fixture
def tiny_far_disk(sshd, remote_dir):
    """A 64 KiB tmpfs inside remote_dir, owned by the ssh user: a far disk that fills up."""
    with mounted_tmpfs(remote_dir / "tiny", "size=64k,mode=755") as path:
        os.chown(path, sshd.pw.pw_uid, sshd.pw.pw_gid)
        yield path


FAR_USER = "watcherfar"


def far_account() -> pwd.struct_passwd:
    """A login of its own for a misbehaving far side (its start-up files are
    the tests' to change: the sshd fixture's login serves every other test)."""
    if subprocess.run(["id", FAR_USER], capture_output=True).returncode != 0:
        r = subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", "-p", "*", FAR_USER],
                           capture_output=True, text=True)
        if r.returncode not in (0, 9):  # 9: made concurrently
            raise RuntimeError(f"useradd {FAR_USER} failed: {r.stderr}")
    return pwd.getpwnam(FAR_USER)


class FarServer(SshServer):
    """A second sshd, with its own host key, whose sessions may get extra
    environment (``SetEnv``, e.g. a PATH with another rsync first) and may
    log in as an account of their own (``own_account``: its ~/.bashrc can
    be made to print)."""

    def __init__(self, env: dict[str, str], own_account: bool = False):
        super().__init__()
        if own_account:
            self.pw = far_account()
            self.user = self.pw.pw_name
            self._write_config()
        if env:
            with open(self.config, "a") as f:
                f.write("SetEnv " + " ".join(f"{k}={v}" for k, v in env.items()) + "\n")


@pytest.fixture
def far_server():
    """Start FarServers with the given session environment; cleaned up afterwards."""
    servers: list[FarServer] = []

    def start(own_account: bool = False, **env: str) -> FarServer:
        if own_account and os.geteuid() != 0:
            pytest.skip("a far account of its own needs root")
        server = FarServer(env, own_account)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.cleanup()
