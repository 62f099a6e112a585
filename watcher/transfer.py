"""One archive's transfer worker: take a batch of pending rows, ship, record.

A loop of steps: each step ships one batch and says whether there was one;
when none is left the worker waits on its wake event (set by the registrar,
or a timeout that picks up rows other processes added), never spinning.
A connection failure is not the files' fault: tenacity backs off and
retries the same batch, the archive shows as degraded, nothing is charged.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from tenacity import Retrying, retry_if_exception_type, wait_exponential

from watcher.config import Archive
from watcher.db import Catalog
from watcher.faults import checkpoint
from watcher.health import Health, with_database_retry
from watcher.rsync import Destination, Item, TransferError, ship_batch

log = logging.getLogger(__name__)

IDLE_WAIT = 2.0  # seconds between looks for rows that other processes added


def _size(row) -> int | None:
    """Bytes of a row's file; rows socs wrote have none recorded (they size md5 timeouts)."""
    if row.size is not None:
        return row.size
    try:
        return os.stat(row.local_path).st_size
    except OSError:
        return None


def items_of(rows) -> list[Item]:
    return [Item(r.id, r.local_path, r.remote_path, r.local_md5sum, _size(r)) for r in rows]


class TransferWorker:
    def __init__(self, catalog: Catalog, archive: Archive, destination: Destination,
                 stop: threading.Event, health: Health | None = None,
                 sleep: Callable[[float], object] | None = None, max_backoff: float = 60.0):
        self.catalog = catalog
        self.archive = archive
        self.destination = destination
        self.stop = stop
        self.health = health
        self.wake = threading.Event()
        self._sleep = sleep or stop.wait
        self._max_backoff = max_backoff
        self._batch_size = archive.files_per_batch
        self._trouble = 0  # batches in a row of which nothing arrived

    def _before_sleep(self, state) -> None:
        error = state.outcome.exception()
        log.warning("archive %s unreachable (%s); retrying in %.0f s",
                    self.archive.name, error, state.upcoming_sleep)
        if getattr(error, "command", None):
            log.debug("failed command: %r", error.command)
        if self.health:
            self.health.degraded(self.archive.name, str(error))

    def _ship(self, items: list[Item]):
        retrying = Retrying(
            retry=retry_if_exception_type(TransferError),
            wait=wait_exponential(multiplier=1, min=1, max=self._max_backoff),
            stop=lambda state: self.stop.is_set(),
            sleep=self._sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        return retrying(ship_batch, self.destination, items, self.stop)

    def step(self) -> bool:
        """Ship one batch; False when nothing was pending."""
        a = self.archive
        rows = with_database_retry(
            lambda: self.catalog.pending_batch(a.name, self._batch_size, a.max_copy_attempts),
            self.health, self.stop)
        if not rows:
            return False
        items = items_of(rows)
        results, missing = self._ship(items)
        if len(results) > 1 and not any(found == sent for sent, found in results.values()):
            self._archive_trouble(len(results), "none of {} files arrived intact")
            return True
        if len(missing) > 1 and len(missing) == len(items):
            # A whole batch gone at once is more likely an unmounted disk than
            # deleted data: mark none; a batch of one is marked as usual.
            self._archive_trouble(len(missing), "none of {} files is on the local disk (unmounted?)")
            return True
        self._batch_size = a.files_per_batch
        if any(found == sent for sent, found in results.values()):
            self._trouble = 0  # only a file that arrived proves the archive well
            if self.health:
                self.health.recovered(a.name)
        checkpoint("verified")
        now = time.time()
        verified, failed = with_database_retry(
            lambda: self.catalog.record_transfer(results, now), self.health, self.stop)
        if missing:
            with_database_retry(lambda: self.catalog.mark_missing([i.id for i in missing]),
                                self.health, self.stop)
            for item in missing:
                log.warning("%s disappeared before it was shipped; marked removed", item.local_path)
        log.info("%s: %d verified, %d not verified, %d missing", a.name, verified, failed, len(missing))
        if failed:
            for item in items:
                sent, found = results.get(item.id, (None, None))
                if item.id in results and found != sent:
                    log.warning("%s -> %s:%s not verified (local md5 %s, far md5 %s)",
                                item.local_path, a.name, item.remote_path, sent, found)
        return True

    def _archive_trouble(self, count: int, what: str) -> None:
        """Not one file of a batch arrived: blame the archive (a full disk, an
        unwritable base directory), not the files. Nothing is charged; the
        worker backs off and tries again with half the batch, so that a
        batch of one, whose failure is charged, ends a run of files that
        really are hopeless and one bad file never holds up the others."""
        self._trouble += 1
        pause = min(self._max_backoff, 2.0 ** (self._trouble - 1))
        self._batch_size = max(1, count // 2)
        message = f"{what.format(count)}; trying {self._batch_size} in {pause:.0f} s"
        log.warning("archive %s: %s", self.archive.name, message)
        if self.health:
            self.health.degraded(self.archive.name, message)
        self._sleep(pause)

    def run(self) -> None:
        while not self.stop.is_set():
            self.wake.clear()
            try:
                worked = self.step()
            except Exception:  # keep the agent alive; the catalog still has the work
                if self.stop.is_set():
                    return  # stopping: a command was abandoned, or a retry gave up
                log.exception("transfer of archive %s failed; retrying shortly", self.archive.name)
                self.stop.wait(5)
                continue
            if not worked:
                self.wake.wait(IDLE_WAIT)
