"""The production deployment, end to end, with the agent NOT root.

README.md's "Installing for production" and systemd/watcher@.service say
how the agent runs: its own account (here ``watchersvc``), its private
group, the catalog group (``watcherdata``) as a supplementary group, umask
007, no new privileges and one capability, CAP_LEASE (ambient, the only
one in the bounding set). This module lays out the directories exactly as
the install steps do (below a shared directory other accounts can reach),
starts ``watcher run`` the way systemd would (setpriv, a clean environment,
a notify socket for Type=notify), and checks the promises of "Security
model" with a real producer account (tests/local_users.py):

1. the agent starts, says where things are, refuses nothing; a file the
   producer writes into the watched tree is shipped, verified and deleted
   (a lease on another user's file: CAP_LEASE); without the capability the
   file is kept and `watcher status --json` counts it under problems;
2. the producer registers files through socs' API (watcher.db.add_file,
   SupRsyncFilesManager) in an ``api_roots`` directory and they ship; rows
   naming files outside the roots are refused and never read;
3. the catalog and SQLite's -wal/-shm files beside it are group-writable:
   the producer inserts rows while the agent runs (and after root ran
   `watcher status`), and after it stopped;
4. a forged row (timestamp 0, the right md5, a matching far copy) cannot make
   the agent delete or touch a producer file outside the roots that the
   agent's account could otherwise delete.

Tests 2 and 3 run on a catalog the agent creates itself (the README's steps
make none: SQLite alone would make it 0644 less the umask, which the catalog
group cannot write) and on one the administrator made 0660 beforehand.

All waits poll with deadlines (AgentProcess.wait_for, tests/waiting.py).
Everything needs root (accounts, setpriv); elsewhere it skips.
"""
from __future__ import annotations

import grp
import hashlib
import itertools
import json
import os
import pwd
import shutil
import site
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.agent_process import AgentProcess, watcher_command
from tests.local_users import Account, _account
from tests.status_command import SHOWN

SERVICE = "watchersvc"
ARCHIVE = "smurf"
PROJECT = Path(__file__).resolve().parent.parent
WRITERS_UNKNOWN = "files whose writers cannot be checked"  # watcher/retention.py's problem kind
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OLD_ATIME = 1_000_000_000  # 2001: a read makes relatime move it (older than a day)
_serial = itertools.count(1)


# Who makes the catalog: the agent at its first start, as README.md's install steps
# have it, or the administrator beforehand, group-writable (a workaround, not in the README).
BY_AGENT = "catalog made by the agent"
BY_ADMINISTRATOR = "catalog made 0660 by the administrator"


class ProducerCannotWriteCatalog(AssertionError):
    """The catalog group may not write the catalog the agent made."""


BOTH_CATALOGS = pytest.mark.parametrize("catalog_by", [
    pytest.param(BY_AGENT, id="catalog-by-agent"),
    pytest.param(BY_ADMINISTRATOR, id="catalog-by-admin")])


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def interpreter_for(account: Account) -> tuple[str, dict[str, str]]:
    """The Python and environment another account can run the project with:
    as Account.python picks them (the tests' interpreter may lie below /root)."""
    python = sys.executable
    if account.run(["test", "-x", python]).returncode != 0:
        python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    env = {"PYTHONPATH": os.pathsep.join([str(PROJECT), *site.getsitepackages()]),
           "PYTHONDONTWRITEBYTECODE": "1"}
    return python, env


