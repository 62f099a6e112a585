"""The agent as a systemd service (watcher/service.py, systemd/watcher@.service):
the unit as systemd reads it and rates it, the drop-in a configuration needs,
the notifications a real agent sends to a notify socket the test binds (READY,
STATUS, WATCHDOG, STOPPING; the pings stopping when a worker hangs), journald
log lines, and where a rules file under /etc/watcher keeps its catalog.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.agent_process import watcher_command
from tests.waiting import wait_until
from watcher import config as config_module
from watcher.config import ConfigError, parse_config

UNIT = Path(__file__).parent.parent / "systemd" / "watcher@.service"
SHIPPED_EXEC = "ExecStart=/usr/local/bin/watcher run --config /etc/watcher/%i.yaml"
MAX_EXPOSURE = 2.5

needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze missing (apt-get install systemd)")


def unit_copy(directory: Path, dropin: str | None = None, instance: str = "smurf") -> Path:
    """The shipped unit in ``directory``, its ExecStart pointed at this checkout's
    watcher (verify checks that the program exists), with ``dropin`` beside it
    as systemd would read it from /etc/systemd/system."""
    text = UNIT.read_text()
    assert SHIPPED_EXEC in text
    program = watcher_command()[0]
    (directory / "watcher@.service").write_text(text.replace("/usr/local/bin/watcher", program))
    if dropin is not None:
        d = directory / f"watcher@{instance}.service.d"
        d.mkdir()
        (d / "paths.conf").write_text(dropin)
    return directory / f"watcher@{instance}.service"


def verify(unit: Path) -> str:
    """What `systemd-analyze verify` says about a unit (empty: nothing)."""
    done = subprocess.run(["systemd-analyze", "--man=no", "verify", str(unit)],
                          capture_output=True, text=True, timeout=60)
    return (done.stdout + done.stderr).strip()


# -- the unit -------------------------------------------------------------------------


@needs_systemd
def test_the_unit_verifies_and_is_exposed_at_most_2_5(tmp_path):
    assert verify(unit_copy(tmp_path)) == ""
    done = subprocess.run(["systemd-analyze", "--offline=true", "security", str(UNIT)],
                          capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, done.stdout


def test_the_unit_is_watched_and_keeps_its_account_and_capability():
    settings = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    for key, value in {"Type": "notify", "NotifyAccess": "main", "User": "watcher",
                       "SupplementaryGroups": "watcherdata", "UMask": "0007",
                       "AmbientCapabilities": "CAP_LEASE", "CapabilityBoundingSet": "CAP_LEASE",
                       "StateDirectory": "watcher/%i", "ProtectSystem": "strict",
                       "RestartPreventExitStatus": "2"}.items():
        assert settings.get(key) == [value], key
    assert int(settings["WatchdogSec"][0]) > 0


# -- the drop-in -----------------------------------------------------------------------


def dropin_of(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(watcher_command("config", "systemd", str(path)), capture_output=True,
                          text=True, timeout=60)


def directives(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


@needs_systemd
def test_the_drop_in_names_what_the_configuration_writes_and_reads(setup, tmp_path):
    odd = setup.rule("data 100%")  # a space and a specifier character
    setup.archive("arch")
    Path(setup.archives["arch"]["remote_basedir"]).mkdir()
    key = tmp_path / "id_ed25519"
    key.write_text("")
    known = tmp_path / "known_hosts"
    known.write_text("")
    setup.archive("far", remote_basedir="base", ssh_host="u@h", ssh_key=str(key), known_hosts=str(known))
    setup.archives["arch"]["api_roots"] = ["/home/cryo/api"]  # below ProtectHome: bound in
    setup.database = tmp_path / "state" / "catalog.db"
    setup.file_root = tmp_path / "final"
    done = dropin_of(setup.write())
    assert done.returncode == 0, done.stderr
    escaped = str(odd).replace("%", "%%")
    assert directives(done.stdout) == [
        "[Service]",
        f'ReadWritePaths="-{escaped}"',
        f'ReadWritePaths="{tmp_path / "state"}"',
        f'ReadWritePaths="{setup.file_root}"',
        f'ReadWritePaths="{setup.archives["arch"]["remote_basedir"]}"',
        f'ReadOnlyPaths="{key}"',
        f'ReadOnlyPaths="{known}"',
        "ProtectHome=tmpfs",
        'BindPaths="-/home/cryo/api"',
    ]
    units = tmp_path / "units"
    units.mkdir()
    assert verify(unit_copy(units, done.stdout)) == ""  # systemd reads every line without a word


def test_the_drop_in_refuses_a_path_it_cannot_quote(setup):
    setup.rule('say "hello"')
    setup.archive("arch")
    setup.database = setup.root / "state" / "catalog.db"  # not a directory above the tree
    done = dropin_of(setup.write())
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and 'say "hello"' in lines[0] and "quote" in lines[0], done.stderr


# -- where a rules file under /etc/watcher keeps its catalog ---------------------------


RULES = "archives: {a: {remote_basedir: /srv/a}}\nrules: []\n"


def test_a_rules_file_in_etc_watcher_keeps_its_catalog_in_its_own_state_directory(tmp_path, monkeypatch):
    etc, state = tmp_path / "etc-watcher", tmp_path / "var-lib-watcher"
    etc.mkdir()
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG_DIR", etc)
    monkeypatch.setattr(config_module, "SYSTEM_STATE_DIR", state)
    smurf = parse_config(RULES, str(etc / "smurf.yaml"), etc, live=False)
    tod = parse_config(RULES, str(etc / "tod.yaml"), etc, live=False)
    assert smurf.database == state / "smurf" / "suprsync.db"
    assert smurf.file_root == state / "smurf" / "finalization"
    assert tod.database == state / "tod" / "suprsync.db"
    elsewhere = parse_config(RULES, str(tmp_path / "smurf.yaml"), tmp_path, live=False)
    assert elsewhere.database == tmp_path / "suprsync.db"  # beside the rules file, as before
    given = parse_config(RULES + f"database: {tmp_path}/x.db\n", str(etc / "smurf.yaml"), etc, live=False)
    assert given.database == tmp_path / "x.db"
    # a catalog at the old default is named, not silently replaced by an empty one
    (etc / "suprsync.db").write_text("")
    with pytest.raises(ConfigError) as refused:
        parse_config(RULES, str(etc / "smurf.yaml"), etc, live=False)
    assert len(refused.value.problems) == 1
    assert f"database: {etc / 'suprsync.db'}" in refused.value.problems[0]


# -- notifications from the real agent --------------------------------------------------


class NotifySocket:
    """A datagram socket standing in for systemd's: what the agent sends, in order."""

    def __init__(self):
        self.name = f"@watcher-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []

    def read(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return [m for _, m in self.messages]
            self.messages.append((time.monotonic(), data.decode()))

    def since(self, when: float, prefix: str) -> list[str]:
        self.read()
        return [m for t, m in self.messages if t >= when and m.startswith(prefix)]

    def close(self):
        self.sock.close()


@pytest.fixture
def notify_socket():
    s = NotifySocket()
    yield s
    s.close()


WATCHDOG_SECONDS = 2


def watched_agent(setup, agent_processes, notify_socket, faults=None):
    setup.archive("arch", copy_timeout=1, cmd_timeout=1)
    inbox = setup.rule()
    agent = agent_processes(setup, NOTIFY_SOCKET=notify_socket.name,
                            WATCHDOG_USEC=str(WATCHDOG_SECONDS * 1_000_000))
    agent.start(faults=faults)
    agent.wait_for(lambda: "READY=1" in notify_socket.read(), 20, "READY=1")
    return agent, inbox


def test_the_agent_says_ready_pings_the_watchdog_reports_status_and_says_stopping(
        setup, agent_processes, notify_socket):
    agent, inbox = watched_agent(setup, agent_processes, notify_socket)
    ready = time.monotonic()
    agent.wait_for(lambda: len(notify_socket.since(ready, "WATCHDOG=1")) >= 3, 20, "three watchdog pings")
    pings = [t for t, m in notify_socket.messages if m == "WATCHDOG=1"]
    assert max(b - a for a, b in zip(pings, pings[1:])) < WATCHDOG_SECONDS  # every WatchdogSec/2
    agent.wait_for(lambda: "STATUS=arch: 0 pending" in notify_socket.read(), 20, "a STATUS line")
    assert agent.terminate() == 0
    assert notify_socket.read()[-1] == "STOPPING=1"


def test_the_pings_stop_while_a_transfer_worker_hangs(setup, agent_processes, notify_socket):
    agent, inbox = watched_agent(setup, agent_processes, notify_socket, faults="copied=block")
    agent.wait_for(lambda: len(notify_socket.since(0, "WATCHDOG=1")) >= 2, 20, "pings before the hang")
    (inbox / "a.dat").write_text("a")
    agent.wait_paused()  # the worker is stuck after its rsync, for good
    # allowed: copy_timeout + cmd_timeout + WatchdogSec (the margin), then a tick
    allowance = 1 + 1 + WATCHDOG_SECONDS + WATCHDOG_SECONDS / 2
    agent.wait_for(lambda: "not progressing: watcher-transfer-arch" in " ".join(notify_socket.read()),
                   allowance + 10, "a STATUS naming the hung worker")
    quiet = time.monotonic()
    assert "1 pending" in [m for m in notify_socket.read() if m.startswith("STATUS=")][-1]
    wait_until(lambda: time.monotonic() > quiet + 2 * WATCHDOG_SECONDS, 3 * WATCHDOG_SECONDS)
    assert notify_socket.since(quiet, "WATCHDOG=1") == []
    assert "watcher-transfer-arch has shown no progress" in agent.log()
    agent.kill()


def _rsyncs_of(pid: int) -> list[int]:
    """The rsync processes below ``pid`` (the agent's batch: rsync forks locally)."""
    found, parents = [], {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat_fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry)] = int(stat_fields[1])
                if Path(f"/proc/{entry}/comm").read_text().strip() == "rsync":
                    found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue

    def below(p: int) -> bool:
        while p > 1:
            p = parents.get(p, 0)
            if p == pid:
                return True
        return False

    return [p for p in found if below(p)]


