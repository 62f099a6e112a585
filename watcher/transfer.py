"""One archive's transfer worker: take a batch of pending rows, ship, record.

A loop of steps: each step ships one batch and says whether there was one;
when none is left the worker waits on its wake event (set by the registrar,
or a timeout that picks up rows other processes added), never spinning.
A connection failure is not the files' fault: the retry policy
(watcher.retry) backs off and retries the same batch, the archive shows as
degraded, nothing is charged. Nor is a batch of which nothing arrived: it
is a result the same policy retries, with a batch half as big.

run() overlaps batches: while the far md5 of one batch runs (on a helper
thread, over its own session of the shared ssh connection), the next batch,
which leaves out the rows in flight and their remote paths, is laid out and
copied; results are recorded in order. In trouble it goes one batch at a
time. step() ships and records one batch, start to end (and, when nothing
of it arrived, the smaller ones after it, until one is judged).

A file whose far copy did not match waits before its next attempt, twice
as long after each (MISMATCH_WAIT up to MISMATCH_WAIT_MAX), while the
other files keep shipping: whatever spoils its copy (a far directory in
its place, a disk going bad) gets time to change before the attempts run out.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from peewee import OperationalError
from tenacity import RetryCallState, Retrying

from watcher.config import Archive
from watcher.catalog import Catalog
from watcher.faults import checkpoint
from watcher.health import Health, with_database_retry
from watcher.retry import MAX_BACKOFF, connection_retrying, result_retrying, stop_after_attempt_if
from watcher.roots import Roots
from watcher.safefs import missing_for_good
from watcher.rsync import (
    BatchResult, Destination, Item, Sent, TransferError, batch_results, send_batch, size_text,
)

log = logging.getLogger(__name__)

IDLE_WAIT = 2.0  # seconds between looks for rows that other processes added
# A batch stops growing once it holds this many bytes (it always holds one
# file), so that big files are copied one batch after another while the
# far md5 of the previous batch runs, instead of hashed all after all are copied.
# A batch the cap ended that fails as a whole is tried again at once without
# the cap, with the files after it: they tell a failing archive (nothing
# arrives: back off, nothing charged) from a failing file (the others arrive).
BATCH_BYTES = 256 << 20
MISMATCH_WAIT = 1.0  # seconds before a file whose far copy did not match is tried again; doubles each time
MISMATCH_WAIT_MAX = 300.0
# A batch rsync could not write (its file I/O failed: a far disk going bad,
# or one far file it cannot write) is tried this many times, then judged as
# a batch of which nothing arrived: halved until one file alone is charged.
BATCH_ERROR_TRIES = 3
# A row whose far name an older live row of another file holds waits this
# long before it is looked at again (that file may be deleted meanwhile).
FAR_NAME_WAIT = 300.0
UNREACHABLE_WAIT = 60.0  # seconds a file whose directory is missing (a disk not mounted?) waits
UNREACHABLE = "unreachable files"  # the problem kind in `watcher status`


def _for_good(missing: list[Item]) -> tuple[list[Item], list[Item]]:
    """The missing files whose directory is there (gone for good: marked
    removed) and those whose directory is not (kept: see missing_for_good)."""
    gone, kept = [], []
    for item in missing:
        (gone if missing_for_good(item.local_path) else kept).append(item)
    return gone, kept


def _stat_size(path: str) -> int | None:
    """Bytes of a file whose row has none recorded (socs wrote it): it sizes md5 timeouts."""
    try:
        return os.stat(path).st_size
    except OSError:
        return None


@dataclass(frozen=True)
class NothingArrived:
    """A batch of which not one file arrived: the archive's trouble, not the
    files'. The result the retry policy retries, with half the batch."""

    count: int
    what: str  # with {} for the count
    why: str = ""  # the cause seen: what rsync said, what the far md5 found

    def __str__(self) -> str:
        return self.what.format(self.count) + (f": {self.why}" if self.why else "")