@pytest.fixture(scope="session")
def service(catalog_group) -> Account:
    """The agent's own account: a private group, and the catalog group."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to start the agent as systemd would")
    account = _account(SERVICE, (catalog_group.gr_name,))
    probe = subprocess.run(_setpriv(account, catalog_group, lease=True) + ["true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"setpriv cannot give an account an ambient capability here: {probe.stderr.strip()}")
    return account


def _setpriv(account: Account, group: grp.struct_group, lease: bool) -> list[str]:
    """What User=, Group=, SupplementaryGroups=, NoNewPrivileges=,
    AmbientCapabilities=CAP_LEASE and CapabilityBoundingSet=CAP_LEASE do."""
    caps = (["--inh-caps=+lease", "--ambient-caps=+lease", "--bounding-set=-all,+lease"] if lease
            else ["--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"])
    return ["setpriv", f"--reuid={account.uid}", f"--regid={account.gid}",
            f"--groups={account.gid},{group.gr_gid}", *caps, "--no-new-privs", "--"]


class Deployment:
    """README's install steps, below ``base`` instead of /var/lib, /data and /etc."""

    def __init__(self, base: Path, service: Account, producer: Account, group: grp.struct_group,
                 catalog_by: str = BY_AGENT):
        self.base, self.service, self.producer, self.group = base, service, producer, group
        svc, gid = service.uid, service.gid
        # install -d -o watcher -g watcher -m 0755 /var/lib/watcher (its home), and so on
        self.home = self._dir(base / "var-lib-watcher", svc, gid, 0o755)
        self.state = self._dir(self.home / "state", svc, group.gr_gid, 0o2770)
        self.file_root = self._dir(self.home / "finalization", svc, gid, 0o755)
        # chgrp -R watcherdata /data/smurf_data && chmod -R g+rwX,g+s /data/smurf_data
        self.data = self._data_tree(base / "data" / "smurf_data")
        self.api = self._data_tree(base / "data" / "timestreams")  # the archive's api_roots
        # a local archive, the agent's own
        self.far = self._dir(base / "archive", svc, gid, 0o755)
        # the producer's other files, in a directory the agent's group may write: only
        # the roots keep the agent from deleting there
        self.elsewhere = self._data_tree(base / "data" / "producer-notes")
        self.database = self.state / "catalog.db"
        if catalog_by == BY_ADMINISTRATOR:
            # install -m 0660 -o watcher -g watcherdata /dev/null /var/lib/watcher/state/catalog.db:
            # not in the README; SQLite makes -wal and -shm with the catalog's mode
            subprocess.run(["install", "-m", "0660", "-o", service.name, "-g", group.gr_name,
                            "/dev/null", str(self.database)], check=True)
        self.logs = self._dir(base / "logs", 0, 0, 0o755)
        etc = self._dir(base / "etc-watcher", 0, 0, 0o755)
        self.config = etc / f"{ARCHIVE}.yaml"
        self.config.write_text(yaml.safe_dump({
            "instance_id": "trust-deployment",
            "database": str(self.database),
            "file_root": str(self.file_root),
            "catalog_group": group.gr_name,
            "rescan_interval": 300,
            "archives": {ARCHIVE: {"remote_basedir": str(self.far), "delete_local_after": 1,
                                   "api_roots": [str(self.api)]}},
            "rules": [{"watch": str(self.data), "archive": ARCHIVE, "settle": 0.5,
                       "remote_path": "{timecode}/{relpath}"}],
        }, sort_keys=False))
        os.chmod(self.config, 0o644)

    @staticmethod
    def _dir(path: Path, uid: int, gid: int, mode: int) -> Path:
        path.mkdir(parents=True)
        os.chown(path, uid, gid)
        os.chmod(path, mode)  # after chown, which clears the setgid bit
        return path

    def _data_tree(self, path: Path) -> Path:
        path.mkdir(parents=True)
        subprocess.run(["chgrp", "-R", self.group.gr_name, str(path)], check=True)
        subprocess.run(["chmod", "-R", "g+rwX,g+s", str(path)], check=True)
        return path

    # -- acting as the producer ------------------------------------------------------

    def produce(self, path: Path, content: bytes, umask: str = "027") -> Path:
        """The producer writes a file (its umask: 027 gives 0640, 002 gives 0664),
        its directories made group-writable (umask 002) as the data tree asks."""
        done = self.producer.run(["sh", "-c", f'umask 002; mkdir -p "$(dirname "$1")"; '
                                              f'umask {umask}; cat > "$1"', "sh", str(path)],
                                 input=content.decode())
        assert done.returncode == 0, f"the producer cannot write {path}: {done.stderr}"
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (self.producer.uid, self.group.gr_gid), "setgid data tree"
        return path

    def producer_python(self, code: str, *args: str) -> str:
        done = self.producer.python(code, *args, timeout=60)
        if "attempt to write a readonly database" in done.stderr:
            raise ProducerCannotWriteCatalog(f"the producer cannot write the catalog ({self.modes()}): "
                                             f"{done.stderr.strip().splitlines()[-1]}")
        assert done.returncode == 0, f"as the producer: {done.stderr}"
        return done.stdout

    def modes(self) -> str:
        """Owner, group and mode of the catalog and SQLite's files beside it."""
        shown = []
        for name in ("catalog.db", "catalog.db-wal", "catalog.db-shm"):
            try:
                st = (self.state / name).stat()
            except FileNotFoundError:
                continue
            shown.append(f"{name} {stat.filemode(st.st_mode)} {pwd.getpwuid(st.st_uid).pw_name}:"
                         f"{grp.getgrgid(st.st_gid).gr_name}")
        return ", ".join(shown)

    def insert_row(self, **columns) -> int:
        """A row written by the producer's own process with plain sqlite3 (every column is theirs)."""
        row = {"archive_name": ARCHIVE, "remote_path": "forged.dat", "local_md5sum": "0" * 32,
               "timestamp": 0.0, "failed_copy_attempts": 0, "deletable": 1, "ignore": 0, **columns}
        code = ("import json, sqlite3, sys\n"
                "row = json.loads(sys.argv[2])\n"
                "con = sqlite3.connect(sys.argv[1], timeout=30)\n"
                "names = ', '.join('\"%s\"' % k for k in row)\n"
                "cur = con.execute('INSERT INTO supersync_v0 (%s) VALUES (%s)'"
                " % (names, ', '.join('?' * len(row))), list(row.values()))\n"
                "con.commit()\n"
                "print(cur.lastrowid)\n")
        return int(self.producer_python(code, str(self.database), json.dumps(row)))

    # -- looking -------------------------------------------------------------------------

    def rows(self) -> list[dict]:
        with sqlite3.connect(self.database, timeout=30) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM supersync_v0 ORDER BY id")]

    def row(self, row_id: int) -> dict:
        return next(r for r in self.rows() if r["id"] == row_id)

    def rows_of(self, path: Path) -> list[dict]:
        return [r for r in self.rows() if r["local_path"] == str(path)]

    def shipped_and_deleted(self, path: Path, content: bytes, remote: str | None = None) -> bool:
        """One row for the path, verified with this content, removed, and the far copy
        under ``remote`` (by default the row's far name) is this content."""
        mine = self.rows_of(path)
        if len(mine) != 1 or (remote is not None and mine[0]["remote_path"] != remote):
            return False
        far = self.far / mine[0]["remote_path"]
        return (not path.exists() and mine[0]["remote_md5sum"] == md5(content)
                and mine[0]["removed"] is not None and far.exists() and far.read_bytes() == content)

    def status(self) -> dict:
        shown = subprocess.run(watcher_command("status", "--json", "--config", str(self.config)),
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode in SHOWN, shown.stderr
        return json.loads(shown.stdout)[ARCHIVE]


class ServiceAgent(AgentProcess):
    """``watcher run --config FILE`` started as the unit starts it: the service
    account, its groups, umask 007, no new privileges, CAP_LEASE (or none), a
    systemd-like environment and a notify socket (Type=notify)."""

    def __init__(self, d: Deployment, lease: bool = True):
        super().__init__(d.config, d.database, d.logs)
        self.d, self.lease = d, lease
        self.notify: socket.socket | None = None
        self.received: list[str] = []

    def start(self, pause_at: str | None = None, env: dict[str, str] | None = None) -> "ServiceAgent":
        assert pause_at is None and env is None, "started as systemd would: no test hooks"
        assert not self.running(), "the agent is already running"
        n = next(_serial)
        self.log_path = self.workdir / f"agent-{n}.log"
        self.logs.append(self.log_path)
        notify_path = self.workdir / f"notify-{n}"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(notify_path))
        os.chmod(notify_path, 0o777)  # as /run/systemd/notify: any service may send
        self.notify.settimeout(0)
        pw = pwd.getpwuid(self.d.service.uid)
        python, extra = interpreter_for(self.d.service)
        env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", "HOME": pw.pw_dir, "USER": pw.pw_name,
               "LOGNAME": pw.pw_name, "SHELL": pw.pw_shell, "NOTIFY_SOCKET": str(notify_path), **extra}
        argv = [*_setpriv(self.d.service, self.d.group, self.lease),
                python, "-m", "watcher.cli", "run", "--config", str(self.config)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, cwd="/", umask=0o007)
        return self

    def notifications(self) -> list[str]:
        """Every message the agent sent to its notify socket so far."""
        while True:
            try:
                self.received.append(self.notify.recv(4096).decode())
            except BlockingIOError:
                return self.received

    def credentials(self) -> dict[str, str]:
        """Uid, groups, capabilities and umask of the running agent, from /proc."""
        return {k: v.strip() for k, v in (line.split(":", 1) for line in
                Path(f"/proc/{self.pid}/status").read_text().splitlines())
                if k in ("Uid", "Gid", "Groups", "CapEff", "CapAmb", "CapBnd", "NoNewPrivs", "Umask")}

    def close(self) -> None:
        if self.notify is not None:
            self.notify.close()


