"""`watcher check`, `list`, `retry`, `ignore`: the catalog's rows of files
and the operator's edits of them. `check` and `list` only read (the
catalog is opened read-only); a path or an archive the catalog does not
know is said, and counts as a problem (exit 1) everywhere."""

from __future__ import annotations

import sys

from watcher.commands.exits import Exit
from watcher.commands.opening import abspath, known_archive, max_attempts, open_catalog
from watcher.commands.rules_files import explain


def _describe(row, limit: int) -> str:
    state = row.state(limit)
    if state == "removed" and not row.removed:
        state = "removed (found gone)"
    return (f"{row.id}\t{state}\t{row.archive_name}:{row.remote_path}\tlocal {row.local_md5sum}\t"
            f"far {row.remote_md5sum or '-'}\tattempts {row.failed_copy_attempts or 0}\t{row.local_path}")


def check(args) -> int:
    catalog, config = open_catalog(args)
    try:
        path = abspath(args.path)
        rows = catalog.files.rows_for_path(path)
        for row in rows:
            print(_describe(row, max_attempts(config, row.archive_name)))
    finally:
        catalog.close()
    if rows:
        return Exit.OK
    print(f"{path}: not in the catalog")
    if config is None:
        print("rules: give --config to see what the rules would do with it")
    else:
        print(f"rules: {explain(path, config)[1]}")
    return Exit.PROBLEM


def list_files(args) -> int:
    catalog, config = open_catalog(args)
    try:
        archive = known_archive(args.archive, config, catalog)
        state = "failed" if args.failed else "pending" if args.pending else None
        limit = max_attempts(config, archive)
        for row in catalog.reports.list_files(archive, state, limit):
            print(_describe(row, limit))
    finally:
        catalog.close()
    return Exit.OK


def _unknown(catalog, paths: list[str], archive: str | None) -> list[str]:
    """The paths with no row (of ``archive``, when given), each said on stderr."""
    missing = []
    for path in paths:
        rows = [r for r in catalog.files.rows_for_path(path) if archive is None or r.archive_name == archive]
        if not rows:
            missing.append(path)
            print(f"watcher: {path}: not in the catalog" + (f" for archive {archive}" if archive else ""),
                  file=sys.stderr)
    return missing


def retry(args) -> int:
    catalog, config = open_catalog(args, write=True)
    try:
        archive = known_archive(args.archive, config, catalog)
        paths = [abspath(p) for p in args.paths]
        missing = _unknown(catalog, paths, archive)
        if paths and len(missing) == len(paths):
            return Exit.PROBLEM  # each said on stderr
        n = catalog.files.retry(archive, [p for p in paths if p not in missing] if paths else None)
    finally:
        catalog.close()
    print(f"{n} failed files of {archive} are pending again")
    return Exit.PROBLEM if missing else Exit.OK


def ignore(args) -> int:
    catalog, _ = open_catalog(args, write=True)
    try:
        paths = [abspath(p) for p in args.paths]
        missing = _unknown(catalog, paths, None)
        n = catalog.files.ignore([p for p in paths if p not in missing]) if len(missing) < len(paths) else 0
    finally:
        catalog.close()
    print(f"{n} catalog rows now ignored")
    return Exit.PROBLEM if missing else Exit.OK