@dataclass
class _InFlight:
    """A batch copied whose far md5 is running."""

    items: list[Item]
    capped: bool
    sent: list[Item]
    refused: list[Item]
    far: Future
    started: float
    said: str = ""  # rsync's complaint when it left files unsent


COUNTERS = ("iterations", "copies", "errors_timeout", "errors_nonzero", "errors_sqlite")
ERROR_KINDS = ("errors_connection", "errors_archive", "errors_batch")  # errors_nonzero's, by TransferError kind


@dataclass(frozen=True)
class TransferStats:
    """What a worker did since it started, in socs' SupRsync counters (the OCS
    agent publishes them): ``iterations`` looks for pending rows (each batch,
    and every IDLE_WAIT when idle); ``copies`` files judged after a copy
    (verified or not, or found missing); ``errors_timeout`` commands killed
    after stalling past copy_timeout or cmd_timeout; ``errors_nonzero`` other
    failed rsync, ssh or far commands (mostly a non-zero exit); ``errors_sqlite``
    catalog errors (a lock, an I/O error) waited out. ``last_copy``: the last
    batch judged, as socs shows it: start_time, files ([local path, verified]),
    stop_time."""

    iterations: int = 0
    copies: int = 0
    errors_timeout: int = 0
    errors_nonzero: int = 0
    errors_sqlite: int = 0
    last_copy: dict = dataclasses.field(default_factory=dict)
    # For metrics (watcher.metrics): files verified and their bytes, and the
    # failed commands that errors_nonzero counts, by TransferError kind.
    verified_files: int = 0
    verified_bytes: int = 0
    errors_connection: int = 0
    errors_archive: int = 0
    errors_batch: int = 0

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}