@pytest.fixture
def catalog_by() -> str:
    """Overridden by BOTH_CATALOGS; tests that do not name it get the README's deployment."""
    return BY_AGENT


@pytest.fixture
def deployment(shared_dir, service, producer, catalog_group, catalog_by) -> Deployment:
    return Deployment(shared_dir, service, producer, catalog_group, catalog_by)


@pytest.fixture
def agents():
    """``make(deployment, lease=True)``; each still running at the end must stop
    cleanly on SIGTERM (exit 0)."""
    made: list[ServiceAgent] = []

    def make(d: Deployment, lease: bool = True) -> ServiceAgent:
        agent = ServiceAgent(d, lease)
        made.append(agent)
        return agent

    yield make
    problems = []
    for agent in made:
        if agent.running():
            status = agent.terminate()
            if status != 0:
                problems.append(f"agent exited {status} on SIGTERM\n{agent.log_tail()}")
        agent.close()
    assert not problems, "\n".join(problems)


def started(agent: ServiceAgent) -> ServiceAgent:
    """Start, wait until it watches its tree and told systemd it is ready."""
    agent.start()
    agent.wait_ready(timeout=30)
    agent.wait_for(lambda: any(m.startswith("READY=1") for m in agent.notifications()),
                   timeout=10, message="READY=1 on the notify socket")
    return agent


