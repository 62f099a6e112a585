"""One archive's transfer worker: take a batch of pending rows, ship, record.

A loop of steps: each step ships one batch and says whether there was one;
when none is left the worker waits on its wake event (set by the registrar,
or a timeout that picks up rows other processes added), never spinning.
A connection failure is not the files' fault: tenacity backs off and
retries the same batch, the archive shows as degraded, nothing is charged.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from peewee import OperationalError
from tenacity import Retrying, retry_if_exception_type, wait_exponential

from watcher.config import Archive
from watcher.db import Catalog
from watcher.faults import checkpoint
from watcher.health import Health, with_database_retry
from watcher.rsync import Destination, Item, Stopped, TransferError, ship_batch

log = logging.getLogger(__name__)

IDLE_WAIT = 2.0  # seconds between looks for rows that other processes added


def items_of(rows) -> list[Item]:
    return [Item(r.id, r.local_path, r.remote_path, r.local_md5sum, r.size) for r in rows]


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
            lambda: self.catalog.pending_batch(a.name, a.files_per_batch, a.max_copy_attempts),
            self.health, self.stop)
        if not rows:
            return False
        items = items_of(rows)
        results, missing = self._ship(items)
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

    def run(self) -> None:
        while not self.stop.is_set():
            self.wake.clear()
            try:
                worked = self.step()
            except Stopped:
                return
            except TransferError:
                if self.stop.is_set():
                    return
                raise
            except OperationalError:
                return  # only when stopping while the catalog was locked
            except Exception:  # keep the agent alive; the catalog still has the work
                log.exception("transfer of archive %s failed; retrying shortly", self.archive.name)
                self.stop.wait(5)
                continue
            if not worked:
                self.wake.wait(IDLE_WAIT)
