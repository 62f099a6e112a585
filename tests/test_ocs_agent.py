"""watcher/ocs_agent.py: the agent as an OCS agent, seen as socs' SupRsync.

Against a real crossbar router (tests/crossbar_router.py), a real OCS
client (ocs.ocs_client.OCSClient, through the router's HTTP bridge) and a
real WAMP subscriber: `watcher ocs-agent` runs as a process, from an OCS
site file entry carrying socs' SupRsync arguments, as at a site. The
command-line refusals need no router.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.agent_process import watcher_command
from tests.status_command import SHOWN
from tests.waiting import wait_until
from watcher.state_files import lock_path
from watcher.cli import main as watcher_main
from watcher.config import ConfigError, load_config
from watcher.suprsync import add_file

INSTANCE = "smurf-sync-test"
ARCHIVE_FIELDS = {"finalized_until", "num_files", "uncopied_files", "last_file_added", "last_file_copied"}
COUNTERS = {"iterations", "copies", "errors_timeout", "errors_nonzero", "errors_sqlite"}


class Deployment:
    """An SO-like data host: a catalog socs producers write, an API root, a local archive."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.data.mkdir()
        self.far = root / "far"
        self.state = root / "state"
        self.state.mkdir()
        self.db = self.state / "suprsync.db"
        self.file_root = self.state / "finalization"

    def socs_arguments(self, **extra: str) -> list[list[str]]:
        """A site-config entry's arguments, as socs' SupRsync takes them, plus --api-roots."""
        args = {"--archive-name": "smurf", "--remote-basedir": str(self.far), "--db-path": str(self.db),
                "--suprsync-file-root": str(self.file_root), "--sleep-time": "60",
                "--max-copy-attempts": "5", "--copy-timeout": "30", "--cmd-timeout": "10",
                "--files-per-batch": "100", "--api-roots": str(self.data), **extra}
        return [[k, v] for k, v in args.items()]

    def register(self, name: str, content: bytes = b"") -> tuple[str, float]:
        """A file written and registered through socs' API (add_file); its path and time."""
        path = self.data / "1700000" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content or name.encode() * 100)
        row = add_file(str(path), f"17000/{name}", "smurf", db_path=str(self.db))
        return str(path), row.timestamp


@pytest.fixture
def deployment(tmp_path) -> Deployment:
    return Deployment(tmp_path)


@pytest.fixture
def ocs_agents(tmp_path):
    """``start(site_file, instance_id, env)``: `watcher ocs-agent` processes, none outliving the test."""
    procs: list[subprocess.Popen] = []

    def start(site: Path, instance_id: str = INSTANCE, env: dict | None = None) -> subprocess.Popen:
        log = open(tmp_path / f"ocs-agent-{len(procs) + 1}.log", "wb")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_FAULTS")}
        full_env.update(env or {})
        proc = subprocess.Popen(watcher_command("ocs-agent", "--site-file", str(site), "--instance-id",
                                                instance_id),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env)
        proc.log_path = Path(log.name)
        log.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _client(site: Path, instance_id: str, proc: subprocess.Popen):
    """An OCSClient once the agent has registered with the router."""
    from ocs.ocs_client import OCSClient

    def connect():
        assert proc.poll() is None, f"the OCS agent exited:\n{proc.log_path.read_text()[-3000:]}"
        try:
            return OCSClient(instance_id, args=["--site-file", str(site)])
        except Exception:  # not registered yet
            return None

    return wait_until(connect, timeout=30, interval=0.2, message="the OCS agent to register")


def _session(reply) -> dict:
    return reply.session


def _blocks(events: list[list], block: str) -> list[dict]:
    """Each sample of a block in a recorded feed's events (OCS publishes one
    argument: [blocks, the feed's description]): {field: value, "timestamp": t}."""
    samples = []
    for args in events:
        encoded = args[0][0].get(block)
        if not encoded:
            continue
        for i, t in enumerate(encoded["timestamps"]):
            samples.append({"timestamp": t, **{k: v[i] for k, v in encoded["data"].items()}})
    return samples