def stop(agent: ServiceAgent) -> None:
    """SIGTERM, as systemctl stop: a clean exit within the unit's TimeoutStopSec."""
    assert agent.terminate(timeout=30) == 0, agent.log_tail()


def complaints(log: str) -> list[str]:
    return [line for line in log.splitlines()
            if " WARNING " in line or " ERROR " in line or "refus" in line.lower() or "Traceback" in line]


def quiet(agent: ServiceAgent) -> bool:
    """True; fails at once when the agent logged a warning, an error or a refusal
    (without CAP_LEASE: 'cannot tell whether a process writes to it')."""
    found = complaints(agent.log())
    assert not found, "the agent complained:\n" + "\n".join(found)
    return True


# -- 1. the deployment works: a producer's file is shipped, verified, deleted ---------------------


def test_the_service_account_ships_verifies_and_deletes_a_producers_file(deployment, agents):
    """As the unit runs it: not root, CAP_LEASE alone, umask 007. It says where
    things are and refuses nothing; a producer's 0640 and 0664 files in the
    watched tree (owned by the producer) are shipped, verified and deleted after
    delete_local_after: 1; it stops cleanly on SIGTERM."""
    d = deployment
    agent = started(agents(d))
    creds = agent.credentials()
    assert creds["Uid"].split()[:2] == [str(d.service.uid)] * 2, creds
    assert sorted(int(g) for g in creds["Groups"].split()) == sorted({d.service.gid, d.group.gr_gid}), creds
    assert int(creds["CapEff"], 16) == int(creds["CapAmb"], 16) == int(creds["CapBnd"], 16) == 1 << 28, creds
    assert creds["NoNewPrivs"] == "1" and creds["Umask"] == "0007", creds

    log = agent.log()
    assert f"catalog {d.database}; finalization files under {d.file_root}" in log, log
    assert f"archive {ARCHIVE} -> {d.far}" in log, log
    assert f"watching {d.data} (inotify)" in log, log
    assert not complaints(log), "\n".join(complaints(log))

    private = d.produce(d.data / "1700000000" / "private.dat", b"group may read\n", umask="027")
    shared = d.produce(d.data / "shared.dat", b"group may write\n", umask="002")
    assert stat.S_IMODE(private.stat().st_mode) == 0o640 and stat.S_IMODE(shared.stat().st_mode) == 0o664
    for path, content in ((private, b"group may read\n"), (shared, b"group may write\n")):
        agent.wait_for(lambda: quiet(agent) and d.shipped_and_deleted(path, content), timeout=40,
                       message=f"{path.name} shipped, verified and deleted by the service account")
    assert d.rows_of(private)[0]["remote_path"] == "17000/1700000000/private.dat"

    # what the agent made is its account's, shared with the catalog group only (umask 007)
    for name in ("catalog.db", "catalog.db-wal", "catalog.db-shm"):
        st = (d.state / name).stat()
        assert (st.st_uid, st.st_gid) == (d.service.uid, d.group.gr_gid), name
        assert stat.S_IMODE(st.st_mode) & 0o007 == 0, f"{name} is open to others: {oct(st.st_mode)}"
    key = (d.state / "catalog.db-watcher.key").stat()
    assert key.st_uid == d.service.uid and stat.S_IMODE(key.st_mode) == 0o600
    for name in ("catalog.db-watcher.key", f"catalog.db-watcher-{ARCHIVE}.json", "catalog.db-watcher.lock",
                 f"catalog.db-watcher-{ARCHIVE}.lock"):
        assert (d.state / name).stat().st_uid == d.service.uid, name
    # timecode 17000 is complete: its finalization file is written in file_root and shipped
    agent.wait_for(lambda: list(d.far.glob(f"*/suprsync/trust-deployment/*_{ARCHIVE}_17000_finalized.yaml")),
                               timeout=40, message="timecode 17000's finalization file shipped")
    # files it made here are shared with the catalog group only (umask 007)
    made = [p for top in (d.state, d.file_root) for p in top.rglob("*")]
    opened = [f"{p} {stat.filemode(p.stat().st_mode)}" for p in made
              if p.exists() and not p.is_symlink() and p.stat().st_mode & 0o007
              and p.stat().st_uid == d.service.uid]
    assert not opened, f"open to every account: {opened}"
    # on the archive, what chmod says (socs' default g+rwX,o+rX: 664 files, 775 directories it made)
    far = {f"{p} {stat.filemode(p.stat().st_mode)}" for p in d.far.rglob("*")
           if p.stat().st_uid == d.service.uid and ".watcher-replaced" not in p.parts}
    assert far and all(m.endswith(" -rw-rw-r--") or m.endswith(" drwxrwxr-x") for m in far), far
    status = d.status()
    assert status["problems"] == {} and status["refused"] == 0 and not status["degraded"], status
    assert not complaints(agent.log()), "\n".join(complaints(agent.log()))
    stop(agent)
    assert "stopped" in agent.log_tail(3)


