"""The fault points themselves (watcher/faults.py): their grammar, that a
mistake is refused rather than ignored, and the agent surviving what they
inject (a lost connection after a copy, a slow registration racing a writer).
"""

from __future__ import annotations

import ast
import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.catalog_rows import md5, rows_of, shipped_as
from watcher import faults
from watcher.faults import POINTS, FaultSpecError, UnknownFaultPoint, checkpoint, parse

PACKAGE = Path(faults.__file__).parent


# -- the grammar ------------------------------------------------------------------------


def fire(fault: faults.Fault, point: str, failure=None) -> str:
    """What one pass through an armed point did: "passed" or the error it raised."""
    try:
        fault.fire(point, failure)
    except Exception as exc:  # noqa: BLE001  (any error is the answer)
        return f"{type(exc).__name__}: {exc}"
    return "passed"


def test_fail_raises_what_the_call_site_says_and_a_count_limits_it(tmp_path):
    record = tmp_path / "fired"
    armed = parse("copied=2*fail; deleting=fail", str(record))
    assert set(armed) == {"copied", "deleting"}

    class Cut(Exception):
        pass

    assert [fire(armed["copied"], "copied", Cut) for _ in range(3)] == [
        "Cut: fault injected at copied", "Cut: fault injected at copied", "passed"]
    with pytest.raises(OSError) as raised:
        armed["deleting"].fire("deleting", None)
    assert raised.value.errno == errno.EIO
    assert [fire(armed["deleting"], "deleting") for _ in range(2)] == [
        "OSError: [Errno 5] fault injected at deleting"] * 2
    assert record.read_text().splitlines() == ["copied 2*fail"] * 2 + ["deleting fail"] * 3


def test_delay_waits_then_goes_on():
    armed = parse("hashed=1*delay(0.3)")
    started = time.monotonic()
    assert fire(armed["hashed"], "hashed") == "passed"
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    assert fire(armed["hashed"], "hashed") == "passed"
    assert time.monotonic() - started < 0.1, "a 1* delay waited twice"


@pytest.mark.parametrize("spec, problem", [
    ("copid=fail", "unknown fault point 'copid' (known: hashed, copied, verified, deleting, finalizing)"),
    ("=fail", "unknown fault point ''"),
    ("copied", "'copied': expected copied=[COUNT*]ACTION"),
    ("copied=explode", "'copied=explode': expected"),
    ("copied=0*fail", "COUNT at least 1"),
    ("copied=delay(soon)", "'copied=delay(soon)': expected"),
    ("copied=delay(7200)", "SECONDS at most 3600"),
    ("copied=fail;copied=block", "fault point 'copied' given twice"),
])
def test_a_specification_mistake_is_named_in_one_line(spec, problem):
    with pytest.raises(FaultSpecError) as raised:
        parse(spec)
    message = str(raised.value)
    assert problem in message and "\n" not in message and message.startswith("WATCHER_FAULTS: ")


def test_a_checkpoint_with_an_unknown_name_is_an_error_naming_the_known_ones():
    with pytest.raises(UnknownFaultPoint) as raised:
        checkpoint("copyed")
    assert str(raised.value) == ("unknown fault point 'copyed' "
                                 "(known: hashed, copied, verified, deleting, finalizing)")
    for point in POINTS:  # unarmed (this process has no WATCHER_FAULTS): nothing happens
        checkpoint(point)


