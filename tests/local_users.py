"""Real local accounts that play the people around the agent (pytest plugin).

The security model names who may do what: the agent's own account, and a
*producer* in the catalog group (it may write the catalog and the state
directory, as socs' add_file callers must) who must not be able to make
the agent read, ship or delete anything else. Tests play the producer
with a real second account, so every refusal is a real permission, a real
link planted by another uid, a real SQLite write from another process.

Creating accounts needs root (as CI runs); elsewhere these tests skip,
saying so.

Load with ``pytest_plugins = ["tests.local_users"]`` in tests/conftest.py.
"""
from __future__ import annotations

import grp
import os
import pwd
import subprocess
from dataclasses import dataclass

import pytest

CATALOG_GROUP = "watcherdata"
PRODUCER = "watcherproducer"
OUTSIDER = "watcheroutsider"


def _ensure_group(name: str) -> grp.struct_group:
    if subprocess.run(["getent", "group", name], capture_output=True).returncode != 0:
        r = subprocess.run(["groupadd", name], capture_output=True, text=True)
        if r.returncode not in (0, 9):  # 9: made concurrently
            raise RuntimeError(f"groupadd {name} failed: {r.stderr}")
    return grp.getgrnam(name)


def _ensure_user(name: str, groups: tuple[str, ...] = ()) -> pwd.struct_passwd:
    if subprocess.run(["id", name], capture_output=True).returncode != 0:
        argv = ["useradd", "--create-home", "--shell", "/bin/sh", "-p", "*"]
        if groups:
            argv += ["--groups", ",".join(groups)]
        r = subprocess.run(argv + [name], capture_output=True, text=True)
        if r.returncode not in (0, 9):
            raise RuntimeError(f"useradd {name} failed: {r.stderr}")
    elif groups:
        subprocess.run(["usermod", "--append", "--groups", ",".join(groups), name], check=True)
    return pwd.getpwnam(name)


@dataclass(frozen=True)
class Account:
    """A local account the tests act as."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run a command as this account (its own uid, gid and groups only)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(argv, user=self.uid, group=self.gid,
                              extra_groups=list(self.groups), cwd="/", **kwargs)

    def python(self, code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
        """Run Python code as this account, with the project and its
        dependencies importable (the tests' interpreter may lie in a home
        directory other accounts cannot enter: then the system's, which
        must be the same version, is used)."""
        import site
        import sys
        project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [project, *site.getsitepackages()]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path),
                   HOME=pwd.getpwuid(self.uid).pw_dir, PYTHONDONTWRITEBYTECODE="1")
        python = sys.executable
        if self.run(["test", "-x", python]).returncode != 0:
            python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
        return self.run([python, "-c", code, *args], env=env, **kwargs)


def _account(name: str, groups: tuple[str, ...] = ()) -> Account:
    pw = _ensure_user(name, groups)
    gids = tuple(grp.getgrnam(g).gr_gid for g in groups)
    return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, gids)


@pytest.fixture(scope="session")
def catalog_group() -> grp.struct_group:
    """The group that may write the catalog and the state directory."""
    if os.geteuid() != 0:
        pytest.skip("creating the producer's account and group needs root")
    return _ensure_group(CATALOG_GROUP)


@pytest.fixture(scope="session")
def producer(catalog_group) -> Account:
    """A member of the catalog group: may write the catalog, not ask for more."""
    return _account(PRODUCER, (catalog_group.gr_name,))


@pytest.fixture(scope="session")
def outsider() -> Account:
    """A local account in no group of the agent's."""
    if os.geteuid() != 0:
        pytest.skip("creating a second account needs root")
    return _account(OUTSIDER)


@pytest.fixture
def shared_dir():
    """A fresh directory the other accounts can reach (``tmp_path`` lies
    below pytest's 0700 directory): 0755, owned by the tests' account."""
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix="watcher-shared-", dir="/tmp")
    os.chmod(path, 0o755)
    try:
        yield __import__("pathlib").Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)