def test_without_cap_lease_the_producers_file_is_shipped_but_kept_and_counted(deployment, agents):
    """The unit's one capability matters: the same agent without CAP_LEASE may not
    lease the producer's file, so it ships and verifies it but keeps it, counting it
    under `watcher status --json`'s problems (nothing deleted blindly)."""
    d = deployment
    agent = started(agents(d, lease=False))
    assert int(agent.credentials()["CapEff"], 16) == 0
    path = d.produce(d.data / "kept.dat", b"nobody can tell who writes this\n")

    def kept_and_counted() -> bool:
        assert path.exists(), "the file was deleted although no lease could be taken"
        return d.status()["problems"].get(WRITERS_UNKNOWN) == 1
    agent.wait_for(kept_and_counted, timeout=40, message=f"status to count the file under {WRITERS_UNKNOWN!r}")
    (row,) = d.rows_of(path)
    assert row["remote_md5sum"] == row["local_md5sum"] and row["removed"] is None, row
    assert path.read_bytes() == b"nobody can tell who writes this\n"
    assert (d.far / row["remote_path"]).read_bytes() == path.read_bytes()
    assert "CAP_LEASE" in agent.log()
    stop(agent)


# -- 2. socs' API as the producer, inside and outside the roots --------------------------------------

REGISTER = """\
import sys
from watcher.db import add_file, SupRsyncFilesManager
db, first, second, outside_secret, shadow = sys.argv[1:]
print(add_file(first, "api/first.dat", "smurf", db_path=db).id)
srfm = SupRsyncFilesManager(db)
print(srfm.add_file(second, "api/second.dat", "smurf").id)
# rows for files the producer may not read: it gives an md5, add_file hashes nothing
print(add_file(outside_secret, "stolen/secret.dat", "smurf", "0" * 32, 0, db_path=db).id)
print(add_file(shadow, "stolen/shadow", "smurf", "0" * 32, 0, db_path=db).id)
"""


