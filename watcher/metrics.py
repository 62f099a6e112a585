"""The Prometheus endpoint (``metrics: {listen: HOST:PORT}``), through prometheus-client.

Optional: ``pip install 'watcher[metrics]'``; the agent imports this module
only when ``metrics:`` is configured. Everything is read when Prometheus
scrapes, never kept twice: the catalog's counts from the numbers SQLite
keeps (constant time at any catalog size, the same as `watcher status`),
the agent's own counters from its threads, degraded archives and problems
from the health files. The catalog is read on a thread of its own, with
a fresh connection each scrape, and waited for at most CATALOG_WAIT: a
catalog that does not answer (locked) is reported as such, and the scrape
still answers with everything else. A scrape never takes a lock the agent
needs.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, Iterable, Protocol
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from peewee import DatabaseError
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from watcher.catalog import Catalog
from watcher.config import Config, ConfigError
from watcher.health import read_health
from watcher.registrar import Registrar
from watcher.transfer import TransferWorker

log = logging.getLogger(__name__)

EXTRA = "watcher[metrics]"
CATALOG_WAIT = 1.0  # seconds a scrape waits for the catalog before it says "locked"
BUSY_TIMEOUT = 0.25  # the scrape's own SQLite busy timeout (the agent's is 10 s)
STATES = ("pending", "verified", "failed", "removed", "ignored", "refused")
# Errors by class: TransferStats' counter for each (see watcher.transfer).
ERROR_CLASSES = {"connection": "errors_connection", "archive": "errors_archive", "batch": "errors_batch",
                 "timeout": "errors_timeout", "catalog": "errors_sqlite"}
# Seconds: a batch of small files takes well under a second, 256 MiB over a slow link minutes.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Source(Protocol):
    """What the metrics read of the running agent (watcher.agent.Agent)."""

    config: Config
    workers: dict[str, TransferWorker]
    registrar: Registrar

    def root_counts(self) -> dict[str, dict[str, int]]: ...


class Metrics:
    """The agent's registry: its duration histograms (fed by the transfer
    workers' ``timed``) and the collector that reads the rest at scrape time."""

    def __init__(self, config: Config):
        self.config = config
        self.registry = CollectorRegistry(auto_describe=True)
        self._durations = {
            "copy": Histogram("watcher_transfer_duration_seconds",
                              "Seconds one batch's rsync copy took (copies that succeeded)",
                              ["archive"], registry=self.registry, buckets=DURATION_BUCKETS),
            "far_md5": Histogram("watcher_far_md5_duration_seconds",
                                 "Seconds one batch's far md5 took (checks that succeeded)",
                                 ["archive"], registry=self.registry, buckets=DURATION_BUCKETS),
        }
        ProcessCollector(registry=self.registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._reader: _CatalogReader | None = None

    def timed(self, archive: str) -> Callable[[str, float], None]:
        """A transfer worker's ``timed``: its copies and far md5s into the histograms."""
        for histogram in self._durations.values():
            histogram.labels(archive)  # each archive's series from the start, at 0

        def observe(what: str, seconds: float) -> None:
            if what in self._durations:
                self._durations[what].labels(archive).observe(seconds)
        return observe

    def serve(self, agent: Source) -> None:
        """Listen (a taken or forbidden address is a ConfigError: one line) and serve on a thread."""
        m = self.config.metrics
        where = f"[{m.host}]:{m.port}" if ":" in m.host else f"{m.host}:{m.port}"
        reader = _CatalogReader(self.config)
        try:
            family = socket.getaddrinfo(m.host, m.port, type=socket.SOCK_STREAM)[0][0]
            server = make_server(m.host, m.port, make_wsgi_app(self.registry), _server_class(family),
                                 handler_class=_Quiet)
        except OSError as exc:  # taken, forbidden, or a name that does not resolve
            reader.close()
            source = f"{self.config.source}: " if self.config.source else ""
            raise ConfigError([f"{source}metrics.listen: cannot listen on {where}: "
                               f"{exc.strerror or exc}"]) from None
        self._reader = reader
        self.registry.register(_Collector(agent, reader))
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.1,), name="watcher-metrics",
                                        daemon=True)  # polls for shutdown every 0.1 s
        self._thread.start()
        log.info("metrics on http://%s/metrics", where)

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()  # joins the scrapes still answering
            self._thread.join(5)
        if self._reader is not None:
            self._reader.close()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):  # a line per scrape would flood the journal
        pass


