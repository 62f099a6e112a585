"""Register complete files: hash them and record them in the catalog, in batches.

Handlers and scans hand over paths; this thread matches each to its rule,
hashes it (checking it did not change while being read), and commits a
whole batch in one transaction, then wakes the archives' transfer workers.
A file already registered with the same size and modification time costs
one stat; one whose content changed is hashed again and ships again.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from watcher.config import Config
from watcher.db import Catalog, NewFile, md5_of
from watcher.faults import checkpoint
from watcher.handlers import SettleTracker
from watcher.health import Health, with_database_retry
from watcher.rules import Match, UnsafeRemotePath, match_rule

log = logging.getLogger(__name__)

BATCH = 500
SMALL_FILE = 1 << 20  # bytes; smaller files are hashed in the registrar's own thread
LOG_EACH = 20  # registering more files at once logs a summary line (each at DEBUG)


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
        self._queue: queue.Queue[str] = queue.Queue()
        self._queued: set[str] = set()
        self._lock = threading.Lock()
        self._hashers = ThreadPoolExecutor(hash_threads, thread_name_prefix="watcher-hash")
        self._reported: set[str] = set()
        self._busy = False

    def submit(self, path: str) -> None:
        """Hand over a complete file (thread-safe; a path already waiting is not queued twice)."""
        with self._lock:
            if path in self._queued:
                return
            self._queued.add(path)
        self._queue.put(path)

    def idle(self) -> bool:
        """Nothing waiting and nothing being registered (timecode directories may be judged)."""
        with self._lock:
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
                    with self._lock:
                        self._busy = False
        finally:
            self._hashers.shutdown(wait=False, cancel_futures=True)

    def _take(self) -> list[str]:
        try:
            first = self._queue.get(timeout=0.5)
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        with self._lock:
            self._queued.difference_update(batch)
            self._busy = True
        return batch

    def register(self, paths: list[str]) -> int:
        """Register or refresh these paths; return how many rows were written."""
        matches: list[tuple[Match, os.stat_result]] = []
        for path in paths:
            found = self._match(path)
            if found:
                matches.append(found)
        if not matches:
            return 0
        existing = with_database_retry(
            lambda: self.catalog.active_rows([m.local_path for m, _ in matches]), self.health, self.stop)
        todo = []
        for m, st in matches:
            row = existing.get((m.local_path, m.rule.archive))
            if row is not None and (row.size, row.mtime_ns) == (st.st_size, st.st_mtime_ns):
                continue  # already registered as it is
            todo.append((m, st, row))
        # Big files go to the hashing threads; small ones are hashed here meanwhile
        # (handing each to a thread would cost more than hashing it).
        big = {id(job): job for job in todo if job[1].st_size > SMALL_FILE}
        in_threads = self._hashers.map(self._hash, big.values())
        md5s = {id(job): self._hash(job) for job in todo if id(job) not in big}
        md5s.update(zip(big, in_threads))
        hashed = [md5s[id(job)] for job in todo]
        new, changed = [], []
        now = time.time()
        for (m, st, row), md5 in zip(todo, hashed):
            if md5 is None:
                continue
            if row is not None:
                changed.append((row, md5, st))
            else:
                new.append(self._new_file(m, st, md5, now))

        def write():
            nonlocal new
            for row, md5, st in changed:
                if md5 != row.local_md5sum:
                    log.info("%s changed after it was registered; it will be shipped again", row.local_path)
                self.catalog.update_content(row.id, md5, st.st_size, st.st_mtime_ns)
            new = self._without_collisions(new)
            if new:
                self.catalog.add_files(new, rows=False)

        checkpoint("hashed")
        with_database_retry(write, self.health, self.stop)
        # One line a file for a trickle; for a burst one line (a line a file
        # costs more than registering it, and journald drops bursts).
        each = logging.INFO if len(new) <= LOG_EACH else logging.DEBUG
        for f in new:
            log.log(each, "registered %s -> %s:%s", f.local_path, f.archive_name, f.remote_path)
        if len(new) > LOG_EACH:
            log.info("registered %d files, %s to %s", len(new), new[0].local_path, new[-1].local_path)
        archives = {f.archive_name for f in new} | {row.archive_name for row, _, _ in changed}
        if archives:
            self.wake(archives)
        return len(new) + len(changed)

    def _without_collisions(self, new: list[NewFile]) -> list[NewFile]:
        """Leave out files whose far name another local file already has (reported once each).

        They stay on disk, unregistered, until the rules give them names of their own.
        """
        taken = self.catalog.remote_path_owners(new)
        kept = []
        for f in new:
            owner = taken.get((f.archive_name, f.remote_path))
            if owner is None or owner == f.local_path:
                kept.append(f)
            elif f.local_path not in self._reported:
                self._reported.add(f.local_path)
                log.error("not registering %s: its far name %s:%s is already taken by %s",
                          f.local_path, f.archive_name, f.remote_path, owner)
        return kept

    def _match(self, path: str) -> tuple[Match, os.stat_result] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None  # gone before it could be registered
        try:
            found = match_rule(path, self.config.rules, mtime=st.st_mtime)
        except UnsafeRemotePath as exc:
            if path not in self._reported:
                self._reported.add(path)
                log.error("not registering %s: %s", path, exc)
            return None
        return (found, st) if found else None

    def _hash(self, job) -> str | None:
        """md5 of a file that stays unchanged while it is read; else None (and it settles again)."""
        m, st, _row = job
        try:
            md5 = md5_of(m.local_path)
            after = os.stat(m.local_path)
        except OSError as exc:
            log.warning("cannot read %s: %s", m.local_path, exc.strerror or exc)
            return None
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            self.settle.track(m.local_path, m.rule.settle)
            return None
        return md5

    def _new_file(self, m: Match, st: os.stat_result, md5: str, now: float) -> NewFile:
        rule = m.rule
        keep_forever = rule.overrides_retention and rule.delete_local_after is None
        return NewFile(
            local_path=m.local_path, remote_path=m.remote_path, archive_name=rule.archive,
            local_md5sum=md5, timestamp=now, deletable=rule.deletable and not keep_forever,
            size=st.st_size, mtime_ns=st.st_mtime_ns,
            retain=rule.delete_local_after if rule.overrides_retention else None,
        )