def checkpoint_calls() -> list[tuple[str, int, str | None]]:
    """(file, line, point name or None when not a literal) of each checkpoint() call in watcher/."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None))
                    == "checkpoint"):
                arg = node.args[0] if node.args else None
                name = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
                found.append((str(path.relative_to(PACKAGE.parent)), node.lineno, name))
    return found


def test_every_fault_point_is_reached_by_exactly_one_checkpoint_in_the_code():
    calls = checkpoint_calls()
    assert not [c for c in calls if c[2] not in POINTS], f"checkpoints naming no known point: {calls}"
    names = sorted(c[2] for c in calls)
    assert names == sorted(POINTS), f"each point once: {calls}"


# -- the agent refuses a specification it cannot honour ----------------------------------------


@pytest.mark.parametrize("env, named", [
    ({"WATCHER_FAULTS": "copid=1*fail"}, "unknown fault point 'copid' (known: hashed, copied,"),
    ({"WATCHER_PAUSE_AT": "copied"}, "WATCHER_PAUSE_AT is no longer read"),
])
def test_the_agent_refuses_to_start_on_a_fault_it_cannot_inject(env, named, setup, agent_processes):
    """A test that asked for a fault must not pass because the agent ran without it."""
    setup.archive()
    inbox = setup.rule()
    (inbox / "f.dat").write_bytes(b"never shipped")
    agent = agent_processes(setup).start(env=env)
    assert agent.wait(30) == 2
    lines = agent.log().splitlines()
    assert len(lines) == 1 and lines[0].startswith("watcher: ") and named in lines[0], agent.log()
    assert not setup.database.exists(), "the agent started before refusing"


# -- the agent survives what the points inject ---------------------------------------------------


@pytest.mark.parametrize("env", [{"WATCHER_FAULTS": "copid=block"}, {"WATCHER_PAUSE_AT": "copied"}])
def test_a_program_that_only_imports_watcher_is_not_stopped_by_a_fault_mistake(env, tmp_path):
    """socs producers import watcher.db: only the agent refuses to start."""
    code = ("from watcher.db import add_file; from watcher import faults; "
            "print(faults.environment_problem() is not None)")
    done = subprocess.run([sys.executable, "-c", code], env=os.environ | env, capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "True"), done.stderr


def test_a_connection_lost_after_the_copy_is_retried_without_charging_the_files(setup, agent_processes):
    """Promise 6: the connection fails once, after rsync copied the batch and before its
    far md5 (rsync.send_batch): the batch is backed off and sent again, each file
    verified, none charged a failed attempt, and the agent logs no traceback."""
    far = setup.archive()
    inbox = setup.rule()
    local = {inbox / f"f{i}.dat": os.urandom(1000 + i) for i in range(3)}
    for path, content in local.items():
        path.write_bytes(content)
    agent = agent_processes(setup).start(faults="copied=1*fail").wait_ready()
    agent.wait_for(lambda: all(shipped_as(setup.database, far, p, p.name, c) for p, c in local.items()),
                   timeout=30, message="every file verified after the lost connection")
    assert agent.fired() == ["copied 1*fail"]
    for path in local:
        [row] = rows_of(setup.database, path)
        assert (row["failed_copy_attempts"] or 0) == 0, f"charged for a lost connection: {row}"
    assert agent.terminate() == 0
    assert "Traceback" not in agent.log()


def test_a_file_appended_while_its_registration_is_delayed_ships_its_final_content(setup, agent_processes):
    """Promise 1: the registrar is slowed between hashing a file and writing its row
    (hashed=delay) while the writer appends: the row first records the content that
    was hashed, then the change is noticed, and the final content is what is
    verified on both sides, charged nothing."""
    far = setup.archive()
    inbox = setup.rule()
    agent = agent_processes(setup).start(faults="hashed=1*delay(2)").wait_ready()
    path = inbox / "grows.dat"
    first, more = os.urandom(50_000), b"appended while the registrar waited\n"
    path.write_bytes(first)
    agent.wait_for(lambda: agent.fired("hashed"), message="the registrar to reach its delay")
    assert rows_of(setup.database, path) == [], "registered before the delay ended"
    with open(path, "ab") as f:
        f.write(more)
    agent.wait_for(lambda: shipped_as(setup.database, far, path, "grows.dat", first + more), timeout=30,
                   message="the appended content verified on both sides")
    [row] = rows_of(setup.database, path)
    assert row["local_md5sum"] == md5(first + more) and (row["failed_copy_attempts"] or 0) == 0
    assert agent.fired() == ["hashed 1*delay(2)"]
    assert agent.terminate() == 0
    assert "Traceback" not in agent.log()
