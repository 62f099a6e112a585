"""The watchdog observer of one watched tree.

Built from watchdog's constructors (BaseObserver, the inotify emitter's
``inotify_fd``) and a subclass of its inotify reader (InotifyFD, watchdog
7.1 and later; undocumented but not private), never by replacing its
private attributes.

inotify, with two departures from watchdog's own InotifyObserver:

- Full events (a move from outside the tree is a move, not a bare creation)
  without watchdog's synthetic ones, its listing of a directory moved into or
  within the tree: that directory's own move event has it scanned once, and a
  tree of 20,000 files would otherwise queue and dispatch 20,000 events the
  handler ignores.
- A queue overflow is signalled: the kernel dropped events, and only a
  rescan finds the files they announced. watchdog rebuilds its watches, but
  tells nobody except its log.

A rule with ``poll`` gets a polling observer (NFS and other file systems
without inotify) that enters no directory through a symlink.
"""

from __future__ import annotations

import errno
import os
import warnings
from typing import Callable

from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

from watcher.safefs import DIR_FLAGS

try:
    from watchdog.observers.inotify import InotifyFullEmitter
    from watchdog.observers.inotify_c import InotifyEvent, InotifyFD
except ImportError:  # pragma: no cover - other platforms: the platform's observer
    InotifyFD = None

POLL_INTERVAL = 2.0  # seconds between snapshots of a polled tree (a full walk each)

# watchdog warns when a directory's watch is re-added during a recursive
# rebuild; it is harmless and would only alarm an operator reading the log.
warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)

Signal = Callable[[], None]


def make_observer(root: str, poll: bool, overflowed: Signal) -> BaseObserver:
    """An observer (not started, nothing scheduled) for the tree at ``root``;
    ``overflowed()`` is called, on watchdog's reader thread, each time the
    kernel's inotify queue overflows (events were lost: rescan)."""
    if poll:
        return PollingObserverVFS(os.lstat, polling_listdir(root), polling_interval=POLL_INTERVAL)
    if InotifyFD is None:  # pragma: no cover - other platforms
        return Observer()
    return _InotifyObserver(overflowed)


if InotifyFD is not None:
    class _Emitter(InotifyFullEmitter):
        """Full inotify events, minus watchdog's synthetic ones (see the module)."""

        def queue_event(self, event) -> None:
            if not event.is_synthetic:
                super().queue_event(event)

    class _OverflowSignal(InotifyFD):
        """An inotify instance that calls ``overflowed()`` when the kernel reports
        IN_Q_OVERFLOW, before watchdog rebuilds its watches."""

        def __init__(self, overflowed: Signal):
            super().__init__()
            self._overflowed = overflowed

        def handle_event(self, event: InotifyEvent) -> None:
            if event.is_queue_overflow:
                self._overflowed()
            super().handle_event(event)

    class _InotifyObserver(BaseObserver):
        """watchdog's InotifyObserver with our emitter and our inotify instance
        (one per observer, as there: an overflow is one tree's)."""

        def __init__(self, overflowed: Signal):
            self._inotify = _OverflowSignal(overflowed)
            self._inotify.start()
            super().__init__(_Emitter, inotify_fd=self._inotify)

        def on_thread_stop(self) -> None:
            super().on_thread_stop()
            self._inotify.stop()
            self._inotify.join()


def polling_listdir(root: str) -> Callable[[str], list[os.DirEntry]]:
    """A ``listdir`` for watchdog's polling snapshots that enters no directory
    through a symlink below ``root`` (it already stats entries with os.lstat,
    so it recurses only into real directories; this closes the gap between
    that stat and the listing)."""

    def listdir(path: str) -> list[os.DirEntry]:
        try:
            fd = os.open(path, DIR_FLAGS if path != root else DIR_FLAGS & ~os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a link now: what a vanished directory looks like to the snapshot
                raise NotADirectoryError(errno.ENOTDIR, exc.strerror, path) from None
            raise
        try:
            with os.scandir(fd) as entries:
                return list(entries)  # only names are used
        finally:
            os.close(fd)

    return listdir
