"""Which rule a path matches and the remote path it gets.

Pure functions over a path and the rules; no I/O except the modification time
that a template may ask for (``{timecode}`` of a path with no ctime in it),
and the clock when no ``now`` is given.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import time
from dataclasses import dataclass
from fnmatch import translate
from typing import TYPE_CHECKING, Callable, Iterable

from watcher.paths import find_ctime, is_ctime, plausible_time

if TYPE_CHECKING:  # config reads templates with the rule below: no import at run time
    from watcher.config import Rule


class UnsafeRemotePath(ValueError):
    """A rendered remote path that is absolute or climbs out of its archive."""


# Where, below an archive's base, the far files that copies replaced are kept
# (rsync --backup-dir): no file is shipped there.
REPLACED_DIR = ".watcher-replaced"


# What can be wrong with a remote path, in the order remote_path_flaw judges it.
EMPTY, ABSOLUTE, CLIMBS, NUL, NOT_NORMAL, REPLACED = (
    "empty", "absolute", "climbs", "nul", "not normal", "replaced")


def remote_path_flaw(remote_path: str) -> str | None:
    """The one definition of a safe far name: the first flaw found, or None.

    Every place that judges a remote path (a template when the rules file is
    read, a rendered name, a catalog row, a batch's listing, retention) asks
    this function, and words the answer for its own reader.
    """
    if not remote_path:
        return EMPTY
    if remote_path.startswith("/"):
        return ABSOLUTE
    if ".." in remote_path.split("/"):
        return CLIMBS
    if "\0" in remote_path:
        return NUL
    if posixpath.normpath(remote_path) != remote_path:
        return NOT_NORMAL
    if remote_path.split("/", 1)[0] == REPLACED_DIR:
        return REPLACED
    return None


_PROBLEMS = {
    EMPTY: "is empty or absolute",
    ABSOLUTE: "is empty or absolute",
    CLIMBS: "contains '..'",
    NUL: "contains a NUL byte",
    NOT_NORMAL: "is not in normal form (no '//', './' or trailing '/')",
    REPLACED: f"is inside {REPLACED_DIR}/, where the archive keeps far files that copies replaced",
}


def remote_path_problem(remote_path: str) -> str | None:
    """Why a remote path could escape its archive's base directory (or land
    among the replaced far files), or None."""
    flaw = remote_path_flaw(remote_path)
    return None if flaw is None else _PROBLEMS[flaw]


@dataclass(frozen=True)
class Match:
    rule: Rule
    local_path: str
    relpath: str
    remote_path: str


def relative_to(path: str, root: str) -> str | None:
    """``path`` relative to ``root``, or None when it is not inside it."""
    root = root.rstrip("/") + "/"
    if not path.startswith(root):
        return None
    return path[len(root):]


@functools.lru_cache(maxsize=256)
def _any_glob(patterns: tuple[str, ...]) -> Callable[[str], object]:
    """One compiled regular expression that matches what any of the globs
    matches (as fnmatchcase): a file is matched once, not once per glob."""
    if not patterns:
        return lambda text: None
    return re.compile("|".join(f"(?:{translate(p)})" for p in patterns)).match


def _path_or_name_hits(relpath: str, patterns: tuple[str, ...]) -> bool:
    """Whether a glob matches the whole relative path or the file's name."""
    hits = _any_glob(patterns)
    return bool(hits(relpath) or hits(relpath.rpartition("/")[2]))


def _glob_hits(relpath: str, patterns: tuple[str, ...]) -> bool:
    # A pattern matches the whole relative path or any single component, so
    # that '.*' excludes hidden files in subdirectories too.
    parent = relpath.rpartition("/")[0]
    return _path_or_name_hits(relpath, patterns) or (bool(parent) and _dir_hits(parent, patterns))


@functools.lru_cache(maxsize=4096)
def _dir_hits(parent: str, patterns: tuple[str, ...]) -> bool:
    """Whether a component of a directory matches: once per directory, not once per file in it."""
    hits = _any_glob(patterns)
    return any(hits(c) for c in parent.split("/"))


def is_selected(relpath: str, rule: Rule) -> bool:
    """Whether the rule's include and exclude globs keep this path."""
    return _path_or_name_hits(relpath, tuple(rule.include)) and not _glob_hits(relpath, tuple(rule.exclude))


