"""The watcher agent as an OCS agent, seen as socs' SupRsync is.

Simons Observatory runs and watches its agents through OCS (a crossbar
router, agents under instance ids, processes, tasks, feeds the
housekeeping aggregator records; sotodlib's packaging reads
``finalized_until`` from it). This face runs the same watcher Agent and
shows it with socs' names: process ``run`` (started at start-up; its
``stop`` stops the agent), feeds ``archive_stats`` (a block per archive:
finalized_until, num_files, uncopied_files, last_file_added,
last_file_copied) and ``transfer_stats`` (block0: iterations, copies,
errors_timeout, errors_nonzero, errors_sqlite), ``run``'s session.data as
socs' docstring shows it, and a ``status`` task with the numbers of
`watcher status --json`.

Settings come from a rules file (``--config``) or from socs' own SupRsync
arguments, read into a Config by watcher.config's reader, so every
refusal is the one a rules file gets. Also an OCS plugin (``agents``):
``ocs-agent-cli`` runs agent class ``WatcherSupRsync`` through it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import txaio
import yaml
from ocs import ocs_agent, site_config
from peewee import OperationalError
from twisted.internet import reactor, threads

from watcher.agent import Agent, AlreadyRunning
from watcher.archive_report import archive_report
from watcher.catalog import Catalog
from watcher.config import Config, ConfigError, load_config, parse_config
from watcher.health import read_health
from watcher.suprsync import SupRsyncFilesManager
from watcher.transfer import COUNTERS

log = logging.getLogger(__name__)

AGENT_CLASS = "WatcherSupRsync"
# An OCS plugin (entry point group "ocs.plugins"): the agent classes it provides.
package_name = "watcher"
agents = {AGENT_CLASS: {"module": "watcher.ocs_agent", "entry_point": "plugin_main"}}

PROG = "watcher ocs-agent"
PUBLISH_INTERVAL = 10.0  # seconds between feed messages (socs: one archive_stats per copy round, >= 60 s)
MIN_INTERVAL, MAX_INTERVAL = 0.1, 3600.0
COST_SHARE = 0.05  # at most this share of a core on counting a huge catalog: publish less often then
LAST_COPY_FILES = 1000  # files of the last batch shown in session.data (a batch may hold 5000)

# socs' SupRsync arguments -> (the archive's setting, or a top-level one).
ARCHIVE_OPTIONS = {
    "remote_basedir": "--remote-basedir", "ssh_host": "--ssh-host", "ssh_key": "--ssh-key",
    "delete_local_after": "--delete-local-after", "max_copy_attempts": "--max-copy-attempts",
    "copy_timeout": "--copy-timeout", "cmd_timeout": "--cmd-timeout",
    "files_per_batch": "--files-per-batch", "compression": "--compression", "bwlimit": "--bwlimit",
    "chmod": "--chmod", "api_roots": "--api-roots",
}
TOP_OPTIONS = {"database": "--db-path", "file_root": "--suprsync-file-root",
               "instance_id": "--instance-id", "catalog_group": "--catalog-group"}
NUMBERS = ("delete_local_after", "max_copy_attempts", "copy_timeout", "cmd_timeout",
           "files_per_batch", "bwlimit")
SOCS_REQUIRED = ("archive_name", "remote_basedir", "db_path", "suprsync_file_root")
SOCS_DEFAULTS = {"max_copy_attempts": 5, "chmod": "g+rwX,o+rX"}  # socs' own, where watcher's differ
IGNORED = "accepted for socs' SupRsync arguments; no meaning here"


class Refused(Exception):
    """Arguments the agent cannot run with: one line each, exit status 2."""

    def __init__(self, *problems: str):
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def make_parser() -> argparse.ArgumentParser:
    """socs' SupRsync arguments, and watcher's own; OCS adds its site arguments."""
    p = argparse.ArgumentParser(prog=PROG, description=(
        "Run the watcher agent as an OCS agent that shows itself as socs' SupRsync does. "
        "Give --config FILE (a watcher rules file), or socs' SupRsync arguments with --api-roots."))
    w = p.add_argument_group("watcher options")
    w.add_argument("--config", metavar="FILE", help="a watcher rules file (instead of socs' arguments)")
    w.add_argument("--api-roots", nargs="+", metavar="DIR",
                   help="with socs' arguments, required: the directories below which the files "
                        "producers register (add_file) lie; rows naming other files are refused "
                        "(README: Security model)")
    w.add_argument("--catalog-group", metavar="GROUP",
                   help="with socs' arguments: the group of the producers that write the catalog")
    w.add_argument("--publish-interval", type=float, default=PUBLISH_INTERVAL, metavar="SECONDS",
                   help=f"seconds between feed messages (default {PUBLISH_INTERVAL:g}; longer when "
                        "counting the catalog takes long)")
    s = p.add_argument_group("socs' SupRsync arguments (mapped onto one archive)")
    s.add_argument("--archive-name", help="the archive: which catalog rows this agent ships")
    s.add_argument("--remote-basedir", help="base directory on the archive host (or local)")
    s.add_argument("--db-path", help="the catalog (suprsync.db)")
    s.add_argument("--ssh-host", help="user@host of the archive; absent: a local directory")
    s.add_argument("--ssh-key", help="ssh key for the archive host")
    s.add_argument("--delete-local-after", metavar="SECONDS",
                   help="delete verified local files this long after registration (or 30m, 7d)")
    s.add_argument("--max-copy-attempts", metavar="N", help="then a file counts as failed (default 5, as socs)")
    s.add_argument("--copy-timeout", metavar="SECONDS", help="a stalled transfer is killed after this")
    s.add_argument("--cmd-timeout", metavar="SECONDS", help="seconds for a remote command")
    s.add_argument("--files-per-batch", metavar="N", help="files per rsync call")
    s.add_argument("--sleep-time", metavar="SECONDS",
                   help="accepted for socs' SupRsync arguments; no meaning here: watcher ships as "
                        "files are registered, without a pause between rounds")
    s.add_argument("--compression", action="store_true", default=None, help="rsync --compress")
    s.add_argument("--bwlimit", metavar="RATE", help="rsync --bwlimit (KiB/s, or 5m)")
    s.add_argument("--suprsync-file-root", help="where finalization files are written")
    s.add_argument("--chmod", help="rsync --chmod for shipped files (default g+rwX,o+rX, as socs)")
    s.add_argument("--db-echo", action="store_true", help=IGNORED)
    s.add_argument("--db-pool-size", metavar="N", help=IGNORED)
    s.add_argument("--db-pool-max-overflow", metavar="N", help=IGNORED)
    return p


def _number(text: str):
    """A number as YAML reads it in a rules file, or the text (the reader then says what is wrong)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else text