def _status_json(db: Path) -> dict:
    out = subprocess.run(watcher_command("status", "--json", "--db", str(db)), capture_output=True,
                         text=True, timeout=30)
    assert out.returncode in SHOWN, out.stderr
    return json.loads(out.stdout)


def _lock_free(path: str) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


# -- against a real router ----------------------------------------------------------


def test_a_socs_site_entry_runs_ships_and_publishes_as_socs(crossbar_router, feed_recorder, ocs_agents,
                                                          deployment, tmp_path):
    """socs' SupRsync site-config entry with another agent class: `run` starts
    itself, files registered with socs' add_file are shipped, archive_stats shows
    num_files, uncopied_files and finalized_until moving, transfer_stats counts
    the copies, a failed copy and a catalog lock waited out, the status task
    gives `watcher status --json`'s numbers, and `stop` stops the agent (its
    archive's lock is free again)."""
    router, d = crossbar_router, deployment
    site = router.site_file(tmp_path / "site.yaml", [{
        "agent-class": "WatcherSupRsync", "instance-id": INSTANCE,
        "arguments": d.socs_arguments(**{"--publish-interval": "0.3"})}])
    stats_topic, transfer_topic = router.topic(INSTANCE, "archive_stats"), router.topic(INSTANCE, "transfer_stats")
    feeds = feed_recorder(router, [stats_topic, transfer_topic])
    # The first copy fails as a cut connection would (retried after 1 s), and
    # the first batch's result waits 2 s before it is recorded: a window in
    # which the feed shows the files uncopied, and the test locks the catalog.
    proc = ocs_agents(site, env={"WATCHER_FAULTS": "copied=1*fail;verified=1*delay(2)",
                                 "WATCHER_BUSY_TIMEOUT": "0.2"})
    client = _client(site, INSTANCE, proc)
    wait_until(lambda: _session(client.run.status()).get("status") == "running", timeout=20,
               message="process run to be running (started at start-up)")
    wait_until(lambda: _blocks(feeds.events(stats_topic), "smurf"), timeout=20,
               message="a first archive_stats message")

    files = [d.register(f"file{i}.dat") for i in range(3)]
    paths, first_registered = {p for p, _ in files}, min(t for _, t in files)

    def seen(predicate):
        return [s for s in _blocks(feeds.events(stats_topic), "smurf") if predicate(s)]

    waiting = wait_until(lambda: seen(lambda s: s["num_files"] == 3 and s["uncopied_files"] == 3),
                         timeout=20, message="archive_stats to show the three files uncopied")[0]
    assert waiting["finalized_until"] < first_registered

    def transfer_stats(predicate):
        return [s for s in _blocks(feeds.events(transfer_topic), "block0") if predicate(s)]

    # Copied, not yet recorded: a producer holding the catalog's write lock now
    # makes the worker wait it out (and count it, as socs counts errors_sqlite).
    wait_until(lambda: all((d.far / "17000" / Path(p).name).exists() for p in paths), timeout=20,
               message="the files to be copied")
    with sqlite3.connect(d.db, isolation_level=None) as producer:
        producer.execute("BEGIN IMMEDIATE")
        wait_until(lambda: transfer_stats(lambda s: s["errors_sqlite"] >= 1), timeout=20,
                   message="transfer_stats to count the catalog lock waited out")
        producer.execute("ROLLBACK")
    done = wait_until(lambda: seen(lambda s: s["num_files"] == 3 and s["uncopied_files"] == 0),
                      timeout=30, message="archive_stats to show the three files copied")[0]
    assert done["finalized_until"] >= max(t for _, t in files)
    assert done["last_file_added"] in paths and done["last_file_copied"] in paths
    assert set(done) == ARCHIVE_FIELDS | {"timestamp"}
    for p in paths:
        assert (d.far / "17000" / Path(p).name).read_bytes() == Path(p).read_bytes()

    transfer = wait_until(lambda: transfer_stats(lambda s: s["copies"] >= 3), timeout=20,
                          message="transfer_stats to count 3 copies")[0]
    assert set(transfer) == COUNTERS | {"timestamp"}
    assert transfer["errors_nonzero"] == 1 and transfer["iterations"] >= 1
    assert feeds.events(stats_topic)[-1][0][1]["record"] is True

    data = _session(client.run.status())["data"]
    assert set(data) == {"activity", "timestamp", "last_copy", "archive_stats", "counters"}
    assert set(data["archive_stats"]["smurf"]) == ARCHIVE_FIELDS and set(data["counters"]) == COUNTERS
    assert {p for p, ok in data["last_copy"]["files"] if ok} == paths
    assert data["last_copy"]["start_time"] <= data["last_copy"]["stop_time"]

    reply = client.status()
    assert reply.status == 0, reply  # ocs.OK
    mine, theirs = reply.session["data"]["smurf"], _status_json(d.db)["smurf"]
    for volatile in ("finalized_until", "oldest_pending_age"):
        mine.pop(volatile), theirs.pop(volatile)
    assert mine == theirs and mine["verified"] == 3

    client.run.stop()
    stopped = wait_until(lambda: (s := _session(client.run.status())).get("status") == "done" and s,
                         timeout=30, message="process run to stop")
    assert stopped["success"] is True
    assert _lock_free(lock_path(d.db, "smurf")), "run stopped, but the watcher agent still holds its archive"

    # Started again, it ships again; SIGTERM then stops the process cleanly.
    client.run.start()
    wait_until(lambda: _session(client.run.status()).get("status") == "running", timeout=20,
               message="process run to run again")
    late, _ = d.register("late.dat")
    wait_until(lambda: (d.far / "17000" / "late.dat").exists(), timeout=20, message="the late file to ship")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.log_path.read_text()[-3000:]
    assert _lock_free(lock_path(d.db, "smurf"))


