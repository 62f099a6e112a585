"""Wiring: observers, threads, wake-ups, signals and service notifications.

Threads, each with one job:
- watchdog observers feed a WatchHandler per watched directory;
- the settle tracker completes files that had no close event;
- the registrar hashes complete files and commits them in batches;
- one transfer worker per archive ships pending rows;
- the housekeeper scans at start and every ``rescan_interval``, derives and
  finalizes timecode directories, and deletes files past their retention.
All state lives in the catalog, so stopping at any instant loses nothing.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import signal
import socket
import threading
import time
import warnings

from pathlib import Path

from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

try:  # Linux: report a move from outside the tree as a move, not a bare creation
    from watchdog.observers.inotify import InotifyFullEmitter, InotifyObserver
except ImportError:  # pragma: no cover - other platforms
    InotifyObserver = None
else:
    class _Emitter(InotifyFullEmitter):
        """Full inotify events without watchdog's synthetic ones (its listing of
        a directory moved into or within the tree): that directory's own move
        event has it scanned, and a tree of 20,000 files would queue and
        dispatch 20,000 events the handler ignores."""

        def queue_event(self, event) -> None:
            if not event.is_synthetic:
                super().queue_event(event)

    def _inotify_observer():
        observer = InotifyObserver(generate_full_events=True)
        if hasattr(observer, "_emitter_class"):  # else the handler ignores them instead
            observer._emitter_class = _Emitter
        return observer

from watcher.config import Config
from watcher.db import Catalog
from watcher.handlers import SettleTracker, WatchHandler, scan
from watcher.health import Health, with_database_retry
from watcher.registrar import Registrar
from watcher.retention import delete_expired
from watcher.rsync import (
    Destination, Stopped, TransferError, make_control_dir, remove_control_dir,
    remove_stale_batch_trees,
)
from watcher.timecode import remove_unregistered_finalizations, update_timecode_dirs
from watcher.transfer import TransferWorker

log = logging.getLogger(__name__)

# watchdog warns when a directory's watch is re-added during a recursive
# rebuild; it is harmless and would only alarm an operator reading the log.
warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)

HOUSEKEEPING_INTERVAL = 5.0
POLL_INTERVAL = 2.0  # seconds between snapshots of a polled tree (a full walk each)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message.encode(), address)
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)


class _OverflowWatch(logging.Handler):
    """watchdog only logs an inotify queue overflow; turn that into a rescan."""

    def __init__(self, event: threading.Event):
        super().__init__(logging.WARNING)
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.event.set()


def outermost(dirs: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """The directories not inside another of the list (a scan covers its subtree)."""
    chosen: dict[str, bool] = {}
    for path, moved_in in sorted(set(dirs), key=lambda d: len(d[0])):  # ancestors first
        parent, up = path, os.path.dirname(path)
        while up != parent and parent not in chosen:
            parent, up = up, os.path.dirname(up)
        if parent not in chosen:
            chosen[path] = moved_in
    return list(chosen.items())


class AlreadyRunning(RuntimeError):
    """Another agent works on the same catalog: two would finalize and delete twice."""


def _lock_catalog(database: Path):
    """Hold an exclusive lock beside the catalog for the agent's lifetime (freed by the kernel at any exit)."""
    path = Path(f"{database}-watcher.lock")
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise AlreadyRunning(f"another watcher agent (pid {holder}) is running on {database}") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _not_shutdown_noise(record: logging.LogRecord) -> bool:
    """watchdog logs an ERROR when its emitter is stopped mid-read: expected at exit."""
    return "called when the thread is inactive" not in record.getMessage()


