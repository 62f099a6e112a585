"""Fault injection on the catalog: other writers, and a lock held too long.

socs processes write to the same SQLite file while the agent runs; one may
hold a lock past the busy timeout. The agent must never die of it, must
say so in its health (and `watcher status`), and must catch up afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.agent_process import watcher_command
from tests.catalog_rows import md5, rows, verified, write_files
from tests.catalog_locks import LOCK_HOLDER

WRITER = textwrap.dedent("""
    import sys
    from watcher.catalog import Catalog
    database, archive, *paths = sys.argv[1:]
    catalog = Catalog(database)
    for path in paths:  # one add_file (one transaction) per file, as socs does
        catalog.add_file(path, "from-socs/" + path.rsplit("/", 1)[-1], archive)
    catalog.close()
""")



def all_verified(database: Path, paths: list[str]) -> bool:
    by_path = {}
    for r in rows(database):
        by_path.setdefault(r["local_path"], []).append(r)
    return all(len(by_path.get(p, [])) == 1 and verified(by_path[p][0]) for p in paths)


def test_a_second_process_adding_files_in_a_loop_never_disturbs_the_agent(setup, agent_processes):
    """Promise 6: another process registering files one transaction at a time (socs'
    add_file) while the agent registers and ships its own never crashes it; all ship."""
    far = setup.archive(api_roots=[str(setup.root / "socs-data")])
    inbox = setup.rule()
    outside = write_files(setup.root / "socs-data", {f"s{i}.dat": b"socs %d\n" % i for i in range(300)})
    agent = agent_processes(setup).start().wait_ready()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(setup.database), "arch", *outside],
                              stderr=subprocess.PIPE)
    dropped = write_files(inbox, {f"w{i}.dat": b"watched %d\n" % i for i in range(300)})
    _, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err.decode()
    agent.wait_for(lambda: all_verified(setup.database, [*outside, *dropped]), timeout=60,
                   message="every file of both writers verified")
    for path, content in outside.items():
        assert (far / "from-socs" / Path(path).name).read_bytes() == content
    for path, content in dropped.items():
        assert (far / Path(path).name).read_bytes() == content
    assert agent.running()
    assert "Traceback" not in agent.log()


def status(setup) -> subprocess.CompletedProcess:
    return subprocess.run(watcher_command("status", "--config", str(setup.root / "rules.yaml")),
                          capture_output=True, text=True, timeout=60)


def test_a_catalog_locked_past_the_busy_timeout_makes_the_agent_wait_and_then_catch_up(
        setup, agent_processes):
    """Promise 6: a process holding the catalog locked longer than the busy timeout
    makes the agent wait and retry (never die); health and `watcher status` say the
    catalog is locked while it lasts; files dropped meanwhile ship once it is released."""
    far = setup.archive()
    inbox = setup.rule()
    agent = agent_processes(setup, WATCHER_BUSY_TIMEOUT="0.5").start().wait_ready()
    before = write_files(inbox, {"before.dat": b"before the lock"})
    agent.wait_for(lambda: all_verified(setup.database, list(before)), message="a file shipped before the lock")

    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(setup.database)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        during = write_files(inbox, {f"during-{i}.dat": os.urandom(1000) for i in range(5)})
        agent.wait_for(lambda: (agent.health() or {}).get("database", {}).get("locked"), timeout=30,
                       message="the agent to report the catalog locked")
        shown = status(setup)
        assert shown.returncode == 3, shown.stderr  # the agent cannot use the catalog
        assert "catalog LOCKED" in shown.stdout, shown.stdout
        assert not any(r["local_path"] in during for r in rows(setup.database)), \
            "registered while the catalog was locked?"
        assert agent.running()
    finally:
        holder.stdin.write("release\n")
        holder.stdin.close()
        assert holder.wait(30) == 0

    agent.wait_for(lambda: all_verified(setup.database, list(during)), timeout=60,
                   message="the files dropped during the lock shipped")
    agent.wait_for(lambda: not agent.health()["database"]["locked"], message="the lock reported gone")
    assert "catalog LOCKED" not in status(setup).stdout
    for path, content in during.items():
        assert (far / Path(path).name).read_bytes() == content
        [row] = [r for r in rows(setup.database) if r["local_path"] == path]
        assert row["local_md5sum"] == md5(content)
    assert "catalog busy" in agent.log()
    assert "Traceback" not in agent.log()