def test_a_rules_file_runs_under_ocs_with_its_archives(crossbar_router, ocs_agents, tmp_path):
    """--config: a watched directory's file is shipped while `run` runs, and the
    status task answers for the rules file's archives."""
    router = crossbar_router
    inbox, far = tmp_path / "inbox", tmp_path / "far"
    inbox.mkdir()
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({
        "instance_id": "tests-srv", "database": str(tmp_path / "state" / "catalog.db"),
        "archives": {"timestreams": {"remote_basedir": str(far)}},
        "rules": [{"watch": str(inbox), "archive": "timestreams", "settle": 0.2}]}))
    site = router.site_file(tmp_path / "site.yaml", [{
        "agent-class": "WatcherSupRsync", "instance-id": "timestream-sync-test",
        "arguments": [["--config", str(rules)], ["--publish-interval", "0.5"]]}])
    proc = ocs_agents(site, "timestream-sync-test")
    client = _client(site, "timestream-sync-test", proc)
    wait_until(lambda: _session(client.run.status()).get("status") == "running", timeout=20,
               message="process run to be running")
    (inbox / "obs.g3").write_bytes(b"g3" * 1000)
    wait_until(lambda: (far / "obs.g3").exists(), timeout=20, message="the watched file to ship")
    counts = wait_until(lambda: (c := client.status().session["data"]) and c["timestreams"]["verified"] == 1 and c,
                        timeout=20, message="the status task to count the file verified")
    assert set(counts) == {"timestreams"}
    wait_until(lambda: _session(client.run.status())["data"].get("archive_stats", {})
               .get("timestreams", {}).get("num_files") == 1, timeout=20,
               message="session.data to show the file")


# -- the command line, without a router -------------------------------------------------


def _site_without_router(path: Path, arguments: list[list[str]]) -> Path:
    path.write_text(yaml.safe_dump({
        "hub": {"wamp_server": "ws://127.0.0.1:9/ws", "wamp_http": "http://127.0.0.1:9/call",
                "wamp_realm": "test_realm", "address_root": "observatory"},
        "hosts": {"localhost": {"agent-instances": [
            {"agent-class": "WatcherSupRsync", "instance-id": INSTANCE, "arguments": arguments}]}}}))
    return path


