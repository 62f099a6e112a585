"""The agent's wiring end to end on a local destination: observers feed the
registrar, the workers ship what it registers, producers' rows are picked up
without a restart, and the agent starts, stops on a signal and refuses a
second agent on its catalog. Real watchdog observers on temporary
directories, real rsync, real SQLite; each test waits on a condition with a
deadline. Each part's own rules are tested in the module that mirrors it
(test_registrar, test_transfer, test_retention, test_finalize)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import yaml

from tests import md5_audit
from tests.catalog_rows import md5, verified_once
from tests.shared_catalog import one_archive_each
from tests.waiting import wait_until
from watcher.catalog import Catalog
from watcher.health import read_health, served_archives


def test_nested_directories_created_and_filled_at_once_are_shipped(setup, start_agent):
    far = setup.archive()
    inbox = setup.rule()
    start_agent(setup)
    paths = []
    for i in range(5):
        d = inbox / f"run{i}" / "deep" / "er"
        d.mkdir(parents=True)
        for j in range(4):
            p = d / f"f{j}.dat"
            p.write_bytes(os.urandom(1000 + j))
            paths.append(p)
    catalog = setup.catalog()
    wait_until(lambda: all(verified_once(catalog, p) for p in paths), timeout=20)
    for p in paths:
        assert (far / p.relative_to(inbox)).read_bytes() == p.read_bytes()


def test_a_file_written_with_pauses_shorter_than_settle_has_only_its_final_md5_recorded(setup, start_agent):
    """Promise 1, the settle rule: a writer that keeps the file open and pauses less
    than ``settle`` between chunks is not registered until it is done; the catalog
    never held another md5 for the file (a partial file registered, then shipped
    again, would leave the same end state)."""
    far = setup.archive()
    inbox = setup.rule(settle=1)
    md5_audit.install(setup.database)
    start_agent(setup)
    target = inbox / "slow.bin"
    chunks = [os.urandom(4096) for _ in range(6)]
    with open(target, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
            f.flush()
            time.sleep(0.4)  # the writer is slow on purpose
    final = b"".join(chunks)
    catalog = setup.catalog()
    wait_until(lambda: verified_once(catalog, target)
               and catalog.files.rows_for_path(str(target))[0].local_md5sum == md5(final), timeout=15)
    assert (far / "slow.bin").read_bytes() == final
    assert set(md5_audit.md5s_recorded(setup.database, target)) == {md5(final)}


def test_a_file_renamed_into_the_watched_tree_is_shipped(setup, start_agent, tmp_path):
    far = setup.archive()
    inbox = setup.rule(settle=30)  # only the move may complete it in time
    start_agent(setup)
    outside = tmp_path / "outside.dat"
    outside.write_bytes(b"moved in")
    os.rename(outside, inbox / "moved.dat")
    catalog = setup.catalog()
    wait_until(lambda: verified_once(catalog, inbox / "moved.dat"), timeout=10)
    assert (far / "moved.dat").read_bytes() == b"moved in"


def test_excluded_names_are_not_shipped_until_renamed_to_an_included_name(setup, start_agent):
    far = setup.archive()
    inbox = setup.rule(settle=30)
    start_agent(setup)
    (inbox / ".hidden").write_text("no")
    (inbox / "sub").mkdir()
    (inbox / "sub" / ".also-hidden").write_text("no")
    (inbox / "data.tmp").write_text("partial")
    os.rename(inbox / "data.tmp", inbox / "data.txt")
    (inbox / "marker.txt").write_text("done")
    catalog = setup.catalog()
    wait_until(lambda: verified_once(catalog, inbox / "data.txt") and verified_once(catalog, inbox / "marker.txt"))
    assert sorted(p.name for p in far.rglob("*") if p.is_file()) == ["data.txt", "marker.txt"]
    assert catalog.files.rows_for_path(str(inbox / ".hidden")) == []
    assert catalog.files.rows_for_path(str(inbox / "data.tmp")) == []


def test_two_rules_ship_to_two_archives(setup, start_agent):
    far_a = setup.archive("alpha")
    far_b = setup.archive("beta")
    inbox_a = setup.rule("in-a", "alpha", remote_path="a/{name}")
    inbox_b = setup.rule("in-b", "beta", remote_path="b/{parent}/{stem}{suffix}")
    start_agent(setup)
    (inbox_a / "one.txt").write_text("1")
    (inbox_b / "x").mkdir()
    (inbox_b / "x" / "two.txt").write_text("2")
    catalog = setup.catalog()
    wait_until(lambda: verified_once(catalog, inbox_a / "one.txt") and verified_once(catalog, inbox_b / "x" / "two.txt"))
    assert (far_a / "a" / "one.txt").read_text() == "1"
    assert (far_b / "b" / "x" / "two.txt").read_text() == "2"
    assert catalog.files.rows_for_path(str(inbox_a / "one.txt"))[0].archive_name == "alpha"
    assert catalog.files.rows_for_path(str(inbox_b / "x" / "two.txt"))[0].archive_name == "beta"


def test_files_added_by_another_process_are_shipped_without_a_restart(setup, start_agent, tmp_path):
    elsewhere = tmp_path / "produced"  # where producers put files: an API root
    elsewhere.mkdir()
    far = setup.archive(api_roots=[str(elsewhere)])
    setup.rule()
    start_agent(setup)
    files = []
    for i in range(3):
        p = elsewhere / f"p{i}.g3"
        p.write_bytes(os.urandom(100))
        files.append(p)
    other = Catalog(setup.database)  # as a producer would, through add_file
    for p in files:
        other.add_file(str(p), f"produced/{p.name}", "arch")
    wait_until(lambda: all(verified_once(other, p) for p in files), timeout=10)
    assert all((far / "produced" / p.name).read_bytes() == p.read_bytes() for p in files)


def test_the_agent_stops_cleanly_on_sigterm_and_exits_zero(setup, tmp_path):
    import signal
    import subprocess
    import sys

    setup.archive()
    inbox = setup.rule()
    config = setup.write()
    proc = subprocess.Popen([sys.executable, "-m", "watcher.cli", "run", "--config", str(config)],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: setup.database.exists(), timeout=10)
        (inbox / "f.txt").write_text("x")
        catalog = Catalog(setup.database)
        wait_until(lambda: verified_once(catalog, inbox / "f.txt"), timeout=15)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in proc.stderr.read()


def _inotify_instances() -> int:
    fds = "/proc/self/fd"
    return sum(1 for fd in os.listdir(fds) if _readlink(f"{fds}/{fd}") == "anon_inode:inotify")


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def test_a_rule_that_asks_for_polling_ships_without_inotify(setup, start_agent):
    far = setup.archive()
    inbox = setup.rule(poll=True)
    before = _inotify_instances()
    start_agent(setup)
    assert _inotify_instances() == before
    (inbox / "nfs.dat").write_bytes(b"polled")
    catalog = setup.catalog()
    wait_until(lambda: verified_once(catalog, inbox / "nfs.dat"), timeout=15)
    assert (far / "nfs.dat").read_bytes() == b"polled"


def test_a_file_under_nested_watched_directories_is_registered_once(setup, start_agent):
    setup.archive()
    setup.rule("data")
    inner = setup.rule("data/inner")  # the start-up scan walks both roots: it meets the file twice
    path = inner / "x.dat"
    path.write_bytes(b"once")
    start_agent(setup)
    catalog = setup.catalog()
    wait_until(lambda: [r.verified for r in catalog.files.rows_for_path(str(path))] == [True],
               message="x.dat shipped")
    assert len(catalog.files.rows_for_path(str(path))) == 1


def test_a_second_agent_on_the_same_catalog_refuses_to_start(setup, start_agent):
    import sys
    setup.archive()
    setup.rule()
    start_agent(setup)
    proc = subprocess.run([sys.executable, "-m", "watcher.cli", "run", "--config", str(setup.write())],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("watcher: another watcher agent (pid ")
    assert "Traceback" not in proc.stderr


def test_two_agents_serve_one_catalog_one_archive_each_with_its_own_instance_id(tmp_path, start_agent):
    """Each agent ships its archive's files and finalizes them under its
    archive's instance_id (directory, file name and key), as socs' two
    SupRsync instances did; `watcher status` sees both agents."""
    deployments = one_archive_each(tmp_path, {"timestreams": "timestream-sync-srv20",
                                               "smurf": "smurf-sync-srv20"})
    agents = {a: start_agent(s, housekeeping_interval=3600) for a, (s, _far, _inbox) in deployments.items()}
    for archive, (_s, _far, inbox) in deployments.items():
        (inbox / "obs_1600000000").mkdir()
        (inbox / "obs_1600000000" / f"1600000001_{archive}.g3").write_bytes(archive.encode())
    catalog = Catalog(tmp_path / "state" / "catalog.db")
    for archive, agent in agents.items():
        wait_until(lambda: [r.verified for r in catalog.reports.known_files(archive, 0)] == [True], timeout=20,
                   message=f"{archive}'s file shipped by its own agent")
        wait_until(agent.timecodes_once, message="housekeeping while nothing waits to be registered")
    for archive, (_s, far, _inbox) in deployments.items():
        instance_id = "timestream-sync-srv20" if archive == "timestreams" else "smurf-sync-srv20"
        wait_until(lambda: list(far.glob(f"*/suprsync/{instance_id}/*_{archive}_16000_finalized.yaml")),
                   timeout=20, message=f"{archive}'s finalization file shipped under {instance_id}")
        [shipped] = far.glob(f"*/suprsync/{instance_id}/*_{archive}_16000_finalized.yaml")
        summary = yaml.safe_load(shipped.read_text())
        assert (summary["instance_id"], summary["archive_name"], summary["subdirs"]) == \
            (instance_id, archive, ["obs_1600000000"])
        assert not list(far.glob("*/suprsync/test-instance/*")), "the top-level id named an archive's file"
        assert len(list(far.rglob("*_finalized.yaml"))) == 1, "one agent finalized the other's archive"
    shown = subprocess.run([sys.executable, "-m", "watcher.cli", "status", "--json",
                            "--db", str(tmp_path / "state" / "catalog.db")],
                           capture_output=True, text=True, timeout=60)
    report = json.loads(shown.stdout)
    assert set(report) == {"timestreams", "smurf"} and not any(r["degraded"] for r in report.values())
    health = read_health(tmp_path / "state" / "catalog.db")
    assert health["pids"] == [os.getpid()] and set(served_archives(tmp_path / "state" / "catalog.db")) == \
        {"timestreams", "smurf"}
    catalog.close()


def test_a_second_agent_for_an_archive_already_served_is_refused_naming_it(tmp_path, start_agent):
    """Another archive of the same catalog may start; the same archive again
    may not, even from a configuration that also names a free archive."""
    deployments = one_archive_each(tmp_path, {"smurf": None, "timestreams": None})
    smurf, _far, _inbox = deployments["smurf"]
    start_agent(smurf)
    both = deployments["timestreams"][0]
    both.archives.update(smurf.archives)
    both.rules.append({**smurf.rules[0]})
    proc = subprocess.run([sys.executable, "-m", "watcher.cli", "run", "--config", str(both.write())],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"watcher: another watcher agent (pid {os.getpid()}) is running archive smurf " \
                   f"on {smurf.database}", last
    assert "Traceback" not in proc.stderr


def test_an_agent_of_an_older_watcher_holding_the_whole_catalog_is_respected(setup, tmp_path):
    """Older watchers lock <catalog>-watcher.lock exclusively; a new agent
    takes it shared, so neither starts beside the other."""
    import fcntl

    setup.archive()
    setup.rule()
    setup.database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{setup.database}-watcher.lock", "w") as old:
        old.write("4242")
        old.flush()
        fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the older agent holds
        proc = subprocess.run([sys.executable, "-m", "watcher.cli", "run", "--config", str(setup.write())],
                              capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"watcher: another watcher agent (pid 4242, an older version, which serves every archive) "
        f"is running on {setup.database}")
