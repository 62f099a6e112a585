"""Start-up checks: what would stop an archive or a watch, said at start in
one line each, not when the first file arrives (or never).

Two sorts. A *refusal* (exit status 2, before anything is touched) is a
fault of this host's configuration that no waiting can mend and that
stops a whole archive: an ssh key that ssh ignores because group or others
may read it. A *finding* is a condition that can change while the agent
runs, and that the agent outlives: a far base directory the far account
cannot write, a command the far md5 needs missing on the archive host, an
inotify watch limit below the directories to watch. Findings are reported
as problems of their archives (`watcher status`) and looked at again until
they are gone; meanwhile the agent works as it can (the transfer worker
backs off, rescans find what inotify does not see).

Over ssh, all of an archive's far checks are one command, through the
archive's shared connection, with ``cmd_timeout``.
"""

from __future__ import annotations

import logging
import os
import shlex
import stat
import threading
from typing import NamedTuple

from watcher.config import Archive, Config
from watcher.rsync import Destination, Stopped, TransferError, run

log = logging.getLogger(__name__)

UNWRITABLE_BASES = "unwritable base directories"
MISSING_FAR_COMMANDS = "missing far commands"
FEW_WATCHES = "too few inotify watches"
WATCH_LIMITS = ("/proc/sys/fs/inotify/max_user_watches",  # the host's
                "/proc/sys/user/max_inotify_watches")  # a user namespace's (the same outside one)
MARK = b"watcher-preflight\0"
# Each command the far md5 step runs, run once with its options (a busybox
# md5sum has no -z); cmp is optional: without it, identical replaced copies stay.
FAR_SCRIPT = """\
m=; o=
command -v rsync >/dev/null 2>&1 || m="$m rsync"
md5sum -z -- /dev/null >/dev/null 2>&1 || m="$m md5sum"
realpath -z -m -- . >/dev/null 2>&1 || m="$m realpath"
printf '.\\0' | xargs -0 -r sh -c : sh >/dev/null 2>&1 || m="$m xargs"
sync -- . >/dev/null 2>&1 || m="$m sync"
find . -maxdepth 0 -type d -empty >/dev/null 2>&1 || m="$m find"
stat -c %d -- . >/dev/null 2>&1 || m="$m stat"
cmp -s -- /dev/null /dev/null >/dev/null 2>&1 || o="$o cmp"
d=$b
while [ ! -e "$d" ]; do case $d in */*) d=${d%/*}; d=${d:-/};; *) d=.;; esac; done
if [ -d "$d" ] && [ -w "$d" ] && [ -x "$d" ]; then d=; fi
printf 'watcher-preflight\\0%s\\0%s\\0%s\\0' "$m" "$o" "$d"
"""


class Finding(NamedTuple):
    kind: str  # a problem kind of `watcher status` (a short plural noun); "": a note, logged once
    subject: str  # names the archive when it is one archive's (hosts and bases may be shared)
    archives: tuple[str, ...]
    message: str  # what is wrong and what to do, one line


# -- refusals ------------------------------------------------------------------------


def refusals(config: Config) -> list[str]:
    """One line per fault that stops the agent with exit status 2."""
    lines = []
    for name, a in config.archives.items():
        if not (a.is_remote and a.ssh_key):
            continue
        try:
            st = os.stat(a.ssh_key)
        except OSError:
            continue  # the configuration says what is wrong with it
        # ssh's own rule: a key of its user that group or others may read is ignored
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            lines.append(f"{config.source}: archives.{name}.ssh_key: {a.ssh_key!r} may be read by "
                         f"group or others (mode {stat.S_IMODE(st.st_mode):04o}), so ssh ignores it and "
                         f"no connection to {a.ssh_host} can succeed; make it private: "
                         f"chmod 600 {shlex.quote(a.ssh_key)}")
    return lines


# -- findings ------------------------------------------------------------------------


def watch_limit() -> int | None:
    """The inotify watches one account may have: the least of the host's
    limit and its user namespace's; None when neither can be read."""
    limits = []
    for path in WATCH_LIMITS:
        try:
            with open(path) as f:
                limits.append(int(f.read()))
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None


def count_directories(root: str, stop: threading.Event | None = None) -> int:
    """The directories inotify would watch below ``root`` (itself included):
    one readdir each, no stat, no symlink followed (nor does the observer)."""
    count, todo = 0, [root]
    while todo:
        if stop is not None and stop.is_set():
            raise Stopped("counting directories")
        count += 1
        try:
            with os.scandir(todo.pop()) as entries:
                todo.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            pass  # unreadable: no watch below it either (reported by the scans)
    return count


