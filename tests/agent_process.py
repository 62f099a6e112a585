"""The agent as a real subprocess, for tests that kill it.

``watcher run --config FILE`` is started from the same virtualenv as the
tests, with its log going to a file; the test can block it at a named
fault point (or make the point fail or wait: watcher/faults.py), SIGKILL
it (alone, or with the rsync it runs, as a power cut would), start it
again, stop it with SIGTERM, freeze it with SIGSTOP, and read its memory
and CPU use from /proc.

Fixtures (a conftest plugin: tests/conftest.py lists it): ``agent_processes``
hands out ``AgentProcess`` objects for a ``Setup`` (tests/conftest.py) and
makes sure none outlives its test; ``agent_prefix`` and ``without_dac`` run
those agents under another command; ``memory_dir`` is a tmpfs directory for
tests that make tens of thousands of files.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

import pytest

from tests.waiting import wait_until

T = TypeVar("T")

WATCHER = Path(sys.executable).with_name("watcher")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_serial = itertools.count(1)


def watcher_command(*args: str) -> list[str]:
    """argv for the installed ``watcher`` script (or ``python -m watcher.cli``)."""
    if WATCHER.exists():
        return [str(WATCHER), *args]
    return [sys.executable, "-m", "watcher.cli", *args]


class AgentDied(AssertionError):
    pass


class AgentProcess:
    """One deployment's agent; ``start()`` may be called again after it ended."""

    def __init__(self, config: Path, database: Path, workdir: Path, env: dict[str, str] | None = None):
        self.config = Path(config)
        self.database = Path(database)
        self.workdir = Path(workdir)
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.faults_file: Path | None = None  # where the agent records each fault it fires
        self.log_path: Path | None = None
        self.logs: list[Path] = []

    # -- life cycle ---------------------------------------------------------------

    def start(self, pause_at: str | None = None, env: dict[str, str] | None = None,
              faults: str | None = None) -> "AgentProcess":
        """Start ``watcher run``; with ``pause_at`` it blocks at that fault point; ``faults``
        is a WATCHER_FAULTS specification (watcher/faults.py) such as "copied=1*fail"."""
        assert not self.running(), "the agent is already running"
        n = next(_serial)
        self.log_path = self.workdir / f"agent-{n}.log"
        self.logs.append(self.log_path)
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("WATCHER_FAULTS", "WATCHER_FAULTS_FILE", "WATCHER_PAUSE_AT",
                                 "WATCHER_PAUSE_FILE", "NOTIFY_SOCKET")}
        full_env.update(self.env)
        full_env.update(env or {})
        spec = ";".join(filter(None, [faults, pause_at and f"{pause_at}=block"]))
        self.faults_file = None
        if spec:
            self.faults_file = self.workdir / f"faults-{n}"
            full_env["WATCHER_FAULTS"] = spec
            full_env["WATCHER_FAULTS_FILE"] = str(self.faults_file)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                watcher_command("run", "--config", str(self.config)),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=full_env, cwd=self.workdir)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the agent was never started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 20) -> "AgentProcess":
        """Until this run has written its health file and watches its directories
        (which it does after its start-up clean-ups: stale batch trees, control
        directories, claimed removals)."""
        self.wait_for(lambda: (self._health_pid() == self.pid and "watching " in self.run_log()),
                      timeout, "the agent to start")
        return self

    def wait_paused(self, timeout: float = 30) -> None:
        """Until the agent reached a point set to block (and blocks there)."""
        assert self.faults_file is not None, "started without a fault point"
        self.wait_for(self.paused, timeout, "a fault point to block")

    def fired(self, point: str | None = None) -> list[str]:
        """The faults this run fired so far, in order ("copied 1*fail"), of one point or all."""
        if self.faults_file is None or not self.faults_file.exists():
            return []
        lines = self.faults_file.read_text().splitlines()
        return [line for line in lines if point is None or line.split(" ", 1)[0] == point]

    def paused(self) -> bool:
        """Whether this run blocked at a fault point."""
        return any(line.endswith("block") for line in self.fired())

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is cleaned up."""
        if self.running():
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def kill_with_children(self) -> None:
        """SIGKILL the agent and every process it started (rsync, ssh), as a power cut would."""
        if not self.running():
            return
        self.freeze()  # so it starts nothing new while its tree is read
        for pid in _process_tree(self.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM and wait for a clean exit; returns the exit status."""
        if self.running():
            self.proc.send_signal(signal.SIGCONT)  # in case it was frozen
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the agent did not stop within {timeout}s of SIGTERM\n{self.log_tail()}")

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    # -- observing ------------------------------------------------------------------

    def log(self) -> str:
        """Everything every run of this agent logged, in order."""
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def run_log(self) -> str:
        """What the current (or last) run logged: an earlier run's lines say nothing of it."""
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_for(self, predicate: Callable[[], T], timeout: float = 20, message: str = "") -> T:
        """wait_until, failing at once (with the log) if the agent exits meanwhile."""
        def check():
            result = predicate()
            if not result and not self.running():
                raise AgentDied(f"the agent exited with status {self.proc.returncode} while waiting for "
                                f"{message or 'a condition'}\n{self.log_tail()}")
            return result
        try:
            return wait_until(check, timeout=timeout, interval=0.05, message=message)
        except AgentDied:
            raise
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- agent log ---\n{self.log_tail()}") from None

    def health(self) -> dict | None:
        from watcher.health import read_health
        return read_health(self.database)

    def _health_pid(self) -> int | None:
        health = self.health()
        return health["pid"] if health else None

    def _status_kb(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def rss_mb(self) -> float:
        """Resident memory now."""
        return self._status_kb("VmRSS") / 1024

    def peak_rss_mb(self) -> float:
        """The most resident memory the process ever had (VmHWM)."""
        return self._status_kb("VmHWM") / 1024

    def cpu_seconds(self) -> float:
        """utime + stime of the agent process (all its threads)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5)

    def cpu_use_over(self, seconds: float) -> float:
        """Share of one core used during the next ``seconds`` (a measurement, not a wait)."""
        before, t0 = self.cpu_seconds(), time.monotonic()
        time.sleep(seconds)
        return (self.cpu_seconds() - before) / (time.monotonic() - t0)


def _process_tree(root: int) -> list[int]:
    """root and all its descendants (children may have started sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


@pytest.fixture
def memory_dir(tmp_path):
    """A directory on tmpfs (/dev/shm) when there is one, else under tmp_path; removed after.

    For tests that create tens of thousands of files: they test the agent's
    handling of the flood, not how fast a disk creates and deletes inodes.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        path = Path(tempfile.mkdtemp(prefix="watcher-test-", dir=shm))
    else:
        path = tmp_path / "many-files"
        path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent_processes(tmp_path):
    """``make(setup, **env)`` -> an AgentProcess for a Setup; all are stopped at the end.

    An agent still running at the end must stop cleanly on SIGTERM (status 0).
    """
    made: list[AgentProcess] = []

    def make(setup, **env: str) -> AgentProcess:
        agent = AgentProcess(setup.write(), setup.database, tmp_path, env)
        made.append(agent)
        return agent

    yield make
    problems = []
    for agent in made:
        if agent.running():
            if agent.paused():
                agent.kill()  # blocked at a fault point on purpose
                continue
            status = agent.terminate()
            if status != 0:
                problems.append(f"agent exited {status} on SIGTERM\n{agent.log_tail()}")
    assert not problems, "\n".join(problems)


# Root without the capabilities that let it read any file.
WITHOUT_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.fixture
def agent_prefix(monkeypatch):
    """``use(*argv)``: agents of agent_processes run under this command (setpriv, unshare)."""
    plain = watcher_command

    def use(*prefix: str) -> None:
        monkeypatch.setattr(sys.modules[__name__], "watcher_command", lambda *args: [*prefix, *plain(*args)])
    return use


@pytest.fixture
def without_dac(agent_prefix):
    """Agents run as root without the capabilities that let root read any file."""
    if os.geteuid() == 0:
        if subprocess.run([*WITHOUT_DAC, "true"], capture_output=True).returncode:
            pytest.skip("setpriv cannot drop capabilities here")
        agent_prefix(*WITHOUT_DAC)
