"""Register complete files: hash them and record them in the catalog, in batches.

Handlers and scans hand over paths; this thread matches each to its rule,
hashes it (checking it did not change while being read), and commits the
batch in groups of about GROUP_BYTES, each in one transaction as soon as it
is hashed, waking the archives' transfer workers: a burst of big files
starts shipping after the first is hashed, not after the last.
A file already registered with the same identity (device, inode, size,
mtime and ctime) costs one stat; any other is hashed again, and ships again
if its content changed. A row's identity counts only when the agent sealed
it (watcher.seal): one written by anyone else is hashed once and sealed.
Files are looked up and opened below their watch root without following any
symlink (safefs): a symlink is reported, never registered.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable, NamedTuple

from watcher.config import Config, Rule
from watcher.catalog import Catalog, Claims, NewFile, Registered, identity_columns
from watcher.faults import checkpoint
from watcher.handlers import SettleTracker
from watcher.hashing import md5_of_fd
from watcher.health import Health, with_database_retry
from watcher.roots import Roots
from watcher.rules import UnsafeRemotePath, remote_path_problem, render_remote_path, select_rule
from watcher.safefs import Identity, SymlinkInPath, Trees, replaced

log = logging.getLogger(__name__)

BATCH = 500
SMALL_FILE = 1 << 20  # bytes; smaller files are hashed in the registrar's own thread
GROUP_BYTES = 64 << 20  # a batch's files are committed (and shipped) in groups of at most this many bytes
LOG_EACH = 20  # registering more files at once logs a summary line (each at DEBUG)


class Candidate(NamedTuple):
    """A complete file, its rule, and its stat (and identity) before hashing."""

    path: str
    rule: Rule
    relpath: str
    groups: dict[str, str]
    stat: os.stat_result
    identity: Identity


class Registrar:
    def __init__(self, catalog: Catalog, config: Config, settle: SettleTracker,
                 wake: Callable[[set[str]], None], stop: threading.Event,
                 health: Health | None = None, hash_threads: int = 2, group_bytes: int = GROUP_BYTES):
        self.catalog = catalog
        self.config = config
        self.settle = settle
        self.wake = wake
        self.stop = stop
        self.health = health
        self.roots = Roots(config)
        self._waiting: collections.deque[str] = collections.deque()
        self._queued: set[str] = set()
        self._cond = threading.Condition()
        self._hashers = ThreadPoolExecutor(hash_threads, thread_name_prefix="watcher-hash")
        self._group_bytes = group_bytes
        self._reported: set[str] = set()
        self._gone: set[str] = set()
        self._unreadable: set[str] = set()  # reported files, solved once they are read
        self._busy = False
        self._registered: collections.Counter[str] = collections.Counter()  # watch root -> new rows
        self._registered_lock = threading.Lock()

    def registered(self) -> dict[str, int]:
        """Files registered since the start, per watch root of their rule (for metrics)."""
        with self._registered_lock:
            return dict(self._registered)

    def submit(self, path: str) -> None:
        """Hand over a complete file (thread-safe; a path already waiting is not queued twice)."""
        self.submit_many((path,))

    def submit_gone(self, path: str) -> None:
        """A file was deleted (thread-safe): its row is closed before the path
        is looked at again, so that a file written there next is a new file."""
        with self._cond:
            self._gone.add(path)
            self._cond.notify()

    def submit_many(self, paths) -> None:
        """Hand over complete files at once (a scan's batch: one lock, not one per file)."""
        with self._cond:
            queued, waiting = self._queued, self._waiting
            before = len(waiting)
            for path in paths:  # nested roots can list one path twice
                if path not in queued:
                    queued.add(path)
                    waiting.append(path)
            if len(waiting) > before:
                self._cond.notify()

    def idle(self) -> bool:
        """Nothing waiting and nothing being registered (timecode directories may be judged)."""
        with self._cond:
            return not self._queued and not self._gone and not self._busy

    def known(self, paths: list[str]) -> dict[str, Identity | None]:
        """The recorded identity of registered paths, for scans (None for a row
        the agent did not seal: its file is handed over and hashed)."""
        rows = with_database_retry(lambda: self.catalog.files.active_rows(paths), self.health, self.stop)
        return {path: self.catalog.trusted_identity(row) for (path, _archive), row in rows.items()}

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                batch, gone = self._take()
                if not batch and not gone:
                    continue
                try:
                    self.register(batch, gone)
                except Exception:  # the groups committed stay; scans hand over the rest again
                    if self.stop.is_set():
                        return
                    log.exception("registering a batch of %d files failed; those not registered "
                                  "are retried by the next scan", len(batch))
                finally:
                    with self._cond:
                        self._busy = False
        finally:
            self._hashers.shutdown(wait=False, cancel_futures=True)

    def _take(self) -> tuple[list[str], list[str]]:
        with self._cond:
            if not self._waiting and not self._gone:
                self._cond.wait(0.5)
            waiting = self._waiting
            batch = [waiting.popleft() for _ in range(min(BATCH, len(waiting)))]
            self._queued.difference_update(batch)
            gone, self._gone = list(self._gone), set()
            self._busy = bool(batch or gone)
        return batch, gone

    def register(self, paths: list[str], gone: list[str] = ()) -> int:
        """Close the rows of files deleted (``gone``), then register or refresh
        these paths; return how many rows were written."""
        if gone:
            self._close_gone(gone)
        with Trees() as trees:  # a watch root's directories, opened once for the batch
            return self._register(paths, trees)

    def _close_gone(self, paths: list[str]) -> None:
        """Mark removed the live rows of deleted files, unless their file is
        back as it was: whatever is at the path now is another file."""
        rows = with_database_retry(lambda: self.catalog.files.active_rows(paths), self.health, self.stop)
        closed = [row.id for row in rows.values() if _current_identity(row.local_path) != row.identity]
        if closed:
            with_database_retry(lambda: self.catalog.files.mark_missing(closed), self.health, self.stop)

    def _register(self, paths: list[str], trees: Trees) -> int:
        found = [c for c in (self._candidate(p, trees) for p in dict.fromkeys(paths)) if c is not None]
        if not found:
            return 0
        existing = with_database_retry(
            lambda: self.catalog.files.active_rows([c.path for c in found]), self.health, self.stop)
        todo: list[_Todo] = []
        for c in found:
            row = existing.get((c.path, c.rule.archive))
            if row is None:
                remote = self._remote_path(c)  # before hashing: an unsafe one is never hashed
                if remote is not None:
                    todo.append(_Todo(c, None, remote))
            elif self.catalog.trusted_identity(row) != c.identity:  # changed, or not hashed by us
                todo.append(_Todo(c, row, None))
            # else: already registered as it is
        # Big files go to the hashing threads, all at once (they run ahead of
        # the commits); small ones are hashed here, group by group (handing
        # each to a thread would cost more than hashing it).
        big: dict[str, Future] = {}
        written = 0
        try:
            for t in todo:
                if t.candidate.stat.st_size > SMALL_FILE:
                    big[t.candidate.path] = self._hashers.submit(self._hash, t.candidate, trees)
            for group in _groups(todo, self._group_bytes):
                if self.stop.is_set():
                    break  # the groups committed are safe; the next start's scan hands over the rest
                written += self._record(group, trees, big)
            return written
        finally:  # on any exit: hashes not started are cancelled, running ones (they read through
            for future in big.values():  # ``trees``' descriptors) waited for
                future.cancel()
            wait(big.values())

    def _record(self, group: list[_Todo], trees: Trees, big: dict[str, Future]) -> int:
        """Hash a group of files, write their rows in one transaction and wake
        their archives' workers; return how many rows were written."""
        md5s = {c.path: self._hash(c, trees) for c, _, _ in group if c.path not in big}
        md5s.update((c.path, big[c.path].result()) for c, _, _ in group if c.path in big)
        fresh, changed = [], []
        now = time.time()
        for c, row, remote in group:
            md5 = md5s[c.path]
            if md5 is None:
                continue
            if row is not None:
                changed.append((c, row, md5))
            else:
                fresh.append(self._new_file(c, remote, md5, now))
        if not fresh and not changed:
            return 0

        def write() -> tuple[list[NewFile], Claims]:
            files, closed = list(fresh), []
            for c, row, md5 in changed:
                if replaced(row.identity, c.stat):  # another file now has the path: a new file
                    remote = self._remote_path(c)
                    if remote is not None:
                        files.append(self._new_file(c, remote, md5, now))
                        closed.append(row.id)
                    continue
                if self.catalog.files.update_content(row.id, md5, c.identity):
                    if md5 != row.local_md5sum:
                        log.info("%s changed after it was registered; it will be shipped again",
                                 row.local_path)
                    continue
                remote = self._remote_path(c)  # its row was removed meanwhile: a new file
                if remote is not None:
                    files.append(self._new_file(c, remote, md5, now))
            claims = (self.catalog.files.register(files, vanished=self._vanished, replaced=closed)
                      if files else Claims({}, {}))
            return files, claims

        checkpoint("hashed")
        files, claims = with_database_retry(write, self.health, self.stop)
        new = self._report_claims(files, claims)
        roots = {c.path: str(c.rule.watch) for c, _, _ in group}
        with self._registered_lock:
            self._registered.update(roots[f.local_path] for f in new if f.local_path in roots)
        # One line a file for a trickle; for a burst one line (a line a file
        # costs more than registering it, and journald drops bursts).
        each = logging.INFO if len(new) <= LOG_EACH else logging.DEBUG
        if log.isEnabledFor(each):
            for f in new:
                log.log(each, "registered %s -> %s:%s", f.local_path, f.archive_name, f.remote_path)
        if len(new) > LOG_EACH:
            log.info("registered %d files, %s to %s", len(new), new[0].local_path, new[-1].local_path)
        archives = {f.archive_name for f in new} | {row.archive_name for _, row, _ in changed}
        if archives:
            self.wake(archives)
        updated = len(changed) - (len(files) - len(fresh))  # the rest were registered as new
        return len(new) + updated

    def _report_claims(self, new: list[NewFile], claims: Claims) -> list[NewFile]:
        """Report files left out because another local file has their far name
        (once each, and as a problem in `watcher status`), and files given a
        version name; return those registered, under their far names.

        Files left out stay on disk, unregistered, until the rules give them
        names of their own or the other file is gone.
        """
        kept = []
        for f in new:
            owner = claims.taken.get((f.archive_name, f.remote_path), f.local_path)
            if owner != f.local_path:
                self._problem(f.archive_name, "far names taken", f.local_path,
                              f"not registering {f.local_path}: its far name {f.archive_name}:"
                              f"{f.remote_path} is already taken by {owner}; change the rule's "
                              "remote_path so that each file gets a name of its own")
                continue
            version = claims.versioned.get((f.local_path, f.archive_name))
            if version is not None:
                log.warning("%s: the far copy %s:%s is the only copy of an earlier file of that "
                            "name; shipping this one as %s", f.local_path, f.archive_name,
                            f.remote_path, version)
                f = f._replace(remote_path=version)
            kept.append(f)
        return kept

    def _problem(self, archive: str, kind: str, path: str, message: str) -> None:
        if self.health is not None:
            self.health.problem(archive, kind, path, message)
        elif path not in self._reported:
            self._reported.add(path)
            log.warning("%s", message)

    def _candidate(self, path: str, trees: Trees) -> Candidate | None:
        found = select_rule(path, self.config.rules)
        if not found:
            return None
        rule = found[0]
        root = str(rule.watch)
        tree = trees.at(root)
        try:
            st = tree.lstat(path)
        except SymlinkInPath as exc:
            self._symlink(rule, exc.filename)
            return None
        except (OSError, ValueError):
            return None  # gone before it could be registered
        if stat.S_ISLNK(st.st_mode):
            self._symlink(rule, path)
            return None
        if not stat.S_ISREG(st.st_mode):
            return None  # a directory, a fifo (reading it would block), a socket
        return Candidate(path, *found, st, Identity.of(st))

    def _symlink(self, rule: Rule, path: str) -> None:
        self._problem(rule.archive, "symlinks", path,
                      f"{path} is a symlink (or lies below one) in watched tree {rule.watch}: "
                      "symlinks are never followed or shipped; put the file itself there if it "
                      "should be shipped")

    def _hash(self, c: Candidate, trees: Trees) -> str | None:
        """md5 of a file found unchanged once read (the identity it had before
        it was read); else None, and it settles again. The file is opened
        below its watch root without following links.

        A file renamed over this path while it is read is not seen here
        (the open descriptor still reads the old one), but its move event
        hands the path over again and the new content is hashed then.
        """
        try:
            fd = trees.at(str(c.rule.watch)).open(c.path)
            try:
                md5, after = md5_of_fd(fd, self.stop.is_set)  # progress, for the watchdog
            finally:
                os.close(fd)
        except SymlinkInPath as exc:
            self._symlink(c.rule, exc.filename)
            return None
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                self._unreadable.add(c.path)
                self._problem(c.rule.archive, "unreadable files", c.path,
                              f"cannot read {c.path}: {exc.strerror or exc}; it is not shipped "
                              "until the agent may read it")
            return None
        if Identity.of(after) != c.identity:
            self.settle.track(c.path, c.rule.settle)
            return None
        if c.path in self._unreadable:
            self._unreadable.discard(c.path)
            if self.health is not None:
                self.health.solved(c.rule.archive, "unreadable files", c.path)
        return md5

    def _remote_path(self, c: Candidate) -> str | None:
        """The far name a new file gets; None (reported once) when it would be unsafe."""
        try:
            remote = render_remote_path(c.rule, c.relpath, c.groups, c.stat.st_mtime)
            problem = remote_path_problem(remote)
            if problem:
                raise UnsafeRemotePath(f"remote path {remote!r} {problem}")
        except UnsafeRemotePath as exc:
            if c.path not in self._reported:
                self._reported.add(c.path)
                log.error("not registering %s: %s", c.path, exc)
            return None
        return remote

    def _vanished(self, path: str) -> bool:
        """Whether nothing is left at a path (a registered file whose directory
        was renamed); never looked at outside every archive's roots."""
        if not any(self.roots.admits(archive, path) for archive in self.config.archives):
            return False
        return not os.path.lexists(path)

    def _new_file(self, c: Candidate, remote: str, md5: str, now: float) -> NewFile:
        rule = c.rule
        keep_forever = rule.overrides_retention and rule.delete_local_after is None
        return NewFile(
            local_path=c.path, remote_path=remote, archive_name=rule.archive,
            local_md5sum=md5, timestamp=now, deletable=rule.deletable and not keep_forever,
            retain=rule.delete_local_after if rule.overrides_retention else None,
            **identity_columns(c.identity),
        )


class _Todo(NamedTuple):
    """A file to hash: new (with the far name it gets) or its row changed."""

    candidate: Candidate
    row: Registered | None
    remote: str | None


def _groups(todo: list[_Todo], group_bytes: int) -> list[list[_Todo]]:
    """``todo`` in groups of at most ``group_bytes`` to hash (a bigger file
    alone), in order: each group is committed once hashed, so that a burst of
    big files starts shipping after the first is hashed, not after the last.

    New files that want one far name go in the first one's group: the
    catalog gives the name to the first of one transaction's files and
    refuses the others, as it did when a batch was one transaction (in two,
    the second could get a version name of its own when the name's last
    copy is gone). A changed file whose row turns out replaced gets its far
    name only when written, in its own group: one of the two is then
    refused or versioned, safe either way.
    """
    groups: list[list[_Todo]] = []
    size = 0
    group_of: dict[tuple[str, str], list[_Todo]] = {}
    for t in todo:
        name = (t.candidate.rule.archive, t.remote) if t.remote is not None else None
        if name in group_of:
            group_of[name].append(t)
            continue
        if not groups or (groups[-1] and size + t.candidate.stat.st_size > group_bytes):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.candidate.stat.st_size
        if name is not None:
            group_of[name] = groups[-1]
    return groups


def _current_identity(path: str) -> Identity | None:
    try:
        return Identity.of(os.lstat(path))
    except OSError:
        return None