@BOTH_CATALOGS
def test_a_producer_registers_through_socs_api_and_rows_outside_the_roots_are_refused(deployment, agents):
    """Files the producer registers (add_file, SupRsyncFilesManager) below the
    archive's api_roots ship and go; rows naming a 0600 file of the service account
    and /etc/shadow are refused, counted, and the files never read."""
    d = deployment
    secret = d.home / "secret.dat"  # the agent's account may read it; the roots forbid it
    secret.write_bytes(b"the service account's own\n")
    os.chown(secret, d.service.uid, d.service.gid)
    os.chmod(secret, 0o600)
    os.utime(secret, (OLD_ATIME, secret.stat().st_mtime))
    agent = started(agents(d))

    first = d.produce(d.api / "obs_1700000000" / "first.dat", b"first\n")
    second = d.produce(d.api / "second.dat", b"second\n", umask="002")
    ids = [int(x) for x in d.producer_python(REGISTER, str(d.database), str(first), str(second),
                                             str(secret), "/etc/shadow").split()]
    assert len(ids) == 4
    for path, remote, content in ((first, "api/first.dat", b"first\n"), (second, "api/second.dat", b"second\n")):
        agent.wait_for(lambda: d.shipped_and_deleted(path, content, remote), timeout=40,
                       message=f"{remote} registered by the producer shipped, verified and deleted")
    agent.wait_for(lambda: all(d.row(i)["refused"] for i in ids[2:]), timeout=20,
                   message="the rows outside the roots refused")
    assert d.status()["refused"] == 2
    for row_id, path in zip(ids[2:], (secret, "/etc/shadow")):
        assert f"refusing catalog row {row_id} of archive {ARCHIVE}: local path '{path}'" in agent.log()
    assert not (d.far / "stolen").exists()
    if _atime_moves_on_read(d.base):  # before the test reads it itself
        assert secret.stat().st_atime == OLD_ATIME, "the agent read a file outside the roots"
    assert secret.read_bytes() == b"the service account's own\n"
    stop(agent)


