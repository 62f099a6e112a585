"""Delete local files whose retention has passed, and only those that are safe.

A file is deleted only when the catalog says verified, its retention has
passed, its size and modification time are still what was hashed, and the
far copy still has the same md5 when checked just before (one batched
command over the shared connection). A far copy that is gone or differs is
shipped again instead; a local file that changed is hashed again and ships.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from watcher.config import Config
from watcher.db import Catalog, File, md5_of
from watcher.faults import checkpoint
from watcher.rsync import Destination

log = logging.getLogger(__name__)


def retention_bounds(config: Config, archive: str) -> tuple[float | None, float | None]:
    """(the archive's retention, the shortest retention any of its files can have)."""
    default = config.archives[archive].delete_local_after
    overrides = [r.delete_local_after for r in config.rules
                 if r.archive == archive and r.overrides_retention and r.delete_local_after is not None]
    candidates = ([default] if default is not None else []) + overrides
    return default, (min(candidates) if candidates else None)


def _unchanged(row: File) -> bool | None:
    """Whether the local file is still what was hashed; None when it is gone."""
    try:
        st = os.stat(row.local_path)
    except FileNotFoundError:
        return None
    except OSError:
        return False
    if row.size is None or row.mtime_ns is None:  # written by socs: hash it once
        try:
            return md5_of(row.local_path) == row.local_md5sum
        except OSError:
            return False
    return (st.st_size, st.st_mtime_ns) == (row.size, row.mtime_ns)


HOLD_UNDELETABLE = 3600.0  # seconds before a file that could not be deleted is tried again


def delete_expired(catalog: Catalog, config: Config, archive: str, destination: Destination,
                   stop: threading.Event | None = None, now: float | None = None,
                   limit: int = 500, held: dict[int, float] | None = None) -> int:
    """One round of deletions for an archive; returns how many files were deleted.

    ``held`` maps rows that could not be deleted (permissions) to when to try
    again, so they are reported once an hour, not every round.
    Raises TransferError when the far side cannot be checked (nothing is deleted).
    """
    now = time.time() if now is None else now
    held = {} if held is None else held
    default, shortest = retention_bounds(config, archive)
    if shortest is None:
        return 0
    for row_id in [i for i, until in held.items() if until <= now]:
        del held[row_id]
    rows = [r for r in catalog.deletable_batch(archive, now, default, shortest, limit + len(held))
            if r.id not in held][:limit]
    if not rows:
        return 0
    contested = catalog.contested_remote_paths(archive, [r.remote_path for r in rows])
    gone, changed, candidates = [], [], []
    for row in rows:
        if row.remote_path in contested:
            if row.id not in held:
                log.error("not deleting %s: other files of different content are registered under "
                          "the same far name %s:%s", row.local_path, archive, row.remote_path)
            held[row.id] = now + HOLD_UNDELETABLE
            continue
        state = _unchanged(row)
        (gone if state is None else candidates if state else changed).append(row)
    far = destination.far_md5([r.remote_path for r in candidates], stop,
                              sum(r.size or 0 for r in candidates))
    deleted, differs = [], {}
    for row in candidates:
        if far.get(row.remote_path) != row.local_md5sum:
            differs[row.id] = far.get(row.remote_path)
            log.warning("far copy of %s (%s:%s) is %s; shipping it again instead of deleting",
                        row.local_path, archive, row.remote_path,
                        "missing" if far.get(row.remote_path) is None else "different")
            continue
        if _unchanged(row) is not True:  # changed in the meantime: leave it
            changed.append(row)
            continue
        checkpoint("deleting")
        try:
            os.unlink(row.local_path)
        except FileNotFoundError:
            gone.append(row)
            continue
        except OSError as exc:
            log.error("cannot delete %s: %s (trying again in %.0f s)", row.local_path,
                      exc.strerror or exc, HOLD_UNDELETABLE)
            held[row.id] = now + HOLD_UNDELETABLE
            continue
        deleted.append(row.id)
        log.info("deleted %s (verified on %s as %s)", row.local_path, archive, row.remote_path)
    if deleted:
        catalog.mark_removed(deleted, time.time())
    if gone:
        catalog.mark_missing([r.id for r in gone])
        for row in gone:
            log.warning("%s was already gone; marked removed", row.local_path)
    if differs:
        catalog.mark_unverified(differs)
    for row in changed:
        try:
            st = os.stat(row.local_path)
            catalog.update_content(row.id, md5_of(row.local_path), st.st_size, st.st_mtime_ns)
            log.warning("%s changed after it was shipped; it will be shipped again", row.local_path)
        except OSError as exc:
            log.error("cannot read %s: %s", row.local_path, exc.strerror or exc)
    return len(deleted)
