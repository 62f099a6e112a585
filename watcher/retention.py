"""Delete local files whose retention has passed, and only those that are safe.

A file is deleted only when the catalog says verified, its retention has
passed, its path lies below one of its archive's roots (watcher.roots: a
row naming any other path is refused unopened), it is still what the agent
hashed (a row it sealed, watcher.seal: device, inode, size, mtime and
ctime; any other row's file is hashed again first), opened below its root
without following any symlink, no process has it
open for writing (a read lease, held while it is unlinked), and the far
copy still has the same md5 when checked just before (one batched command
over the shared connection). A far copy that is gone or differs is shipped
again instead; a local file that changed is hashed again and ships.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from typing import Callable

from watcher.config import Config
from watcher.catalog import Catalog, File
from watcher.faults import checkpoint
from watcher.hashing import md5_of_fd
from watcher.health import Health
from watcher.roots import Roots
from watcher.rsync import Destination, size_text
from watcher.rules import remote_path_problem
from watcher.safefs import (
    Identity, SymlinkInPath, Trees, WriterCheck, hold_against_writers, missing_for_good, release_lease,
    replaced,
)

log = logging.getLogger(__name__)


def retention_bounds(config: Config, archive: str) -> tuple[float | None, float | None]:
    """(the archive's retention, the shortest retention any of its files can have)."""
    default = config.archives[archive].delete_local_after
    overrides = [r.delete_local_after for r in config.rules
                 if r.archive == archive and r.overrides_retention and r.delete_local_after is not None]
    candidates = ([default] if default is not None else []) + overrides
    return default, (min(candidates) if candidates else None)


HOLD_UNDELETABLE = 3600.0  # seconds before a file that could not be deleted is tried again
WRITER_RECHECK = 60.0  # seconds before a file held open for writing is looked at again
HELD_LOOKED_PAST = 5000  # held rows a round reads past to find others
WRITERS_UNKNOWN = "files whose writers cannot be checked"
WRITERS_ACTIVE = "files kept while a process writes to them"


def delete_expired(catalog: Catalog, config: Config, archive: str, destination: Destination,
                   stop: threading.Event | None = None, now: float | None = None,
                   limit: int = 500, held: dict | None = None,
                   health: Health | None = None) -> int:
    """One round of deletions for an archive; returns how many files were deleted.

    ``held`` keeps, across rounds, the rows that could not be deleted
    (permissions, a symlink in the way, a writer) with when to try again,
    so they are reported once, not every round; a row whose file was hashed
    again since (a writer closed it) is tried at once. Raises TransferError
    when the far side cannot be checked (nothing is deleted).
    """
    now = time.time() if now is None else now
    held = {} if held is None else held
    default, shortest = retention_bounds(config, archive)
    if shortest is None:
        return 0
    for row_id in [i for i, (until, _) in held.items() if until <= now]:
        del held[row_id]

    def holding(row: File) -> bool:
        return row.id in held and held[row.id][1] == row.identity

    # Held rows are the oldest, so they come first; looking past a bounded
    # number of them keeps a round's cost to a batch when many are held.
    rows = [r for r in catalog.removals.deletable(archive, now, default, shortest,
                                               limit + min(len(held), HELD_LOOKED_PAST))
            if not holding(r)][:limit]
    rows = _admitted(catalog, Roots(config), rows)
    if not rows:
        return 0
    with _Round(catalog, config, archive, now, held, health) as round_:
        return round_.run(rows, destination, stop)


def _admitted(catalog: Catalog, roots: Roots, rows: list[File]) -> list[File]:
    """The rows whose path lies below their archive's roots; the others are
    marked refused, unopened (one WARNING each: no round reads them again)."""
    refused = []
    for row in rows:
        refusal = roots.refusal(row.archive_name, row.id, row.local_path)
        if refusal is not None:
            log.warning("%s", refusal)
            refused.append(row.id)
    if not refused:
        return rows
    catalog.files.refuse(refused)
    gone = set(refused)
    return [r for r in rows if r.id not in gone]


class _Round:
    """One retention round: the files it opened (below their roots, without
    following links) stay open until it ends, so what is checked is what is
    deleted."""

    def __init__(self, catalog: Catalog, config: Config, archive: str, now: float,
                 held: dict[int, float], health: Health | None):
        self.catalog, self.archive, self.now, self.held, self.health = catalog, archive, now, held, health
        roots = Roots(config)
        # this archive's roots (all archives' for the rows a stopped agent left)
        self.trees = Trees(roots.of(archive) if archive else
                           [r for name in config.archives for r in roots.of(name)])
        self.fds: list[int] = []
        self._progress: Callable[[], object] | None = None  # see run

    def __enter__(self) -> "_Round":
        return self

    def __exit__(self, *exc) -> None:
        for fd in self.fds:
            os.close(fd)
        self.trees.close()

    def _hold(self, row: File, seconds: float, level: int, message: str, kind: str | None = None) -> None:
        """Leave a row for ``seconds``, saying why once (and counting it, for a problem)."""
        if row.id not in self.held:
            if kind and self.health is not None:
                self.health.problem(self.archive, kind, row.local_path, message, level=level)
            else:
                log.log(level, "%s", message)
        self.held[row.id] = (self.now + seconds, row.identity)

    def _open(self, row: File) -> tuple[int, Identity] | str:
        """The row's file opened and found to be what was hashed, with its
        identity; else what it is instead: "gone", "changed" or "held"."""
        try:
            fd = self.trees.of(row.local_path).open(row.local_path)
        except SymlinkInPath as exc:
            self._hold(row, HOLD_UNDELETABLE, logging.WARNING,
                       f"not deleting {row.local_path}: {exc.filename} is a symlink, which is never "
                       "followed; the file stays in the catalog until the path is plain again",
                       kind="symlinks")
            return "held"
        except (FileNotFoundError, NotADirectoryError):
            if missing_for_good(row.local_path, row.dev):
                return "gone"
            self._hold(row, HOLD_UNDELETABLE, logging.WARNING,
                       f"not deleting {row.local_path}: its directory is missing or on another file "
                       "system (a disk not mounted?); it stays in the catalog until it is there again "
                       "(`watcher ignore PATH` if it is gone for good)", kind="unreachable files")
            return "held"
        except (OSError, ValueError) as exc:
            self._hold(row, HOLD_UNDELETABLE, logging.ERROR,
                       f"cannot open {row.local_path} to delete it: {getattr(exc, 'strerror', None) or exc}")
            return "held"
        self.fds.append(fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return "gone"  # a directory or fifo took its name: the file is not here
            identity = self.catalog.trusted_identity(row)
            if identity is None:  # an md5 the agent did not compute (socs, the API, forged): hash it
                md5, st = md5_of_fd(fd, self._progress)
                if md5 != row.local_md5sum:
                    log.warning("%s is not what its catalog row %d says (md5 %s, not %s); it is "
                                "shipped before it may be deleted", row.local_path, row.id, md5,
                                row.local_md5sum)
                    self.catalog.files.update_content(row.id, md5, Identity.of(st))
                    return "changed"
                identity = Identity.of(st)
            elif replaced(identity, st):  # another file has the path: the registrar's to register
                return "gone"
            elif Identity.of(st) != identity:
                self._record_change(row, *md5_of_fd(fd, self._progress))
                return "changed"
        except OSError as exc:  # an I/O error reading it: keep it, say so once
            self._hold(row, HOLD_UNDELETABLE, logging.ERROR,
                       f"cannot read {row.local_path} to delete it: {exc.strerror or exc}")
            return "held"
        return fd, identity

    def _record_change(self, row: File, md5: str, st: os.stat_result) -> None:
        """The file is not what was hashed: record what it is; new content ships again."""
        self.catalog.files.update_content(row.id, md5, Identity.of(st))
        if md5 != row.local_md5sum:
            log.warning("%s changed after it was shipped; it will be shipped again", row.local_path)

    def run(self, rows: list[File], destination: Destination, stop: threading.Event | None) -> int:
        archive = self.archive
        # hashing a round's files may take long: looking at the agent's stop
        # event, per file and per 64 MiB, shows its watchdog we are working
        self._progress = stop.is_set if stop is not None else None
        contested = self.catalog.far_names.contested(archive, [r.remote_path for r in rows])
        gone, candidates = [], []
        for row in rows:
            if self._progress is not None:
                self._progress()
            problem = remote_path_problem(row.remote_path)
            if problem:  # no copy the agent shipped lies there (a writer of the catalog made the row)
                self._hold(row, HOLD_UNDELETABLE, logging.ERROR,
                           f"not deleting {row.local_path}: its far name {archive}:{row.remote_path} {problem}")
                continue
            if row.remote_path in contested:
                self._hold(row, HOLD_UNDELETABLE, logging.ERROR,
                           f"not deleting {row.local_path}: other files of different content are "
                           f"registered under the same far name {archive}:{row.remote_path}")
                continue
            opened = self._open(row)
            if opened == "gone":
                gone.append(row)
            elif not isinstance(opened, str):
                candidates.append((row, *opened))
        far = destination.far_md5([r.remote_path for r, _, _ in candidates], stop,
                                  sum(identity.size for _, _, identity in candidates))
        differs, free = {}, []
        for row, fd, identity in candidates:
            found = far.get(row.remote_path)
            if found != row.local_md5sum:
                differs[row.id] = found
                log.warning("far copy of %s (%s:%s) is %s; shipping it again instead of deleting",
                            row.local_path, archive, row.remote_path,
                            "missing" if found is None else "different")
            elif self._lease(row, fd, release=True):  # nobody writes now; held again to unlink
                free.append((row, fd, identity))
        # The files of these rows are deleted now, and those of ``gone`` were:
        # a file at their path later is another, whose copy must not replace
        # theirs as an edit (Destination.may_be_edit).
        destination.forget([r.id for r, _, _ in free] + [r.id for r in gone])
        deleted, freed, changed = self._delete(free)
        if deleted:
            log.info("%s: deleted %d local file%s (%s) past their retention, their far copies "
                     "checked just before", archive, deleted, "" if deleted == 1 else "s", size_text(freed))
        for row, fd in changed:
            try:
                self._record_change(row, *md5_of_fd(fd, self._progress))
            except OSError as exc:
                log.error("cannot read %s: %s", row.local_path, exc.strerror or exc)
        if gone:
            self.catalog.files.mark_missing([r.id for r in gone])
            for row in gone:
                log.debug("%s was already gone; marked removed", row.local_path)
            log.warning("%s: %d local files past their retention were already gone (deleted by "
                        "someone else), marked removed; %s, for one", archive, len(gone), gone[0].local_path)
        if differs:
            self.catalog.removals.mark_unverified(differs)
        return deleted

    def _lease(self, row: File, fd: int, release: bool = False) -> bool:
        """Hold off writers (a read lease); False (said once) when someone
        writes to the file, or when that cannot be known."""
        writers = hold_against_writers(fd)
        if writers == WriterCheck.WRITING:
            self._hold(row, WRITER_RECHECK, logging.INFO,
                       f"not deleting {row.local_path} yet: a process has it open for writing "
                       "(on NFS, a lease may be refused even so: files there are kept)",
                       kind=WRITERS_ACTIVE)
        elif writers == WriterCheck.UNKNOWN:
            self._hold(row, HOLD_UNDELETABLE, logging.WARNING,
                       f"not deleting {row.local_path}: cannot tell whether a process writes to "
                       "it (a lease needs the file's owner or CAP_LEASE: give the agent "
                       "AmbientCapabilities=CAP_LEASE)", kind=WRITERS_UNKNOWN)
        elif release:
            release_lease(fd)
        return writers == WriterCheck.FREE

    def _delete(self, free: list[tuple[File, int, Identity]]) -> tuple[int, int, list[tuple[File, int]]]:
        """Unlink files nobody writes to that are still what was hashed; the
        rows are marked removed first (catalog.removals.claim), so no new file
        at a path is ever taken for the one deleted. Each file's lease is held
        only while it is checked and unlinked (a writer opening it waits that
        long). Returns how many were deleted, their bytes, and the files found changed."""
        if not free:
            return 0, 0, []
        claimed = self.catalog.removals.claim([row for row, _, _ in free], time.time())
        deleted, kept, changed, freed = [], [], [], 0
        for row, fd, identity in free:
            if row.id not in claimed:
                continue  # changed or removed meanwhile: its row says what to do
            checkpoint("deleting")
            if not self._lease(row, fd):
                kept.append(row.id)
                continue
            try:
                st = os.fstat(fd)
                if st.st_nlink == 0:
                    deleted.append(row.id)  # someone else removed it (or renamed another over it)
                elif Identity.of(st) != identity:  # written to before our lease
                    changed.append((row, fd))
                    kept.append(row.id)
                elif self.trees.of(row.local_path).unlink_if(row.local_path, identity):
                    deleted.append(row.id)
                    freed += identity.size
                    log.debug("deleted %s (verified on %s as %s)", row.local_path, self.archive,
                              row.remote_path)
                else:
                    log.warning("not deleting %s: another file took its name", row.local_path)
                    kept.append(row.id)
            except (FileNotFoundError, NotADirectoryError):
                deleted.append(row.id)  # gone meanwhile: removed all the same
            except OSError as exc:
                kept.append(row.id)
                self._hold(row, HOLD_UNDELETABLE, logging.ERROR,
                           f"cannot delete {row.local_path}: {exc.strerror or exc} "
                           f"(trying again in {HOLD_UNDELETABLE:.0f} s)")
            finally:
                release_lease(fd)
        self.catalog.removals.end(deleted, kept)
        if self.health is not None:
            gone = set(deleted)
            for row, _, _ in free:
                if row.id in gone:
                    for kind in ("symlinks", WRITERS_UNKNOWN, WRITERS_ACTIVE, "unreachable files"):
                        self.health.solved(self.archive, kind, row.local_path)
        return len(deleted), freed, changed


def settle_claimed_removals(catalog: Catalog, config: Config) -> int:
    """Rows an agent claimed for removal before it stopped (catalog.removals.claim):
    a file still there, unchanged, keeps its row (live again); any other was
    deleted. Run at start, before anything registers. Returns rows made live."""
    rows = catalog.removals.claimed()
    if not rows:
        return 0
    roots = Roots(config)
    outside = [r for r in rows if not roots.admits(r.archive_name, r.local_path)]
    if outside:  # a writer of the catalog flagged them: live again, and refused, unopened
        catalog.removals.end([], [r.id for r in outside])
        _admitted(catalog, roots, outside)
        rows = [r for r in rows if roots.admits(r.archive_name, r.local_path)]
    kept, deleted = [], []
    with _Round(catalog, config, "", time.time(), {}, None) as round_:
        for row in rows:
            opened = round_._open(row)
            (kept if isinstance(opened, tuple) else deleted).append(row.id)
    catalog.removals.end(deleted, kept)
    return len(kept)
