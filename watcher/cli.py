"""The `watcher` command: each subcommand a thin function over the modules.

Exit status: 0 done, 1 a runtime problem (named on one line), 2 a bad
configuration or bad arguments. No traceback for a user's mistake.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from watcher import __version__, service
from watcher.config import (
    Config, ConfigError, default_state_dir, load_config, load_default_config,
)
from watcher.catalog import Catalog

log = logging.getLogger("watcher")

DB_ENV = "SUPRSYNC_DB"
DEFAULT_MAX_ATTEMPTS = 10


class UsageError(Exception):
    """A mistake in how the command was called: one line, exit 2."""


class CommandError(Exception):
    """A problem the command met: one line, exit 1."""


# -- shared option handling ------------------------------------------------------


def _config(args, live: bool = True) -> Config:
    """The rules file; ``live`` false for commands that only read the catalog
    (a watched directory that is gone must not stop `watcher status`)."""
    if getattr(args, "config", None):
        return load_config(args.config, live=live)
    state = default_state_dir(getattr(args, "state_dir", None))
    return load_default_config(state)


def _catalog(args, must_exist: bool = True) -> tuple[Catalog, Config | None]:
    """The catalog named by --db, $SUPRSYNC_DB or the configuration."""
    config = None
    db = getattr(args, "db", None)
    if db is None and getattr(args, "config", None) is None:
        db = os.environ.get(DB_ENV)
    if db is None and getattr(args, "config", None) is None:
        state = default_state_dir(getattr(args, "state_dir", None))
        if not state.is_dir():  # no agent ran here: say so rather than create its directories
            raise CommandError(f"no catalog: {state} does not exist (give --db, --config or "
                               f"--state-dir, or set {DB_ENV})")
    if db is None:
        config = _config(args, live=False)
        db = config.database
    db = Path(db)
    if must_exist and not db.exists():
        raise CommandError(f"no catalog at {db} (give --db, --config or set {DB_ENV})")
    return Catalog(db), config


def _max_attempts(config: Config | None, archive: str) -> int:
    if config and archive in config.archives:
        return config.archives[archive].max_copy_attempts
    return DEFAULT_MAX_ATTEMPTS


def _abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


# -- subcommands -----------------------------------------------------------------


def cmd_run(args) -> int:
    from watcher.agent import Agent, AlreadyRunning

    config = _config(args)
    if not args.config:
        state = default_state_dir(args.state_dir)
        log.info("no --config: using the shipped default with state under %s", state)
        log.info("drop files into %s; they are copied to %s", state / "inbox", state / "archive")
    try:
        agent = Agent(config)
    except AlreadyRunning as exc:
        raise CommandError(str(exc)) from None
    return agent.run()


def cmd_add(args) -> int:
    catalog, _ = _catalog(args, must_exist=False)
    path = _abspath(args.local_path)
    if not os.path.isfile(path):
        raise CommandError(f"{path}: no such file")
    try:
        row = catalog.add_file(path, args.remote_path, args.archive, args.md5, None, not args.keep)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"registered {path} -> {args.archive}:{args.remote_path} (id {row.id}, md5 {row.local_md5sum})")
    return 0


def _status(args) -> dict:
    from watcher.health import read_health

    catalog, config = _catalog(args)
    now = time.time()
    names = list(config.archives) if config else []
    names += [n for n in catalog.reports.archive_names() if n not in names]
    health = read_health(catalog.path) or {}
    out = {}
    for name in names:
        stats = catalog.reports.stats(name, _max_attempts(config, name), now)
        state = health.get("archives", {}).get(name)
        stats["degraded"] = bool(state and state.get("degraded"))
        stats["last_error"] = state.get("last_error") if state else None
        problems = health.get("problems", {}).get(name, {})
        stats["problems"] = {kind: entry["count"] for kind, entry in problems.items()}
        stats["problem_messages"] = {kind: entry["message"] for kind, entry in problems.items()}
        out[name] = stats
    db_state = health.get("database", {})
    return {"archives": out, "agent_running": bool(health), "database_locked": bool(db_state.get("locked")),
            "database_error": db_state.get("last_error")}


def cmd_status(args) -> int:
    report = _status(args)
    if args.json:
        for stats in report["archives"].values():
            del stats["problem_messages"]
        print(json.dumps(report["archives"], indent=2, default=str))
        return 0
    problem = ("LOCKED" if report["database_locked"] else "ERROR") if report["database_error"] else None
    print(f"agent: {'running' if report['agent_running'] else 'not running'}"
          + (f"; catalog {problem} ({report['database_error']})" if problem else ""))
    for name, s in report["archives"].items():
        age = s["oldest_pending_age"]
        print(f"{name}: {s['files']} files, {s['pending']} pending ({_size(s['bytes_pending'])}), "
              f"{s['verified']} verified, {s['failed']} failed, {s['removed']} removed, "
              f"{s['ignored']} ignored"
              + (f"; oldest pending {age:.0f}s old" if age is not None else "")
              + (f"; DEGRADED: {s['last_error']}" if s["degraded"] else ""))
        print(f"  finalized until {_when(s['finalized_until'])}; last added {s['last_file_added']}; "
              f"last verified {s['last_file_verified']}")
        if s.get("refused"):
            print(f"  REFUSED: {s['refused']} catalog rows name files outside this archive's roots "
                  "(its rules' watch directories, api_roots, file_root); they are never read, "
                  "shipped or deleted (the log names each)")
        for kind, n in sorted(s["problems"].items()):
            print(f"  PROBLEM: {n} {kind}; latest: {s['problem_messages'][kind]}")
    if not report["archives"]:
        print("no archives")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _describe(row, max_attempts: int) -> str:
    state = row.state(max_attempts)
    if state == "removed" and not row.removed:
        state = "removed (found gone)"
    return (f"{row.id}\t{state}\t{row.archive_name}:{row.remote_path}\tlocal {row.local_md5sum}\t"
            f"far {row.remote_md5sum or '-'}\tattempts {row.failed_copy_attempts or 0}\t{row.local_path}")


def cmd_check(args) -> int:
    catalog, config = _catalog(args)
    path = _abspath(args.path)
    rows = catalog.files.rows_for_path(path)
    if not rows:
        print(f"{path}: not in the catalog")
        return 1
    for row in rows:
        print(_describe(row, _max_attempts(config, row.archive_name)))
    return 0


def cmd_list(args) -> int:
    catalog, config = _catalog(args)
    state = "failed" if args.failed else "pending" if args.pending else None
    limit = _max_attempts(config, args.archive)
    for row in catalog.reports.list_files(args.archive, state, limit):
        print(_describe(row, limit))
    return 0


def cmd_retry(args) -> int:
    catalog, _ = _catalog(args)
    paths = [_abspath(p) for p in args.paths] or None
    n = catalog.files.retry(args.archive, paths)
    print(f"{n} files of {args.archive} are pending again")
    return 0


def cmd_ignore(args) -> int:
    catalog, _ = _catalog(args)
    n = catalog.files.ignore([_abspath(p) for p in args.paths])
    print(f"{n} catalog rows now ignored")
    return 0 if n else 1


def cmd_add_local_files(args) -> int:
    from tqdm import tqdm

    from watcher.catalog import NewFile, identity_columns
    from watcher.hashing import hash_with_identity
    from watcher.handlers import walk_files

    root = _abspath(args.root)
    if not os.path.isdir(root):
        raise CommandError(f"{root}: no such directory")
    try:
        catalog, _ = _catalog(args, must_exist=args.dry_run)
    except CommandError:  # a dry run creates no catalog; nothing is registered yet
        catalog = None
    cutoff = time.time() - args.last_edit
    found = [e for e in walk_files(root) if e.stat().st_mtime <= cutoff]
    known = catalog.files.known_paths([e.path for e in found]) if catalog else set()
    todo = sorted((e for e in found if e.path not in known), key=lambda e: e.path)
    print(f"{len(found)} files under {root}: {len(known)} already registered, {len(todo)} to add")
    if args.dry_run:
        for e in todo:
            print(f"would add {e.path} -> {args.archive}:{os.path.relpath(e.path, root)}")
        return 0
    batch: list[NewFile] = []
    for e in tqdm(todo, unit="file", disable=None):
        md5, identity = hash_with_identity(e.path)
        batch.append(NewFile(e.path, os.path.relpath(e.path, root), args.archive, md5,
                             time.time(), True, **identity_columns(identity)))
        if len(batch) >= 500:
            catalog.add_files(batch)
            batch.clear()
    if batch:
        catalog.add_files(batch)
    return 0


OCS_EXTRA = "watcher ocs-agent needs the ocs extra: pip install 'watcher[ocs]'"


def cmd_ocs_agent(args) -> int:
    """The agent as an OCS agent (watcher.ocs_agent parses its own arguments)."""
    try:
        from watcher import ocs_agent
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] not in ("ocs", "twisted", "autobahn", "txaio"):
            raise
        print(OCS_EXTRA, file=sys.stderr)
        return 2
    return ocs_agent.main(args.ocs_args)


def cmd_config_systemd(args) -> int:
    """The unit drop-in a rules file needs (watcher.service.dropin)."""
    config = load_config(args.file, live=False)  # a tree missing now still gets its line
    try:
        print(service.dropin(config, os.path.abspath(args.file)), end="")
    except service.DropInError as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    return 0


# -- the parser ------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="watcher", description="Ship new data files to an archive and prove they arrived.")
    p.add_argument("--version", action="version", version=f"watcher {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="debug log, every command run included (-vv: sh's internals too)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def where(sp, db=True):
        sp.add_argument("--config", metavar="FILE", help="rules file (default: the shipped one)")
        sp.add_argument("--state-dir", metavar="DIR",
                        help="where the shipped default keeps its data (default: ./watcher-data, or $WATCHER_STATE_DIR)")
        if db:
            sp.add_argument("--db", metavar="PATH", help="catalog file (default: --config's database, then $SUPRSYNC_DB)")

    def command(name, func, help, db=True):
        sp = sub.add_parser(name, help=help)
        where(sp, db)
        sp.set_defaults(func=func)
        return sp

    command("run", cmd_run, "run the agent until SIGTERM or SIGINT", db=False)

    sp = command("add", cmd_add, "register one file (like socs' add_file)")
    sp.add_argument("local_path")
    sp.add_argument("remote_path")
    sp.add_argument("archive")
    sp.add_argument("--md5", help="the file's md5, when already known")
    sp.add_argument("--keep", action="store_true", help="never delete the local file")

    sp = command("status", cmd_status, "per-archive counts, health and progress")
    sp.add_argument("--json", action="store_true", help="one JSON object keyed by archive")

    command("check", cmd_check, "the catalog rows of a local file").add_argument("path")

    sp = command("list", cmd_list, "files of an archive")
    sp.add_argument("archive")
    group = sp.add_mutually_exclusive_group()
    group.add_argument("--failed", action="store_true", help="only files whose attempts are exhausted")
    group.add_argument("--pending", action="store_true", help="only files waiting for a copy")

    sp = command("retry", cmd_retry, "make failed files pending again")
    sp.add_argument("archive")
    sp.add_argument("paths", nargs="*", metavar="PATH")

    sp = command("ignore", cmd_ignore, "stop shipping these files (and stop waiting for them)")
    sp.add_argument("paths", nargs="+", metavar="PATH")

    sp = command("add-local-files", cmd_add_local_files, "register an existing tree once")
    sp.add_argument("root")
    sp.add_argument("archive")
    sp.add_argument("--last-edit", type=float, default=0.0, metavar="SECONDS",
                    help="only files not modified for at least this long")
    sp.add_argument("--dry-run", action="store_true", help="only say what would be added")

    sp = sub.add_parser("config", help="what a rules file needs around it")
    kinds = sp.add_subparsers(dest="kind", metavar="KIND", required=True)
    sp = kinds.add_parser("systemd", help="print the unit drop-in (writable and readable paths) for FILE")
    sp.add_argument("file", metavar="FILE")
    sp.set_defaults(func=cmd_config_systemd)

    # Every argument goes to watcher.ocs_agent's parser (OCS's site arguments among them).
    sp = sub.add_parser("ocs-agent", add_help=False, prefix_chars="\0",
                        help="run the agent as an OCS agent, shown as socs' SupRsync (`watcher ocs-agent --help`)")
    sp.add_argument("ocs_args", nargs=argparse.REMAINDER)
    sp.set_defaults(func=cmd_ocs_agent)
    return p


def setup_logging(verbosity: int) -> None:
    level = logging.INFO if verbosity == 0 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(service.log_formatter(sys.stderr))  # journald's priorities under systemd
    logging.basicConfig(level=level, handlers=[handler])
    if verbosity < 2:  # sh's own debug lines are about its internals
        logging.getLogger("sh").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"watcher: {problem}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"watcher: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"watcher: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # e.g. an unreadable catalog: one line, not a traceback
        print(f"watcher: {type(exc).__name__}: {exc}", file=sys.stderr)
        log.debug("details", exc_info=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
