"""The agent's own files, in directories the catalog group may write.

Producers must write the catalog's directory (SQLite makes its -wal and
-shm files beside the catalog) and may write ``file_root``, so a producer
can plant a symlink, a FIFO, a directory or a hard link wherever the agent
(root here) is about to write. A real second account (tests/local_users.py)
plants each trap in a deployment under a ``shared_dir``; a real agent runs
as root. Whatever the trap, the agent writes through none of them: it
refuses to start with one line (exit status 2) when the trap stands where
its lock or SQLite's files go, replaces it by renaming a file of its own
over the health file's name, and leaves a finalization waiting (counted in
`watcher status`) while a link stands in ``file_root``. A state directory or
``file_root`` that others than the owner and the catalog group may write
(or swap, through an ancestor) is refused at start.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import Setup
from tests.catalog_rows import row_of, verified
from tests.status_command import problems
from tests.waiting import wait_until
from watcher.catalog import Catalog
from watcher.paths import timecode_now

SECRET = b"root's secret\n"


class Deployment:
    """A deployment in a shared directory: the state directory and file_root
    root:watcherdata 2770 (the catalog group writes them), everything else
    root's; a root-only directory holding the victims a trap points at."""

    def __init__(self, base: Path, producer, group):
        self.producer = producer
        self.base = base
        self.setup = Setup(base / "deploy")
        self.setup.root.mkdir(mode=0o755)
        self.state = self.setup.root / "state"
        self.setup.database = self.state / "catalog.db"
        self.setup.file_root = self.state / "finalization"
        self.setup.top["catalog_group"] = group.gr_name
        for d in (self.state, self.setup.file_root):
            d.mkdir(mode=0o755)
            os.chown(d, 0, group.gr_gid)
            os.chmod(d, 0o2770)
        self.private = base / "private"
        self.private.mkdir(mode=0o700)
        self.victim = self.private / "victim"
        self.victim.write_bytes(SECRET)
        self.victim.chmod(0o600)
        self.setup.archive()
        self.inbox = self.setup.rule(remote_path="{timecode}/{name}")
        self.setup.write()

    def plant(self, *argv: str) -> None:
        """Run a command as the producer (ln -s, mkfifo, mkdir...); it must succeed."""
        done = self.producer.run(list(argv))
        assert done.returncode == 0, f"{argv} as the producer: {done.stderr}"

    def catalog(self) -> None:
        """The catalog, made by root and shared with the group, as the install makes it."""
        Catalog(self.setup.database).close()
        for name in os.listdir(self.state):
            if name.startswith("catalog.db"):
                os.chown(self.state / name, 0, self.setup.database.parent.stat().st_gid)
                os.chmod(self.state / name, 0o660)

    def victim_intact(self) -> bool:
        st = os.lstat(self.victim)
        return (self.victim.read_bytes() == SECRET and stat.S_IMODE(st.st_mode) == 0o600
                and st.st_uid == 0 and st.st_nlink == 1 + self.extra_links())

    def extra_links(self) -> int:
        return getattr(self, "_links", 0)


@pytest.fixture
def deployment(shared_dir, producer, catalog_group) -> Deployment:
    return Deployment(shared_dir, producer, catalog_group)


def refused(agent, deployment: Deployment, naming: str) -> str:
    """The agent exited 2 with one line naming ``naming``; the victim is intact."""
    assert agent.wait(30) == 2, agent.log_tail()
    log = agent.log()
    assert "Traceback" not in log, log
    last = log.strip().splitlines()[-1]
    assert last.startswith("watcher: ") and naming in last, last
    assert deployment.victim_intact(), "the agent wrote through the trap"
    return last


# -- the lock file ----------------------------------------------------------------

LOCK_TRAPS = {
    "symlink to a root-only file": lambda d, lock: d.plant("ln", "-s", str(d.victim), lock),
    "dangling symlink into a root-only directory":
        lambda d, lock: d.plant("ln", "-s", str(d.private / "made-by-root"), lock),
    "FIFO": lambda d, lock: d.plant("mkfifo", lock),
    "directory": lambda d, lock: d.plant("mkdir", lock),
    "file of the producer's": lambda d, lock: d.plant("sh", "-c", f"echo 1 > '{lock}'"),
    "hard link to the catalog": lambda d, lock: (d.catalog(), d.plant("ln", str(d.setup.database), lock)),
}