def _refused(capsys, *argv: str) -> str:
    """The one line `watcher ocs-agent ARGV` says as it exits with status 2."""
    pytest.importorskip("ocs")
    assert watcher_main(["ocs-agent", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_without_the_ocs_extra_one_line_says_what_to_install(tmp_path):
    script = ("import sys; sys.modules['ocs'] = None\n"  # as if not installed: its import fails
              "from watcher.cli import main\nsys.exit(main(['ocs-agent', '--instance-id', 'x']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == "watcher ocs-agent needs the ocs extra: pip install 'watcher[ocs]'"


def test_socs_arguments_without_api_roots_are_refused_saying_why(capsys, deployment, tmp_path):
    arguments = [a for a in deployment.socs_arguments() if a[0] != "--api-roots"]
    site = _site_without_router(tmp_path / "site.yaml", arguments)
    line = _refused(capsys, "--site-file", str(site), "--instance-id", INSTANCE)
    assert line.startswith("watcher ocs-agent: --api-roots DIR [DIR ...] is required") and "Security model" in line
    assert not deployment.db.exists(), "a refused agent must touch nothing"


@pytest.mark.parametrize("option, key, value", [
    ("--copy-timeout", "copy_timeout", "0"),
    ("--max-copy-attempts", "max_copy_attempts", "many"),
    ("--delete-local-after", "delete_local_after", ".nan"),
    ("--ssh-host", "ssh_host", "-oProxyCommand=touch /tmp/x"),
    ("--chmod", "chmod", "u+s"),
    ("--bwlimit", "bwlimit", "100b"),
])
def test_a_bad_socs_value_is_refused_as_in_a_rules_file(capsys, deployment, tmp_path, option, key, value):
    """The same words as a rules file gets for the same value, naming the argument."""
    site = _site_without_router(tmp_path / "site.yaml", deployment.socs_arguments(**{option: value}))
    line = _refused(capsys, "--site-file", str(site), "--instance-id", INSTANCE)
    rules = tmp_path / "rules.yaml"
    typed = yaml.safe_load(value) if key != "ssh_host" else value  # what YAML reads from the same text
    rules.write_text(yaml.safe_dump({"archives": {"smurf": {"remote_basedir": str(deployment.far), key: typed}}}))
    with pytest.raises(ConfigError) as refused:
        load_config(rules)
    said = [p.split(f"archives.smurf.{key}: ", 1)[1] for p in refused.value.problems if f".{key}: " in p]
    assert line == f"watcher ocs-agent: {option}: {said[0]}"


def test_config_and_socs_arguments_exclude_each_other(capsys, deployment, tmp_path):
    line = _refused(capsys, "--site-file", str(_site_without_router(tmp_path / "site.yaml", [])),
                    "--instance-id", INSTANCE, "--config", str(tmp_path / "rules.yaml"), "--archive-name", "smurf")
    assert "--config and socs' SupRsync arguments (--archive-name) exclude each other" in line


def test_missing_socs_arguments_are_named(capsys, tmp_path):
    site = _site_without_router(tmp_path / "site.yaml", [["--archive-name", "smurf"]])
    line = _refused(capsys, "--site-file", str(site), "--instance-id", INSTANCE)
    assert line.endswith("missing: --remote-basedir, --db-path, --suprsync-file-root")


@pytest.mark.parametrize("argv, words", [
    ((), "no OCS site configuration: give --site-file FILE"),
    (("--site-file", "/nonexistent/site.yaml"), "OCS site file /nonexistent/site.yaml: No such file"),
    (("--instance-id", "nobody"), "no agent instance for this --instance-id"),
])
def test_a_site_configuration_problem_is_one_line(capsys, monkeypatch, tmp_path, argv, words):
    monkeypatch.delenv("OCS_CONFIG_DIR", raising=False)
    if argv and argv[0] == "--instance-id":
        argv = ("--site-file", str(_site_without_router(tmp_path / "site.yaml", [])), *argv)
    assert words in _refused(capsys, *argv)


def test_help_says_sleep_time_has_no_meaning(capsys):
    pytest.importorskip("ocs")
    with pytest.raises(SystemExit) as done:
        watcher_main(["ocs-agent", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--sleep-time SECONDS accepted for socs' SupRsync arguments; no meaning here" in text
    assert "--api-roots" in text and "--site-hub" in text