class Agent:
    def __init__(self, config: Config, housekeeping_interval: float = HOUSEKEEPING_INTERVAL):
        self.config = config
        # A rescan_interval shorter than the housekeeping tick shortens the tick.
        self.interval = min(housekeeping_interval, config.rescan_interval)
        self.stop_event = threading.Event()
        self.rescan_now = threading.Event()
        config.database.parent.mkdir(parents=True, exist_ok=True)
        self._catalog_lock = _lock_catalog(config.database)  # first: a second agent must touch nothing
        self.catalog = Catalog(config.database)
        self.health = Health(config.database)
        self._control_dir = (make_control_dir()
                             if any(a.is_remote for a in config.archives.values()) else None)
        roots = tuple(str(r.watch) for r in config.rules) + (str(config.file_root),)
        self.destinations = {name: Destination(a, self._control_dir, roots)
                             for name, a in config.archives.items()}
        self.workers = {name: TransferWorker(self.catalog, a, self.destinations[name],
                                             self.stop_event, self.health)
                        for name, a in config.archives.items()}
        self.settle = SettleTracker(self._complete)
        self.registrar = Registrar(self.catalog, config, self.settle, self._wake,
                                   self.stop_event, self.health)
        self._observers: list = []
        self._scan_queue: queue.Queue[tuple[str, bool]] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._overflow = _OverflowWatch(self.rescan_now)
        self.scans_done = 0
        self._undeletable: dict[int, float] = {}  # retention's rows held back after a failed unlink

    # -- wiring ---------------------------------------------------------------

    def _complete(self, path: str) -> None:
        self.settle.forget(path)
        self.registrar.submit(path)

    def _complete_many(self, paths: list[str]) -> None:
        self.settle.forget_many(paths)
        self.registrar.submit_many(paths)

    def _wake(self, archives: set[str]) -> None:
        for name in archives:
            if name in self.workers:
                self.workers[name].wake.set()

    def _scan_dir(self, path: str, moved_in: bool) -> None:
        """Scan a directory that appeared (its early files had no events) off the observer thread."""
        self._scan_queue.put((path, moved_in))

    def _scanner(self) -> None:
        while not self.stop_event.is_set():
            try:
                queued = [self._scan_queue.get(timeout=0.5)]
            except queue.Empty:
                continue
            while True:  # a tree moved in brings an event per subdirectory: scan it once
                try:
                    queued.append(self._scan_queue.get_nowait())
                except queue.Empty:
                    break
            for path, moved_in in outermost(queued):
                try:
                    scan([path], list(self.config.rules), self.registrar.known, self._complete_many,
                         self.settle, moved_in=moved_in)
                except Exception:
                    if not self.stop_event.is_set():
                        log.exception("scan of %s failed", path)

    def _thread(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _start_observers(self) -> None:
        by_dir: dict[str, list] = {}
        for rule in self.config.rules:
            by_dir.setdefault(str(rule.watch), []).append(rule)
        for watch, rules in by_dir.items():
            observer = (PollingObserver(timeout=POLL_INTERVAL) if any(r.poll for r in rules)
                        else _inotify_observer() if InotifyObserver
                        else Observer())
            handler = WatchHandler(list(self.config.rules), self._complete, self.settle, self._scan_dir)
            try:
                observer.schedule(handler, watch, recursive=True, event_filter=WatchHandler.EVENTS)
                observer.start()
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EMFILE):
                    log.error("cannot watch %s: %s; raise the limit with "
                              "'sysctl fs.inotify.max_user_watches=524288' (and "
                              "fs.inotify.max_user_instances); until then files there are found "
                              "by the rescan every %.0f s", watch, exc.strerror or exc,
                              self.config.rescan_interval)
                else:
                    log.error("cannot watch %s: %s; relying on rescans", watch, exc)
                continue
            self._observers.append(observer)
            log.info("watching %s (%s)", watch, "polling" if any(r.poll for r in rules) else "inotify")

    def start(self) -> None:
        for name in ("watchdog.observers.inotify", "watchdog.observers.inotify_c"):
            logging.getLogger(name).addHandler(self._overflow)
        log.info("catalog %s; finalization files under %s", self.config.database, self.config.file_root)
        for name, a in self.config.archives.items():
            where = f"{a.ssh_host}:{a.remote_basedir}" if a.is_remote else a.remote_basedir
            log.info("archive %s -> %s", name, where)
        remove_stale_batch_trees()  # left by an agent killed mid-batch
        remove_unregistered_finalizations(self.catalog, self.config.file_root, self.config.instance_id,
                                          list(self.config.archives))
        self._thread(self.settle.run, "watcher-settle")
        self._thread(self.registrar.run, "watcher-registrar")
        self._thread(self._scanner, "watcher-scanner")
        self._start_observers()
        for name, worker in self.workers.items():
            self._thread(worker.run, f"watcher-transfer-{name}")
        self._thread(self._housekeep, "watcher-housekeeper")
        self._thread(self._retain, "watcher-retention")
        sd_notify("READY=1")

    def stop(self, timeout: float = 10.0) -> None:
        sd_notify("STOPPING=1")
        self.stop_event.set()
        self.rescan_now.set()  # wakes the housekeeper
        self.settle.stop()
        for worker in self.workers.values():
            worker.wake.set()
        logging.getLogger("watchdog.observers.inotify").addFilter(_not_shutdown_noise)
        for observer in self._observers:
            observer.stop()
        deadline = time.monotonic() + timeout
        for observer in self._observers:
            observer.join(max(0.1, deadline - time.monotonic()))
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        for name in ("watchdog.observers.inotify", "watchdog.observers.inotify_c"):
            logging.getLogger(name).removeHandler(self._overflow)
        for dest in self.destinations.values():
            dest.close()
        if self._control_dir:
            remove_control_dir(self._control_dir)
        self.health.close()
        self.catalog.close()
        self._catalog_lock.close()

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; return the exit status."""
        def on_signal(signum, _frame):
            log.info("received %s; stopping", signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        while not self.stop_event.wait(1.0):
            pass
        self.stop()
        log.info("stopped")
        return 0

    # -- housekeeping -------------------------------------------------------------

    def rescan(self) -> int:
        roots = sorted({str(r.watch) for r in self.config.rules})
        found = scan(roots, list(self.config.rules), self.registrar.known, self._complete_many,
                     self.settle)
        self.scans_done += 1
        if self.scans_done == 1:  # says when the agent has caught up with what it missed
            log.info("start-up scan done: %d new or changed files", found)
        elif found:
            log.info("scan found %d new or changed files", found)
        return found

    def _housekeep(self) -> None:
        next_scan = 0.0
        while not self.stop_event.is_set():
            try:
                if self.rescan_now.is_set() or time.monotonic() >= next_scan:
                    self.rescan_now.clear()
                    self.rescan()
                    next_scan = time.monotonic() + self.config.rescan_interval
                self.timecodes_once()
            except (Stopped, TransferError) as exc:
                if not self.stop_event.is_set():
                    log.warning("housekeeping postponed: %s", exc)
            except Exception:
                if self.stop_event.is_set():
                    return
                log.exception("housekeeping failed; trying again shortly")
            self.rescan_now.wait(self.interval)

    def quiet(self) -> bool:
        """No complete file waits to be registered, and no scan is pending.

        Files still settling are not waited for: one that is written forever
        (a log) would otherwise hold every directory open; one that completes
        later in a finalized directory is a late file and finalizes it again.
        """
        return self.registrar.idle() and self._scan_queue.empty()

    def _retain(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.retain_once()
            except Stopped:
                return
            except Exception:
                if self.stop_event.is_set():
                    return
                log.exception("retention failed; trying again shortly")
            self.stop_event.wait(self.interval)

    def housekeep_once(self, now: float | None = None) -> None:
        """Timecode directories, then retention, for every archive."""
        self.timecodes_once(now)
        self.retain_once(now)

    def timecodes_once(self, now: float | None = None) -> bool:
        """Derive and finalize timecode directories; False when postponed.

        Postponed while files are still on their way into the catalog (after
        a start or a rescan, during a burst), so that a directory is never
        declared whole before its files were counted.
        """
        stop = self.stop_event
        with_database_retry(self.catalog.derive_timecode_dirs, self.health, stop)
        if not self.quiet():
            return False
        for name in self.config.archives:
            finalized = with_database_retry(
                lambda: update_timecode_dirs(self.catalog, name, self.config.file_root,
                                             self.config.instance_id, now), self.health, stop)
            if finalized:
                self._wake({name})
        return True

    def retain_once(self, now: float | None = None) -> None:
        """One round of retention for every archive (far md5 checks can take long: own thread)."""
        stop = self.stop_event
        for name in self.config.archives:
            try:
                with_database_retry(
                    lambda: delete_expired(self.catalog, self.config, name, self.destinations[name],
                                           stop, now, held=self._undeletable, health=self.health),
                    self.health, stop)
            except TransferError as exc:
                log.warning("retention for %s postponed: far side not reachable (%s)", name, exc)