def _root_hard_link(d: Deployment, lock: str) -> None:
    """fs.protected_hardlinks=1 (Debian's default) keeps the producer from
    linking a file it may not write; on a host where it is 0 the producer
    could: root makes the link the producer would have made."""
    os.link(d.victim, lock)
    d._links = 1


LOCK_TRAPS["hard link to a root-only file (protected_hardlinks=0)"] = _root_hard_link


@pytest.mark.parametrize("which", ["catalog", "archive"])
@pytest.mark.parametrize("trap", LOCK_TRAPS)
def test_a_trap_at_the_lock_file_is_never_written_through(deployment, agent_processes, trap, which):
    """The producer plants a trap at catalog.db-watcher.lock (shared by the
    agents of the catalog) or the archive's catalog.db-watcher-ARCHIVE.lock: the agent opens
    it without following it, truncates nothing, and refuses to start with one
    line naming it (exit 2: the lock's inode is what excludes a second agent,
    so a wrong one is for an operator to remove, not replaced behind another
    agent's back)."""
    d = deployment
    [archive] = d.setup.archives
    lock = f"{d.setup.database}-watcher{'' if which == 'catalog' else '-' + archive}.lock"
    catalog_before = None
    LOCK_TRAPS[trap](d, lock)
    if d.setup.database.exists():
        catalog_before = d.setup.database.read_bytes()
    agent = agent_processes(d.setup).start()
    refused(agent, d, str(d.setup.database))
    assert not (d.private / "made-by-root").exists(), "the agent created a file through a dangling link"
    if catalog_before is not None:
        assert d.setup.database.read_bytes() == catalog_before, "the catalog was written through the lock"


def test_a_lock_file_of_the_agents_own_is_reused_and_a_second_agent_is_still_refused(
        deployment, agent_processes):
    """The archive's lock left by an earlier run (root's, one link) is taken
    again, its old pid replaced; a second agent then exits 1 naming the first's pid."""
    d = deployment
    [archive] = d.setup.archives
    lock = Path(f"{d.setup.database}-watcher-{archive}.lock")
    lock.write_text("999999 and more")
    first = agent_processes(d.setup).start().wait_ready()
    assert lock.read_text() == str(first.pid)
    second = agent_processes(d.setup).start()
    assert second.wait(30) == 1
    assert f"pid {first.pid}" in second.log().strip().splitlines()[-1]


# -- the health file ----------------------------------------------------------------


def _health(d: Deployment) -> Path:
    """The health file of the deployment's one archive."""
    [archive] = d.setup.archives
    return Path(f"{d.setup.database}-watcher-{archive}.json")


HEALTH_TRAPS = {
    "symlink at the health file": lambda d: d.plant("ln", "-s", str(d.victim), str(_health(d))),
    "symlink at its old temporary name": lambda d: d.plant("ln", "-s", str(d.victim), f"{_health(d)}.tmp"),
    "dangling symlink at its old temporary name":
        lambda d: d.plant("ln", "-s", str(d.private / "made-by-root"), f"{_health(d)}.tmp"),
    "FIFO at the health file": lambda d: d.plant("mkfifo", str(_health(d))),
}


@pytest.mark.parametrize("trap", HEALTH_TRAPS)
def test_a_trap_at_the_health_file_is_replaced_never_written_through(deployment, start_agent, trap):
    """Planted before the start, and again while the agent runs: each health
    write renames a new file of the agent's over the name, so the victim is
    never written, `watcher status` reads the agent's own health, and
    stopping does not hang on a FIFO put in its place."""
    d = deployment
    HEALTH_TRAPS[trap](d)
    agent = start_agent(d.setup)
    health = _health(d)
    assert d.victim_intact()
    assert not (d.private / "made-by-root").exists()
    st = os.lstat(health)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0
    assert json.loads(health.read_text())["pid"] == os.getpid()

    # While it runs: the health file becomes a trap, and a problem makes the agent write it.
    d.plant("sh", "-c", f"rm -f '{health}' && ln -s '{d.victim}' '{health}'")
    os.symlink("/etc", d.inbox / "link")  # a symlink in the tree: a problem the agent reports
    wait_until(lambda: problems(d.setup).get("symlinks") == 1, message="the symlink to be reported")
    assert d.victim_intact()
    assert stat.S_ISREG(os.lstat(health).st_mode)

    d.plant("sh", "-c", f"rm -f '{health}' && mkfifo '{health}'")
    stopper = threading.Thread(target=agent.stop, name="stopper")
    stopper.start()
    stopper.join(20)
    if stopper.is_alive():  # hung opening the FIFO to read it: give it a writer, and fail
        os.close(os.open(health, os.O_WRONLY | os.O_NONBLOCK))
        os.unlink(health)
        stopper.join(20)
        pytest.fail("stopping hung on a FIFO at the health file")
    assert stat.S_ISFIFO(os.lstat(health).st_mode), "removed something not the agent's"
    assert d.victim_intact()


