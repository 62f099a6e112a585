"""A file is never deleted while a process has it open for writing, however
long that process pauses (DESIGN.md, promise 2; issue 8).

A real writer process opens a file in a watched tree, writes ten lines and
sleeps longer than the rule's ``settle`` between them, so the file is
registered (and shipped) while still open; retention is short. The writer
itself checks after every write that its file still has a name (``st_nlink``)
and fails if it was unlinked under it; the test checks that every line ends
up in the far copy and that the local file goes only after that.
Variants: a plain writer, one that opens with O_APPEND, one that reopens the
file between lines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.waiting import wait_until
from watcher.catalog import Catalog

LINES = 10
SETTLE = 0.3
PAUSE = 0.6  # the writer's pause between lines: twice the rule's settle

WRITER = textwrap.dedent("""
    import os, sys, time
    path, mode, lines, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    unlinked = []

    def still_named(fd, n):
        if os.fstat(fd).st_nlink == 0:
            unlinked.append(n)

    if mode == "plain":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    else:  # append, reopen
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for n in range(1, lines + 1):
        os.write(fd, b"line %d of the log\\n" % n)
        still_named(fd, n)
        if n == lines:
            break
        time.sleep(pause)
        still_named(fd, n)
        if mode == "reopen":
            # Open again (no O_CREAT: a file deleted meanwhile is an error), then close the old one.
            new = os.open(path, os.O_WRONLY | os.O_APPEND)
            os.close(fd)
            fd = new
    still_named(fd, lines)
    os.close(fd)
    if unlinked:
        print("unlinked while open for writing, after line(s) %s" % sorted(set(unlinked)))
        sys.exit(3)
    print("done")
""")


def expected_text() -> bytes:
    return b"".join(b"line %d of the log\n" % n for n in range(1, LINES + 1))


def start_writer(path: Path, mode: str, lines: int = LINES) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), mode, str(lines), str(PAUSE)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def expected_text(lines: int = LINES) -> bytes:
    return b"".join(b"line %d of the log\n" % n for n in range(1, lines + 1))


def run_writer_under_the_agent(catalog, log: Path, mode: str, lines: int = LINES) -> None:
    """Run a writer to its end; meanwhile its file must never be gone, and must
    get registered (its pauses are longer than settle)."""
    writer = start_writer(log, mode, lines)
    try:
        wait_until(lambda: log.exists() or writer.poll() is not None, timeout=10,
                   message="the writer to create its file")
        seen = {"registered": False}

        def writer_done() -> bool:
            running = writer.poll() is None
            if running:
                assert os.path.lexists(log), "the file was deleted while its writer had it open"
            seen["registered"] |= bool(catalog.files.rows_for_path(str(log)))
            return not running

        wait_until(writer_done, timeout=lines * PAUSE + 10, interval=0.02,
                   message="the writer to finish")
        output = writer.stdout.read()
        assert writer.returncode == 0, output
        assert seen["registered"], "a pause longer than settle should have registered the file"
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait()
        writer.stdout.close()


class DeletedOnlyWhenComplete:
    """A poll: fails if the local file is gone while the far copy lacks a line."""

    def __init__(self, local: Path, far: Path, expected: bytes):
        self.local, self.far, self.expected = local, far, expected

    def deleted(self) -> bool:
        if os.path.lexists(self.local):
            return False
        assert self.far.exists() and self.far.read_bytes() == self.expected, \
            "the local file was deleted before its far copy held every line"
        return True


@pytest.mark.parametrize("mode", ["plain", "append", "reopen"])
def test_a_paused_writer_keeps_its_file_and_every_line_reaches_the_far_copy(setup, start_agent, mode):
    far = setup.archive(delete_local_after=0.5)
    inbox = setup.rule(settle=SETTLE)
    start_agent(setup)
    catalog = setup.catalog()
    log = inbox / "run.log"
    run_writer_under_the_agent(catalog, log, mode)
    watch = DeletedOnlyWhenComplete(log, far / "run.log", expected_text())

    def every_line_verified_on_the_far_side() -> bool:
        watch.deleted()
        [row] = catalog.files.rows_for_path(str(log))
        return (row.verified and (far / "run.log").exists()
                and (far / "run.log").read_bytes() == expected_text())

    wait_until(every_line_verified_on_the_far_side, timeout=10, interval=0.02,
               message="the closed file verified on the far side with every line")
    assert sorted(p.name for p in far.iterdir()) == ["run.log"]  # no second generation


def test_a_file_its_writer_closed_is_deleted_once_its_last_lines_are_verified(setup, start_agent):
    """Retention that found the writer busy looks again once the file was closed
    and shipped whole, not a fixed time later."""
    far = setup.archive(delete_local_after=0.5)
    inbox = setup.rule(settle=SETTLE)
    start_agent(setup)
    catalog = setup.catalog()
    log = inbox / "run.log"
    lines = 5
    run_writer_under_the_agent(catalog, log, "plain", lines)
    watch = DeletedOnlyWhenComplete(log, far / "run.log", expected_text(lines))
    wait_until(watch.deleted, timeout=10, interval=0.02,
               message="the closed file shipped with every line, then deleted")
    [row] = catalog.files.rows_for_path(str(log))
    assert (row.removed or 0) > 0 and row.verified


def test_the_signal_a_broken_lease_sends_never_stops_the_agent(setup, agent_processes):
    """The kernel tells a lease holder that a writer opens its file with SIGIO,
    whose default action ends a process: the agent ignores it."""
    far = setup.archive()
    inbox = setup.rule()
    agent = agent_processes(setup).start().wait_ready()
    os.kill(agent.pid, signal.SIGIO)
    (inbox / "after.dat").write_bytes(b"after")
    catalog = Catalog(setup.database)
    try:
        wait_until(lambda: any(r.verified for r in catalog.files.rows_for_path(str(inbox / "after.dat"))),
                   timeout=15, message="a file shipped after the signal")
    finally:
        catalog.close()
    assert (far / "after.dat").read_bytes() == b"after"
    assert agent.running()
    assert agent.terminate() == 0