def read_settings(args: argparse.Namespace) -> Config:
    """The Config to run: ``--config``'s, or one archive from socs' arguments,
    read by the rules file's own reader (its refusals name the argument)."""
    if not MIN_INTERVAL <= args.publish_interval <= MAX_INTERVAL:  # (NaN is neither)
        raise Refused(f"--publish-interval: expected from {MIN_INTERVAL:g} to {MAX_INTERVAL:g} seconds, "
                      f"got {args.publish_interval:g}")
    socs = [name for name in (*SOCS_REQUIRED, *(k for k in ARCHIVE_OPTIONS if k != "api_roots"),
                              "catalog_group")
            if getattr(args, name, None) is not None]
    if args.config:
        if socs or args.api_roots:
            given = ", ".join(_option(n) for n in socs + (["api_roots"] if args.api_roots else []))
            raise Refused(f"--config and socs' SupRsync arguments ({given}) exclude each other: "
                          "give one or the other")
        return load_config(args.config)
    missing = [_option(n) for n in SOCS_REQUIRED if getattr(args, n) is None]
    if missing:
        raise Refused(f"give --config FILE, or socs' SupRsync arguments; missing: {', '.join(missing)}")
    if not args.api_roots:
        raise Refused("--api-roots DIR [DIR ...] is required with socs' SupRsync arguments: the agent "
                      "acts only on catalog rows whose files lie below their archive's roots (README: "
                      "Security model), and socs' arguments name none; add the directories producers "
                      "register files from, e.g. --api-roots /data/so/timestreams")
    archive = {key: getattr(args, key) for key in ARCHIVE_OPTIONS if getattr(args, key) is not None}
    archive = {**SOCS_DEFAULTS, **{k: _number(v) if k in NUMBERS else v for k, v in archive.items()}}
    data = {"database": args.db_path, "file_root": args.suprsync_file_root,
            "archives": {args.archive_name: archive}, "rules": []}
    for key in ("instance_id", "catalog_group"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    try:
        return parse_config(text, PROG, Path.cwd())
    except ConfigError as exc:
        raise Refused(*(_named(p, args.archive_name) for p in exc.problems)) from None


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _named(problem: str, archive: str) -> str:
    """A reader's problem line with the argument named instead of a line of a file."""
    rest = problem.split(": ", 1)[1] if problem.startswith(PROG + ":") else problem
    keys = {f"archives.{archive}.{k}": o for k, o in ARCHIVE_OPTIONS.items()}
    keys.update(TOP_OPTIONS)
    keys[f"archives.{archive}"] = "--archive-name"
    for key in sorted(keys, key=len, reverse=True):
        if rest.startswith(key + ": "):
            return f"{keys[key]}: {rest[len(key) + 2:]}"
    return rest


def archive_status(config: Config, now: float | None = None) -> dict:
    """`watcher status --json` for this agent's archives."""
    now = time.time() if now is None else now
    names = list(config.archives)
    with closing(Catalog(config.database)) as catalog:
        out = archive_report(catalog, names, lambda name: config.archives[name].max_copy_attempts, now,
                             read_health(config.database, names) or {})
    for stats in out.values():
        del stats["problem_messages"]  # as `watcher status --json`
    return out


class OCSWatcher:
    """The watcher Agent behind socs' SupRsync operations and feeds."""

    def __init__(self, ocs: ocs_agent.OCSAgent, config: Config, publish_interval: float = PUBLISH_INTERVAL):
        """Makes the watcher Agent now, in the main thread: a configuration it
        refuses, or another agent on its archive, stops us before OCS starts."""
        self.ocs = ocs
        self.config = config
        self.interval = publish_interval
        self.exit_status = 0
        self._agent: Agent | None = Agent(config)
        self._stopping = threading.Event()
        ocs.register_feed("transfer_stats", record=True, agg_params={"exclude_aggregator": True})
        ocs.register_feed("archive_stats", record=True)
        ocs.register_process("run", self.run, self._stop, startup=True)
        ocs.register_task("status", self.status)

    def run(self, session, params=None):
        """run()

        **Process** - Runs the watcher agent: files are shipped, verified,
        finalized and deleted after retention while this runs. Publishes
        ``archive_stats`` (a block per archive) and ``transfer_stats``
        (block0) every publish interval, as socs' SupRsync does.

        Notes:
            The session data has socs' shape::

                >>> response.session['data']
                {"activity": "idle",
                 "timestamp": 1661284493.5398622,
                 "last_copy": {"start_time": 1661284493.53, "files": [["/path/to/file", true]],
                               "stop_time": 1661284493.54},
                 "archive_stats": {"smurf": {"finalized_until": 1687797424.65, "num_files": 3,
                                             "uncopied_files": 0, "last_file_added": "/path/to/file",
                                             "last_file_copied": "/path/to/file"}},
                 "counters": {"iterations": 1, "copies": 0, "errors_timeout": 0,
                              "errors_nonzero": 0, "errors_sqlite": 0}}
        """
        self._stopping.clear()
        try:  # started again after a stop: made in the main thread, as at start-up
            agent = self._agent or threads.blockingCallFromThread(reactor, Agent, self.config)
        except (AlreadyRunning, ConfigError) as exc:
            return False, str(exc)
        self._agent = agent
        agent.start()
        session.data = {"activity": "idle", "last_copy": {}, "counters": dict.fromkeys(COUNTERS, 0)}
        feed = _Publisher(self, agent, session)
        try:
            while not self._stopping.is_set() and not agent.stop_event.is_set():
                try:
                    wait = feed.publish()
                except Exception:  # never stop shipping for a feed
                    log.exception("publishing the OCS feeds failed; trying again shortly")
                    wait = self.interval
                deadline = time.monotonic() + wait
                while (not self._stopping.wait(min(0.5, max(0.0, deadline - time.monotonic())))
                       and not agent.stop_event.is_set() and time.monotonic() < deadline):
                    pass
        finally:
            feed.close()
            agent.stop()
            self._agent = None
        if agent.exit_status:  # it stopped itself (its catalog was replaced): so does the process
            self.exit_status = agent.exit_status
            reactor.callFromThread(_stop_reactor)
            return False, f"the watcher agent stopped with exit status {agent.exit_status} (see its log)"
        return True, "Stopped run process"

    def _stop(self, session, params=None):
        self._stopping.set()
        session.set_status("stopping")
        return True, "Stopping the watcher agent"

    def status(self, session, params=None):
        """status()

        **Task** - The numbers of `watcher status --json` for this agent's
        archives, in session.data keyed by archive name: files, pending,
        verified, failed, removed, ignored, refused, bytes_pending,
        oldest_pending_age, finalized_until, last_file_added,
        last_file_verified, degraded, last_error, problems.
        """
        session.data = archive_status(self.config)
        return True, "Status of " + ", ".join(self.config.archives)

    def close(self) -> None:
        """Stop an agent that `run` never started (OCS never connected)."""
        agent, self._agent = self._agent, None
        if agent is not None:
            agent.stop()


def _stop_reactor() -> None:
    if reactor.running:
        reactor.stop()


class _Publisher:
    """One run's feed messages and session.data, from the catalog (socs'
    get_archive_stats) and the transfer workers' counters."""

    def __init__(self, face: OCSWatcher, agent: Agent, session):
        self.face = face
        self.agent = agent
        self.session = session
        self.files = SupRsyncFilesManager(face.config.database)
        self.sqlite_errors = 0  # the catalog failing our own reads, counted with the workers'
        self.copies = 0

    def publish(self) -> float:
        """Publish once; returns the seconds until the next time."""
        ocs, config, now = self.face.ocs, self.face.config, time.time()
        started = time.monotonic()
        try:
            stats = {name: self.files.get_archive_stats(name) for name in config.archives}
        except OperationalError as exc:
            self.sqlite_errors += 1
            log.warning("cannot read archive statistics from %s: %s", config.database, exc)
            stats = None
        cost = time.monotonic() - started
        workers = [w.stats() for w in self.agent.workers.values()]
        counters = {k: sum(getattr(s, k) for s in workers) for k in COUNTERS}
        counters["errors_sqlite"] += self.sqlite_errors
        last = max((s.last_copy for s in workers if s.last_copy), key=lambda c: c["stop_time"], default={})
        if last:
            last = {**last, "files": last["files"][:LAST_COPY_FILES]}
        health = read_health(config.database, list(config.archives)) or {}
        # session.data before the feeds: whoever sees a feed message and then
        # asks for the session gets what that message said, or newer
        self.session.degraded = stats is None or any(
            a.get("degraded") for a in health.get("archives", {}).values())
        self.session.data = {
            "activity": "copying" if counters["copies"] > self.copies else "idle",
            "timestamp": now, "last_copy": last,
            "archive_stats": stats if stats is not None else self.session.data.get("archive_stats", {}),
            "counters": counters}
        self.copies = counters["copies"]
        for name, data in (stats or {}).items():
            ocs.publish_to_feed("archive_stats", {"block_name": name, "timestamp": now, "data": data})
        ocs.publish_to_feed("transfer_stats", {"block_name": "block0", "timestamp": now,
                                               "data": dict(counters)})
        return max(self.face.interval, cost / COST_SHARE)

    def close(self) -> None:
        self.files.catalog.close()


def _site_problem(exc: BaseException) -> str:
    """OCS's site-configuration errors (an assert, a KeyError) in one line."""
    if isinstance(exc, AssertionError):
        return ("no OCS site configuration: give --site-file FILE, or set OCS_CONFIG_DIR "
                "(--site NAME reads $OCS_CONFIG_DIR/NAME.yaml)")
    if isinstance(exc, OSError):
        return f"OCS site file {exc.filename}: {exc.strerror}"
    if isinstance(exc, yaml.YAMLError):
        return f"OCS site file is not valid YAML: {getattr(exc, 'problem', None) or exc}"
    if isinstance(exc, RuntimeError) and "matching device" in str(exc):
        return "the OCS site file has no agent instance for this --instance-id (or agent class " \
               f"{AGENT_CLASS}) on this host"
    if isinstance(exc, KeyError):
        return f"OCS site file: {exc.args[0] if exc.args else exc}"
    return f"OCS site configuration: {type(exc).__name__}: {exc}"


def main(args: list[str] | None = None) -> int:
    """Parse, check, then run until stopped; returns the exit status."""
    args = sys.argv[1:] if args is None else list(args)
    try:
        parsed = site_config.parse_args(AGENT_CLASS, parser=make_parser(), args=args)
    except (AssertionError, OSError, yaml.YAMLError, KeyError, RuntimeError, AttributeError,
            TypeError, ValueError) as exc:
        print(f"{PROG}: {_site_problem(exc)}", file=sys.stderr)
        return 2
    try:
        config = read_settings(parsed)
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                                format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        txaio.start_logging(level=os.environ.get("LOGLEVEL", "info"))
        ocs, runner = ocs_agent.init_site_agent(parsed)
        face = OCSWatcher(ocs, config, parsed.publish_interval)
    except (Refused, ConfigError) as exc:
        for problem in exc.problems:
            print(f"{PROG}: {problem}", file=sys.stderr)
        return 2
    except AlreadyRunning as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    try:
        runner.run(ocs, auto_reconnect=True)
    finally:
        face.close()
    return face.exit_status


def plugin_main(args: list[str] | None = None) -> None:
    """The entry point ``ocs-agent-cli`` calls (it ignores a return value)."""
    sys.exit(main(args))