def _atime_moves_on_read(where: Path) -> bool:
    """Whether this file system records reads (relatime does, for an atime older than a day)."""
    probe = where / "atime-probe"
    probe.write_bytes(b"x")
    os.utime(probe, (OLD_ATIME, probe.stat().st_mtime))
    probe.read_bytes()
    moved = probe.stat().st_atime != OLD_ATIME
    probe.unlink()
    return moved


# -- 3. the catalog stays the producer's to write ----------------------------------------------------


@BOTH_CATALOGS
def test_the_catalog_stays_writable_by_the_producer_while_the_agent_runs(deployment, agents):
    """SQLite's -wal and -shm, made by the agent (umask 007, setgid state
    directory), are group-writable: the producer inserts rows while the agent
    runs, also after root ran `watcher status` on the catalog, and the agent
    ships what they name."""
    d = deployment
    agent = started(agents(d))
    for name in ("catalog.db", "catalog.db-wal", "catalog.db-shm"):
        st = (d.state / name).stat()
        assert (st.st_uid, st.st_gid) == (d.service.uid, d.group.gr_gid), d.modes()
        if stat.S_IMODE(st.st_mode) & 0o060 != 0o060:
            raise ProducerCannotWriteCatalog(f"{name} is not group-writable: {d.modes()}")
    d.status()  # an administrator looks, as root
    for n in (1, 2):
        content = f"row {n}\n".encode()
        path = d.produce(d.api / f"plain-{n}.dat", content)
        row_id = d.insert_row(local_path=str(path), remote_path=f"plain/{n}.dat", local_md5sum=md5(content),
                              timestamp=time.time())
        agent.wait_for(lambda: d.shipped_and_deleted(path, content, f"plain/{n}.dat"), timeout=40,
                       message=f"row {row_id}, inserted by the producer with sqlite3, shipped and deleted")
    stop(agent)
    # and after the agent is gone (its last checkpoint done), still
    path = d.produce(d.api / "after.dat", b"after\n")
    d.insert_row(local_path=str(path), remote_path="after.dat", local_md5sum=md5(b"after\n"), timestamp=0.0)


# -- 4. a forged row cannot make the agent touch the producer's other files ---------------------------


@pytest.mark.parametrize("catalog_by", [BY_ADMINISTRATOR], ids=["catalog-by-admin"])
def test_a_forged_row_cannot_make_the_service_account_delete_a_producer_file(deployment, agents):
    """A producer file outside the roots, in a directory the agent's group may
    write (so only the roots protect it), named by a row with timestamp 0, its
    true md5 and a matching far copy: refused, never shipped, deleted or written."""
    d = deployment
    content = b"notes the producer keeps\n"
    notes = d.produce(d.elsewhere / "notes.txt", content, umask="002")
    before = notes.stat()
    (d.far / "notes.txt").write_bytes(content)  # the far copy "verifies"
    os.chown(d.far / "notes.txt", d.service.uid, d.service.gid)
    agent = started(agents(d))
    row_id = d.insert_row(local_path=str(notes), remote_path="notes.txt", local_md5sum=md5(content),
                          remote_md5sum=md5(content), timestamp=0.0)

    def untouched() -> bool:
        """True; fails at once when the file is gone, rewritten or replaced."""
        assert notes.exists(), "the agent deleted a producer file outside the roots"
        after = notes.stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_uid) == \
            (before.st_ino, before.st_size, before.st_mtime_ns, before.st_ctime_ns, before.st_uid), \
            "the agent changed a producer file outside the roots"
        return True
    agent.wait_for(lambda: untouched() and d.row(row_id)["refused"], timeout=20, message="the forged row refused")
    # a file the agent ships and deletes after the refusal: a retention round has passed
    probe = d.produce(d.data / "probe.dat", b"probe\n")
    agent.wait_for(lambda: untouched() and d.shipped_and_deleted(probe, b"probe\n"), timeout=40,
                   message="a later file shipped and deleted (retention ran after the forged row)")
    assert untouched() and notes.read_bytes() == content
    assert d.row(row_id)["removed"] is None and d.status()["refused"] == 1
    stop(agent)
