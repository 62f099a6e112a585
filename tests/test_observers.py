"""The observer of a watched tree (watcher.observers), with real inotify and real files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from watchdog.events import DirMovedEvent, FileSystemEventHandler

from tests.waiting import wait_until
from watcher.handlers import WatchHandler
from watcher.observers import make_observer

MAX_QUEUED = Path("/proc/sys/fs/inotify/max_queued_events")


class Recorder(FileSystemEventHandler):
    """Every event the observer dispatches, in order."""

    def __init__(self):
        self.events = []
        self._lock = threading.Lock()

    def dispatch(self, event) -> None:
        with self._lock:
            self.events.append(event)

    def seen(self) -> list:
        with self._lock:
            return list(self.events)

    def closed(self, path: Path) -> bool:
        return any(e.event_type == "closed" and e.src_path == str(path) for e in self.seen())


def _watching(root: Path, handler, overflowed=lambda: None, poll: bool = False):
    """A started observer of ``root``, scheduled as the agent schedules it."""
    observer = make_observer(str(root), poll, overflowed)
    observer.schedule(handler, str(root), recursive=True, event_filter=WatchHandler.EVENTS)
    observer.start()
    return observer


def _stop(observer) -> None:
    observer.stop()
    observer.join(5)


def _make_tree(top: Path) -> list[Path]:
    files = [top / "a.dat", top / "sub" / "b.dat", top / "sub" / "deeper" / "c.dat"]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"data")
    return files


@pytest.mark.parametrize("source", ["outside", "inside"])
def test_a_directory_moved_in_is_one_move_event_and_its_contents_make_none(tmp_path, source):
    """A directory moved into (or within) the tree: its own move event has the
    agent scan it; watchdog's synthetic events for each file it holds never
    reach the handler."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    staging = (tmp_path if source == "outside" else inbox) / "staging"
    contents = _make_tree(staging)
    recorder = Recorder()
    observer = _watching(inbox, recorder)
    try:
        dest = inbox / "run 7"
        os.rename(staging, dest)
        marker = inbox / "marker.dat"  # its close event comes after everything the move made
        marker.write_bytes(b"m")
        wait_until(lambda: recorder.closed(marker), timeout=10, message="the marker's close event")
    finally:
        _stop(observer)
    events = recorder.seen()
    moves = [e for e in events if isinstance(e, DirMovedEvent)]
    assert [(e.dest_path, e.is_synthetic) for e in moves] == [(str(dest), False)]
    moved_paths = {str(dest / p.relative_to(staging)) for p in contents}
    moved_paths |= {os.path.dirname(p) for p in moved_paths} - {str(dest)}
    about_contents = [e for e in events if {e.src_path, e.dest_path} & moved_paths]
    assert about_contents == []
    assert not [e for e in events if e.is_synthetic]


def test_an_inotify_queue_overflow_signals_a_rescan(tmp_path):
    """The kernel drops events when the queue overflows: the observer says so
    (the agent then rescans), and watching goes on."""
    if not os.access(MAX_QUEUED, os.W_OK):
        pytest.skip(f"cannot lower {MAX_QUEUED} (needs root outside a read-only /proc)")
    overflowed = threading.Event()
    recorder = Recorder()
    # The limit is read when an inotify instance is made: lowered only for that
    # moment, so other inotify users on the machine keep theirs.
    saved = MAX_QUEUED.read_text()
    try:
        MAX_QUEUED.write_text("16")
        observer = make_observer(str(tmp_path), False, overflowed.set)
    finally:
        MAX_QUEUED.write_text(saved)
    observer.schedule(recorder, str(tmp_path), recursive=True, event_filter=WatchHandler.EVENTS)
    observer.start()
    try:
        batch = 0

        def flood() -> bool:  # until the reader falls 16 events behind
            nonlocal batch
            batch += 1
            for i in range(200):
                (tmp_path / f"f{batch}-{i}.dat").write_bytes(b"x")
            return overflowed.is_set()

        wait_until(flood, timeout=30, interval=0, message="an inotify queue overflow")
        # watchdog rebuilds its watches after the signal (events meanwhile are
        # lost too: the rescan finds those files); then events flow again.
        later: list[Path] = []

        def reported_again() -> bool:
            later.append(tmp_path / f"later-{len(later)}.dat")
            later[-1].write_bytes(b"later")
            return any(recorder.closed(path) for path in later)

        wait_until(reported_again, timeout=10, interval=0.2, message="events after the overflow")
    finally:
        _stop(observer)
