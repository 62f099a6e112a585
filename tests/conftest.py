"""Shared fixtures: rules files in temporary directories, an in-process agent,
and a guard that fails any test leaking a thread."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import yaml

from tests.waiting import wait_until
from watcher.agent import Agent
from watcher.config import load_config
from watcher.catalog import Catalog

pytest_plugins = ["tests.sshd", "tests.local_users", "tests.ssh_support", "tests.agent_process", "tests.real_socs",
                  "tests.crossbar_router"]


@pytest.fixture(autouse=True)
def no_leaked_threads():
    before = set(threading.enumerate())
    yield
    wait_until(lambda: not [t for t in threading.enumerate() if t not in before and t.is_alive()],
               timeout=10, message="a test left threads running: "
               + ", ".join(t.name for t in threading.enumerate() if t not in before))


class Setup:
    """A temporary deployment: inbox directories, a local archive, a rules file."""

    def __init__(self, root: Path):
        self.root = root
        self.database = root / "catalog.db"
        self.file_root = root / "finalization"
        self.archives: dict[str, dict] = {}
        self.rules: list[dict] = []
        self.top: dict = {"instance_id": "test-instance", "rescan_interval": 300}

    def archive(self, name: str = "arch", **options) -> Path:
        """A local archive directory (or options for an ssh one)."""
        base = Path(options.pop("remote_basedir", self.root / f"far-{name}"))
        self.archives[name] = {"remote_basedir": str(base), **options}
        return base

    def rule(self, watch: str = "inbox", archive: str = "arch", **options) -> Path:
        path = self.root / watch
        path.mkdir(parents=True, exist_ok=True)
        self.rules.append({"watch": str(path), "archive": archive, "settle": 0.5, **options})
        return path

    def write(self) -> Path:
        data = {**self.top, "database": str(self.database), "file_root": str(self.file_root),
                "archives": self.archives, "rules": self.rules}
        path = self.root / "rules.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def config(self):
        return load_config(self.write())

    def catalog(self) -> Catalog:
        return Catalog(self.database)


@pytest.fixture
def setup(tmp_path) -> Setup:
    return Setup(tmp_path)


@pytest.fixture
def start_agent():
    """Start an in-process agent on a Setup; stopped (and checked stopped) at the end."""
    agents: list[Agent] = []

    def start(s: Setup, housekeeping_interval: float = 0.2) -> Agent:
        agent = Agent(s.config(), housekeeping_interval=housekeeping_interval)
        agent.start()
        agents.append(agent)
        wait_until(lambda: agent.scans_done >= 1, timeout=10, message="start-up scan did not finish")
        return agent

    yield start
    for agent in agents:
        agent.stop()
