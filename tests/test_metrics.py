"""The Prometheus endpoint (watcher/metrics.py): the real agent, scraped over
HTTP (urllib) and read with prometheus_client's own text parser, checked
against the catalog's rows and `watcher status --json`; a catalog that
cannot be read still gets an answer at once; the configuration's
refusals; the example alerting rules use names the endpoint serves."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.agent_process import watcher_command
from tests.catalog_rows import rows, verified, write_files
from tests.status_command import status
from tests.waiting import wait_until
from tests.catalog_locks import LOCK_HOLDER

ALERTS = Path(__file__).resolve().parents[1] / "monitoring" / "watcher-alerts.yml"
ALERT_TESTS = ALERTS.with_name("watcher-alerts.test.yml")
STATES = ("pending", "verified", "failed", "removed", "ignored", "refused")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_metrics(setup) -> int:
    port = free_port()
    setup.top["metrics"] = {"listen": f"127.0.0.1:{port}"}
    return port


def scrape(port: int, timeout: float = 15) -> dict[str, list[tuple[dict, float]]]:
    """{sample name: [(labels, value)]}, as Prometheus would read the page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples, name: str, **labels) -> float:
    [found] = [v for got, v in samples.get(name, []) if all(got.get(k) == w for k, w in labels.items())]
    return found


def status_json(setup) -> dict:
    return json.loads(status(setup, "--json").stdout)


# -- the numbers --------------------------------------------------------------------


