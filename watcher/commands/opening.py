"""What every command opens: the configuration, the catalog, and the
arguments checked against them (archives, durations, paths).

Commands that only look (`status`, `list`, `check`) open the catalog
read-only: nothing is created, migrated or written, and a file that is no
catalog is said to be one line. Commands that write refuse a file that is
not a catalog rather than turn it into one.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from peewee import DatabaseError

from watcher.catalog import Catalog
from watcher.catalog.store import NotACatalog
from watcher.commands.exits import CommandError, UsageError
from watcher.config import DEFAULT_CONFIG, Config, default_state_dir, load_config, parse_duration

DB_ENV = "SUPRSYNC_DB"
DEFAULT_MAX_ATTEMPTS = 10


def config_at_hand(args, live: bool = False) -> Config | None:
    """The rules file the command was given (--config), or the shipped
    default of an existing state directory when no catalog was named; None
    when only a catalog was named (--db, $SUPRSYNC_DB). ``live`` false: a
    watched directory that is gone must not stop the commands that look."""
    if getattr(args, "config", None):
        return load_config(args.config, live=live)
    if getattr(args, "db", None) is not None or os.environ.get(DB_ENV):
        return None
    state = default_state_dir(getattr(args, "state_dir", None))
    if not state.is_dir():  # no agent ran here: say so rather than create its directories
        raise CommandError(f"no catalog: {state} does not exist (give --db, --config or "
                           f"--state-dir, or set {DB_ENV})")
    return load_config(DEFAULT_CONFIG, base=state, live=live)


def catalog_path(args, config: Config | None) -> Path:
    """--db, else the configuration's database, else $SUPRSYNC_DB."""
    db = getattr(args, "db", None)
    if db is None and config is not None:
        db = config.database
    if db is None:
        db = os.environ.get(DB_ENV)
    return Path(db)


def open_catalog(args, *, write: bool = False, must_exist: bool = True) -> tuple[Catalog | None, Config | None]:
    """The catalog and the configuration at hand; read-only unless ``write``.
    A missing catalog is an error; unless ``must_exist`` is false: then it
    is created to be written, or None when only read."""
    config = config_at_hand(args)
    return open_catalog_of(args, config, write=write, must_exist=must_exist), config


def open_catalog_of(args, config: Config | None, *, write: bool = False,
                    must_exist: bool = True) -> Catalog | None:
    """open_catalog's catalog, the configuration already read."""
    path = catalog_path(args, config)
    if not path.exists():
        if must_exist:
            raise CommandError(f"no catalog at {path} (give --db, --config or set {DB_ENV})")
        if not write:
            return None
    try:
        if not write:
            return Catalog(path, read_only=True)
        refusal = Catalog.refusal(path)
        if refusal:
            raise CommandError(refusal)
        return Catalog(path)
    except NotACatalog as exc:
        raise CommandError(str(exc)) from None
    except DatabaseError as exc:  # locked past the busy timeout while migrating
        raise CommandError(f"{path}: cannot open the catalog: {exc}") from None
    except OSError as exc:  # its directory cannot be made or written
        raise CommandError(f"{path}: cannot open the catalog: {exc.strerror or exc}") from None


def max_attempts(config: Config | None, archive: str) -> int:
    if config and archive in config.archives:
        return config.archives[archive].max_copy_attempts
    return DEFAULT_MAX_ATTEMPTS


def known_archive(name: str, config: Config | None, catalog: Catalog | None = None) -> str:
    """``name`` if the configuration has it (without one: if the catalog has
    files of it); else a UsageError naming the known ones. socs' API
    (watcher.db.add_file) keeps accepting any name: only commands check."""
    if config is not None:
        if name not in config.archives:
            raise UsageError(f"unknown archive {name!r} (known: {', '.join(sorted(config.archives))})")
        return name
    if catalog is not None:
        names = catalog.reports.archive_names()
        if name not in names:
            raise UsageError(f"no archive {name!r} in the catalog {catalog.path} (archives with files: "
                             f"{', '.join(names) or 'none'}); give --config to check against the rules file")
    return name


def abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def duration(text: str) -> float:
    """An option's duration, read as the rules file reads one (config.parse_duration)."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def in_words(seconds: float) -> str:
    """A duration as the rules file would write it: 7d, 12h, 30m, 90s."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:g}s"
