"""The catalog under a running agent: deleted, replaced, read-only, or shared.

Retention deletes on the catalog's word, so the agent checks every second,
and before every retention round, that the catalog is the file it opened:
one deleted or replaced (a backup restored over it, the state directory
removed) stops the agent with one ERROR line and exit status 1, having
deleted nothing more; a read-only one pauses deletions, shown in `watcher
status`, until it is writable again. Only one agent works on a catalog, and
only one on a watched tree, whatever is removed under them.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time

import pytest

from tests.catalog_rows import row_of, verified
from tests.status_command import status, wait_for_problems
from tests.waiting import wait_until


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line]


def copy_over(database) -> None:
    """Restore a copy of the catalog over it, as a backup would be."""
    copy = database.with_name("restored.db")
    with sqlite3.connect(database) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    os.replace(copy, database)


REMOVALS = {
    "catalog deleted": lambda db: db.unlink(),
    "replaced by a copy": copy_over,
    "state directory removed": lambda db: shutil.rmtree(db.parent),
    "lock file removed": lambda db: os.unlink(f"{db}-watcher.lock"),
}


def agent_whose_retention_works(setup, agent_processes, delete_local_after: float):
    """An agent process with housekeeping and retention rounds every second,
    started and seen to ship and delete a first file. Returns (inbox, agent)."""
    setup.top["rescan_interval"] = 1
    setup.archive(delete_local_after=delete_local_after)
    inbox = setup.rule(settle=0.2)
    agent = agent_processes(setup).start().wait_ready()
    early = inbox / "early.dat"
    early.write_bytes(b"early")
    agent.wait_for(lambda: not early.exists(), message="early.dat shipped and deleted: retention works")
    return inbox, agent


@pytest.mark.parametrize("how", REMOVALS)
def test_a_catalog_taken_from_under_the_agent_stops_it_before_it_deletes_anything_more(
        setup, agent_processes, how):
    """Frozen while the catalog goes and a verified file's retention passes, the
    agent, thawed, deletes nothing and exits 1 with one ERROR line. A second agent
    on the same configuration meanwhile is refused (the tree is locked); started
    after the first exited, it is the only one deleting."""
    setup.database = setup.root / "state" / "catalog.db"
    inbox, first = agent_whose_retention_works(setup, agent_processes, delete_local_after=2)
    due = inbox / "due.dat"
    due.write_bytes(b"due")
    first.wait_for(lambda: (row_of(setup.database, due) or {}).get("remote_md5sum"), message="due.dat verified")
    registered = row_of(setup.database, due)["timestamp"]

    first.freeze()
    REMOVALS[how](setup.database)
    refused = agent_processes(setup).start()
    assert refused.wait(30) == 1
    assert refused.log().strip().splitlines()[-1].startswith("watcher: another watcher agent "), refused.log()
    wait_until(lambda: time.time() > registered + 3, timeout=10, message="due.dat's retention to pass")
    first.thaw()
    assert first.wait(15) == 1, first.log_tail()
    assert due.read_bytes() == b"due", "deleted after the catalog was gone"
    errors = error_lines(first.log())
    assert len(errors) == 1 and "catalog" in errors[0] and "start the agent again" in errors[0], errors
    assert "cannot rollback" not in first.log() and "Traceback" not in first.log()

    second = agent_processes(setup).start().wait_ready()
    second.wait_for(lambda: not due.exists(), message="the second agent deletes due.dat in its turn")
    second.wait_for(lambda: (row_of(setup.database, due) or {}).get("removed"),
                    message="the catalog records the deletion")


def test_a_second_agent_with_another_catalog_on_the_same_tree_is_refused(setup, agent_processes):
    """Two catalogs, one tree: each agent would delete what the other has not
    shipped. The second exits 1 with one line; the first goes on."""
    far = setup.archive()
    inbox = setup.rule(settle=0.2)
    first = agent_processes(setup).start().wait_ready()
    setup.database = setup.root / "other" / "catalog.db"
    second = agent_processes(setup).start()
    assert second.wait(30) == 1
    assert second.log().strip().splitlines()[-1] == \
        f"watcher: another watcher agent watches {inbox} (with another catalog)"
    assert not setup.database.exists(), "the refused agent made a catalog"
    (inbox / "still.dat").write_bytes(b"still shipping")
    first.wait_for(lambda: (far / "still.dat").exists(), message="the first agent still ships")


@pytest.mark.parametrize("how", ["immutable", "no write permission"])
def test_a_read_only_catalog_pauses_deletion_until_it_is_writable_again(setup, agent_processes, request, how):
    """chattr +i (which binds root too), or a mode without write permission for
    an agent that, like any user, is bound by modes: status shows the read-only
    catalog and one ERROR line says so; a verified file past its retention is
    kept until the catalog is writable again, then deleted."""
    if how == "no write permission":
        request.getfixturevalue("without_dac")
    elif subprocess.run(["chattr", "-i", str(setup.root)], capture_output=True).returncode:
        pytest.skip("this file system has no immutable attribute")
    inbox, agent = agent_whose_retention_works(setup, agent_processes, delete_local_after=1)

    make = ["chattr", "+i"] if how == "immutable" else ["chmod", "a-w"]
    undo = ["chattr", "-i"] if how == "immutable" else ["chmod", "u+w"]
    subprocess.run([*make, str(setup.database)], check=True)
    try:
        wait_for_problems(setup, {"read-only catalogs": 1}, agent)
        text = status(setup).stdout
        assert "PROBLEM: 1 read-only catalogs; latest: catalog" in text and "nothing is deleted" in text, text
        kept = inbox / "kept.dat"
        kept.write_bytes(b"kept")
        agent.wait_for(lambda: verified(row_of(setup.database, kept) or {"remote_md5sum": None}),
                       message="kept.dat verified (the open catalog still takes writes)")
        verified_at = time.time()
        wait_until(lambda: time.time() > verified_at + 2.5, message="kept.dat's retention to pass, twice over")
        assert kept.exists(), "deleted while the catalog was read-only"
    finally:
        subprocess.run([*undo, str(setup.database)], check=True)
    agent.wait_for(lambda: not kept.exists(), message="kept.dat deleted once the catalog is writable")
    wait_for_problems(setup, {}, agent)
    errors = error_lines(agent.log())
    assert len(errors) == 1 and "is read-only" in errors[0], errors
    assert "is writable again" in agent.log()
    assert agent.running()