def test_the_endpoint_shows_what_the_catalog_and_watcher_status_show(setup, agent_processes, tmp_path):
    """Per archive: files by state, bytes pending, the oldest pending, finalized_until, the
    last verification, files and bytes shipped, durations, errors by class, degraded; per
    root: registered, rescans, watches; the catalog's state. An archive whose host refuses
    connections (nothing listens on its port) is degraded, its files pending; the other ships."""
    port = with_metrics(setup)
    setup.archive("good")
    setup.archive("down", ssh_host="nobody@127.0.0.1", ssh_port=free_port(), remote_basedir="far",
                  cmd_timeout=2, accept_new_host_keys=True, known_hosts=str(tmp_path / "known_hosts"))
    good_inbox = setup.rule("good-inbox", archive="good")
    down_inbox = setup.rule("down-inbox", archive="down")
    started = time.time()
    agent = agent_processes(setup).start().wait_ready()
    good = write_files(good_inbox, {"g0.dat": os.urandom(1000)})
    agent.wait_for(lambda: sum(verified(r) for r in rows(setup.database)) == 1, timeout=30,
                   message="the first file verified")  # the others later: the last verified is theirs
    good.update(write_files(good_inbox, {f"g{i}.dat": os.urandom(1000 + i) for i in (1, 2)}))
    down = write_files(down_inbox, {f"d{i}.dat": os.urandom(500 + i) for i in range(3)})
    outside = write_files(tmp_path / "outside", {"o.dat": b"not below any root of good"})
    agent.wait_for(lambda: sum(verified(r) for r in rows(setup.database)) == 3, timeout=30,
                   message="the good archive's files verified")
    agent.wait_for(lambda: len(rows(setup.database)) == 6, message="the down archive's files registered")
    ignored = sorted(down)[0]
    done = subprocess.run(watcher_command("ignore", "--config", str(setup.root / "rules.yaml"), ignored),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    [path] = outside
    catalog = setup.catalog()  # as a socs producer's add_file: a row outside the archive's roots
    catalog.add_file(path, "o.dat", "good")
    catalog.close()
    agent.wait_for(lambda: status_json(setup)["good"]["refused"] == 1, message="the row outside refused")
    agent.wait_for(lambda: status_json(setup)["down"]["degraded"], timeout=30, message="down degraded")

    samples = scrape(port)
    shown = status_json(setup)
    now = time.time()
    for archive in ("good", "down"):
        s = shown[archive]
        for state in STATES:
            assert value(samples, "watcher_files", archive=archive, state=state) == s[state], (archive, state)
        assert value(samples, "watcher_catalog_files", archive=archive) == s["files"]
        assert value(samples, "watcher_pending_bytes", archive=archive) == s["bytes_pending"]
        assert value(samples, "watcher_oldest_pending_age_seconds", archive=archive) == \
            pytest.approx(s["oldest_pending_age"] or 0, abs=30)
        assert value(samples, "watcher_finalized_until_timestamp_seconds", archive=archive) == \
            pytest.approx(s["finalized_until"], abs=30)
        assert value(samples, "watcher_archive_degraded", archive=archive) == int(s["degraded"])
    # ... and what the catalog's rows say, read without agent code
    all_rows = rows(setup.database)
    assert shown["down"]["pending"] == 2 and shown["down"]["ignored"] == 1
    assert value(samples, "watcher_pending_bytes", archive="down") == \
        sum(len(down[r["local_path"]]) for r in all_rows if r["local_path"] in down and r["local_path"] != ignored)
    assert value(samples, "watcher_files", archive="good", state="verified") == \
        sum(verified(r) for r in all_rows if r["archive_name"] == "good") == 3
    assert value(samples, "watcher_oldest_pending_age_seconds", archive="down") > 0
    assert value(samples, "watcher_archive_degraded", archive="down") == 1
    assert value(samples, "watcher_archive_degraded", archive="good") == 0
    copied = sorted(r["copied"] for r in all_rows if verified(r))
    assert started < copied[0] < copied[-1] < now
    assert value(samples, "watcher_last_verified_timestamp_seconds", archive="good") == copied[-1]
    assert value(samples, "watcher_last_verified_timestamp_seconds", archive="down") == 0
    # what this agent did
    assert value(samples, "watcher_shipped_files_total", archive="good") == 3
    assert value(samples, "watcher_shipped_bytes_total", archive="good") == sum(len(c) for c in good.values())
    assert value(samples, "watcher_shipped_files_total", archive="down") == 0
    assert value(samples, "watcher_transfer_duration_seconds_count", archive="good") >= 1
    assert value(samples, "watcher_far_md5_duration_seconds_count", archive="good") >= 1
    assert value(samples, "watcher_transfer_duration_seconds_bucket", archive="good", le="+Inf") >= 1
    assert value(samples, "watcher_transfer_errors_total", archive="down", **{"class": "connection"}) >= 1
    assert value(samples, "watcher_transfer_errors_total", archive="good", **{"class": "connection"}) == 0
    for root, n in ((good_inbox, 3), (down_inbox, 3)):
        assert value(samples, "watcher_registered_files_total", root=str(root)) == n
        assert value(samples, "watcher_rescans_total", root=str(root)) >= 1
        assert value(samples, "watcher_rescan_found_files_total", root=str(root)) == 0  # all had events
        assert value(samples, "watcher_root_watched", root=str(root)) == 1
        assert value(samples, "watcher_lost_watches", root=str(root)) == 0
    assert value(samples, "watcher_catalog_locked") == 0
    assert value(samples, "watcher_catalog_failing") == 0
    assert "Traceback" not in agent.log()


def test_a_rescan_counts_the_files_it_found_for_its_root(setup, agent_processes):
    """Files that appeared while the agent was down are found by the start-up scan, per root."""
    port = with_metrics(setup)
    far = setup.archive()
    inbox = setup.rule()
    write_files(inbox, {"early-1.dat": b"1", "early-2.dat": b"2"})
    past = time.time() - 60  # quiet for a minute: complete at once
    for name in ("early-1.dat", "early-2.dat"):
        os.utime(inbox / name, (past, past))
    agent = agent_processes(setup).start().wait_ready()
    agent.wait_for(lambda: (far / "early-2.dat").exists() and (far / "early-1.dat").exists())
    samples = scrape(port)
    assert value(samples, "watcher_rescan_found_files_total", root=str(inbox)) == 2
    assert value(samples, "watcher_registered_files_total", root=str(inbox)) == 2


# -- a catalog that is locked ----------------------------------------------------------

# SQLite's unix VFS locks the -shm file's bytes 120 + i for WAL lock i; 3 to 7 are
# the read marks. A connection rebuilding the WAL index (recovery) holds them all:
# no one can read meanwhile, and a reader waits about 10 s before SQLite gives up,
# whatever its busy timeout.
READ_MARKS = (123, 5)


def test_a_scrape_answers_at_once_when_the_catalog_is_locked(setup, agent_processes):
    """A writer's lock (the agent waits on it) shows as watcher_catalog_locked 1 with the
    counts still read; a catalog no one can read is reported locked within seconds,
    without its counts, and everything else is still served."""
    port = with_metrics(setup)
    setup.archive()
    inbox = setup.rule()
    agent = agent_processes(setup, WATCHER_BUSY_TIMEOUT="0.5").start().wait_ready()
    write_files(inbox, {"before.dat": b"before"})
    agent.wait_for(lambda: any(verified(r) for r in rows(setup.database)), message="a file shipped")

    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(setup.database)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        write_files(inbox, {"during.dat": b"during"})  # the agent must write: it waits on the lock
        agent.wait_for(lambda: value(scrape(port), "watcher_catalog_locked") == 1, timeout=30,
                       message="the lock shown")
        samples = scrape(port)
        assert value(samples, "watcher_files", archive="arch", state="verified") == 1  # still read
    finally:
        holder.stdin.write("release\n")
        holder.stdin.close()
        assert holder.wait(30) == 0
    agent.wait_for(lambda: value(scrape(port), "watcher_catalog_locked") == 0, timeout=30,
                   message="the lock reported gone")

    fd = os.open(f"{setup.database}-shm", os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX, READ_MARKS[1], READ_MARKS[0])
        for _ in range(2):  # the second finds the first's read still waiting
            began = time.monotonic()
            samples = scrape(port)
            took = time.monotonic() - began
            assert took < 4, f"a scrape took {took:.1f} s on a catalog that cannot be read"
            assert value(samples, "watcher_catalog_locked") == 1
            assert "watcher_files" not in samples and "watcher_pending_bytes" not in samples
            assert value(samples, "watcher_shipped_files_total", archive="arch") >= 1
            assert value(samples, "watcher_root_watched", root=str(inbox)) == 1
    finally:
        os.close(fd)  # releases the lock
    agent.wait_for(lambda: "watcher_files" in (s := scrape(port)) and value(s, "watcher_catalog_locked") == 0,
                   timeout=30, message="the counts back")
    assert agent.running()
    assert "Traceback" not in agent.log()


# -- refusals ---------------------------------------------------------------------------


def run_agent(setup, *python: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`watcher run --config` on the setup (after ``python`` lines run in the same process)."""
    argv = ["run", "--config", str(setup.write())]
    code = "\n".join([*python, "import sys", "from watcher.cli import main", f"sys.exit(main({argv!r}))"])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def one_line(done: subprocess.CompletedProcess) -> str:
    [line] = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr
    return line


@pytest.mark.parametrize("listen, says", [
    ("9630", "expected HOST:PORT such as 127.0.0.1:9630"),
    (9630, "expected HOST:PORT"),
    ("127.0.0.1:0", "a port from 1 to 65535"),
    ("127.0.0.1:65536", "a port from 1 to 65535"),
    ("[nonsense]:9630", "is not an IPv6 address"),
    ("300.1.1.1:9630", "is not an IPv4 address"),
    ("a host:9630", "expected HOST:PORT"),
])
def test_a_bad_listen_address_is_refused_with_one_line_and_exit_2(setup, listen, says):
    setup.archive()
    setup.rule()
    setup.top["metrics"] = {"listen": listen}
    done = run_agent(setup)
    assert done.returncode == 2, done.stderr
    line = one_line(done)
    assert "rules.yaml:" in line and "metrics.listen:" in line and says in line, line


def test_metrics_without_listen_or_with_another_key_are_refused(setup):
    setup.archive()
    setup.rule()
    setup.top["metrics"] = {"port": 9630}
    done = run_agent(setup)
    assert done.returncode == 2, done.stderr
    assert "metrics.port: unknown key (known: listen)" in done.stderr
    assert "metrics.listen: is required" in done.stderr


def test_an_address_already_taken_is_refused_with_one_line_and_exit_2(setup):
    setup.archive()
    setup.rule()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        setup.top["metrics"] = {"listen": f"127.0.0.1:{port}"}
        done = run_agent(setup)
    assert done.returncode == 2, done.stderr
    line = one_line(done)
    assert f"metrics.listen: cannot listen on 127.0.0.1:{port}: Address already in use" in line, line


def test_metrics_without_prometheus_client_installed_are_refused_naming_the_extra(setup):
    setup.archive()
    setup.rule()
    with_metrics(setup)
    done = run_agent(setup, "import sys", "sys.modules['prometheus_client'] = None  # not installed")
    assert done.returncode == 2, done.stderr
    line = one_line(done)
    assert "metrics: needs the prometheus-client library" in line and "pip install 'watcher[metrics]'" in line


def test_with_metrics_off_the_agent_never_imports_them(setup):
    """An agent without `metrics:` runs without prometheus-client (and never loads it)."""
    setup.archive()
    setup.rule()
    config = setup.write()
    code = textwrap.dedent(f"""
        import sys
        from watcher.agent import Agent
        from watcher.config import load_config
        agent = Agent(load_config({str(config)!r}))
        agent.start()
        agent.stop()
        print(sorted(m for m in sys.modules if m.startswith(("prometheus_client", "watcher.metrics"))))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


# -- the example alerting rules -------------------------------------------------------------


def test_the_example_alerts_use_only_names_the_endpoint_serves(setup, start_agent):
    port = with_metrics(setup)
    far = setup.archive()
    inbox = setup.rule()
    start_agent(setup)
    write_files(inbox, {"a.dat": b"a"})
    wait_until(lambda: (far / "a.dat").exists(), message="a file shipped")
    served = set(scrape(port))
    rules = [r for group in yaml.safe_load(ALERTS.read_text())["groups"] for r in group["rules"]]
    names = {r["alert"] for r in rules}
    assert {"WatcherNothingVerified", "WatcherOldestPendingTooOld"} <= names
    for rule in rules:
        used = set(re.findall(r"\bwatcher_[a-z0-9_]+", rule["expr"]))
        assert used <= served, f"{rule['alert']} uses {sorted(used - served)}, which the endpoint does not serve"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) not installed")
def test_the_example_alerts_pass_promtool_and_fire_when_they_should():
    """promtool's own check, and its unit tests (monitoring/watcher-alerts.test.yml):
    nothing verified for an hour while files wait, the oldest pending too old."""
    for argv in (["promtool", "check", "rules", ALERTS.name], ["promtool", "test", "rules", ALERT_TESTS.name]):
        done = subprocess.run(argv, cwd=ALERTS.parent, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