# -- finalization files ----------------------------------------------------------------


def _wait_verified(d: Deployment, path: Path) -> None:
    wait_until(lambda: (row_of(d.setup.database, path) or {}).get("remote_md5sum")
               and verified(row_of(d.setup.database, path)), timeout=20, message=f"{path.name} verified")


FINALIZATION_TRAPS = {
    "timecode directory is a symlink": lambda d, tc, iid: d.plant(
        "ln", "-s", str(d.private), str(d.setup.file_root / str(tc))),
    "instance directory is a symlink": lambda d, tc, iid: (
        d.plant("mkdir", str(d.setup.file_root / str(tc))),
        d.plant("ln", "-s", str(d.private), str(d.setup.file_root / str(tc) / iid))),
    "timecode directory is a file": lambda d, tc, iid: d.plant(
        "touch", str(d.setup.file_root / str(tc))),
    # the producer's own directory: it could swap the finalization file in it
    "timecode directory made by the producer": lambda d, tc, iid: d.plant(
        "mkdir", "-m", "0755", str(d.setup.file_root / str(tc))),
    "instance directory made by the producer, read-only": lambda d, tc, iid: (
        d.plant("mkdir", str(d.setup.file_root / str(tc))),
        d.plant("mkdir", "-m", "0555", str(d.setup.file_root / str(tc) / iid))),
}


@pytest.mark.parametrize("trap", FINALIZATION_TRAPS)
def test_a_link_planted_in_file_root_makes_the_finalization_wait_and_writes_nothing_elsewhere(
        deployment, start_agent, trap):
    """With today's timecode directory (or this instance's below it) a link to
    a root-only directory, a complete and shipped timecode directory is not
    finalized through it: the finalization waits, counted in `watcher status`
    (`blocked finalizations`); once the producer removes the trap, the agent
    makes the directory itself, finalizes, and the problem is gone."""
    d = deployment
    tc = timecode_now(time.time())
    iid = d.setup.top["instance_id"]
    FINALIZATION_TRAPS[trap](d, tc, iid)
    start_agent(d.setup)
    (d.inbox / "1700000000").mkdir()
    data = d.inbox / "1700000000" / "a.dat"
    data.write_bytes(b"old data")
    _wait_verified(d, data)
    wait_until(lambda: problems(d.setup).get("blocked finalizations") == 1, timeout=15,
               message="the blocked finalization to be counted")
    assert sorted(os.listdir(d.private)) == ["victim"], "a finalization was written through the link"
    assert d.victim_intact()

    d.plant("rm", "-rf", str(d.setup.file_root / str(tc)))
    written = d.setup.file_root / str(tc) / iid
    wait_until(lambda: written.is_dir() and not written.is_symlink()
               and any(n.endswith("_arch_17000_finalized.yaml") for n in os.listdir(written)),
               timeout=15, message="the finalization once the trap is gone")
    wait_until(lambda: "blocked finalizations" not in problems(d.setup), message="the problem solved")
    assert sorted(os.listdir(d.private)) == ["victim"]


CLEAN_UP_TRAPS = {
    "instance directory is a symlink": lambda d, tc, iid, target: (
        d.plant("mkdir", str(d.setup.file_root / tc)),
        d.plant("ln", "-s", str(target / iid), str(d.setup.file_root / tc / iid))),
    "timecode directory is a symlink": lambda d, tc, iid, target: d.plant(
        "ln", "-s", str(target), str(d.setup.file_root / tc)),
}