class TransferWorker:
    def __init__(self, catalog: Catalog, archive: Archive, destination: Destination,
                 stop: threading.Event, health: Health | None = None,
                 sleep: Callable[[float], object] | None = None, max_backoff: float = MAX_BACKOFF,
                 clock: Callable[[], float] = time.monotonic, *, roots: Roots,
                 timed: Callable[[str, float], object] | None = None):
        """``roots``: which local paths rows of this archive may name (watcher.roots);
        ``timed(what, seconds)``: told how long each copy ("copy") and far md5
        ("far_md5") that succeeded took (the metrics' histograms)."""
        self._timed = timed
        self.catalog = catalog
        self.roots = roots
        self.archive = archive
        self.destination = destination
        self.stop = stop
        self.health = health
        self.wake = threading.Event()
        self._sleep = stop.wait if sleep is None else sleep
        self._max_backoff = max_backoff
        self._batch_size = archive.files_per_batch
        self._trouble = 0  # batches in a row of which nothing arrived
        self._uncap_next = False  # the next batch ignores BATCH_BYTES (see there)
        self._in_flight: _InFlight | None = None  # run()'s batch being checked
        self._checker: ThreadPoolExecutor | None = None
        self._clock = clock
        self._held: dict[int, tuple[float, int]] = {}  # row id -> (not before, far mismatches so far)
        self._unreachable: set[str] = set()  # files kept because their directory was missing
        self._degraded: tuple[float, int, str] | None = None  # since (monotonic), tries, last error
        self._stats = TransferStats()
        self._stats_lock = threading.Lock()  # the far md5 runs on the checker thread

    def stats(self) -> TransferStats:
        """The counters so far (a snapshot; read by the OCS agent)."""
        with self._stats_lock:
            return self._stats

    def _count(self, **changes) -> None:
        with self._stats_lock:
            s = self._stats
            self._stats = dataclasses.replace(s, **{k: (v if k == "last_copy" else getattr(s, k) + v)
                                                    for k, v in changes.items()})

    def _counted(self, command: Callable, what: str | None = None):
        """``command``, counting each TransferError it raises by kind, and
        timing it as ``what`` when it succeeds."""
        def run(*args):
            started = time.monotonic()
            try:
                result = command(*args)
            except TransferError as exc:
                if exc.kind == "timeout":
                    self._count(errors_timeout=1)
                else:
                    by_kind = f"errors_{exc.kind}"
                    self._count(errors_nonzero=1, **({by_kind: 1} if by_kind in ERROR_KINDS else {}))
                raise
            if what and self._timed:
                self._timed(what, time.monotonic() - started)
            return result
        return run

    def _catalog_work(self, work: Callable):
        """Catalog work, its errors waited out (and counted)."""
        def counted():
            try:
                return work()
            except OperationalError:
                self._count(errors_sqlite=1)
                raise
        return with_database_retry(counted, self.health, self.stop)

    def _before_sleep(self, state) -> None:
        error = state.outcome.exception()
        what = "in trouble" if getattr(error, "kind", None) in ("archive", "batch") else "unreachable"
        log.warning("archive %s %s (%s); retrying in %.0f s",
                    self.archive.name, what, error, state.upcoming_sleep)
        if getattr(error, "command", None):
            log.debug("failed command: %r", error.command)
        self._degrade(str(error))

    def _retrying(self) -> Retrying:
        """The same batch again after a TransferError; a batch error only BATCH_ERROR_TRIES times."""
        return connection_retrying(
            self.stop, TransferError, max_backoff=self._max_backoff,
            give_up=stop_after_attempt_if(BATCH_ERROR_TRIES, _is_batch_error),
            sleep=self._sleep, before_sleep=self._before_sleep)

    def _until_judged(self, one_batch: Callable[[], bool | NothingArrived]) -> bool:
        """Run ``one_batch`` (True: a batch was taken, False: none was pending)
        and again, with the next smaller batch, after each NothingArrived, per the
        retry policy; its wait counts the batches in a row of which nothing arrived.
        A stop during that wait takes no further batch (tenacity would try
        once more before it looks at the stop)."""
        tried = []

        def attempt() -> bool | NothingArrived:
            if tried and self.stop.is_set():
                return True  # the batches so far were judged: the worker's loop ends
            tried.append(1)
            return one_batch()

        outcome = result_retrying(
            self.stop, lambda outcome: isinstance(outcome, NothingArrived), lambda: self._trouble,
            max_backoff=self._max_backoff, sleep=self._sleep,
            before_sleep=self._before_next_batch)(attempt)
        return outcome is not False

    def _before_next_batch(self, state: RetryCallState) -> None:
        message = f"{state.outcome.result()}; trying {self._batch_size} in {state.upcoming_sleep:.0f} s"
        log.warning("archive %s: %s", self.archive.name, message)
        self._degrade(message)

    def _degrade(self, message: str) -> None:
        """The archive is in trouble: `watcher status` shows ``message`` (which
        names the cause), and the recovery is logged once (``_recovered``)."""
        since, tries, _ = self._degraded or (time.monotonic(), 0, "")
        self._degraded = (since, tries + 1, message)
        if self.health:
            self.health.degraded(self.archive.name, message)

    def _recovered(self) -> None:
        """A file arrived: a degraded archive says, once, that it recovered."""
        if self._degraded is not None:
            since, tries, message = self._degraded
            self._degraded = None
            log.warning("archive %s recovered after %.0f s and %d %s; the last error was: %s",
                        self.archive.name, time.monotonic() - since, tries, "try" if tries == 1 else "tries",
                        message)
        if self.health:
            self.health.recovered(self.archive.name)

    def _ship(self, items: list[Item]) -> tuple[BatchResult, str]:
        """Copy and check a batch (retried per the policy), with rsync's
        complaint when it left files unsent."""
        def ship(destination: Destination, items: list[Item], stop: threading.Event):
            sent = send_batch(destination, items, stop)
            far = destination.far_md5([i.remote_path for i in sent.sent], stop,
                                      sum(i.size or 0 for i in sent.sent))
            return batch_results(sent.sent, sent.refused, far), sent.said
        try:
            return self._retrying()(self._counted(ship), self.destination, items, self.stop)
        except TransferError as exc:
            if exc.kind != "batch":
                raise
            return batch_results([], self._blamed(items, exc), {}), str(exc)

    def _send(self, items: list[Item]) -> Sent:
        try:
            return self._retrying()(self._counted(send_batch, "copy"), self.destination, items, self.stop)
        except TransferError as exc:
            if exc.kind != "batch":
                raise
            return Sent([], self._blamed(items, exc), str(exc))

    def _blamed(self, items: list[Item], error: TransferError) -> list[Item]:
        log.warning("archive %s: %s; after %d tries the batch's files are judged as not arrived",
                    self.archive.name, error, BATCH_ERROR_TRIES)
        return items

    def _fetch(self, in_flight: _InFlight | None = None) -> tuple[list[Item], bool]:
        """The next batch: the oldest pending rows, less those in flight and
        any row for a remote path in flight (it waits, so that no copy
        overwrites a far file while that file is being hashed) and rows
        waiting after a far mismatch, up to ``files_per_batch`` files or
        BATCH_BYTES bytes; and whether the byte cap ended it.

        A row naming a path outside the archive's roots is refused unopened:
        marked in the catalog (no later batch reads it again), one WARNING each."""
        a = self.archive
        now = self._clock()
        skip_ids = {i for i, (until, _) in self._held.items() if until > now}
        skip_paths: set[str] = set()
        if in_flight is not None:
            skip_ids.update(i.id for i in in_flight.items)
            skip_paths = {i.remote_path for i in in_flight.items}
        cap = None if self._uncap_next else BATCH_BYTES
        self._uncap_next = False
        for _ in range(10):  # a batch of refused rows only: look past it, a few times at most
            rows = self._catalog_work(
                lambda: self.catalog.shipping.pending(a.name, self._batch_size + len(skip_ids),
                                                      a.max_copy_attempts))
            items, total, capped, refused = [], 0, False, []
            edits: bool | None = None  # the batch's kind: see Destination.may_be_edit
            for row in rows:
                file_id, local_path, remote_path, size = row.id, row.local_path, row.remote_path, row.size
                if file_id in skip_ids or remote_path in skip_paths:
                    continue
                refusal = self.roots.refusal(a.name, file_id, local_path)
                if refusal is not None:
                    log.warning("%s", refusal)
                    refused.append(file_id)
                    continue
                if not isinstance(size, int):  # socs wrote none; any catalog writer anything
                    size = _stat_size(local_path)
                edit = self.destination.may_be_edit(file_id, local_path, remote_path)
                if edits is None:
                    edits = edit
                elif edit != edits:
                    continue  # the other kind waits for the next batch
                items.append(Item(file_id, local_path, remote_path, row.local_md5sum, size, edit))
                total += size or 0
                if len(items) >= self._batch_size:
                    break
                if cap is not None and total >= cap:
                    capped = True
                    break
            items = self._claim_far_names(items)
            if not refused:
                return items, capped
            self._catalog_work(lambda: self.catalog.files.refuse(refused))
            if items or self.stop.is_set():
                return items, capped
            # only refused rows: the next ones (no longer returned) may be shippable
        return [], False

    def _claim_far_names(self, items: list[Item]) -> list[Item]:
        """The batch with the far-name rules of registration applied to rows
        the agent did not register (socs' add_file, any catalog writer): a
        row for a name another file's older live row holds waits (FAR_NAME_WAIT,
        counted in `watcher status` as "far names taken"), and a name
        holding the only copy of other content is numbered (``name.~N~``),
        so that no row overwrites an earlier copy."""
        a = self.archive
        claims = self._catalog_work(lambda: self.catalog.far_names.claims_for_rows(a.name, items))
        if not claims.taken and not claims.versioned:
            return items
        kept, renames = [], {}
        for item in items:
            owner = claims.taken.get((a.name, item.remote_path), item.local_path)
            if owner != item.local_path:
                self._held[item.id] = (self._clock() + FAR_NAME_WAIT, self._held.get(item.id, (0, 0))[1])
                if self.health:
                    self.health.problem(a.name, "far names taken", item.local_path,
                                        f"not shipping {item.local_path}: its far name {a.name}:"
                                        f"{item.remote_path} belongs to {owner} (catalog row "
                                        f"{item.id} waits until that file is gone)")
                continue
            version = claims.versioned.get((item.local_path, a.name))
            if version is not None:
                log.info("%s -> %s:%s, as %s holds the only copy of other content",
                         item.local_path, a.name, version, item.remote_path)
                renames[item.id] = version
                item = dataclasses.replace(item, remote_path=version, edit=False)
            kept.append(item)
        if renames:
            self._catalog_work(lambda: self.catalog.far_names.rename(renames))
        return kept

    def step(self) -> bool:
        """Ship and record one batch (after one of which nothing arrived, the
        smaller ones that follow); False when nothing was pending."""
        return self._until_judged(self._one_batch)

    def _one_batch(self) -> bool | NothingArrived:
        if self._in_flight is not None:
            return self._finish_in_flight() or True
        started = time.time()
        items, capped = self._fetch()
        if not items:
            return False
        self._log_taken(items, capped)
        result, complaint = self._ship(items)
        return self._conclude(items, result, capped, started, complaint) or True

    def _pipelined_step(self) -> bool:
        """Copy the next batch while the previous one is checked, then record
        the previous one; False when nothing was pending or in flight."""
        return self._until_judged(self._pipelined_batch)

    def _pipelined_batch(self) -> bool | NothingArrived:
        previous = self._in_flight
        if previous is not None and (self._trouble or self._uncap_next):
            # In trouble, or about to try a failed batch again with the files
            # after it: one batch at a time, so none of them is in flight.
            return self._finish_in_flight() or True
        items, capped = self._fetch(previous)
        if not items:
            if previous is None:
                return False
            return self._finish_in_flight() or True
        started = time.time()
        self._log_taken(items, capped, previous)
        sent, refused, complaint = self._send(items)
        if self._checker is None:
            self._checker = ThreadPoolExecutor(1, f"watcher-check-{self.archive.name}")
        far = self._checker.submit(self._counted(self.destination.far_md5, "far_md5"),
                                   [i.remote_path for i in sent], self.stop, sum(i.size or 0 for i in sent))
        batch = _InFlight(items, capped, sent, refused, far, started, complaint)
        judged = None
        try:
            if previous is not None:
                judged = self._finish_in_flight()
        finally:
            self._in_flight = batch
        return judged or True

    def _finish_in_flight(self) -> NothingArrived | None:
        """Wait for the in-flight batch's far md5 and record it."""
        batch, self._in_flight = self._in_flight, None
        try:
            far = batch.far.result()
        except TransferError:
            # The connection failed during the check: copy and check the
            # batch again, backing off as for any connection failure.
            result, complaint = self._ship(batch.items)
        else:
            result, complaint = batch_results(batch.sent, batch.refused, far), batch.said
        return self._conclude(batch.items, result, batch.capped, batch.started, complaint)

    def _conclude(self, items: list[Item], result: BatchResult, capped: bool = False,
                  started: float | None = None, complaint: str = "") -> NothingArrived | None:
        """Judge and record one shipped batch (``capped``: BATCH_BYTES ended it;
        ``started``: when its copy began; ``complaint``: what rsync said); a
        NothingArrived is recorded nowhere: the policy retries it."""
        a = self.archive
        results, missing = result
        nothing_arrived = bool(results) and not any(found == sent for sent, found in results.values())
        if capped and (nothing_arrived or (missing and not results)):
            # Big files travel alone: one failing says nothing yet about
            # whose fault it is. Try it again at once with the files after it.
            self._uncap_next = True
            log.info("archive %s: a batch of %d big files failed as a whole; trying it again "
                     "with the files after it", a.name, len(items))
            return None
        if len(results) > 1 and nothing_arrived:
            return self._archive_trouble(len(results), "none of {} files arrived intact",
                                         _why_not_arrived(items, results, complaint))
        if len(missing) > 1 and not results:
            # A whole batch gone at once is more likely an unmounted disk than
            # deleted data: mark none; a batch of one is marked as usual.
            return self._archive_trouble(len(missing), "none of {} files is on the local disk (unmounted?)",
                                         f"{missing[0].local_path} is gone, for one")
        self._batch_size = a.files_per_batch
        if any(found == sent for sent, found in results.values()):
            self._trouble = 0  # only a file that arrived proves the archive well
            self._recovered()
        checkpoint("verified")
        now = time.time()
        verified, failed = self._catalog_work(lambda: self.catalog.shipping.record(results, now))
        missing, unreachable = _for_good(missing)
        for item in unreachable:
            self._held[item.id] = (self._clock() + UNREACHABLE_WAIT, self._held.get(item.id, (0, 0))[1])
            self._unreachable.add(item.local_path)
            if self.health:
                self.health.problem(a.name, UNREACHABLE, item.local_path,
                                    f"not shipping {item.local_path}: its directory is missing or on "
                                    "another file system (a disk not mounted?); it is kept and tried "
                                    f"again every {UNREACHABLE_WAIT:.0f} s (`watcher ignore PATH` if it "
                                    "is gone for good)")
        if missing:
            self._catalog_work(lambda: self.catalog.files.mark_missing([i.id for i in missing]))
            for item in missing:
                log.warning("%s disappeared before it was shipped; marked removed", item.local_path)
        self._log_batch(items, results, verified, failed, len(missing), now if started is None else started)
        files = [[i.local_path, results[i.id][0] == results[i.id][1]] for i in items if i.id in results]
        files += [[i.local_path, False] for i in missing]
        arrived = [i for i in items if i.id in results and results[i.id][0] == results[i.id][1]]
        self._count(copies=len(files), last_copy={"start_time": now if started is None else started,
                                                  "files": files, "stop_time": time.time()},
                    verified_files=len(arrived), verified_bytes=sum(i.size or 0 for i in arrived))
        for item in missing:
            self._held.pop(item.id, None)
        self.destination.forget(i.id for i in missing)
        bad = [i.id for i in items if i.id in results and results[i.id][0] != results[i.id][1]]
        attempts = self._catalog_work(lambda: self.catalog.reports.attempts(bad)) if bad else {}
        for item in items:
            if item.id not in results:
                continue
            sent, found = results[item.id]
            if found == sent:
                self._held.pop(item.id, None)
                self.destination.verified(item)
                if item.local_path in self._unreachable:  # its disk came back
                    self._unreachable.discard(item.local_path)
                    if self.health:
                        self.health.solved(a.name, UNREACHABLE, item.local_path)
                continue
            why = (f"far md5 {found}, local md5 {sent}" if found is not None
                   else complaint or "no far copy was read")
            if attempts.get(item.id, 0) >= a.max_copy_attempts:
                self._held.pop(item.id, None)
                log.warning("%s -> %s:%s failed: not verified after %d attempts (%s); it is not tried "
                            "again and holds back %s's finalized_until. Once the cause is fixed: %s",
                            item.local_path, a.name, item.remote_path, attempts[item.id], why, a.name,
                            shlex.join(["watcher", "retry", "--db", os.path.abspath(self.catalog.path), a.name,
                                        item.local_path]))
                continue
            wait = self._hold(item.id)
            log.warning("%s -> %s:%s not verified (%s); next attempt in %.0f s",
                        item.local_path, a.name, item.remote_path, why, wait)
        return None

    def _log_taken(self, items: list[Item], capped: bool, in_flight: _InFlight | None = None) -> None:
        """-v: the batch the worker took, and why it is no bigger."""
        if log.isEnabledFor(logging.DEBUG):
            held = sum(1 for until, _ in self._held.values() if until > self._clock())
            log.debug("%s: shipping %d files (%s)%s%s%s", self.archive.name, len(items),
                      size_text(sum(i.size or 0 for i in items)),
                      f", ended at {size_text(BATCH_BYTES)}" if capped else "",
                      f", {len(in_flight.items)} in flight" if in_flight else "",
                      f", {held} held back after a far mismatch" if held else "")

    def _log_batch(self, items: list[Item], results: dict, verified: int, failed: int, missing: int,
                   started: float) -> None:
        """A batch judged, in one INFO line: files, bytes, time and rate (from
        the start of its copy to its far md5 recorded)."""
        size = sum(i.size or 0 for i in items if i.id in results and results[i.id][0] == results[i.id][1])
        took = max(time.time() - started, 1e-3)
        log.info("%s: %d file%s verified, %s in %.3g s (%s/s)%s%s", self.archive.name, verified,
                 "" if verified == 1 else "s", size_text(size), took, size_text(size / took),
                 f"; {failed} not verified" if failed else "",
                 f"; {missing} gone before shipping, marked removed" if missing else "")

    def _hold(self, row_id: int) -> float:
        """Keep a row whose far copy did not match out of batches for a while; returns how long."""
        mismatches = self._held.get(row_id, (0.0, 0))[1] + 1
        wait = min(MISMATCH_WAIT_MAX, MISMATCH_WAIT * 2 ** (mismatches - 1))
        self._held[row_id] = (self._clock() + wait, mismatches)
        return wait

    def _idle_wait(self) -> float:
        """How long to wait for work: until a held row may go again, at most IDLE_WAIT."""
        now = self._clock()
        due = [until - now for until, _ in self._held.values() if until > now]
        return min([IDLE_WAIT, *due])

    def _archive_trouble(self, count: int, what: str, why: str = "") -> NothingArrived:
        """Not one file of a batch arrived: blame the archive (a full disk, an
        unwritable base directory), not the files. Nothing is charged; the
        policy backs off and the next try takes half the batch, so that a
        batch of one, whose failure is charged, ends a run of files that
        really are hopeless and one bad file never holds up the others."""
        self._trouble += 1
        self._batch_size = max(1, count // 2)
        return NothingArrived(count, what, why)

    def run(self) -> None:
        try:
            self._run()
        finally:
            if self._checker is not None:
                self._checker.shutdown(wait=True)  # a far md5 left running ends with stop
                self._checker = None

    def _run(self) -> None:
        while not self.stop.is_set():
            self.wake.clear()
            self._count(iterations=1)
            try:
                worked = self._pipelined_step()
            except Exception:  # keep the agent alive; the catalog still has the work
                if self.stop.is_set():
                    return  # stopping: a command was abandoned, or a retry gave up
                log.exception("transfer of archive %s failed; retrying shortly", self.archive.name)
                self.stop.wait(5)
                continue
            if not worked:
                self.wake.wait(self._idle_wait())


def _why_not_arrived(items: list[Item], results: dict, complaint: str) -> str:
    """Why files did not arrive, in words: what rsync said, else what the far
    md5 found for the first of them."""
    if complaint:
        return complaint
    for item in items:
        sent, found = results.get(item.id, (None, None))
        if found is not None:
            return f"the far md5 of {item.remote_path} was {found}, not {sent} as sent"
    return "no far copy was read, and rsync reported no error"


def _is_batch_error(error: BaseException) -> bool:
    """rsync's file I/O failed: tried BATCH_ERROR_TRIES times, then judged."""
    return getattr(error, "kind", None) == "batch"
