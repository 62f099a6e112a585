"""The `watcher` command line: the parser, and the agent's own commands
(`run`, `ocs-agent`); the other commands live in watcher.commands, one
module per group. Exit statuses are watcher.commands.exits' (0 done, 1 a
problem named on one line, 2 a bad command line or configuration, 3 and 4
from `status`); no traceback or Python error text reaches the user.
"""

from __future__ import annotations

import argparse
import importlib
import errno
import logging
import os
import sys

from peewee import DatabaseError

from watcher import __version__, service
from watcher.commands.exits import CommandError, CommandFailed, Exit
from watcher.commands.opening import duration
from watcher.config import ConfigError, default_state_dir, load_config, load_default_config

log = logging.getLogger("watcher")


def cmd_run(args) -> int:
    from watcher.agent import Agent, AlreadyRunning

    if args.config:
        config = load_config(args.config)
    else:
        state = default_state_dir(args.state_dir)
        config = load_default_config(state)
        log.info("no --config: using the shipped default with state under %s", state)
        log.info("drop files into %s; they are copied to %s", state / "inbox", state / "archive")
    try:
        agent = Agent(config)
    except AlreadyRunning as exc:
        raise CommandError(str(exc)) from None
    return agent.run()


OCS_EXTRA = "watcher ocs-agent needs the ocs extra: pip install 'watcher[ocs]'"


def cmd_ocs_agent(args) -> int:
    """The agent as an OCS agent (watcher.ocs_agent parses its own arguments)."""
    try:
        from watcher import ocs_agent
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] not in ("ocs", "twisted", "autobahn", "txaio"):
            raise
        print(OCS_EXTRA, file=sys.stderr)
        return Exit.USAGE
    return ocs_agent.main(args.ocs_args)


# -- the parser ------------------------------------------------------------------