def _server_class(family: int) -> type:
    """A thread per scrape (a slow one never holds up another), of the address's family."""
    class Server(ThreadingMixIn, WSGIServer):
        address_family = family
        daemon_threads = False  # joined at close

        def handle_error(self, request, client_address) -> None:
            # a scraper that hung up: no traceback on stderr
            log.debug("metrics request from %s failed", client_address, exc_info=True)
    return Server


class _CatalogReader:
    """The catalog's numbers for a scrape, read on one thread of its own with
    a fresh connection each time (peewee: one per thread, closed after), and
    waited for at most CATALOG_WAIT. A read still running (SQLite waits up
    to 10 s on a WAL it cannot enter) is waited for by the next scrapes,
    never doubled."""

    def __init__(self, config: Config):
        self.config = config
        self._catalog = Catalog(config.database, busy_timeout=BUSY_TIMEOUT)
        self._catalog.close()  # this thread's connection; the reader opens its own
        self._pool = ThreadPoolExecutor(1, "watcher-metrics-catalog")
        self._lock = threading.Lock()
        self._running = None

    def read(self, now: float) -> tuple[dict[str, dict] | None, str | None]:
        """({archive: stats}, None), or (None, "locked" or what failed)."""
        with self._lock:
            if self._running is None or self._running.done():
                self._running = self._pool.submit(self._read, now)
            running = self._running
        try:
            return running.result(CATALOG_WAIT), None
        except FutureTimeout:
            return None, "locked"
        except DatabaseError as exc:
            text = str(exc)
            return None, "locked" if "locked" in text or "busy" in text else text

    def _read(self, now: float) -> dict[str, dict]:
        reports = self._catalog.reports
        try:
            out = {}
            for name, a in self.config.archives.items():
                stats = reports.stats(name, a.max_copy_attempts, now)
                stats["last_verified_time"] = reports.last_verified_time(name)
                out[name] = stats
            return out
        finally:
            self._catalog.close()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _number(value) -> float:
    """A time read from the catalog as a number (any catalog writer can write
    anything into a column); 0 for none."""
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class _Collector(Collector):
    """Reads every number but the histograms when Prometheus scrapes."""

    def __init__(self, agent: Source, reader: _CatalogReader):
        self.agent = agent
        self.reader = reader

    def describe(self):
        return []  # read at scrape time only: registering must not read the catalog

    def collect(self):
        config = self.agent.config
        now = time.time()
        stats, trouble = self.reader.read(now)
        health = read_health(config.database, list(config.archives)) or {}
        yield from self._catalog(health, trouble)
        if stats is not None:
            yield from self._archives(stats)
        yield from self._health(health)
        yield from self._transfers()
        yield from self._roots()

    def _catalog(self, health: dict, trouble: str | None):
        db = health.get("database") or {}
        locked = bool(db.get("locked")) or trouble == "locked"
        failing = bool(db.get("last_error") and not db.get("locked")) or bool(trouble and trouble != "locked")
        g = _gauge("watcher_catalog_locked",
                   "1 while the catalog is locked: the agent waits on it, or it did not answer the scrape "
                   f"within {CATALOG_WAIT:g} s (its counts are then left out)")
        g.add_metric([], int(locked))
        yield g
        g = _gauge("watcher_catalog_failing", "1 while catalog work fails for another reason than a lock "
                   "(a full disk, an I/O error)")
        g.add_metric([], int(failing))
        yield g

    def _archives(self, stats: dict[str, dict]):
        files = _gauge("watcher_files", "Catalog rows of an archive in each state (states overlap: a removed "
                       "file also counts as verified when it was)", ["archive", "state"])
        rows = _gauge("watcher_catalog_files", "Catalog rows of an archive, whatever their state", ["archive"])
        pending = _gauge("watcher_pending_bytes", "Bytes of the archive's pending files", ["archive"])
        oldest = _gauge("watcher_oldest_pending_age_seconds",
                        "Seconds since the oldest pending file was registered (0: none pending)", ["archive"])
        until = _gauge("watcher_finalized_until_timestamp_seconds", "Every file registered before this unix "
                       "time is verified (socs' finalized_until)", ["archive"])
        last = _gauge("watcher_last_verified_timestamp_seconds",
                      "Unix time the archive's newest verified copy was verified (0: none yet)", ["archive"])
        for name, s in stats.items():
            for state in STATES:
                files.add_metric([name, state], s[state])
            rows.add_metric([name], s["files"])
            pending.add_metric([name], s["bytes_pending"])
            oldest.add_metric([name], _number(s["oldest_pending_age"]))
            until.add_metric([name], _number(s["finalized_until"]))
            last.add_metric([name], _number(s["last_verified_time"]))
        yield from (files, rows, pending, oldest, until, last)

    def _health(self, health: dict):
        config = self.agent.config
        archives = health.get("archives") or {}
        degraded = _gauge("watcher_archive_degraded", "1 while the archive cannot be reached or written "
                          "(watcher status shows its last error)", ["archive"])
        problems = _gauge("watcher_problems", "Subjects (files, directories) showing a problem that degrades "
                          "service, by kind as in `watcher status` (symlinks, far names taken, ...)",
                          ["archive", "kind"])
        for name in config.archives:
            state = archives.get(name)
            degraded.add_metric([name], int(bool(isinstance(state, dict) and state.get("degraded"))))
            kinds = (health.get("problems") or {}).get(name) or {}
            for kind, entry in sorted(kinds.items()):
                if isinstance(entry, dict) and isinstance(entry.get("count"), int):
                    problems.add_metric([name, kind], entry["count"])
        yield from (degraded, problems)

    def _transfers(self):
        files = CounterMetricFamily("watcher_shipped_files", "Files copied and verified by this agent since "
                                    "it started", labels=["archive"])
        size = CounterMetricFamily("watcher_shipped_bytes", "Bytes of the files copied and verified by this "
                                   "agent since it started", labels=["archive"])
        errors = CounterMetricFamily("watcher_transfer_errors", "Failed copies and far md5s (connection, "
                                     "archive, batch, timeout) and catalog errors waited out (catalog), "
                                     "since the agent started", labels=["archive", "class"])
        for name, worker in self.agent.workers.items():
            s = worker.stats()
            files.add_metric([name], s.verified_files)
            size.add_metric([name], s.verified_bytes)
            for kind, counter in ERROR_CLASSES.items():
                errors.add_metric([name, kind], getattr(s, counter))
        yield from (files, size, errors)

    def _roots(self):
        registered = self.agent.registrar.registered()
        roots = self.agent.root_counts()
        made = CounterMetricFamily("watcher_registered_files", "Files registered from the watched directory "
                                   "since the agent started", labels=["root"])
        rescans = CounterMetricFamily("watcher_rescans", "Scans of the whole watched directory (at start, "
                                      "every rescan_interval, after a queue overflow or a new watch)",
                                      labels=["root"])
        found = CounterMetricFamily("watcher_rescan_found_files", "New or changed files those scans found "
                                    "(events missed: more than a few says inotify loses them)", labels=["root"])
        lost = _gauge("watcher_lost_watches", "Directories below the root with no inotify watch at the last "
                      "scan (raise fs.inotify.max_user_watches)", ["root"])
        watched = _gauge("watcher_root_watched", "1 while the directory is watched; 0: gone or not watchable",
                         ["root"])
        for root, c in sorted(roots.items()):
            made.add_metric([root], registered.get(root, 0))
            rescans.add_metric([root], c["rescans"])
            found.add_metric([root], c["rescan_found"])
            lost.add_metric([root], c["lost_watches"])
            watched.add_metric([root], c["watched"])
        yield from (made, rescans, found, lost, watched)
