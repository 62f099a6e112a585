"""A real crossbar (WAMP) router for the OCS tests, and a real WAMP subscriber.

The router is started from ocs' own template (ocs/support/crossbar_config.json,
its {realm}, {address_root} and {port} filled in) on 127.0.0.1 at a free
port, with one fix: crossbar 26 refuses the template's ``auto_ping_size``
of 4 (12 is its least). Tests that need it skip, saying why, when crossbar
or ocs is not installed or the router does not come up.

The subscriber is a process of its own (one twisted reactor each, as in
production): ``python -m tests.crossbar_router subscribe URL REALM OUT TOPIC...``
appends each event to OUT as a JSON line.

Fixtures (a conftest plugin: tests/conftest.py lists it): ``crossbar_router``
(one router per test module) and ``feed_recorder`` (subscribers stopped at
the end of the test).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
REALM = "test_realm"
ADDRESS_ROOT = "observatory"
READY = "NODE_BOOT_COMPLETE"  # crossbar's log line once every transport and service runs
START_TIMEOUT = 60.0


def _crossbar() -> str | None:
    beside = Path(sys.executable).with_name("crossbar")
    return str(beside) if beside.exists() else shutil.which("crossbar")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def router_config(template: str, port: int) -> dict:
    """ocs' template for this realm and port, listening on 127.0.0.1 only."""
    text = (template.replace("{realm}", REALM).replace("{address_root}", ADDRESS_ROOT)
            .replace("{port}", str(port)))
    config = json.loads(text)
    for worker in config["workers"]:
        for transport in worker.get("transports", []):
            transport["endpoint"]["interface"] = "127.0.0.1"
            for path in transport.get("paths", {}).values():
                options = path.get("options", {})
                if options.get("auto_ping_size", 12) < 12:
                    options["auto_ping_size"] = 12  # crossbar 26 refuses less
    return config


class Router:
    """A running crossbar node and what clients need to reach it."""

    def __init__(self, workdir: Path, port: int, proc: subprocess.Popen, log: Path):
        self.workdir, self.port, self.proc, self.log = workdir, port, proc, log
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.http = f"http://127.0.0.1:{port}/call"
        self.realm = REALM
        self.address_root = ADDRESS_ROOT

    def site_file(self, path: Path, instances: list[dict]) -> Path:
        """An OCS site file for this router, with these agent instances on host "localhost"
        (OCS's match for any host not named)."""
        site = {"hub": {"wamp_server": self.url, "wamp_http": self.http, "wamp_realm": self.realm,
                        "address_root": self.address_root},
                "hosts": {"localhost": {"agent-instances": instances}}}
        path.write_text(yaml.safe_dump(site, sort_keys=False))
        return path

    def topic(self, instance_id: str, feed: str) -> str:
        return f"{self.address_root}.{instance_id}.feeds.{feed}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own group: the node and its workers
                self.proc.wait(10)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="module")
def crossbar_router(tmp_path_factory):
    """A crossbar router on 127.0.0.1 for the module's tests; skips when none can run."""
    try:
        import ocs
    except ImportError:
        pytest.skip("no crossbar router for the OCS tests: the ocs package is not installed "
                    "(pip install 'watcher[ocs]' crossbar)")
    crossbar = _crossbar()
    if crossbar is None:
        pytest.skip("no crossbar router for the OCS tests: crossbar is not installed (pip install crossbar)")
    template = (Path(ocs.__file__).parent / "support" / "crossbar_config.json").read_text()
    workdir = tmp_path_factory.mktemp("crossbar")
    cbdir = workdir / ".crossbar"
    cbdir.mkdir()
    port = _free_port()
    (cbdir / "config.json").write_text(json.dumps(router_config(template, port), indent=1))
    log = workdir / "crossbar.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([crossbar, "start", "--cbdir", str(cbdir)], cwd=workdir, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    router = Router(workdir, port, proc, log)
    try:
        wait_until(lambda: proc.poll() is not None or READY in log.read_text(errors="replace"),
                   timeout=START_TIMEOUT, interval=0.2, message="crossbar to start")
    except AssertionError:
        pass
    if proc.poll() is not None or READY not in log.read_text(errors="replace"):
        router.stop()
        pytest.skip(f"no crossbar router for the OCS tests: crossbar did not start within "
                    f"{START_TIMEOUT:g} s; its log ends:\n{_log_tail(log)}")
    try:
        yield router
    finally:
        router.stop()


class FeedRecorder:
    """A WAMP subscriber process recording events of some topics."""

    def __init__(self, router: Router, out: Path, topics: list[str]):
        self.out = out
        self.log = out.with_suffix(".log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.crossbar_router", "subscribe", router.url, router.realm,
                 str(out), *topics], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        wait_until(lambda: self.proc.poll() is not None or self._lines(), timeout=20,
                   message="the feed subscriber to join the realm")
        assert self._lines() and self._lines()[0] == {"subscribed": topics}, _log_tail(self.log)

    def _lines(self) -> list[dict]:
        try:
            text = self.out.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def events(self, topic: str) -> list[list]:
        """The positional arguments of each event received on ``topic``, in order."""
        return [e["args"] for e in self._lines() if e.get("topic") == topic]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def feed_recorder(tmp_path):
    """``record(router, topics)`` starts a subscriber; each is stopped at the end."""
    recorders: list[FeedRecorder] = []

    def record(router: Router, topics: list[str]) -> FeedRecorder:
        recorder = FeedRecorder(router, tmp_path / f"feeds-{len(recorders) + 1}.jsonl", topics)
        recorders.append(recorder)
        return recorder

    yield record
    for recorder in recorders:
        recorder.stop()


def _subscribe(url: str, realm: str, out: str, topics: list[str]) -> None:
    """Append {"topic", "args"} for each event of ``topics`` to ``out``, one JSON line each."""
    from autobahn.twisted.wamp import ApplicationRunner, ApplicationSession
    from twisted.internet.defer import inlineCallbacks

    def write(record: dict) -> None:
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")

    class Subscriber(ApplicationSession):
        @inlineCallbacks
        def onJoin(self, details):
            for topic in topics:
                yield self.subscribe(lambda *args, topic=topic: write({"topic": topic, "args": list(args)}),
                                     topic)
            write({"subscribed": topics})

    ApplicationRunner(url, realm).run(Subscriber)


if __name__ == "__main__":
    if sys.argv[1:2] == ["subscribe"] and len(sys.argv) >= 6:
        _subscribe(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        sys.exit("usage: python -m tests.crossbar_router subscribe URL REALM OUT TOPIC...")
