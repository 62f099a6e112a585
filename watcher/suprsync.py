"""socs' ``SupRsyncFilesManager`` API over the watcher catalog.

Code written for ``socs.db.suprsync`` only changes its import:
``from watcher.db import SupRsyncFilesManager, create_file`` (watcher.db
re-exports this module's names, and ``add_file``). Sessions are
emulated: ``with srfm.Session.begin() as s: s.add_all(files)`` commits the
new rows in one transaction, and rows a method returned for a session are
saved when it commits, as SQLAlchemy would. Unlike socs, no method loads the
whole table to answer, and timecode directories come from the rows
themselves, whoever inserted them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from peewee import SQL, Case, fn

from watcher.catalog import Catalog, File, NewFile
from watcher.finalize import update_timecode_dirs
from watcher.hashing import md5_of

SupRsyncFile = File
_NO_LIMIT = 2 ** 10


def create_file(local_path, remote_path, archive_name, local_md5sum=None,
                timestamp=None, deletable=True) -> File:
    """A new, unsaved catalog row (socs' ``create_file``); hashes the file if no md5 is given."""
    local_path = str(local_path)
    if local_md5sum is None:
        local_md5sum = md5_of(local_path)
    return File(local_path=local_path, remote_path=str(remote_path), archive_name=archive_name,
                local_md5sum=local_md5sum, timestamp=time.time() if timestamp is None else timestamp,
                deletable=True if deletable is None else bool(deletable),
                failed_copy_attempts=0, ignore=False)


class Session:
    """Just enough of a SQLAlchemy session: add, add_all, commit, rollback."""

    def __init__(self, catalog: Catalog):
        self._catalog = catalog
        self._new: list[File] = []
        self._tracked: list[File] = []
        self._with_dir: set[int] = set()  # id() of new files whose timecode dir add_file writes

    def add(self, obj: File) -> None:
        if getattr(obj, "id", None) is None:
            self._new.append(obj)
        else:
            self._tracked.append(obj)

    def add_all(self, objs) -> None:
        for obj in objs:
            self.add(obj)

    def add_with_timecode_dir(self, obj: File) -> None:
        """add, and write the file's timecode directory row with it (socs' add_file)."""
        self.add(obj)
        self._with_dir.add(id(obj))

    def track(self, rows: list) -> list:
        self._tracked.extend(rows)
        return rows

    def commit(self) -> None:
        """Insert the new rows in one transaction, as socs does: a far name
        another file holds is no reason to refuse one (the pysmurf monitor
        would crash); the agent ships it once the name is free."""
        new = []
        for f in self._new:
            # No identity: the producer's md5 is checked by hashing before any deletion.
            new.append(NewFile(f.local_path, f.remote_path, f.archive_name, f.local_md5sum,
                               f.timestamp, f.deletable is not False))
        with self._catalog.db.atomic("IMMEDIATE"):
            rows = self._catalog.add_files(new, refuse_taken=False) if new else []
            for obj, row in zip(self._new, rows):
                obj.id, obj.remote_path = row.id, row.remote_path  # a reused name gets a version
            self._catalog.timecode_dirs.ensure_for(
                [row for obj, row in zip(self._new, rows) if id(obj) in self._with_dir])
            for row in self._tracked:
                dirty = row.dirty_fields
                if dirty:
                    self._catalog.File.update({f: getattr(row, f.name) for f in dirty}).where(
                        self._catalog.File.id == row.id).execute()
        self._new, self._tracked, self._with_dir = [], [], set()

    def rollback(self) -> None:
        self._new, self._tracked, self._with_dir = [], [], set()

    def close(self) -> None:
        self.rollback()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()


class _SessionMaker:
    def __init__(self, catalog: Catalog):
        self._catalog = catalog

    def __call__(self) -> Session:
        return Session(self._catalog)

    def begin(self) -> Session:
        return Session(self._catalog)


class SupRsyncFilesManager:
    """socs' files manager, same constructor and public methods."""

    def __init__(self, db_path, create_all=True, echo=False, pool_size=5, max_overflow=10):
        db_path = os.path.abspath(db_path)
        os.makedirs(os.path.dirname(db_path), exist_ok=True)
        self.catalog = Catalog(db_path)
        self.Session = _SessionMaker(self.catalog)

    def _rows(self, session, rows: list) -> list:
        return session.track(rows) if isinstance(session, Session) else rows

    def add_file(self, local_path, remote_path, archive_name, local_md5sum=None,
                 timestamp=None, session=None, deletable=True) -> File:
        file = create_file(local_path, remote_path, archive_name, local_md5sum, timestamp, deletable)
        if session is None:
            with self.Session.begin() as session:
                session.add_with_timecode_dir(file)
        else:
            session.add_with_timecode_dir(file)
        return file

    def get_copyable_files(self, archive_name, session=None, max_copy_attempts=None, num_files=None):
        limit = num_files if num_files is not None else -1
        attempts = _NO_LIMIT if max_copy_attempts is None else max_copy_attempts  # 0: none, as socs
        return self._rows(session, self.catalog.shipping.pending_files(archive_name, limit, attempts))

    def get_deletable_files(self, archive_name, delete_after, session=None):
        rows = self.catalog.removals.deletable(archive_name, time.time(), delete_after, delete_after, -1)
        return self._rows(session, rows)

    def get_known_files(self, archive_name, session=None, min_ctime=None):
        rows = self.catalog.reports.known_files(archive_name, min_ctime or 0)
        return self._rows(session, rows)

    def get_finalized_until(self, archive_name, session=None) -> float:
        return self.catalog.reports.finalized_until(archive_name, time.time())

    def get_archive_stats(self, archive_name, session=None) -> dict:
        """socs' numbers: 'uncopied' is every unverified, not-ignored row, and
        'last' means the latest registration time (socs walks rows by timestamp)."""
        F = self.catalog.File
        mine = F.archive_name == archive_name
        verified = SQL("(remote_md5sum IS local_md5sum)")
        uncopied = SQL("(remote_md5sum IS NOT local_md5sum)") & (fn.coalesce(F.ignore, 0) == 0)
        counts = (F.select(fn.COUNT(F.id).alias("files"),
                           fn.SUM(Case(None, [(uncopied, 1)], 0)).alias("uncopied"))
                  .where(mine).dicts().get())
        latest = (F.timestamp.desc(), F.id.desc())
        added = F.select(F.local_path).where(mine).order_by(*latest).first()
        copied = F.select(F.local_path).where(mine, verified).order_by(*latest).first()
        return {
            "finalized_until": self.catalog.reports.finalized_until(archive_name, time.time()),
            "num_files": counts["files"],
            "uncopied_files": int(counts["uncopied"] or 0),
            "last_file_added": added.local_path if added else "",
            "last_file_copied": copied.local_path if copied else "",
        }

    def create_all_timecode_dirs(self, archive_name, min_ctime=None) -> None:
        self.catalog.timecode_dirs.derive()

    def update_all_timecode_dirs(self, archive_name, file_root, sync_id) -> None:
        self.catalog.timecode_dirs.derive()
        update_timecode_dirs(self.catalog, archive_name, Path(file_root), sync_id)


def add_file(local_path, remote_path, archive_name, local_md5sum=None, timestamp=None,
             deletable=True, db_path=None) -> File:
    """Register one file in the catalog at ``db_path`` (or $SUPRSYNC_DB)."""
    db_path = db_path or os.environ.get("SUPRSYNC_DB")
    if not db_path:
        raise ValueError("add_file needs db_path= or the SUPRSYNC_DB environment variable")
    catalog = Catalog(db_path)
    try:
        return catalog.add_file(local_path, remote_path, archive_name, local_md5sum,
                                timestamp, deletable)
    finally:
        catalog.close()