def _later(module: str, name: str):
    """A subcommand's function, imported when it runs: each command loads only
    what it needs (`watcher status` loads no registering, hashing or rules)."""
    def run(args):
        return getattr(importlib.import_module(f"watcher.commands.{module}"), name)(args)
    return run


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (no usage block): exit 2."""

    def error(self, message: str):
        self.exit(Exit.USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="watcher", description="Ship new data files to an archive and prove they arrived.")
    p.add_argument("--version", action="version", version=f"watcher {__version__}")
    verbose = "debug log, every command run included (-vv: sh's internals too); before or after the command"
    p.add_argument("-v", "--verbose", action="count", default=0, help=verbose)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def where(sp, db=True):
        sp.add_argument("-v", "--verbose", action="count", default=0, dest="verbose_after", help=verbose)
        sp.add_argument("--config", metavar="FILE", help="rules file (default: the shipped one)")
        sp.add_argument("--state-dir", metavar="DIR",
                        help="where the shipped default keeps its data (default: ./watcher-data, or $WATCHER_STATE_DIR)")
        if db:
            sp.add_argument("--db", metavar="PATH", help="catalog file (default: --config's database, then $SUPRSYNC_DB)")

    def command(name, func, help, db=True, parent=sub):
        sp = parent.add_parser(name, help=help, description=help)
        where(sp, db)
        sp.set_defaults(func=func)
        return sp

    command("run", cmd_run, "run the agent until SIGTERM or SIGINT", db=False)

    sp = command("add", _later("registering", "add"), "register one file (like socs' add_file), judged by the rules")
    sp.add_argument("local_path")
    sp.add_argument("remote_path")
    sp.add_argument("archive")
    sp.add_argument("--md5", help="the file's md5 (32 hexadecimal digits), when already known")
    sp.add_argument("--keep", action="store_true", help="never delete the local file")

    sp = command("status", _later("status", "run"), "per-archive counts, health and progress (exit 0 all well, "
                 "3 an archive needs attention, 4 an agent is not running)")
    sp.add_argument("--json", action="store_true", help="one JSON object keyed by archive")

    command("check", _later("rows", "check"), "the catalog rows of a local file (or what the rules would do with it)"
            ).add_argument("path")

    sp = command("list", _later("rows", "list_files"), "files of an archive")
    sp.add_argument("archive")
    group = sp.add_mutually_exclusive_group()
    group.add_argument("--failed", action="store_true", help="only files whose attempts are exhausted")
    group.add_argument("--pending", action="store_true", help="only files waiting for a copy")

    sp = command("retry", _later("rows", "retry"), "make failed files pending again")
    sp.add_argument("archive")
    sp.add_argument("paths", nargs="*", metavar="PATH")

    sp = command("ignore", _later("rows", "ignore"), "stop shipping these files (and stop waiting for them)")
    sp.add_argument("paths", nargs="+", metavar="PATH")

    sp = command("add-local-files", _later("registering", "add_local_files"),
                 "register an existing tree once (the rules' excludes apply)")
    sp.add_argument("root")
    sp.add_argument("archive")
    sp.add_argument("--last-edit", type=duration, default=0.0, metavar="DURATION",
                    help="only files not modified for at least this long (90, 30m, 12h, 7d)")
    sp.add_argument("--keep", action="store_true", help="never delete the local files")
    sp.add_argument("--dry-run", action="store_true", help="only say what would be added (writes nothing)")

    sp = sub.add_parser("rules", help="what a rules file does with paths")
    kinds = sp.add_subparsers(dest="kind", metavar="ACTION", required=True)
    sp = command("test", _later("rules_files", "rules_test"), "per PATH: the rule, archive and remote path it gets, "
                 "or why none takes it (exit 1 if any ships nowhere)", db=False, parent=kinds)
    sp.add_argument("paths", nargs="+", metavar="PATH")

    sp = sub.add_parser("serve", help="on the archive host, as the forced command of the agent's key "
                        "in authorized_keys: serve only its deliveries below DIR")
    sp.add_argument("-v", "--verbose", action="count", default=0, dest="verbose_after", help=verbose)
    sp.add_argument("--root", required=True, metavar="DIR", help="the only directory the key may write in")
    sp.add_argument("--append-only", action="store_true",
                    help="never change or remove a far file: rsync skips names that exist")
    sp.add_argument("--min-temp-age", type=duration, default=600.0, metavar="DURATION",
                    help="rsync's temporary files younger than this are never removed (default 10m)")
    sp.set_defaults(func=_later("serving", "run"))

    sp = sub.add_parser("config", help="what a rules file needs around it")
    kinds = sp.add_subparsers(dest="kind", metavar="KIND", required=True)
    sp = kinds.add_parser("systemd", help="print the unit drop-in (writable and readable paths) for FILE")
    sp.add_argument("-v", "--verbose", action="count", default=0, dest="verbose_after", help=verbose)
    sp.add_argument("file", metavar="FILE")
    sp.set_defaults(func=_later("rules_files", "config_systemd"))
    sp = kinds.add_parser("check", help="what `watcher run` would find wrong with FILE, and what its start-up "
                          "scan would register; changes nothing (exit 0 all well, 1 a problem, 2 a bad file)")
    sp.add_argument("-v", "--verbose", action="count", default=0, dest="verbose_after", help=verbose)
    sp.add_argument("file", metavar="FILE")
    sp.set_defaults(func=_later("checking", "config_check"))
    sp = kinds.add_parser("example", help="print a commented starter rules file")
    sp.add_argument("-v", "--verbose", action="count", default=0, dest="verbose_after", help=verbose)
    sp.set_defaults(func=_later("rules_files", "config_example"))

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
    if verbosity < 2:  # -v: watcher's own lines (its decisions, each command it runs); -vv: its SQL too
        for library in ("peewee", "sh", "watchdog"):  # SQL, then the internals of sh and of watchdog
            logging.getLogger(library).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose + getattr(args, "verbose_after", 0))
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"watcher: {problem}", file=sys.stderr)
        return Exit.USAGE
    except CommandFailed as exc:
        print(f"watcher: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    except BrokenPipeError:
        return _reader_gone()
    except DatabaseError as exc:  # the catalog failed under a command: locked, full, corrupt
        print(f"watcher: the catalog: {exc}", file=sys.stderr)
        log.debug("details", exc_info=True)
        return Exit.PROBLEM
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            return _reader_gone()
        print(f"watcher: {exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}", file=sys.stderr)
        log.debug("details", exc_info=True)
        return Exit.PROBLEM
    except Exception as exc:  # a bug: one line naming it; the traceback under -v
        print(f"watcher: unexpected {type(exc).__name__}: {exc} (run with -v for details)", file=sys.stderr)
        log.debug("details", exc_info=True)
        return Exit.PROBLEM


def _reader_gone() -> int:
    """The reader of our output went away (`| head`): stop quietly, and let
    the interpreter's last flush of stdout write nowhere instead of failing."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return Exit.BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
