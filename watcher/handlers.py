"""Watchdog event handlers, deciding when a file is complete, and rescans.

A file is complete when it was closed after writing, moved into the tree,
or has been quiet (same size and modification time) for its rule's
``settle`` seconds. Close events alone are not enough: a directory created
and filled at once is watched late, and its files arrive as bare creations;
lost events (queue overflow, the agent down) are found by scans.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import threading
import time
from typing import Callable, Iterable, Iterator, NamedTuple

from watchdog.events import (
    DirCreatedEvent, DirDeletedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent,
    FileDeletedEvent, FileModifiedEvent, FileMovedEvent, FileSystemEvent,
    FileSystemEventHandler,
)

from watcher.config import Rule
from watcher.rules import select_rule
from watcher.safefs import (
    DIR_FLAGS, FILE_FLAGS, Identity, WriterCheck, hold_against_writers, release_lease,
)

log = logging.getLogger(__name__)

Sink = Callable[[str], None]
BatchSink = Callable[[list[str]], None]
DirSink = Callable[[str, bool], None]  # (directory, whether it was moved in whole)


class SettleTracker:
    """Waits for files without a close event to go quiet, without polling.

    ``track(path, settle)`` (re)arms a deadline; a thread sleeps until the
    earliest one, then compares size and modification time with what it saw
    last. A quiet file goes to ``complete``; a changing one is re-armed.
    """

    def __init__(self, complete: Sink, clock: Callable[[], float] = time.monotonic):
        self._complete = complete
        self._clock = clock
        self._heap: list[tuple[float, str]] = []
        self._state: dict[str, tuple[float, float, tuple | None]] = {}  # path -> (deadline, settle, stat)
        self._cond = threading.Condition()
        self._stopped = False

    def track(self, path: str, settle: float) -> None:
        with self._cond:
            deadline = self._clock() + settle
            self._state[path] = (deadline, settle, _stat_key(path))
            heapq.heappush(self._heap, (deadline, path))
            self._cond.notify()

    def forget(self, path: str) -> None:
        with self._cond:
            self._state.pop(path, None)

    def forget_many(self, paths: list[str]) -> None:
        with self._cond:
            if self._state:
                for path in paths:
                    self._state.pop(path, None)

    def __len__(self) -> int:
        return len(self._state)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def run(self) -> None:
        while True:
            due = []
            with self._cond:
                while not self._stopped:
                    now = self._clock()
                    while self._heap and self._heap[0][0] <= now:
                        deadline, path = heapq.heappop(self._heap)
                        entry = self._state.get(path)
                        if entry and entry[0] == deadline:
                            due.append((path, entry))
                    if due:
                        break
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
                if self._stopped:
                    return
            for path, (deadline, settle, seen) in due:
                self._check(path, settle, seen)

    def _check(self, path: str, settle: float, seen: tuple | None) -> None:
        now_key = _stat_key(path)
        if now_key is None:
            self.forget(path)
            return
        if now_key == seen:
            with self._cond:
                entry = self._state.get(path)
                if entry is None or entry[2] != seen:
                    return  # re-armed meanwhile
                del self._state[path]
            self._complete(path)
        else:
            with self._cond:
                deadline = self._clock() + settle
                self._state[path] = (deadline, settle, now_key)
                heapq.heappush(self._heap, (deadline, path))


def closed_for_writing(path: str) -> bool:
    """True when no process has the file open for writing, as far as we can tell.

    A read lease is granted only then. A file found by a scan (its events
    were missed) that is closed counts as closed after writing; one that is
    still open will send its close event, as its directory is watched by now.
    Only the file's owner (or root) may take a lease, and not on every file
    system: then False, and the file settles as before. The lease is dropped
    at once (a break's SIGIO is ignored: safefs.ignore_lease_breaks).
    """
    try:
        fd = os.open(path, FILE_FLAGS)
    except OSError:
        return False
    try:
        free = hold_against_writers(fd) == WriterCheck.FREE
        if free:
            release_lease(fd)
        return free
    finally:
        os.close(fd)


def _stat_key(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


class WatchHandler(FileSystemEventHandler):
    """Turns one watched tree's events into complete files and files to settle."""

    # The events it handles (``event_filter`` when scheduling). Leaving out
    # opened / closed-without-writing / attribute events keeps the agent's own
    # reads (hashing, rsync) from flooding the queue with three events a file.
    EVENTS = [FileClosedEvent, FileCreatedEvent, DirCreatedEvent, FileMovedEvent, DirMovedEvent,
              FileModifiedEvent, FileDeletedEvent, DirDeletedEvent]

    def __init__(self, rules: list[Rule], complete: Sink, settle: SettleTracker,
                 scan_dir: DirSink, gone: Sink | None = None):
        """``gone`` hears of files deleted: a file written at the same path
        later is another file, even if it is given the same inode number."""
        self.rules = rules
        self.complete = complete
        self.settle = settle
        self.scan_dir = scan_dir
        self.gone = gone

    def _rule(self, path: str) -> Rule | None:
        found = select_rule(path, self.rules)  # an unsafe remote path: the registrar reports it
        return found[0] if found else None

    def dispatch(self, event: FileSystemEvent) -> None:
        if event.is_synthetic:
            # watchdog listing what a directory moved into (or within) the tree
            # holds: that directory's own move event scans all of it, once.
            # (watcher.observers drops them before they are queued; the
            # platform's own observer, off Linux, does not.)
            return
        try:
            super().dispatch(event)
        except Exception:  # one odd event must never stop the observer
            log.exception("could not handle %s", event)

    def on_closed(self, event: FileClosedEvent) -> None:
        path = os.fsdecode(event.src_path)
        if self._rule(path):
            self.settle.forget(path)
            self.complete(path)

    def on_moved(self, event: FileSystemEvent) -> None:
        dest = os.fsdecode(event.dest_path)
        self.settle.forget(os.fsdecode(event.src_path))
        if isinstance(event, DirMovedEvent):
            if dest:
                self.scan_dir(dest, True)  # its files were moved in: complete
        elif self._rule(dest):
            self.complete(dest)

    def on_created(self, event: FileSystemEvent) -> None:
        path = os.fsdecode(event.src_path)
        if isinstance(event, DirCreatedEvent):
            self.scan_dir(path, False)  # files made before its watch arrived
            return
        rule = self._rule(path)
        if rule:
            self.settle.track(path, rule.settle)

    def on_modified(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileModifiedEvent):
            path = os.fsdecode(event.src_path)
            rule = self._rule(path)
            if rule:
                self.settle.track(path, rule.settle)

    def on_deleted(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileDeletedEvent):
            path = os.fsdecode(event.src_path)
            self.settle.forget(path)
            if self.gone is not None and self._rule(path):
                self.gone(path)


Problem = Callable[[str, str, str, "str | None"], None]  # (kind, path, message, archive or None: all)


class Found(NamedTuple):
    """A regular file a walk met, with its own stat (taken beside its directory's descriptor)."""

    path: str
    st: os.stat_result

    def stat(self, follow_symlinks: bool = False) -> os.stat_result:
        return self.st


def walk_files(root: str, problem: Problem | None = None,
               listed: Callable[[str, os.stat_result], None] | None = None) -> Iterator[Found]:
    """Every regular file below ``root``, depth first, never through a symlink.

    Each directory is opened beside its parent's descriptor with O_NOFOLLOW,
    so one swapped for a link while the walk runs is not entered either (the
    root itself may be a link). ``problem`` hears of each symlink and each
    directory that cannot be read; ``listed(path, stat)`` of each directory
    read (the agent checks that it has an inotify watch).
    """
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        _unreadable(problem, root, exc)
        return
    stack: list[tuple[str, int, list[str]]] = []  # (directory, its descriptor, subdirectories left)
    try:
        path = root
        while True:
            if fd is not None:
                names: list[str] = []
                stack.append((path, fd, names))
                yield from _list(path, fd, names, problem, listed)
            if not stack:
                return
            parent, parent_fd, names = stack[-1]
            if not names:
                os.close(parent_fd)
                stack.pop()
                fd = None
                continue
            path = os.path.join(parent, names.pop())
            fd = _open_dir(path, parent_fd, problem)
    finally:
        for _, dir_fd, _ in stack:
            os.close(dir_fd)


def _list(path: str, fd: int, subdirs: list[str], problem: Problem | None, listed) -> Iterator[Found]:
    """Yield the regular files of one open directory; add its subdirectories' names to ``subdirs``."""
    try:
        if listed is not None:
            listed(path, os.fstat(fd))
        with os.scandir(fd) as entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.name)
                    elif entry.is_file(follow_symlinks=False):
                        yield Found(os.path.join(path, entry.name), entry.stat(follow_symlinks=False))
                    elif entry.is_symlink() and problem is not None:
                        link = os.path.join(path, entry.name)
                        problem("symlinks", link, f"{link} is a symlink: not followed and not shipped; "
                                "put the data itself in the tree", None)
                except PermissionError as exc:  # listed, but not searchable
                    _unreadable(problem, path, exc)
                except OSError:
                    continue
    except OSError as exc:
        _unreadable(problem, path, exc)