@pytest.mark.parametrize("trap", CLEAN_UP_TRAPS)
def test_the_start_up_clean_up_of_finalization_files_never_deletes_through_a_link(
        deployment, start_agent, trap):
    """At start the agent deletes this instance's finalization files that no
    catalog row names (left by a crash). Through a link the producer planted
    in file_root, that would reach another instance's files in a root-only
    directory: they stay; this instance's own unregistered file goes."""
    d = deployment
    iid = d.setup.top["instance_id"]
    theirs = d.private / "elsewhere"
    (theirs / iid).mkdir(parents=True)
    victim = theirs / iid / "1700000000_arch_17000_finalized.yaml"
    victim.write_text("another instance's finalization\n")
    CLEAN_UP_TRAPS[trap](d, "17000", iid, theirs)
    ours = d.setup.file_root / "17001" / iid / "1700100000_arch_17000_finalized.yaml"
    ours.parent.mkdir(parents=True)
    ours.write_text("left by a crash\n")
    start_agent(d.setup)
    assert victim.read_text() == "another instance's finalization\n"
    assert not ours.exists(), "the agent's own unregistered file was kept"


# -- who may write the directories --------------------------------------------------


def _refuse_state(d: Deployment, how: str) -> Path:
    """Make the deployment unsafe in one way; the directory the refusal must name."""
    state, file_root = d.state, d.setup.file_root
    if how == "state directory o+w":
        os.chmod(state, 0o2777)
    elif how == "state directory o+w, sticky":
        os.chmod(state, 0o3777)
    elif how == "state directory owned by the producer":
        os.chown(state, d.producer.uid, -1)
    elif how == "state directory writable by a group not configured":
        del d.setup.top["catalog_group"]
    elif how == "file_root o+w":
        os.chmod(file_root, 0o777)
        return file_root
    elif how == "an ancestor o+w, not sticky":
        os.chmod(d.setup.root, 0o777)
    elif how == "an ancestor owned by the producer":
        os.chown(d.setup.root, d.producer.uid, -1)
    return state


REFUSALS = ["state directory o+w", "state directory o+w, sticky", "state directory owned by the producer",
            "state directory writable by a group not configured", "file_root o+w",
            "an ancestor o+w, not sticky", "an ancestor owned by the producer"]


@pytest.mark.parametrize("how", REFUSALS)
def test_a_state_directory_others_may_write_or_swap_is_refused(deployment, agent_processes, how):
    """Exit 2 with one line naming the directory and who may write it; nothing
    is written there first (no lock file, no health file)."""
    d = deployment
    named = _refuse_state(d, how)
    d.setup.write()
    agent = agent_processes(d.setup).start()
    line = refused(agent, d, str(named))
    assert "refusing" in line
    assert not list(d.setup.database.parent.glob(f"{d.setup.database.name}-watcher*.lock"))
    assert not list(d.setup.database.parent.glob(f"{d.setup.database.name}-watcher*.json"))


@pytest.mark.parametrize("mode", [0o2770, 0o700, 0o755], ids=["2770", "0700", "0755"])
def test_a_state_directory_of_the_owner_and_the_catalog_group_is_used(deployment, agent_processes, mode):
    """The catalog group may write it (and a sticky /tmp above it is fine)."""
    d = deployment
    os.chmod(d.state, mode)
    agent = agent_processes(d.setup).start().wait_ready()
    data = d.inbox / "a.dat"
    data.write_bytes(b"a")
    agent.wait_for(lambda: (row_of(d.setup.database, data) or {}).get("remote_md5sum"), message="a.dat shipped")


DEFAULT_RUN = """
import os, signal, sys, threading, time
os.chdir(sys.argv[1]); os.umask(int(sys.argv[2], 8))
def stop_when_ready():
    deadline = time.monotonic() + 60
    health = os.path.join('watcher-data', 'catalog.db-watcher-local.json')
    while time.monotonic() < deadline:
        try:
            if str(os.getpid()) in open(health).read():
                break
        except OSError:
            pass
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=stop_when_ready, daemon=True).start()
from watcher.cli import main
sys.exit(main(['run']))
"""