def watch_finding(config: Config, stop: threading.Event | None = None) -> Finding | None:
    """Fewer inotify watches allowed than directories to watch: those beyond
    the limit are seen only by the rescans (watchdog drops their ENOSPC)."""
    roots = sorted({str(r.watch) for r in config.rules if not r.poll and os.path.isdir(r.watch)})
    limit = watch_limit()
    if not roots or limit is None:
        return None
    # each root's observer watches its whole tree, nested roots included
    needed = sum(count_directories(path, stop) for path in roots)
    if needed <= limit:
        return None
    archives = tuple(sorted({r.archive for r in config.rules if str(r.watch) in roots}))
    return Finding(FEW_WATCHES, "fs.inotify.max_user_watches", archives,
                   f"inotify may watch {limit} directories per account (fs.inotify.max_user_watches), "
                   f"fewer than the {needed} directories below {', '.join(roots)}: files in those "
                   f"beyond the limit are found only by the rescan every {config.rescan_interval:.0f} s; "
                   f"raise it to at least {needed} plus what other programs of this account watch, e.g. "
                   f"'sysctl fs.inotify.max_user_watches={max(2 * needed, 524288)}' (and in "
                   "/etc/sysctl.d/ to keep it)")


def _unwritable(archive: Archive, where: str, base: str, dir_: str) -> Finding:
    if dir_ in (base, base.rstrip("/")):
        what = f"cannot write its base directory {where}{base}"
    else:
        what = f"cannot make its base directory {where}{base}: {where}{dir_} cannot be written"
    return Finding(UNWRITABLE_BASES, f"{archive.name}: {where}{base}", (archive.name,),
                   f"archive {archive.name}: the {'far ' if where else ''}account {what}, so no file can "
                   "arrive; give it write access (or fix remote_basedir): checked again every rescan")


def local_findings(archive: Archive) -> list[Finding]:
    """A local archive's base directory, or where it would be made, must be writable."""
    base = archive.remote_basedir
    d = os.path.abspath(base)
    while not os.path.exists(d):  # a dangling link too: rsync would make what it names
        d = os.path.dirname(d)
    if os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK):
        return []
    return [_unwritable(archive, "", base, d)]


def far_findings(dest: Destination, stop: threading.Event | None = None) -> list[Finding]:
    """What the archive host lacks, in one command through the archive's
    shared connection. Raises TransferError when it cannot be asked."""
    a = dest.archive
    argv = dest.preflight_args(FAR_SCRIPT)
    result = run(argv, timeout=a.cmd_timeout, stop=stop)
    at = result.stdout.rfind(MARK)
    fields = result.stdout[at + len(MARK):].split(b"\0") if at >= 0 else []
    if len(fields) < 3:
        kind = "connection" if result.exit_code == 255 else "archive"
        said = (result.stderr or result.stdout).decode("utf-8", "replace").strip()[-300:]
        raise TransferError(kind, f"the start-up check on {a.ssh_host} exited {result.exit_code}: {said}",
                            argv)
    missing, optional, unwritable = (os.fsdecode(f) for f in fields[:3])
    found = []
    if missing.split():
        found.append(Finding(
            MISSING_FAR_COMMANDS, f"{a.name}: {a.ssh_host}: {missing.strip()}", (a.name,),
            f"archive {a.name}: {a.ssh_host} lacks what the far md5 step needs: "
            f"{', '.join(missing.split())} (GNU coreutils, findutils and rsync 3.5 or later, in the far "
            "login's PATH): nothing can be verified until they are there; checked again every rescan"))
    if optional.split():  # service goes on: a line in the log, no problem
        found.append(Finding(
            "", f"{a.name}: {a.ssh_host}: {optional.strip()}", (a.name,),
            f"archive {a.name}: {a.ssh_host} has no {', '.join(optional.split())} (diffutils): far "
            f"copies replaced by identical ones are kept in {a.remote_basedir}/.watcher-replaced/ "
            "instead of being removed"))
    if unwritable:
        found.append(_unwritable(a, f"{a.ssh_host}:", a.remote_basedir, unwritable))
    return found


class StartupChecks:
    """The findings of every archive and of the watches, checked again on
    demand. An archive whose host cannot be asked keeps its last findings
    (and is said so once in the log); notes are logged once."""

    def __init__(self, config: Config, destinations: dict[str, Destination]):
        self.config = config
        self.destinations = destinations
        self.unreachable: set[str] = set()  # archives whose host could not be asked last time
        self._last: dict[str, list[Finding]] = {}
        self._noted: set[tuple[str, str]] = set()

    def run(self, stop: threading.Event | None = None) -> list[Finding]:
        """The problems found now (Stopped when ``stop`` is set meanwhile)."""
        found = []
        watch = watch_finding(self.config, stop)
        if watch:
            found.append(watch)
        for name, dest in self.destinations.items():
            if not dest.archive.is_remote:
                self._last[name] = local_findings(dest.archive)
            else:
                try:
                    self._last[name] = far_findings(dest, stop)
                    self.unreachable.discard(name)
                except TransferError as exc:
                    if name not in self.unreachable:
                        log.warning("archive %s: cannot check %s at start (%s); checked again every "
                                    "rescan", name, dest.archive.ssh_host, exc)
                    self.unreachable.add(name)
            for f in self._last.get(name, []):
                if f.kind:
                    found.append(f)
                elif (name, f.subject) not in self._noted:
                    self._noted.add((name, f.subject))
                    log.warning("%s", f.message)
        return found