def test_the_pings_stop_while_an_rsync_is_stopped_where_its_own_timeout_never_ends_it(
        setup, agent_processes, notify_socket):
    """A stopped rsync (SIGSTOP; one stuck in the kernel is alike) reads and
    writes nothing, and its --timeout never fires: the worker polling it is
    not progressing once it has been quiet for copy_timeout."""
    setup.archive("arch", copy_timeout=1, cmd_timeout=1, bwlimit=64)
    inbox = setup.rule()
    agent = agent_processes(setup, NOTIFY_SOCKET=notify_socket.name,
                            WATCHDOG_USEC=str(WATCHDOG_SECONDS * 1_000_000)).start()
    agent.wait_for(lambda: "READY=1" in notify_socket.read(), 20, "READY=1")
    (inbox / "big.dat").write_bytes(os.urandom(4 << 20))  # about a minute at 64 KiB/s
    agent.wait_for(lambda: _rsyncs_of(agent.pid), 30, "the batch's rsync running")
    stopped = _rsyncs_of(agent.pid)
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        allowance = 1 + 1 + 1 + WATCHDOG_SECONDS + WATCHDOG_SECONDS / 2  # stall, then the worker's own
        agent.wait_for(lambda: "not progressing: watcher-transfer-arch" in " ".join(notify_socket.read()),
                       allowance + 10, "a STATUS naming the worker whose rsync is stopped")
        quiet = time.monotonic()
        wait_until(lambda: time.monotonic() > quiet + 2 * WATCHDOG_SECONDS, 3 * WATCHDOG_SECONDS)
        assert notify_socket.since(quiet, "WATCHDOG=1") == []
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    agent.kill()