def _open_dir(path: str, parent_fd: int, problem: Problem | None) -> int | None:
    try:
        return os.open(os.path.basename(path), DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # gone, or swapped for a link
            _unreadable(problem, path, exc)
        return None


def _unreadable(problem: Problem | None, path: str, exc: OSError) -> None:
    if problem is None:
        log.debug("cannot scan %s: %s", path, exc)
    elif exc.errno in (errno.EACCES, errno.EPERM):
        problem("unreadable directories", path,
                f"cannot read directory {path} ({exc.strerror}): nothing below it is shipped; give the "
                "agent's user read and search permission on it", None)
    elif exc.errno != errno.ENOENT:
        problem("unreadable directories", path, f"cannot read directory {path} ({exc.strerror}): "
                "nothing below it is shipped until a rescan can read it", None)


def scan(roots: Iterable[str], rules: list[Rule], known: Callable[[list[str]], dict[str, tuple]],
         complete: BatchSink, settle: SettleTracker, batch: int = 500, moved_in: bool = False,
         problem: Problem | None = None,
         listed: Callable[[str, os.stat_result], None] | None = None) -> int:
    """Find files the events missed; quiet ones are complete, others settle.

    Files of a directory that was ``moved_in`` whole are complete at once,
    and handed on without a look at the catalog: the registrar skips those
    it has registered as they are. Otherwise ``known(paths)`` returns
    ``{path: Identity}`` for registered paths, so that unchanged
    registered files cost one stat and no hashing. ``complete`` takes a list
    of paths. Returns how many files were handed on.

    Symlinks a rule would have taken are never handed on: they go to
    ``problem``, with unreadable directories (see walk_files for ``listed``).
    """
    handed = 0
    wall = time.time()
    pending: list[tuple[Found, Rule]] = []

    def flush():
        nonlocal handed
        done = []
        if moved_in:
            done = [entry.path for entry, _ in pending]
        else:
            registered = known([entry.path for entry, _ in pending])
            for entry, rule in pending:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if registered.get(entry.path) == Identity.of(st):
                    continue
                if wall - st.st_mtime_ns / 1e9 >= rule.settle or closed_for_writing(entry.path):
                    done.append(entry.path)
                else:
                    handed += 1
                    settle.track(entry.path, rule.settle)
        if done:
            handed += len(done)
            complete(done)
        pending.clear()

    def met(kind: str, path: str, message: str, archive: str | None) -> None:
        if kind == "symlinks":
            found = select_rule(path, rules)
            if found is None:
                return
            archive = found[0].archive
        problem(kind, path, message, archive)

    for root in roots:
        for entry in walk_files(root, met if problem else None, listed):
            found = select_rule(entry.path, rules)
            if found is None:
                continue
            pending.append((entry, found[0]))
            if len(pending) >= batch:
                flush()
    if pending:
        flush()
    return handed