@pytest.mark.parametrize("umask", ["022", "002"])
@pytest.mark.parametrize("who", ["root", "an ordinary user"])
def test_the_shipped_default_starts_for_root_and_for_an_ordinary_user(shared_dir, producer, who, umask):
    """`watcher run` with ./watcher-data in the current directory: the state
    directory it makes is its own (group-writable only by the user's private
    group with umask 002), so it starts, and stops on SIGTERM with status 0."""
    home = shared_dir / "cwd"
    home.mkdir()
    if who == "root":
        done = subprocess.run([sys.executable, "-c", DEFAULT_RUN, str(home), umask],
                              capture_output=True, text=True, timeout=90, cwd="/")
    else:
        os.chown(home, producer.uid, producer.gid)
        done = producer.python(DEFAULT_RUN, str(home), umask, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "watching " in done.stderr, done.stderr[-3000:]
    mode = stat.S_IMODE((home / "watcher-data").stat().st_mode)
    assert mode == (0o775 if umask == "002" else 0o755)


# -- SQLite's own files --------------------------------------------------------------

SQLITE_TRAPS = {
    "symlink at catalog.db-wal": lambda d: d.plant("ln", "-s", str(d.victim), f"{d.setup.database}-wal"),
    "symlink at catalog.db-shm": lambda d: d.plant("ln", "-s", str(d.victim), f"{d.setup.database}-shm"),
    "symlink at catalog.db-journal":
        lambda d: d.plant("ln", "-s", str(d.victim), f"{d.setup.database}-journal"),
    "symlink at the catalog": lambda d: d.plant(
        "sh", "-c", f"rm -f '{d.setup.database}' && ln -s '{d.victim}' '{d.setup.database}'"),
}


def _root_wal_link(d: Deployment) -> None:
    """As _root_hard_link: what the producer could do with fs.protected_hardlinks=0."""
    os.link(d.victim, f"{d.setup.database}-wal")
    d._links = 1


SQLITE_TRAPS["hard link at catalog.db-wal (protected_hardlinks=0)"] = _root_wal_link


@pytest.mark.parametrize("trap", SQLITE_TRAPS)
def test_a_trap_at_sqlites_files_is_refused_before_sqlite_opens_it(deployment, agent_processes, trap):
    """SQLite opens its -wal, -shm and -journal files with O_NOFOLLOW, so a
    symlink there only makes the catalog fail to open ("unable to open
    database file"), but it follows a symlink at the catalog itself (and
    writes its journal beside the target), and writes through a hard link at
    -wal. The agent looks first and refuses with one line naming the entry."""
    d = deployment
    d.catalog()
    SQLITE_TRAPS[trap](d)
    agent = agent_processes(d.setup).start()
    refused(agent, d, str(d.setup.database))


def test_sqlite_itself_never_writes_through_a_symlink_at_its_side_files(deployment):
    """What SQLite's unix VFS does by itself (a platform fact the agent's
    refusal does not rely on, checked here): the victims behind links the
    producer planted at -wal, -shm and -journal stay unwritten."""
    import sqlite3
    d = deployment
    d.catalog()
    victims = {}
    for suffix in ("-wal", "-shm", "-journal"):
        victims[suffix] = d.private / f"victim{suffix}"
        shutil.copy(d.victim, victims[suffix])
        d.plant("ln", "-s", str(victims[suffix]), f"{d.setup.database}{suffix}")
    for mode in ("delete", "wal"):
        try:
            with sqlite3.connect(d.setup.database) as db:
                db.execute(f"pragma journal_mode={mode}")
                db.execute("create table if not exists t(x)")
                db.execute("insert into t values (1)")
        except sqlite3.OperationalError:
            pass  # refused: that is fine too
    assert all(v.read_bytes() == SECRET for v in victims.values())


@pytest.mark.parametrize("trap", ["fifo", "symlink to a forged health file"])
def test_watcher_status_neither_hangs_on_nor_believes_a_trap_at_the_health_file(deployment, trap):
    """With no agent running, the producer plants a FIFO (reading it would
    block `watcher status` for ever) or a link to a health file of its own
    naming a live pid (init) and a healthy archive."""
    from tests.agent_process import watcher_command
    d = deployment
    Catalog(d.setup.database).close()
    health = _health(d)
    if trap == "fifo":
        d.plant("mkfifo", str(health))
    else:
        forged = d.setup.database.parent / "forged.json"  # the state directory: the group writes it
        d.plant("sh", "-c", f"echo '{{\"pid\": 1, \"archives\": {{}}}}' > '{forged}'")
        d.plant("ln", "-s", str(forged), str(health))
    shown = subprocess.run(watcher_command("status", "--config", str(d.setup.root / "rules.yaml")),
                           capture_output=True, text=True, timeout=30)
    assert shown.returncode == 4, shown.stderr  # not running (watcher.commands.exits)
    assert "agent: not running" in shown.stdout, shown.stdout
