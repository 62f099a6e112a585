"""`watcher add` and `watcher add-local-files`: register files by hand.

Both judge each file as the agent would: by the first rule of the archive
that takes it (watcher.rules), else, when a rule of the archive watches it,
refused with that rule's reason; a file no rule watches is judged by the
default excludes. Both say at the end when the local copies will be deleted.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from watcher.catalog import NewFile, identity_columns
from watcher.commands.exits import CommandError, Exit, UsageError
from watcher.commands.opening import abspath, config_at_hand, in_words, known_archive, open_catalog_of
from watcher.config import Config, Rule
from watcher.hashing import hash_with_identity
from watcher.handlers import walk_files
from watcher.roots import Roots
from watcher.rules import relative_to, select_rule, why_not_taken

MD5 = re.compile(r"[0-9a-fA-F]{32}")
BATCH = 500  # files per transaction


@dataclass(frozen=True)
class Verdict:
    """What the rules say of one file for one archive."""

    rule: Rule | None  # the rule that takes it (None: no rule of the archive watches it)
    index: int | None  # its place in the rules file
    refused: str | None  # why it is not registered, or None


def judge(path: str, archive: str, config: Config | None) -> Verdict:
    rules = [(i, r) for i, r in enumerate(config.rules) if r.archive == archive] if config else []
    found = select_rule(path, [r for _, r in rules])
    if found is not None:
        i = next(i for i, r in rules if r is found[0])
        return Verdict(found[0], i, None)
    reasons = [f"rules[{i}] (watch {r.watch}) {why_not_taken(rel, r)}"
               for i, r in rules if (rel := relative_to(path, str(r.watch)))]
    if reasons:
        return Verdict(None, None, "; ".join(reasons))
    default = Rule(watch=os.path.dirname(path), archive=archive)
    why = why_not_taken(os.path.basename(path), default)
    if why is None and config is not None:
        why = Roots(config).problem(archive, path)
        return Verdict(None, None, f"it {why}" if why else None)
    return Verdict(None, None, f"no rule of {archive} watches it; the default rule: {why}" if why else None)


def deletion(config: Config | None, archive: str, verdict: Verdict, keep: bool,
             registered: float | None) -> str:
    """When the local copies are deleted, in words (retention as watcher.retention reads it)."""
    if keep:
        return "kept (--keep): watcher never deletes the local copy"
    if config is None:
        return ("deleted once verified and past the archive's delete_local_after in the agent's rules "
                "file (give --config to see when; --keep: never)")
    rule = verdict.rule
    if rule is not None and not rule.deletable:
        return f"kept: rules[{verdict.index}] says deletable: false"
    if rule is not None and rule.overrides_retention:
        retention, whose = rule.delete_local_after, f"rules[{verdict.index}]'s delete_local_after"
    else:
        retention, whose = config.archives[archive].delete_local_after, f"archive {archive}'s delete_local_after"
    if retention is None:
        return f"kept: {whose} is not set (never delete)"
    when = "" if registered is None else time.strftime(" (%Y-%m-%d %H:%M)", time.localtime(registered + retention))
    return (f"deleted {in_words(retention)} after registration{when}, once verified on the archive "
            f"({whose}; --keep: never)")


def _new_file(path: str, remote: str, archive: str, md5: str | None, verdict: Verdict, keep: bool) -> NewFile:
    """As the registrar builds one (registrar._new_file): the rule's deletable and retention."""
    identity = None  # an md5 we did not compute is checked by hashing before any deletion
    if md5 is None:
        md5, identity = hash_with_identity(path)
    rule = verdict.rule
    forever = rule is not None and rule.overrides_retention and rule.delete_local_after is None
    deletable = not keep and (rule is None or rule.deletable) and not forever
    retain = rule.delete_local_after if rule is not None and rule.overrides_retention else None
    return NewFile(path, remote, archive, md5, time.time(), deletable, retain=retain,
                   **identity_columns(identity))


