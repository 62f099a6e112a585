"""Wiring: observers, threads, wake-ups, signals and service notifications.

Threads, each with one job:
- watchdog observers (watcher.observers) feed a WatchHandler per watched directory;
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
import re
import signal
import stat
import threading
import time

from pathlib import Path

from peewee import OperationalError

from watcher import faults, preflight, service, state_files
from watcher.state_files import lock_path
from watcher.config import Config, ConfigError
from watcher.catalog import Catalog
from watcher.roots import Roots
from watcher.seal import Sealer, load_key
from watcher.handlers import SettleTracker, WatchHandler, scan
from watcher.health import Health, read_health, with_database_retry
from watcher.observers import make_observer
from watcher.registrar import Registrar
from watcher.retention import delete_expired, settle_claimed_removals
from watcher.safefs import ignore_lease_breaks
from watcher.rsync import Destination, Stopped, TransferError, remove_stale_batch_trees
from watcher.ssh import make_control_dir, remove_control_dir, remove_stale_control_dirs
from watcher.finalize import remove_unregistered_finalizations, update_timecode_dirs
from watcher.service import sd_notify
from watcher.transfer import TransferWorker

log = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL = 5.0
CATALOG_CHECK = 1.0  # seconds between looks at the catalog file: deleted, replaced, read-only?
SCAN_KINDS = ("symlinks", "unreadable directories")  # problems a scan of their whole root re-checks
MISSING_ROOTS = "missing watch roots"  # a watch root that is not there (an unmounted disk, deleted)
BLOCKED = "blocked finalizations"  # a link (or file) planted where a finalization directory goes
HASHING_ALLOWANCE = 600.0  # seconds the registrar's hashing may go between 64 MiB read (a disk at 110 kB/s)
STATUS_INTERVAL = 5.0  # seconds between looks at the pending counts for systemd's STATUS=
STATUS_CAP = 1000  # pending rows counted per archive for STATUS= (more: "1000+"): a bounded query


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
    """Another agent works on the same catalog or tree: two would finalize and delete twice."""


class _Locks:
    """The lock files the agent holds (flock) for its lifetime, freed by the
    kernel at any exit: the catalog's, shared by every agent on it (an agent
    of an older watcher, which serves the whole catalog, takes it
    exclusively), and one per archive it serves, exclusive: two agents may
    share a catalog (one service per archive, as socs ran one SupRsync
    instance per archive) but never an archive."""

    def __init__(self):
        self.held: list[tuple[int, str]] = []  # (descriptor, path)

    def close(self) -> None:
        for fd, _path in self.held:
            os.close(fd)
        self.held = []


def _lock_archives(database: Path, archives: list[str], dir_fd: int) -> _Locks:
    """Hold the catalog's lock shared and each archive's exclusively. Opened in
    the state directory's descriptor without following a link, never truncated
    before it is known to be the agent's own file (see state_files.open_lock):
    its directory may be the catalog group's."""
    locks = _Locks()
    try:
        for archive in [None] + sorted(archives):
            path = lock_path(database, archive)
            fd = state_files.open_lock(dir_fd, os.path.basename(path), path)
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if archive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                if archive is None:
                    raise AlreadyRunning(f"another watcher agent (pid {holder}, an older version, which "
                                         f"serves every archive) is running on {database}") from None
                raise AlreadyRunning(f"another watcher agent (pid {holder}) is running archive {archive} "
                                     f"on {database}") from None
            if archive is not None:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
            locks.held.append((fd, path))
    except BaseException:
        locks.close()
        raise
    return locks


def _lock_root(path: str) -> int:
    """A descriptor of a watched directory, flock'ed while it is watched: two agents
    with different catalogs on one tree would each delete files the other has not
    shipped. (Agents that share a catalog could one day take it shared.)"""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"another watcher agent watches {path} (with another catalog)") from None
    except OSError as exc:  # a file system without flock (some NFS): the catalog's lock still holds
        log.debug("cannot lock %s: %s", path, exc)
    return fd