def test_a_notify_socket_nobody_listens_on_harms_nothing(setup, agent_processes):
    setup.archive("arch")
    inbox = setup.rule()
    agent = agent_processes(setup, NOTIFY_SOCKET=f"@watcher-nobody-{uuid.uuid4().hex}",
                            WATCHDOG_USEC="1000000").start().wait_ready()
    (inbox / "a.dat").write_text("a")
    agent.wait_for(lambda: (Path(setup.archives["arch"]["remote_basedir"]) / "a.dat").exists(), 20,
                   "the file shipped")
    assert agent.terminate() == 0


# -- journald ---------------------------------------------------------------------------


def run_logging_to(setup, log_path: Path, journal_of: Path | None) -> str:
    """Run the agent with stderr to ``log_path`` and JOURNAL_STREAM naming
    ``journal_of``; a symlink in the tree makes it warn. Returns its log."""
    setup.archive("arch")
    inbox = setup.rule()
    os.symlink("/etc/hostname", inbox / "link")
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
    with open(log_path, "wb") as log:
        if journal_of is not None:
            st = os.stat(journal_of)
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.Popen(watcher_command("run", "--config", str(setup.write())),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    try:
        wait_until(lambda: "symlink" in log_path.read_text(), 20, message="the symlink warning")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    return log_path.read_text()


def test_under_journald_lines_carry_a_priority_and_no_timestamp(setup, tmp_path):
    log = tmp_path / "journal.log"
    log.touch()
    lines = run_logging_to(setup, log, journal_of=log).splitlines()
    assert lines and all(re.match(r"<[3467]>[\w.]+: ", line) for line in lines), lines
    assert any(line.startswith("<6>watcher.agent: watching ") for line in lines)
    assert any(line.startswith("<4>") and "symlink" in line for line in lines)


def test_a_journal_stream_that_is_not_our_stderr_leaves_timestamps(setup, tmp_path):
    other = tmp_path / "other"
    other.touch()
    lines = run_logging_to(setup, tmp_path / "plain.log", journal_of=other).splitlines()
    assert lines and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ", line) for line in lines), lines