def add(args) -> int:
    md5 = args.md5
    if md5 is not None and not MD5.fullmatch(md5):
        raise UsageError(f"--md5 {md5!r}: expected 32 hexadecimal digits (md5sum's output)")
    path = abspath(args.local_path)
    if os.path.isdir(path):
        raise CommandError(f"{path}: a directory; `watcher add` registers one file "
                           f"(a tree: watcher add-local-files {path} {args.archive})")
    if not os.path.isfile(path):
        raise CommandError(f"{path}: no such file")
    config = config_at_hand(args)
    archive = known_archive(args.archive, config)
    verdict = judge(path, archive, config)
    if verdict.refused:
        raise CommandError(f"{path}: not registered: {verdict.refused}")
    catalog = open_catalog_of(args, config, write=True, must_exist=False)
    try:
        live = [r for r in catalog.files.rows_for_path(path) if r.archive_name == archive and r.removed is None]
        if live:
            raise CommandError(f"{path}: already registered for {archive} (catalog row {live[0].id}, "
                               f"far name {live[0].remote_path}): see watcher check {path}")
        new = _new_file(path, args.remote_path, archive, md5 and md5.lower(), verdict, args.keep)
        try:
            [row] = catalog.add_files([new], timecode_dirs=True)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    finally:
        catalog.close()
    print(f"registered {path} -> {archive}:{row.remote_path} (id {row.id}, md5 {row.local_md5sum})")
    print(f"local copy: {deletion(config, archive, verdict, args.keep, row.timestamp)}")
    return Exit.OK


def add_local_files(args) -> int:
    root = abspath(args.root)
    if not os.path.isdir(root):
        raise CommandError(f"{root}: no such directory")
    # A dry run writes nothing: it reads the catalog if there is one.
    config = config_at_hand(args)
    archive = known_archive(args.archive, config)
    catalog = open_catalog_of(args, config, write=not args.dry_run, must_exist=False)
    try:
        return _add_tree(args, root, archive, catalog, config)
    finally:
        if catalog is not None:
            catalog.close()


def _add_tree(args, root: str, archive: str, catalog, config: Config | None) -> int:
    skipped: dict[str, int] = {}

    def problem(kind, subject, message, *rest):
        skipped[kind] = skipped.get(kind, 0) + 1

    cutoff = time.time() - args.last_edit
    found = [e for e in walk_files(root, problem) if e.stat().st_mtime <= cutoff]
    verdicts = {e.path: judge(e.path, archive, config) for e in found}
    excluded = sorted(p for p, v in verdicts.items() if v.refused)
    candidates = [e for e in found if not verdicts[e.path].refused]
    known = catalog.files.known_paths([e.path for e in candidates]) if catalog else set()
    todo = sorted((e for e in candidates if e.path not in known), key=lambda e: e.path)
    print(f"{len(found)} files under {root}: {len(known)} already registered, "
          f"{len(excluded)} excluded by the rules, {len(todo)} to add"
          + "".join(f"; {n} {kind} skipped" for kind, n in sorted(skipped.items())))
    if args.dry_run:
        for path in excluded:
            print(f"would skip {path}: {verdicts[path].refused}")
        for e in todo:
            print(f"would add {e.path} -> {archive}:{os.path.relpath(e.path, root)}")
        if catalog is None:
            print("(no catalog yet: every file counts as new)")
    else:
        _register(catalog, todo, root, archive, verdicts, args.keep)
    notes: dict[str, int] = {}
    for e in todo:
        note = deletion(config, archive, verdicts[e.path], args.keep, None)
        notes[note] = notes.get(note, 0) + 1
    for note, n in notes.items():
        print(f"local copies of {n} files{' (when added)' if args.dry_run else ''}: {note}")
    return Exit.OK


def _register(catalog, todo, root: str, archive: str, verdicts: dict, keep: bool) -> None:
    from tqdm import tqdm

    batch: list[NewFile] = []
    done = [0]
    for e in tqdm(todo, unit="file", disable=None):
        try:
            batch.append(_new_file(e.path, os.path.relpath(e.path, root), archive, None, verdicts[e.path], keep))
        except OSError as exc:  # gone or unreadable since the walk: the others still count
            print(f"skipped {e.path}: {exc.strerror or exc}")
            continue
        if len(batch) >= BATCH:
            _add(catalog, batch, done)
            batch.clear()
    if batch:
        _add(catalog, batch, done)


def _add(catalog, batch: list[NewFile], done: list[int]) -> None:
    try:
        catalog.add_files(batch)
    except ValueError as exc:  # a far name taken: this batch is not registered
        raise CommandError(f"{exc}; {done[0]} files were registered before it, the rest not") from None
    done[0] += len(batch)
