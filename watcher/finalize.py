"""Finalizing timecode directories: the YAML file that says one is whole.

A complete directory (watcher.paths) is *synced* when every file of it
in its archive is verified; then a small YAML file says so and is shipped
like any other file (socs-compatible names and keys). The catalog records
it; this module writes, registers and cleans up the files.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import yaml

from watcher.faults import checkpoint
from watcher.hashing import md5_and_stat
from watcher.paths import (
    finalization_leftover, finalization_name, finalization_remote_path, is_complete, subdirs_of,
    timecode_now,
)
from watcher.safefs import Identity, SymlinkInPath, open_subdir
from watcher.state_files import write_atomic

if TYPE_CHECKING:
    from watcher.catalog import Catalog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finalization:
    local_path: Path
    remote_path: str
    summary: dict


class FinalizationBlocked(Exception):
    """Something other than a directory (a symlink, a file) stands where a
    finalization directory must be: never followed, the finalization waits."""

    def __init__(self, path: str, why: str):
        super().__init__(f"{path} {why}")
        self.path = path
        self.why = why


def _finalization_dir(file_root: Path, tc_now: int, instance_id: str, create: bool) -> int:
    """A descriptor of ``file_root/tc_now/instance_id``, made when missing;
    neither component below file_root is followed if it is a link
    (FinalizationBlocked). file_root itself is configured, and may be a link."""
    if create:
        os.makedirs(file_root, exist_ok=True)
    at = os.open(file_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    path = str(file_root)
    for name in (str(tc_now), instance_id):
        path = os.path.join(path, name)
        try:
            fd = open_subdir(at, name, path, create=create)
        except SymlinkInPath:
            raise FinalizationBlocked(path, "is a symlink") from None
        except NotADirectoryError:
            raise FinalizationBlocked(path, "is not a directory") from None
        except PermissionError:
            raise FinalizationBlocked(path, "cannot be made or entered (permission denied)") from None
        finally:
            os.close(at)
        at = fd
        st = os.fstat(at)
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o002:
            os.close(at)
            # Made by someone else (a writer of file_root), or writable by
            # anyone: they could swap a finalization file before it ships.
            raise FinalizationBlocked(path, f"belongs to uid {st.st_uid} or may be written by "
                                            f"anyone (mode {stat.S_IMODE(st.st_mode):o})")
    return at


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def write_finalization(
    file_root: Path, instance_id: str, archive: str, timecode: int,
    num_files: int, subdirs: list[str], finalized_until: float, now: float,
    taken: Callable[[str], bool] = lambda remote: False,
) -> Finalization:
    """Write the YAML that tells downstream a directory is whole.

    Written to a new temporary name (O_EXCL, unpredictable) and renamed in
    its directory, so a crash never leaves a half file; a file whose catalog
    row was never committed is harmless (nothing ships it) and is replaced by
    a newer one. A directory finalized again within the same second gets the
    next free second in its name (a name that is here, as anything, or
    ``taken`` in the catalog): a far copy is never overwritten.

    file_root may be writable by the catalog group: the directories below it
    are made and entered without following links (FinalizationBlocked when
    one is in the way), and nothing planted at a name is written through.
    """
    tc_now = timecode_now(now)
    summary = {
        "timecode": timecode,
        "num_files": num_files,
        "subdirs": sorted(subdirs),
        "finalized_at": now,
        "finalized_until": finalized_until,
        "archive_name": archive,
        "instance_id": instance_id,
    }
    at = _finalization_dir(Path(file_root), tc_now, instance_id, create=True)
    try:
        named = int(now)
        while True:
            name = finalization_name(named, archive, timecode)
            if not _exists(at, name) and not taken(finalization_remote_path(tc_now, instance_id, name)):
                break
            named += 1
        try:
            write_atomic(at, name, yaml.safe_dump(summary).encode(), sync=True)
        except PermissionError:
            raise FinalizationBlocked(str(Path(file_root) / str(tc_now) / instance_id),
                                      "cannot be written (permission denied)") from None
    finally:
        os.close(at)
    local = Path(file_root) / str(tc_now) / instance_id / name
    return Finalization(local, finalization_remote_path(tc_now, instance_id, name), summary)


def remove_finalization(file_root: Path, local_path: Path) -> None:
    """Unlink a finalization file this agent wrote, through no link."""
    rel = Path(local_path).relative_to(file_root).parts
    if len(rel) != 3:
        return
    try:
        at = _finalization_dir(Path(file_root), int(rel[0]), rel[1], create=False)
    except (OSError, ValueError, FinalizationBlocked):
        return
    try:
        if stat.S_ISREG(os.stat(rel[2], dir_fd=at, follow_symlinks=False).st_mode):
            os.unlink(rel[2], dir_fd=at)
    except OSError:
        pass
    finally:
        os.close(at)


def _instance_files(file_root: Path, instance_id: str) -> list[tuple[str, str]]:
    """(timecode directory, name) of the regular files in file_root/*/instance_id/,
    walked through no link."""
    found = []
    try:
        root = os.open(file_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return found
    try:
        with os.scandir(root) as entries:
            tcs = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        for tc in tcs:
            try:
                tc_fd = open_subdir(root, tc, os.path.join(file_root, tc))
            except OSError:
                continue
            try:
                inst = open_subdir(tc_fd, instance_id, os.path.join(file_root, tc, instance_id))
            except OSError:
                continue
            finally:
                os.close(tc_fd)
            try:
                with os.scandir(inst) as entries:
                    found += [(tc, e.name) for e in entries if e.is_file(follow_symlinks=False)]
            finally:
                os.close(inst)
    finally:
        os.close(root)
    return found


def remove_unregistered_finalizations(catalog: "Catalog", file_root: Path, instance_id: str,
                                      archives: list[str]) -> int:
    """Delete this instance's finalization files that never made it into the catalog.

    A crash between writing one and registering it leaves it behind; it
    would never be shipped, and a newer one replaces it. Files are matched
    by far name (the local one may be spelled another way by socs). Run at
    start, when this instance writes none. Returns how many were removed.
    Directories are walked, and files unlinked, through no link: a link
    planted in file_root never leads the deletion elsewhere.
    """
    removed = 0
    files = _instance_files(Path(file_root), instance_id)
    for archive in archives:
        named = finalization_leftover(archive)
        found = {finalization_remote_path(tc, instance_id, name): Path(file_root) / tc / instance_id / name
                 for tc, name in files if named.match(name)}
        if not found:
            continue
        known = catalog.files.known_remote_paths(archive, list(found))
        for remote, path in found.items():
            if remote not in known:
                remove_finalization(Path(file_root), path)
                removed += 1
                log.info("removed %s: written before a crash, never registered", path)
    return removed


def update_timecode_dirs(
    catalog: "Catalog", archive: str, file_root: Path, instance_id: str,
    now: float | None = None, blocked: Callable[[FinalizationBlocked, int], None] | None = None,
) -> int:
    """Advance every open timecode directory of an archive; return how many were finalized.

    Completion is judged again each time, not taken from the stored flag: a
    flag set because of a future directory (by socs or an older watcher)
    would finalize a directory again after every new file. The flag is
    corrected for socs' readers. A finalization whose directory is blocked
    (a link planted below file_root) waits, told to ``blocked`` with the
    timecode; the others go on.
    """
    now = time.time() if now is None else now
    newest = catalog.timecode_dirs.newest(archive, timecode_now(now))
    finalized = 0
    for tcdir in catalog.timecode_dirs.open_dirs(archive):
        complete = is_complete(tcdir.timecode, newest, now)
        if bool(tcdir.completed) != complete:
            catalog.timecode_dirs.set_flags(tcdir.id, completed=complete)
        if not complete:
            continue
        if catalog.timecode_dirs.has_unverified(archive, tcdir.timecode):
            continue
        if not tcdir.synced:
            catalog.timecode_dirs.set_flags(tcdir.id, synced=True)
        paths = catalog.timecode_dirs.remote_paths(archive, tcdir.timecode)
        try:
            fin = write_finalization(
                file_root, instance_id, archive, tcdir.timecode, len(paths),
                subdirs_of(paths), catalog.reports.finalized_until(archive, now), now,
                taken=lambda remote: bool(catalog.files.known_remote_paths(archive, [remote])),
            )
        except FinalizationBlocked as exc:
            if blocked is None:
                raise
            blocked(exc, tcdir.timecode)
            continue
        checkpoint("finalizing")
        md5, st = md5_and_stat(fin.local_path)  # hashed before the catalog's write lock is taken
        if catalog.timecode_dirs.finalize(tcdir.id, fin.local_path, fin.remote_path, md5, Identity.of(st),
                                          now, len(paths)):
            finalized += 1
            log.info("finalized %s timecode %s (%d files): %s", archive, tcdir.timecode,
                     len(paths), fin.local_path)
        else:  # finalized or changed meanwhile: ours is never shipped (next round decides)
            remove_finalization(Path(file_root), fin.local_path)
    return finalized