def why_not_taken(relpath: str, rule: Rule) -> str | None:
    """Why a rule does not take a path inside its watch directory (include,
    exclude or ``match``, as select_rule judges them), in words; None when it
    takes it. For the operator's commands (`watcher rules test`, `check`)."""
    if not _path_or_name_hits(relpath, tuple(rule.include)):
        return f"matches none of its include globs ({', '.join(map(repr, rule.include))})"
    for glob in rule.exclude:
        if _glob_hits(relpath, (glob,)):
            return f"excluded by its glob {glob!r}"
    if rule.match is not None and not rule.match.search(relpath):
        return f"does not match its match regex {rule.match.pattern!r}"
    return None


def _path_ctime(relpath: str, groups: dict[str, str], now: float) -> str | None:
    """The ctime a path names: the ``match`` regex's ``ctime`` group when it
    captured one, else the first ten-digit number; None when that is no
    plausible time (see timecode.plausible_time)."""
    captured = groups.get("ctime")
    if captured:
        return captured if is_ctime(captured, now) else None
    return find_ctime(relpath, now)


def template_fields(relpath: str, groups: dict[str, str], mtime: float | None,
                    now: float | None = None) -> dict[str, str]:
    """The values a remote_path template may use for this file.

    ``{ctime}`` (and ``{timecode}``, its first five digits) is the time the
    path names if plausible, else the file's modification time if plausible,
    else ``now`` (registration): a number that is no time, or a clock far
    off, never puts a file in a timecode directory of the far future.
    """
    now = time.time() if now is None else now
    parent, _, name = relpath.rpartition("/")
    stem, dot, suffix = name.rpartition(".")
    if not stem:  # no dot, or a dot-file such as '.bashrc'
        stem, suffix = name, ""
    else:
        suffix = dot + suffix
    ctime = _path_ctime(relpath, groups, now)
    if ctime is None:
        ctime = str(int(mtime if mtime is not None and plausible_time(mtime, now) else now))
    fields = {
        "relpath": relpath, "name": name, "stem": stem, "suffix": suffix,
        "parent": parent, "ctime": ctime, "timecode": ctime[:5],
    }
    fields.update({k: (v or "") for k, v in groups.items() if k != "ctime"})
    return fields


def render_remote_path(rule: Rule, relpath: str, groups: dict[str, str], mtime: float | None,
                       now: float | None = None) -> str:
    """Fill the rule's template; refuse a result that escapes the archive."""
    fields = template_fields(relpath, groups, mtime, now)
    rendered = rule.remote_path.format(**fields)
    if (rendered.startswith("/") and not rule.remote_path.startswith("/")
            and not any(v.startswith("/") for v in fields.values())):
        rendered = rendered.lstrip("/")  # an empty leading field: {parent} of a top-level file
    # Fields may leave '//' or './' behind: the name is judged as rendered,
    # then normalised (a '..' that normalising would hide is refused too).
    normal = posixpath.normpath(rendered)
    flaw = remote_path_flaw(rendered)
    if flaw in (EMPTY, ABSOLUTE) or normal == "." or remote_path_flaw(normal) == CLIMBS:
        raise UnsafeRemotePath(f"remote path {rendered!r} escapes the archive")
    if flaw == CLIMBS:
        raise UnsafeRemotePath(f"remote path {rendered!r} contains '..'")
    return normal


def select_rule(path: str, rules: Iterable[Rule]) -> tuple[Rule, str, dict[str, str]] | None:
    """The first rule that takes this absolute path, with its relative path
    and ``match`` groups; the remote path is not rendered (scans and events
    only need to know whether a file is wanted)."""
    for rule in rules:
        relpath = relative_to(path, str(rule.watch))
        if not relpath or not is_selected(relpath, rule):
            continue
        groups: dict[str, str] = {}
        if rule.match is not None:
            found = rule.match.search(relpath)
            if not found:
                continue
            groups = found.groupdict()
        return rule, relpath, groups
    return None


def match_rule(path: str, rules: Iterable[Rule], mtime: float | None = None,
               now: float | None = None) -> Match | None:
    """The first rule that takes this absolute path, with its remote path.

    ``mtime`` is only read when a template needs it and is not given.
    Raises UnsafeRemotePath when the matching rule would place it outside
    its archive.
    """
    found = select_rule(path, rules)
    if found is None:
        return None
    rule, relpath, groups = found
    now = time.time() if now is None else now
    if mtime is None and _path_ctime(relpath, groups, now) is None:
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            mtime = None
    remote = render_remote_path(rule, relpath, groups, mtime, now)
    return Match(rule=rule, local_path=path, relpath=relpath, remote_path=remote)
