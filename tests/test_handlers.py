"""Deciding when a file is complete: the settle tracker and scans, on real files."""

from __future__ import annotations

import os
import threading

from watchdog.events import DirMovedEvent, FileCreatedEvent, FileMovedEvent

from tests.waiting import wait_until
from watcher.config import Rule
from watcher.handlers import SettleTracker, WatchHandler, closed_for_writing, scan


def test_a_file_open_for_writing_is_not_closed_and_a_closed_one_is(tmp_path):
    path = tmp_path / "f.dat"
    with open(path, "wb") as writer:
        writer.write(b"partial")
        writer.flush()
        assert not closed_for_writing(str(path))
    assert closed_for_writing(str(path))
    with open(path, "rb"):  # a reader does not hold it open for writing
        assert closed_for_writing(str(path))


def test_a_scan_completes_a_fresh_closed_file_at_once_and_lets_an_open_one_settle(tmp_path):
    rule = Rule(watch=tmp_path, archive="arch", settle=30)
    (tmp_path / "closed.dat").write_bytes(b"done")
    completed = []
    settle = SettleTracker(completed.append)
    with open(tmp_path / "open.dat", "wb") as writer:
        writer.write(b"still writing")
        writer.flush()
        handed = scan([str(tmp_path)], [rule], lambda paths: {}, completed.extend, settle)
        assert handed == 2
        assert completed == [str(tmp_path / "closed.dat")]  # fresh, but nobody writes it
        assert len(settle) == 1  # the open one waits for quiet (or its close event)
    settle.stop()


def test_the_handler_acts_on_a_moved_directory_not_on_watchdogs_listing_of_it(tmp_path):
    """A platform's own observer (watcher.observers drops them on Linux) follows a
    directory's move with synthetic events for what it holds; the handler ignores
    those: the directory's own move event has all of it scanned, once."""
    rule = Rule(watch=tmp_path, archive="arch", settle=30)
    moved = tmp_path / "run 7"
    (moved / "sub").mkdir(parents=True)
    (moved / "sub" / "f.dat").write_bytes(b"data")
    completed, scans = [], []
    settle = SettleTracker(completed.append)
    handler = WatchHandler([rule], completed.append, settle, lambda d, whole: scans.append((d, whole)))
    handler.dispatch(DirMovedEvent("", str(moved / "sub"), is_synthetic=True))
    handler.dispatch(FileMovedEvent("", str(moved / "sub" / "f.dat"), is_synthetic=True))
    handler.dispatch(FileCreatedEvent(str(moved / "sub" / "f.dat"), is_synthetic=True))
    assert (completed, scans, len(settle)) == ([], [], 0)
    handler.dispatch(DirMovedEvent("", str(moved)))
    handler.dispatch(FileCreatedEvent(str(moved / "sub" / "f.dat")))  # a real one settles
    assert (completed, scans, len(settle)) == ([], [(str(moved), True)], 1)


class ManualClock:
    """The settle tracker's clock, moved only by the test: a slow machine cannot
    make a file look quiet for ``settle`` seconds (the tracker still sleeps in
    real time, at most the settle time, before it reads this clock again)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


SETTLE = 0.25  # fake seconds; binary fractions, so deadlines add up exactly


class Tracked:
    """A running SettleTracker on a manual clock, recording each completion with
    the file's size then. ``barrier(due)`` tracks a quiet file due at ``due``:
    once it completes, everything due no later, in path order before it
    ("a-..." < "b-..."), has been checked."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.clock = ManualClock()
        self.completed: list[tuple[str, int]] = []
        self.settle = SettleTracker(lambda p: self.completed.append((p, os.path.getsize(p))),
                                    clock=self.clock)
        self.thread = threading.Thread(target=self.settle.run)
        self.thread.start()
        self._barriers = 0

    def barrier(self, due: float) -> str:
        self._barriers += 1
        path = self.dir / f"b-quiet-{self._barriers}.dat"
        path.write_bytes(b"q")
        self.settle.track(str(path), due - self.clock.now)
        return str(path)

    def advance_to(self, now: float, barrier: str) -> None:
        self.clock.now = now
        wait_until(lambda: barrier in self.paths(), timeout=10, message=f"{barrier} to settle")

    def paths(self) -> list[str]:
        return [p for p, _ in self.completed]

    def stop(self) -> None:
        self.settle.stop()
        self.thread.join(5)


def test_an_event_for_a_settling_file_restarts_its_wait(tmp_path):
    """A slow writer's events (each re-tracks the file) push its completion back:
    it is complete only ``settle`` seconds after the last one, with all its data."""
    path = tmp_path / "a-slow.dat"
    path.write_bytes(b"a")
    tracked = Tracked(tmp_path)
    try:
        tracked.settle.track(str(path), SETTLE)
        due = tracked.clock.now + SETTLE  # when its current wait ends
        for _ in range(3):
            tracked.clock.now = due - SETTLE / 4  # the writer writes again before then
            with open(path, "ab") as f:
                f.write(b"b")
            tracked.settle.track(str(path), SETTLE)  # what its modified event does
            was, due = due, tracked.clock.now + SETTLE
            tracked.advance_to(was, tracked.barrier(was))
            assert str(path) not in tracked.paths()  # its old wait is over, the new one is not
        tracked.advance_to(due, tracked.barrier(due))
        wait_until(lambda: str(path) in tracked.paths(), timeout=10, message="the slow file to settle")
    finally:
        tracked.stop()
    assert [c for c in tracked.completed if c[0] == str(path)] == [(str(path), 4)]


def test_a_file_that_changes_without_events_is_complete_only_once_unchanged(tmp_path):
    """The tracker compares size and modification time when the wait ends: a file
    that changed meanwhile (a writer whose events were lost) waits again."""
    path = tmp_path / "a-silent.dat"
    path.write_bytes(b"a")
    tracked = Tracked(tmp_path)
    try:
        tracked.settle.track(str(path), SETTLE)
        for _ in range(3):
            with open(path, "ab") as f:  # no event: nothing re-tracks it
                f.write(b"b")
            due = tracked.clock.now + SETTLE
            tracked.advance_to(due, tracked.barrier(due))
            assert str(path) not in tracked.paths()  # it changed during its wait
        due = tracked.clock.now + SETTLE
        tracked.advance_to(due, tracked.barrier(due))
        wait_until(lambda: str(path) in tracked.paths(), timeout=10, message="the file to settle")
    finally:
        tracked.stop()
    assert [c for c in tracked.completed if c[0] == str(path)] == [(str(path), 4)]
