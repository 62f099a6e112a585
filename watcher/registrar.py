"""Register complete files: hash them and record them in the catalog, in batches.

Handlers and scans hand over paths; this thread matches each to its rule,
hashes it (checking it did not change while being read), and commits a
whole batch in one transaction, then wakes the archives' transfer workers.
A file already registered with the same size and modification time costs
one stat; one whose content changed is hashed again and ships again.
"""

from __future__ import annotations

import collections
import logging
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple

from watcher.config import Config, Rule
from watcher.db import Catalog, NewFile, Registered, md5_and_stat
from watcher.faults import checkpoint
from watcher.handlers import SettleTracker
from watcher.health import Health, with_database_retry
from watcher.rules import UnsafeRemotePath, remote_path_problem, render_remote_path, select_rule

log = logging.getLogger(__name__)

BATCH = 500
SMALL_FILE = 1 << 20  # bytes; smaller files are hashed in the registrar's own thread
LOG_EACH = 20  # registering more files at once logs a summary line (each at DEBUG)


class Candidate(NamedTuple):
    """A complete file, its rule, and its stat before hashing."""

    path: str
    rule: Rule
    relpath: str
    groups: dict[str, str]
    stat: os.stat_result


class Registrar:
    def __init__(self, catalog: Catalog, config: Config, settle: SettleTracker,
                 wake: Callable[[set[str]], None], stop: threading.Event,
                 health: Health | None = None, hash_threads: int = 2):
        self.catalog = catalog
        self.config = config
        self.settle = settle
        self.wake = wake
        self.stop = stop
        self.health = health
        self._waiting: collections.deque[str] = collections.deque()
        self._queued: set[str] = set()
        self._cond = threading.Condition()
        self._hashers = ThreadPoolExecutor(hash_threads, thread_name_prefix="watcher-hash")
        self._reported: set[str] = set()
        self._busy = False

    def submit(self, path: str) -> None:
        """Hand over a complete file (thread-safe; a path already waiting is not queued twice)."""
        self.submit_many((path,))

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
            return not self._queued and not self._busy

    def known(self, paths: list[str]) -> dict[str, tuple]:
        """(size, mtime_ns) of registered paths, for scans."""
        rows = with_database_retry(lambda: self.catalog.active_rows(paths), self.health, self.stop)
        return {path: (row.size, row.mtime_ns) for (path, _archive), row in rows.items()}

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                batch = self._take()
                if not batch:
                    continue
                try:
                    self.register(batch)
                except Exception:  # the catalog keeps nothing of it; scans will hand it over again
                    if self.stop.is_set():
                        return
                    log.exception("registering %d files failed; they are retried by the next scan",
                                  len(batch))
                finally:
                    with self._cond:
                        self._busy = False
        finally:
            self._hashers.shutdown(wait=False, cancel_futures=True)

    def _take(self) -> list[str]:
        with self._cond:
            if not self._waiting:
                self._cond.wait(0.5)
            waiting = self._waiting
            batch = [waiting.popleft() for _ in range(min(BATCH, len(waiting)))]
            self._queued.difference_update(batch)
            self._busy = bool(batch)
        return batch

    def register(self, paths: list[str]) -> int:
        """Register or refresh these paths; return how many rows were written."""
        found = [c for c in map(self._candidate, dict.fromkeys(paths)) if c is not None]
        if not found:
            return 0
        existing = with_database_retry(
            lambda: self.catalog.active_rows([c.path for c in found]), self.health, self.stop)
        todo: list[tuple[Candidate, Registered | None, str | None]] = []  # remote path of a new file
        for c in found:
            row = existing.get((c.path, c.rule.archive))
            if row is None:
                remote = self._remote_path(c)  # before hashing: an unsafe one is never hashed
                if remote is not None:
                    todo.append((c, None, remote))
            elif (row.size, row.mtime_ns) != (c.stat.st_size, c.stat.st_mtime_ns):
                todo.append((c, row, None))
            # else: already registered as it is
        # Big files go to the hashing threads; small ones are hashed here meanwhile
        # (handing each to a thread would cost more than hashing it).
        big = [c for c, _, _ in todo if c.stat.st_size > SMALL_FILE]
        in_threads = self._hashers.map(self._hash, big)
        md5s = {c.path: self._hash(c) for c, _, _ in todo if c.stat.st_size <= SMALL_FILE}
        md5s.update(zip((c.path for c in big), in_threads))
        new, changed = [], []
        now = time.time()
        for c, row, remote in todo:
            md5 = md5s[c.path]
            if md5 is None:
                continue
            if row is not None:
                changed.append((row, md5, c.stat))
            else:
                new.append(self._new_file(c, remote, md5, now))

        def write():
            for row, md5, st in changed:
                if md5 != row.local_md5sum:
                    log.info("%s changed after it was registered; it will be shipped again", row.local_path)
                self.catalog.update_content(row.id, md5, st.st_size, st.st_mtime_ns)
            return self.catalog.register_files(new) if new else {}

        checkpoint("hashed")
        taken = with_database_retry(write, self.health, self.stop)
        if taken:
            new = self._report_collisions(new, taken)
        # One line a file for a trickle; for a burst one line (a line a file
        # costs more than registering it, and journald drops bursts).
        each = logging.INFO if len(new) <= LOG_EACH else logging.DEBUG
        if log.isEnabledFor(each):
            for f in new:
                log.log(each, "registered %s -> %s:%s", f.local_path, f.archive_name, f.remote_path)
        if len(new) > LOG_EACH:
            log.info("registered %d files, %s to %s", len(new), new[0].local_path, new[-1].local_path)
        archives = {f.archive_name for f in new} | {row.archive_name for row, _, _ in changed}
        if archives:
            self.wake(archives)
        return len(new) + len(changed)

    def _report_collisions(self, new: list[NewFile], taken: dict[tuple[str, str], str]) -> list[NewFile]:
        """Report (once each) files left out because another local file has their far name;
        return those registered.

        They stay on disk, unregistered, until the rules give them names of their own.
        """
        kept = []
        for f in new:
            owner = taken.get((f.archive_name, f.remote_path), f.local_path)
            if owner == f.local_path:
                kept.append(f)
            elif f.local_path not in self._reported:
                self._reported.add(f.local_path)
                log.error("not registering %s: its far name %s:%s is already taken by %s",
                          f.local_path, f.archive_name, f.remote_path, owner)
        return kept

    def _candidate(self, path: str) -> Candidate | None:
        try:
            st = os.stat(path)
        except OSError:
            return None  # gone before it could be registered
        if not stat.S_ISREG(st.st_mode):
            return None  # a directory, a fifo (reading it would block), a socket
        found = select_rule(path, self.config.rules)
        return Candidate(path, *found, st) if found else None

    def _hash(self, c: Candidate) -> str | None:
        """md5 of a file found unchanged once read (same inode, size and
        modification time as before); else None, and it settles again.

        A file renamed over this path while it is read is not seen here
        (the open descriptor still reads the old one), but its move event
        hands the path over again and the new content is hashed then.
        """
        try:
            md5, after = md5_and_stat(c.path)
        except OSError as exc:
            log.warning("cannot read %s: %s", c.path, exc.strerror or exc)
            return None
        if (after.st_ino, after.st_size, after.st_mtime_ns) != (c.stat.st_ino, c.stat.st_size, c.stat.st_mtime_ns):
            self.settle.track(c.path, c.rule.settle)
            return None
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

    def _new_file(self, c: Candidate, remote: str, md5: str, now: float) -> NewFile:
        rule = c.rule
        keep_forever = rule.overrides_retention and rule.delete_local_after is None
        return NewFile(
            local_path=c.path, remote_path=remote, archive_name=rule.archive,
            local_md5sum=md5, timestamp=now, deletable=rule.deletable and not keep_forever,
            size=c.stat.st_size, mtime_ns=c.stat.st_mtime_ns,
            retain=rule.delete_local_after if rule.overrides_retention else None,
        )