def _identity(path, directory: bool = False) -> tuple[int, int] | None:
    """(device, inode) of what a path names now, following links; None when it is gone
    (or, with ``directory``, is no directory)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if directory and not stat.S_ISDIR(st.st_mode):
        return None
    return (st.st_dev, st.st_ino)


_INOTIFY_WATCH = re.compile(r"^inotify wd:\S+ ino:([0-9a-f]+) sdev:([0-9a-f]+)", re.M)


def inotify_watched() -> set[tuple[int, int]]:
    """(device, inode) of every directory this process's inotify instances watch.

    Read from /proc/self/fdinfo: what the kernel watches, whatever watchdog
    made of an error (it drops a subdirectory's ENOSPC without a word).
    """
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                text = f.read()
        except OSError:  # closed meanwhile
            continue
        for ino, sdev in _INOTIFY_WATCH.findall(text):
            sdev = int(sdev, 16)  # the kernel's dev_t: major << 20 | minor
            found.add((os.makedev(sdev >> 20, sdev & 0xFFFFF), int(ino, 16)))
    return found


def _comparable(watched: set[tuple[int, int]], dirs: list[tuple[str, tuple[int, int]]]) -> set:
    """The watched (device, inode) pairs, in the devices stat() gives: for a
    directory whose device the kernel never names (btrfs reports a
    subvolume's own device to stat(), the file system's to fdinfo), the
    inode is compared with the watches on devices stat() never names."""
    devices = {dev for dev, _ in watched}
    seen = {ident[0] for _, ident in dirs}
    foreign = {ino for dev, ino in watched if dev not in seen}
    return watched | {ident for _, ident in dirs if ident[0] not in devices and ident[1] in foreign}


def _read_only(path: Path) -> str | None:
    """Why the catalog cannot be written, or None. Never opens it: closing any
    descriptor of the file would drop the locks SQLite holds on it."""
    if os.access(path, os.W_OK):
        return None
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "its file system is mounted read-only"
    except OSError:
        return None  # gone: that is _catalog_changed's to say
    return "the agent may not write it: its permissions, or the immutable attribute"


def _missing_root(root: "_Root") -> str:
    """What a missing watch root means and what to do, in one line."""
    what = (f"watched directory {root.path} is gone" if root.watched_once else
            f"watched directory {root.path} does not exist (a disk not mounted?)")
    return (f"{what}: its rules ship nothing from it until it is there; the other rules work "
            "meanwhile. Mount or make it (or fix the rule): it is watched and scanned as soon as "
            "it is a directory")


class _Root:
    """One watched directory: its observer, and the directory (locked) it watches."""

    def __init__(self, path: str, rules: list):
        self.path = path
        self.poll = any(r.poll for r in rules)
        self.lock: int | None = None  # a descriptor of the directory watched
        self.observer = None
        self.watched_once = False
        self.gone = False
        self.rewatch = False  # some of its directories lost their inotify watches: watch it again
        self.rewatched = False  # it was, and no scan of it has found every directory watched since
        self.retry_at = 0.0  # monotonic time before which a failed or incomplete watch is not redone
        self.rescans = 0  # scans of the whole root, and the files they handed on (for metrics)
        self.rescan_found = 0
        self.lost_watches = 0  # its directories without an inotify watch at the last scan

    def identity(self) -> tuple[int, int] | None:
        if self.lock is None:
            return None
        st = os.fstat(self.lock)
        return (st.st_dev, st.st_ino)

    def release(self) -> None:
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


class _Findings:
    """Problems the agent meets itself (scans, watches, the catalog), reported
    through Health once each and solved when they are no longer met."""

    def __init__(self, health: Health, config: Config):
        self.health = health
        self._watches = [(str(r.watch), r.archive) for r in config.rules]
        self._open: dict[tuple[str, str], list[str]] = {}  # (kind, subject) -> archives
        self._lock = threading.Lock()

    def archives(self, path: str) -> list[str]:
        """The archives of the rules watching ``path``."""
        return sorted({a for w, a in self._watches if path == w or path.startswith(w.rstrip("/") + "/")})

    def report(self, kind: str, subject: str, message: str, archives: list[str] | None = None,
               level: int = logging.WARNING) -> None:
        archives = archives or self.archives(subject)
        with self._lock:
            self._open[(kind, subject)] = archives
        self.health.problem(archives, kind, subject, message, level=level)

    def solve(self, kind: str, subject: str) -> None:
        with self._lock:
            archives = self._open.pop((kind, subject), None)
        if archives:
            self.health.solved(archives, kind, subject)

    def below(self, kinds, roots: list[str]) -> set[tuple[str, str]]:
        """The open problems of these kinds at or below these roots."""
        with self._lock:
            return {(k, s) for k, s in self._open
                    if k in kinds and any(s == r or s.startswith(r.rstrip("/") + "/") for r in roots)}


def _metrics(config: Config):
    """The Prometheus endpoint's registry (watcher.metrics) when ``metrics:`` is
    configured, else None: the optional module and its library load only then."""
    if config.metrics is None:
        return None
    try:
        from watcher.metrics import Metrics
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "prometheus_client":
            raise
        where = f"{config.source}: " if config.source else ""
        raise ConfigError([f"{where}metrics: needs the prometheus-client library, which is not "
                           "installed: pip install 'watcher[metrics]'"]) from None
    return Metrics(config)


def _not_shutdown_noise(record: logging.LogRecord) -> bool:
    """watchdog logs an ERROR when its emitter is stopped mid-read: expected at exit."""
    return "called when the thread is inactive" not in record.getMessage()


class Agent:
    def __init__(self, config: Config, housekeeping_interval: float = HOUSEKEEPING_INTERVAL):
        if problem := faults.environment_problem():
            raise ConfigError([problem])
        if refused := preflight.refusals(config):  # before anything is touched
            raise ConfigError(refused)
        self.config = config
        self.metrics = _metrics(config)  # before anything is locked: a missing library is a refusal
        # A rescan_interval shorter than the housekeeping tick shortens the tick.
        self.interval = min(housekeeping_interval, config.rescan_interval)
        # The stop event doubles as the threads' heartbeat (watcher.service): each loop looks at it.
        self.hearts = service.Heartbeats(service.watchdog_interval())
        self.stop_event = service.ProgressEvent(self.hearts)
        self.rescan_now = threading.Event()
        # First, before anything is written: the state directory and file_root
        # are safe to use, then the lock (a second agent must touch nothing).
        try:
            state_dir = state_files.prepare(config.database, config.file_root,
                                            config.catalog_group)
            try:
                self._locks = _lock_archives(config.database, list(config.archives), state_dir)
            finally:
                os.close(state_dir)
        except state_files.UnsafeStateFile as exc:
            raise ConfigError([str(exc)]) from None
        try:
            ignore_lease_breaks()  # retention's and scans' read leases: a break must not kill us
        except ValueError:  # not the main thread (an embedding program): it must ignore SIGIO itself
            log.warning("not started from the main thread: SIGIO (a broken lease) is not ignored")
        self._roots = self._lock_roots()
        # rows are requests: paths outside their archive's roots are refused, and
        # only what the agent sealed is taken as hashed (watcher.roots, watcher.seal)
        self.roots = Roots(config)
        self.catalog = Catalog(config.database, sealer=Sealer(load_key(config.database)))
        self._catalog_id = _identity(config.database)
        self.health = Health(config.database, config.archives)
        self._findings = _Findings(self.health, config)
        self._roots_lock = threading.Lock()  # observers are replaced while the agent runs
        self._catalog_guard = threading.Lock()
        self._read_only: str | None = None
        self.exit_status = 0
        self._control_dir = (make_control_dir()
                             if any(a.is_remote for a in config.archives.values()) else None)
        self.destinations = {name: Destination(a, self._control_dir, self.roots.of(name))
                             for name, a in config.archives.items()}
        self.workers = {name: TransferWorker(self.catalog, a, self.destinations[name],
                                             self.stop_event, self.health, roots=self.roots,
                                             timed=self.metrics.timed(name) if self.metrics else None)
                        for name, a in config.archives.items()}
        self.settle = SettleTracker(self._complete)
        self.registrar = Registrar(self.catalog, config, self.settle, self._wake,
                                   self.stop_event, self.health)
        self._scan_queue: queue.Queue[tuple[str, bool]] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self.scans_done = 0
        self._undeletable: dict = {}  # retention's rows held back (a writer, a failed unlink), across rounds

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
                    self._scan([path], moved_in)
                except Exception:
                    if not self.stop_event.is_set():
                        log.exception("scan of %s failed", path)

    def _thread(self, target, name: str, allowance: float | None = None, helpers: tuple[str, ...] = (),
                idle=None) -> None:
        """Start a thread; with ``allowance``, the watchdog expects it to show
        progress at least that often (see watcher.service), or ``idle()``."""
        t = threading.Thread(target=target, name=name, daemon=True)
        if allowance is not None:
            self.hearts.register(name, allowance, helpers, idle=idle, alive=t.is_alive)
        t.start()
        self._threads.append(t)

    def _lock_roots(self) -> dict[str, _Root]:
        """Every watched directory, locked (a root missing now is reported once running)."""
        by_dir: dict[str, list] = {}
        for rule in self.config.rules:
            by_dir.setdefault(str(rule.watch), []).append(rule)
        roots = {path: _Root(path, rules) for path, rules in by_dir.items()}
        try:
            for root in roots.values():
                try:
                    root.lock = _lock_root(root.path)
                except OSError as exc:  # gone, or unreadable: reported once running, retried
                    log.debug("cannot lock %s yet: %s", root.path, exc)
        except AlreadyRunning:
            for root in roots.values():
                root.release()
            self._locks.close()
            raise
        return roots

    def _check_roots(self) -> None:
        """Watch each root that is not watched, or is no longer the directory
        watched (deleted and made again, moved away and replaced), and report
        one that is missing (at start: an unmounted disk is a degraded rule,
        not a configuration error) or gone; every housekeeping tick. A watch
        that failed, or lost some of its directories' watches, is redone at
        most once a rescan interval."""
        now = time.monotonic()
        for root in self._roots.values():
            try:
                current = _identity(root.path, directory=True)
            except OSError as exc:  # out of reach (a search permission lost on the way, a loop)
                if root.observer is None and now >= root.retry_at:
                    root.retry_at = now + self.config.rescan_interval
                    self._cannot_watch(root, exc)
                continue
            if current is None:
                if not root.gone:
                    root.gone = True
                    with self._roots_lock:
                        self._unwatch(root)
                        root.release()
                    self._findings.report(MISSING_ROOTS, root.path, _missing_root(root))
                continue
            if root.gone or (root.lock is not None and current != root.identity()):
                self._watch(root)  # another directory than the one watched: at once
            elif root.rewatch or (root.observer is None and now >= root.retry_at):
                root.rewatched = root.rewatch
                self._watch(root)

    def _preflight(self) -> None:
        """The start-up checks (watcher.preflight): each problem found is
        reported, and looked at again every rescan interval until none is
        left and every archive's host has answered."""
        checks = preflight.StartupChecks(self.config, self.destinations)
        reported: set[tuple[str, str]] = set()
        first = clean = True
        while True:
            try:
                found = checks.run(self.stop_event)
            except Stopped:
                return
            except Exception:  # a check's own failure must not stop the agent
                log.exception("start-up checks failed")
                return
            if first:
                first = False
                log.info("start-up checks done: %s", f"{len(found)} problems" if found else "nothing found")
            for f in found:
                self._findings.report(f.kind, f.subject, f.message, list(f.archives))
            if clean:
                clean = False
                self._clean_far_temp_files()  # a walk of each far base: after the reports
            now = {(f.kind, f.subject) for f in found}
            for kind, subject in reported - now:
                self._findings.solve(kind, subject)
            reported = now
            if not reported and not checks.unreachable:
                return
            if self.stop_event.wait(self.config.rescan_interval):
                return

    def _clean_far_temp_files(self) -> None:
        """rsync's temporary files that a far power cut left below each ssh
        archive's base (see Destination.clean_temp_files), once at start."""
        for name, dest in self.destinations.items():
            try:
                removed = dest.clean_temp_files(
                    lambda paths, name=name: self.catalog.files.known_remote_paths(name, paths),
                    self.stop_event)
            except Stopped:
                return
            except Exception as exc:  # the far side's or the catalog's: nothing else depends on it
                log.warning("archive %s: rsync's temporary files left on the far side were not "
                            "cleaned up: %s", name, exc)
                continue
            if removed:
                log.info("archive %s: removed %d temporary files a cut-off copy left on the far side, "
                         "e.g. %s", name, len(removed), removed[0])

    def _watch(self, root: _Root) -> None:
        """(Re)start the observer of a root; a failure is reported and retried later."""
        root.gone = root.rewatch = False
        root.retry_at = time.monotonic() + self.config.rescan_interval
        with self._roots_lock:
            if self.stop_event.is_set():
                return
            self._unwatch(root)
            if root.identity() != _identity(root.path, directory=True):
                root.release()
                try:
                    root.lock = _lock_root(root.path)
                except AlreadyRunning as exc:
                    self._findings.report("unwatched roots", root.path, f"not watching {root.path}: {exc}")
                    return
                except FileNotFoundError:
                    return  # gone again: the next tick says so
                except OSError as exc:  # unreadable: say so; tried again every rescan
                    self._cannot_watch(root, exc)
                    return
            observer = make_observer(root.path, root.poll, overflowed=self.rescan_now.set)
            handler = WatchHandler(list(self.config.rules), self._complete, self.settle, self._scan_dir,
                                   gone=self.registrar.submit_gone)
            try:
                observer.schedule(handler, root.path, recursive=True, event_filter=WatchHandler.EVENTS)
                observer.start()
            except OSError as exc:
                observer.stop()
                self._cannot_watch(root, exc)
                return
            root.observer = observer
            self._observer_heart(root.path, observer, handler)
        log.info("watching %s (%s)", root.path, "polling" if root.poll else "inotify")
        self._findings.solve("unwatched roots", root.path)
        self._findings.solve(MISSING_ROOTS, root.path)
        if root.watched_once or self.scans_done:  # else the start-up scan is coming
            self._scan_dir(root.path, False)
        root.watched_once = True

    def root_counts(self) -> dict[str, dict[str, int]]:
        """Each watched directory for metrics: watched (1 or 0), rescans, the
        files they found, directories without a watch at the last scan."""
        return {path: {"watched": int(r.observer is not None), "rescans": r.rescans,  # no lock: ints
                       "rescan_found": r.rescan_found, "lost_watches": r.lost_watches}
                for path, r in self._roots.items()}

    def _cannot_watch(self, root: _Root, exc: OSError) -> None:
        if exc.errno in (errno.ENOSPC, errno.EMFILE):
            advice = ("raise the limit with 'sysctl fs.inotify.max_user_watches=524288' (and "
                      "fs.inotify.max_user_instances); until then")
        else:
            advice = "until the agent can watch it (tried again every rescan),"
        self._findings.report("unwatched roots", root.path,
                              f"cannot watch {root.path}: {exc.strerror or exc}; {advice} files there are "
                              f"found only by the rescan every {self.config.rescan_interval:.0f} s")

    def _observer_heart(self, path: str, observer, handler: WatchHandler) -> None:
        """An observer progresses when it has no event queued or dispatches one."""
        heart = self.hearts.register(f"watcher-observer {path}", 0.0, alive=observer.is_alive,
                                     idle=observer.event_queue.empty)
        dispatch = handler.dispatch

        def beating(event) -> None:
            heart.beat()
            dispatch(event)
        handler.dispatch = beating

    def _unwatch(self, root: _Root) -> None:
        self.hearts.forget(f"watcher-observer {root.path}")
        observer, root.observer = root.observer, None
        if observer is not None:
            observer.stop()
            observer.join(5)

    def _root_of(self, path: str) -> str | None:
        """The innermost root a path lies in."""
        inside = [r for r in self._roots if path == r or path.startswith(r.rstrip("/") + "/")]
        return max(inside, key=len) if inside else None

    def _scan(self, paths: list[str], moved_in: bool = False) -> int:
        """Scan directories; report what they hold that is not shipped (a symlink,
        an unreadable directory); after a scan of a whole root, solve what it no
        longer meets and check that inotify watches every directory it listed
        (reading the kernel's list costs a line per watch: not for every new
        directory)."""
        roots = [p for p in paths if p in self._roots]
        before = self._findings.below(SCAN_KINDS, roots)
        met: set[tuple[str, str]] = set()
        dirs: list[tuple[str, tuple[int, int]]] = []

        def problem(kind: str, path: str, message: str, archive: str | None) -> None:
            self.hearts.beat()
            met.add((kind, path))
            self._findings.report(kind, path, message, [archive] if archive else None)

        def listed(path: str, st: os.stat_result) -> None:
            self.hearts.beat()
            dirs.append((path, (st.st_dev, st.st_ino)))

        def known(found: list[str]):
            self.hearts.beat()  # a scan of a big tree is progress (the housekeeper's, the scanner's)
            return self.registrar.known(found)

        found = 0
        for path in paths:  # one at a time, to count each root's findings
            found_here = scan([path], list(self.config.rules), known, self._complete_many, self.settle,
                              moved_in=moved_in, problem=problem, listed=listed if roots else None)
            found += found_here
            if path in roots:
                self._roots[path].rescans += 1
                self._roots[path].rescan_found += found_here
        for kind, subject in before - met:
            self._findings.solve(kind, subject)
        if roots:
            self._check_watches([d for d in dirs if self._root_of(d[0]) in roots], roots)
        return found

    def _check_watches(self, dirs: list[tuple[str, tuple[int, int]]], roots: list[str]) -> None:
        """Directories a scan of whole roots listed that the kernel does not watch
        (lost to the watch limit, or unreadable when they appeared): their root
        is watched again, at most once a rescan interval, and they are reported
        when that did not help (the scan after it still finds them)."""
        inotify = {r.path for r in self._roots.values() if r.observer is not None and not r.poll}
        dirs = [(path, ident) for path, ident in dirs if self._root_of(path) in inotify]
        missing = []
        if dirs:
            watched = _comparable(inotify_watched(), dirs)
            missing = [(path, ident) for path, ident in dirs if ident not in watched]
        if missing:
            self.stop_event.wait(1.0)  # a directory just made may be getting its watch right now
            watched = _comparable(inotify_watched(), dirs)
            missing = [(path, ident) for path, ident in missing
                       if ident not in watched and _identity(path) == ident]
        lost: dict[str, list[str]] = {}
        for path, _ in missing:
            lost.setdefault(self._root_of(path), []).append(path)
        for path in roots:
            self._roots[path].lost_watches = len(lost.get(path, ()))
            if path in inotify and path not in lost:
                self._roots[path].rewatched = False
                self._findings.solve("lost watches", path)
        now = time.monotonic()
        for path, paths in lost.items():
            root = self._roots[path]
            if now >= root.retry_at:
                root.rewatch = True
            if not root.rewatched:
                continue
            self._findings.report(
                "lost watches", path,
                f"{len(paths)} directories below {path} have no inotify watch (e.g. {paths[0]}): the "
                "limit fs.inotify.max_user_watches was reached, or they could not be read when they "
                "appeared; raise the limit ('sysctl fs.inotify.max_user_watches=524288') or fix their "
                f"permissions: until then files there are found only by the rescan every "
                f"{self.config.rescan_interval:.0f} s, which also watches them again")

    # -- the catalog ------------------------------------------------------------

    def _catalog_changed(self) -> str | None:
        """What happened to the catalog file or its lock since the agent opened them, if anything."""
        now = _identity(self.config.database)
        if now is None:
            return "was deleted"
        if now != self._catalog_id:
            return "was replaced by another file"
        for fd, path in self._locks.held:
            lock = os.fstat(fd)
            try:
                now = os.lstat(path)  # a link put in its place is not the lock
            except (FileNotFoundError, NotADirectoryError):
                now = None
            if now is None or (now.st_dev, now.st_ino) != (lock.st_dev, lock.st_ino):
                return f"lost its lock file {path} (another agent could start on it)"
        return None

    def _check_catalog(self) -> bool:
        """Whether retention may delete: the catalog is the file the agent opened,
        and writable. A catalog deleted or replaced stops the agent (exit status
        1): nothing it records would be kept. A read-only one only pauses
        deletions, until it is writable again: restarting would not help."""
        changed = self._catalog_changed()
        if changed:
            with self._catalog_guard:
                first, self.exit_status = self.exit_status == 0, 1
            if first:
                log.error("catalog %s %s under the running agent: stopping, and deleting nothing more "
                          "(no deletion would be recorded); start the agent again once the right "
                          "catalog is in place", self.config.database, changed)
                self.stop_event.set()
            return False
        why = _read_only(self.config.database)
        with self._catalog_guard:
            was, self._read_only = self._read_only, why
        database = str(self.config.database)
        if why and not was:
            self._findings.report("read-only catalogs", database,
                                  f"catalog {database} is read-only ({why}): nothing is deleted until it "
                                  "is writable again; make it writable (chmod, chattr -i, or remount its "
                                  "file system read-write)", list(self.config.archives), level=logging.ERROR)
        elif was and not why:
            log.info("catalog %s is writable again; deleting resumes", database)
            self._findings.solve("read-only catalogs", database)
        return why is None

    def _checkpoint_lost_catalog(self) -> None:
        """Checkpoint the catalog the agent opened (moved away, it is then whole)
        and empty its write-ahead log: left beside the path, that log would be
        replayed into whatever catalog is put there next. Runs on the thread that
        opened the catalog, whose connection still holds the old file."""
        try:
            self.catalog.db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        except OperationalError as exc:
            log.debug("cannot checkpoint the lost catalog: %s", exc)

    def _guard_catalog(self) -> None:
        while not self.stop_event.wait(CATALOG_CHECK):
            self._check_catalog()

    def start(self) -> None:
        if self.metrics:  # first: an address that cannot be had stops the start (ConfigError)
            self.metrics.serve(self)
        log.info("catalog %s; finalization files under %s", self.config.database, self.config.file_root)
        for name, a in self.config.archives.items():
            where = f"{a.ssh_host}:{a.remote_basedir}" if a.is_remote else a.remote_basedir
            log.info("archive %s -> %s", name, where)
        remove_stale_batch_trees()  # left by an agent killed mid-batch
        remove_stale_control_dirs()  # masters and control directories of agents killed (SIGKILL)
        settle_claimed_removals(self.catalog, self.config)  # left by an agent killed while deleting
        if readmitted := self.catalog.files.readmit(self.roots.admits):  # a root added since they were refused
            log.info("%d catalog rows refused before are inside their archive's roots now", readmitted)
        by_instance: dict[str, list[str]] = {}
        for name, archive in self.config.archives.items():
            by_instance.setdefault(archive.instance_id, []).append(name)
        for instance_id, names in by_instance.items():
            remove_unregistered_finalizations(self.catalog, self.config.file_root, instance_id, names)
        self._thread(self.settle.run, "watcher-settle")  # waits on its own condition: no heartbeat
        self._thread(self.registrar.run, "watcher-registrar", HASHING_ALLOWANCE, ("watcher-hash",),
                     idle=self.registrar.idle)
        self._thread(self._scanner, "watcher-scanner", 1.0)
        self._thread(self._guard_catalog, "watcher-catalog-guard", CATALOG_CHECK)
        self._check_roots()
        self._thread(self._preflight, "watcher-preflight")  # far commands: off the start's path
        for name, worker in self.workers.items():
            a = self.config.archives[name]  # its far md5 runs on its checker thread meanwhile
            self._thread(worker.run, f"watcher-transfer-{name}", a.copy_timeout + a.cmd_timeout,
                         helpers=(f"watcher-check-{name}",))
        far = max(a.cmd_timeout for a in self.config.archives.values())
        self._thread(self._housekeep, "watcher-housekeeper", self.interval + far)
        self._thread(self._retain, "watcher-retention", self.interval + far)
        sd_notify("READY=1")

    def stop(self, timeout: float = 10.0) -> None:
        sd_notify("STOPPING=1")
        self.stop_event.set()
        self.rescan_now.set()  # wakes the housekeeper
        self.settle.stop()
        for worker in self.workers.values():
            worker.wake.set()
        logging.getLogger("watchdog.observers.inotify").addFilter(_not_shutdown_noise)
        with self._roots_lock:  # no observer is started after this
            observers = [r.observer for r in self._roots.values() if r.observer is not None]
        for observer in observers:
            observer.stop()
        deadline = time.monotonic() + timeout
        for observer in observers:
            observer.join(max(0.1, deadline - time.monotonic()))
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        for dest in self.destinations.values():
            dest.close()
        if self.metrics:
            self.metrics.close()
        if self._control_dir:
            remove_control_dir(self._control_dir)
        self.health.close()
        if self.exit_status:
            self._checkpoint_lost_catalog()
        self.catalog.close()
        for root in self._roots.values():
            root.release()
        self._locks.close()

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; return the exit status."""
        def on_signal(signum, _frame):
            log.info("received %s; stopping", signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        self._notify_until_stopped()
        self.stop()
        log.info("stopped")
        return self.exit_status

    # -- systemd ------------------------------------------------------------------

    def _notify_until_stopped(self) -> None:
        """Until the agent stops: WATCHDOG=1 every half WatchdogSec while every
        thread shows progress (one that stops showing it is logged, and systemd
        restarts the service), and STATUS= when it changes."""
        ping = service.watchdog_interval()
        notify = bool(os.environ.get("NOTIFY_SOCKET"))
        tick = min(ping / 2, STATUS_INTERVAL) if ping else STATUS_INTERVAL
        stalled: dict[str, str] = {}
        status = None
        woke = time.monotonic()
        while not self.stop_event.wait(tick):
            late, woke = time.monotonic() - woke - tick, time.monotonic()
            if late > tick:  # this thread too was stopped or starved: so were the others
                self.hearts.forgive()
            now = self.hearts.stalled()
            if threading.Event.is_set(self.stop_event):
                break  # a thread that ended as the agent stops is no news
            for name in now.keys() - stalled.keys():
                log.error("%s: not telling systemd's watchdog that all is well (it restarts the "
                          "service when WatchdogSec passes without)", now[name])
            for name in stalled.keys() - now.keys():
                log.warning("thread %s makes progress again", name)
            stalled = now
            if ping and not stalled:
                sd_notify("WATCHDOG=1")
            if notify:
                text = self._status_text(stalled)
                if text != status:
                    sd_notify(f"STATUS={text}")
                    status = text

    def _status_text(self, stalled: dict[str, str]) -> str:
        """Pending files per archive (counted up to STATUS_CAP, through the
        pending index: the cost of a batch, never of the table), degraded
        archives, and threads not progressing."""
        pending: dict[str, int | None] = {}
        for name, a in self.config.archives.items():
            try:
                pending[name] = len(self.catalog.shipping.pending(name, STATUS_CAP, a.max_copy_attempts))
            except OperationalError:
                pending[name] = None
        health = read_health(self.config.database, list(self.config.archives)) or {}
        degraded = {name: state.get("last_error") or "?" for name, state in health.get("archives", {}).items()
                    if isinstance(state, dict) and state.get("degraded")}
        text = service.status_line(pending, STATUS_CAP, degraded)
        if stalled:
            text = f"not progressing: {', '.join(sorted(stalled))}; {text}"
        return text

    # -- housekeeping -------------------------------------------------------------

    def rescan(self) -> int:
        found = self._scan(sorted(self._roots))
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
                self._check_roots()
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
        with_database_retry(self.catalog.timecode_dirs.derive, self.health, stop)
        if not self.quiet():
            return False
        waiting = self._findings.below({BLOCKED}, [str(self.config.file_root)])
        met: set[tuple[str, str]] = set()
        for name in self.config.archives:
            def blocked(exc, timecode, name=name) -> None:
                met.add((BLOCKED, exc.path))
                self._findings.report(
                    BLOCKED, exc.path,
                    f"finalization of {name} timecode {timecode} waits: {exc.path} {exc.why}, and is "
                    "not followed (someone who may write file_root could have put it there to make "
                    "the agent write elsewhere); remove it: the agent then makes the directory itself",
                    [name])
            finalized = with_database_retry(
                lambda: update_timecode_dirs(self.catalog, name, self.config.file_root,
                                             self.config.archives[name].instance_id, now, blocked),
                self.health, stop)
            if finalized:
                self._wake({name})
        for kind, subject in waiting - met:
            self._findings.solve(kind, subject)
        return True

    def retain_once(self, now: float | None = None) -> None:
        """One round of retention for every archive (far md5 checks can take long: own thread).

        Each round, a retried one included, first checks that the catalog is
        the one opened and writable: nothing is deleted on the word of another.
        """
        stop = self.stop_event
        for name in self.config.archives:
            def round_(name=name) -> int:
                if not self._check_catalog():
                    return 0
                return delete_expired(self.catalog, self.config, name, self.destinations[name],
                                      stop, now, held=self._undeletable, health=self.health)
            try:
                with_database_retry(round_, self.health, stop)
            except TransferError as exc:
                log.warning("retention for %s postponed: far side not reachable (%s)", name, exc)
