"""`watcher status` as a monitor uses it: its exit status (0 all well, 3 an
archive needs attention, 4 an agent not running; watcher.commands.exits),
`--json`'s agent and times, and the catalog opened read-only."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

from tests.agent_process import watcher_command
from tests.waiting import wait_until

SOCS_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "socs_suprsync_v0.db"


def status(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(watcher_command("status", *args), capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def report(setup) -> tuple[int, dict]:
    done = status("--json", "--config", str(setup.root / "rules.yaml"))
    return done.returncode, json.loads(done.stdout)


def test_status_exits_0_while_the_agent_serves_every_archive_and_4_once_it_stops(setup, start_agent):
    inbox = setup.rule()
    setup.archive()
    agent = start_agent(setup)
    (inbox / "a.dat").write_bytes(b"a")
    wait_until(lambda: report(setup)[1]["arch"]["verified"] == 1, timeout=20, message="a.dat verified")
    code, shown = report(setup)
    assert code == 0
    arch = shown["arch"]
    assert arch["agent"] == {"running": True, "pid": os.getpid()}
    assert time.time() - 60 < arch["last_file_added_time"] <= arch["last_file_verified_time"] <= time.time()
    text = status("--config", str(setup.root / "rules.yaml"))
    assert text.returncode == 0 and text.stdout.startswith(f"agent: running (pid {os.getpid()})")
    assert "None" not in text.stdout
    agent.stop()
    code, shown = report(setup)
    assert code == 4 and shown["arch"]["agent"] == {"running": False, "pid": None}
    text = status("--config", str(setup.root / "rules.yaml"))
    assert text.returncode == 4 and text.stdout.startswith("agent: not running")


def test_status_exits_3_for_a_degraded_archive_and_shows_why(setup, start_agent):
    """An ssh archive whose host refuses connections: degraded, exit 3."""
    inbox = setup.rule()
    setup.archive(remote_basedir="far", ssh_host="127.0.0.1", ssh_port=9, accept_new_host_keys=True,
                  known_hosts=str(setup.root / "known_hosts"))
    start_agent(setup)
    (inbox / "a.dat").write_bytes(b"a")
    wait_until(lambda: report(setup)[1]["arch"]["degraded"], timeout=30, message="the archive degraded")
    code, shown = report(setup)
    assert code == 3 and shown["arch"]["agent"]["running"] and shown["arch"]["last_error"]
    text = status("--config", str(setup.root / "rules.yaml"))
    assert text.returncode == 3 and "DEGRADED: " in text.stdout


def test_status_exits_3_for_failed_files_and_4_for_rows_of_an_archive_nobody_serves(setup, start_agent):
    inbox = setup.rule()
    setup.archive()
    start_agent(setup)
    (inbox / "a.dat").write_bytes(b"a")
    wait_until(lambda: report(setup)[1]["arch"]["files"] == 1, timeout=20, message="a.dat registered")
    db = sqlite3.connect(setup.database)
    with db:  # the copy failed for good (the agent's triggers count it)
        db.execute("UPDATE supersync_v0 SET failed_copy_attempts = 10, remote_md5sum = ?", ("0" * 32,))
    code, shown = report(setup)
    assert code == 3 and shown["arch"]["failed"] == 1
    with db:  # a producer's typo: rows of an archive no agent serves pend forever
        db.execute("INSERT INTO supersync_v0 (local_path, local_md5sum, archive_name, remote_path, timestamp, "
                   "failed_copy_attempts, deletable, ignore) VALUES (?, ?, 'smurff', 'x', ?, 0, 1, 0)",
                   (str(inbox / "x"), "1" * 32, time.time()))
    db.close()
    done = status("--db", str(setup.database))
    assert done.returncode == 4
    assert any(line.startswith("smurff: 1 files") and line.endswith("no agent serves it")
               for line in done.stdout.splitlines()), done.stdout
    assert "no agent serves smurff" in done.stdout.splitlines()[0]


def digest(path) -> tuple:
    return path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_only_commands_leave_an_unrelated_sqlite_file_as_it_was(tmp_path):
    other = tmp_path / "some-other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE measurements (t REAL, v REAL)")
        db.execute("INSERT INTO measurements VALUES (1, 2)")
    before = digest(other)
    for command in (["status"], ["status", "--json"], ["list", "smurf"], ["check", str(other)]):
        done = subprocess.run(watcher_command(*command, "--db", str(other)), capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 1, (command, done)
        assert done.stderr.splitlines() == [f"watcher: {other}: not a catalog (a SQLite database without "
                                            "socs' supersync_v0 and timecode_dirs_v0 tables)"], command
        assert done.stdout == ""
    assert digest(other) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["some-other.db"]
    with sqlite3.connect(other) as db:
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["measurements"]


def test_read_only_commands_change_no_byte_of_a_catalog(setup, tmp_path):
    setup.archive()
    inbox = setup.rule()
    (inbox / "a.dat").write_bytes(b"a")
    catalog = setup.catalog()
    catalog.add_file(str(inbox / "a.dat"), "a.dat", "arch")
    catalog.close()
    wal = setup.database.with_name("catalog.db-wal")
    before = digest(setup.database), wal.exists() and wal.read_bytes()
    rules = str(setup.write())
    for command in (["status"], ["status", "--json"], ["list", "arch"], ["list", "arch", "--failed"],
                    ["check", str(inbox / "a.dat")], ["check", str(inbox / "b.dat")]):
        subprocess.run(watcher_command(*command, "--config", rules), capture_output=True, timeout=60)
    # SQLite may leave an empty -wal beside a WAL catalog it read; nothing is written into either
    assert digest(setup.database) == before[0]
    assert (wal.exists() and wal.read_bytes()) in (before[1], b"")


def test_a_socs_catalog_watcher_never_opened_is_named_and_left_alone(tmp_path):
    socs = tmp_path / "suprsync.db"
    shutil.copyfile(SOCS_FIXTURE, socs)  # written by socs itself
    before = digest(socs)
    done = status("--db", str(socs))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [f"watcher: {socs}: a socs catalog that watcher has not opened yet: "
                                        "start the agent (or `watcher add`) once to add its columns and counts"]
    assert digest(socs) == before


def test_the_counts_status_shows_add_up_to_each_rows_one_state(tmp_path):
    """reports.by_state, read from the counts SQLite keeps, is states.state_of summed over the rows."""
    from collections import Counter

    from tests.varied_catalogs import LIMITS, varied
    from watcher.catalog.states import is_verified, state_of

    catalog = varied(tmp_path / "catalog.db", 7)
    rows = list(catalog.File.select())
    for archive, limit in [(a, m) for a in ("x", "y", "z") for m in LIMITS]:
        mine = [r for r in rows if r.archive_name == archive]
        shown = catalog.reports.by_state(archive, limit)
        expected = Counter(state_of(r, limit) for r in mine)
        assert {k: v for k, v in shown.items() if k != "removed_verified"} == {
            state: expected.get(state, 0) for state in ("pending", "failed", "verified", "removed", "ignored",
                                                        "refused")}
        assert sum(v for k, v in shown.items() if k != "removed_verified") == len(mine)
        assert shown["removed_verified"] == sum(1 for r in mine if r.removed is not None and is_verified(r))
    catalog.close()


def test_a_health_file_left_by_a_killed_agent_whose_pid_was_reused_says_not_running(setup, tmp_path):
    """An agent killed (SIGKILL, systemd's watchdog) leaves its health file;
    its pid may be another live process's later. The archive's lock file,
    free, says the truth: status exits 4. Held (an agent runs), it is 0."""
    import fcntl

    from watcher.catalog import Catalog
    from watcher.state_files import lock_path

    setup.archive()
    setup.rule()
    setup.write()
    Catalog(setup.database).close()
    Path(f"{setup.database}-watcher-arch.json").write_text(json.dumps(
        {"pid": os.getpid(), "started": time.time(), "archive": "arch", "archives": {}, "problems": {},
         "database": {"locked": False}}))  # this test's pid: alive
    lock = Path(lock_path(setup.database, "arch"))
    lock.write_text("4242")
    code, shown = report(setup)
    assert (code, shown["arch"]["agent"]["running"]) == (4, False), shown["arch"]["agent"]
    with open(lock) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the agent holds it for its lifetime
        code, shown = report(setup)
    assert (code, shown["arch"]["agent"]) == (0, {"running": True, "pid": os.getpid()})
