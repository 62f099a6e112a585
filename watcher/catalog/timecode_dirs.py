"""Timecode directories: derived from the rows, reopened by late files, finalized.

Rows of ``timecode_dirs_v0`` are derived from every file row, whoever
inserted it, walking only rows newer than a remembered id. A file that
arrives in (or changes in) a finalized directory reopens it, so a newer
finalization file counts it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from peewee import SQL, fn

from watcher.catalog.schema import Queries, TimecodeDir, from_db_path, raw
from watcher.catalog.states import UNVERIFIED
from watcher.paths import is_finalization_file, timecode_of
from watcher.safefs import Identity

log = logging.getLogger(__name__)


class TimecodeDirs(Queries):
    """The timecode-directory queries."""

    def derive(self, chunk: int = 10000) -> int:
        """Create timecode rows for files added since the last call, whoever added them.

        Walks only rows newer than a remembered id. A file registered after a
        directory's finalization file (a late file) reopens the directory, so
        a newer finalization file counting it is written. Returns rows walked.
        """
        walked = 0
        while True:
            with self.db.atomic("IMMEDIATE"):
                last = int(self.catalog.meta_get("tcdir_scanned_id", "0"))
                # Plain SQL and tuples: a burst brings tens of thousands of rows.
                rows = self.db.execute_sql(
                    "SELECT id, archive_name, remote_path FROM supersync_v0 WHERE id > ? "
                    "ORDER BY id LIMIT ?", (last, chunk)).fetchall()
                if not rows:
                    return walked
                # one look-up per directory, not per row: a chunk holds a few directories
                newest: dict[tuple[str, int], int | None] = {}
                for file_id, archive, remote in rows:
                    remote = from_db_path(remote)
                    timecode = timecode_of(remote)
                    # A finalization file makes no directory of its own: an idle
                    # archive would otherwise finalize an empty one every day.
                    if timecode is not None and not is_finalization_file(remote):
                        key = (archive, timecode)
                        newest[key] = max(newest.get(key, 0), file_id)
                for (archive, timecode), late in newest.items():
                    self._ensure(archive, timecode, late)
                self.catalog.meta_set("tcdir_scanned_id", str(rows[-1][0]))
                walked += len(rows)

    def ensure_for(self, rows) -> None:
        """The timecode directory rows of files just inserted, in the caller's
        transaction (socs' add_file writes its file's with it). derive() later
        walks these files too and finds the rows there: never a second one,
        which would break socs' one_or_none."""
        newest: dict[tuple[str, int], int] = {}
        for row in rows:
            timecode = timecode_of(row.remote_path)
            if timecode is not None and not is_finalization_file(row.remote_path):
                key = (row.archive_name, timecode)
                newest[key] = max(newest.get(key, 0), row.id)
        for (archive, timecode), late in newest.items():
            self._ensure(archive, timecode, late)

    def _ensure(self, archive: str, timecode: int, file_id: int | None, force: bool = False) -> None:
        """The directory's row exists; reopen it if ``file_id`` came after its finalization."""
        row = self.TimecodeDir.get_or_none(archive_name=archive, timecode=timecode)
        if row is None:
            self.TimecodeDir.create(archive_name=archive, timecode=timecode,
                                    completed=False, synced=False, finalized=False)
            return
        late = file_id is not None and row.finalize_file_id is not None and file_id > row.finalize_file_id
        if row.finalized and (late or force):
            log.warning("late or changed file in finalized timecode directory %s of %s: "
                        "it will be finalized again", timecode, archive)
            (self.TimecodeDir.update(synced=False, finalized=False)
             .where(self.TimecodeDir.id == row.id).execute())

    def reopen(self, archive: str, remote_path: str) -> None:
        """A file of a finalized directory changed: finalize it again."""
        tc = timecode_of(remote_path)
        if tc is not None and not is_finalization_file(remote_path):
            self._ensure(archive, tc, None, force=True)

    def newest(self, archive: str, until: int) -> int | None:
        """The newest timecode directory of an archive up to ``until`` (now's):
        a future one (a bogus row, a clock ahead) must not hide the real newest."""
        row = (self.TimecodeDir.select(fn.MAX(self.TimecodeDir.timecode).alias("tc"))
               .where(self.TimecodeDir.archive_name == archive, self.TimecodeDir.timecode <= until)
               .dicts().get())
        return row["tc"]

    def open_dirs(self, archive: str) -> list[TimecodeDir]:
        return list(self.TimecodeDir.select()
                    .where(self.TimecodeDir.archive_name == archive,
                           fn.coalesce(self.TimecodeDir.finalized, 0) == 0)
                    .order_by(self.TimecodeDir.timecode))

    def set_flags(self, tcdir_id: int, **flags) -> None:
        self.TimecodeDir.update(**flags).where(self.TimecodeDir.id == tcdir_id).execute()

    def _in_dir(self, archive: str, timecode: int, blob: bool = False):
        """Rows under ``{timecode}/``, as a range of one index. An older watcher
        stored non-UTF-8 names as BLOBs, which sort apart from text: ``blob``
        asks for those (a catalog it could not yet migrate, see Catalog)."""
        lo, hi = f"{timecode}/", f"{timecode}0"  # '0' sorts right after '/'
        rp = self.File.remote_path
        if blob:
            return (self.File.archive_name == archive) & (rp >= SQL("?", [lo.encode()])) & (rp < SQL("?", [hi.encode()]))
        return (self.File.archive_name == archive) & (rp >= lo) & (rp < hi)

    def has_unverified(self, archive: str, timecode: int) -> bool:
        """Whether a not-ignored file of the directory still waits for its copy."""
        return any(self.unverified_query(archive, timecode, blob).exists() for blob in (False, True))

    def unverified_query(self, archive: str, timecode: int, blob: bool = False):
        return (self.File.select(self.File.id)
                .where(self._in_dir(archive, timecode, blob), raw(UNVERIFIED),
                       fn.coalesce(self.File.ignore, 0) == 0, self.File.refused.is_null())
                .limit(1))

    def remote_paths(self, archive: str, timecode: int) -> list[str]:
        """The verified files of a directory, once each (for its finalization file)."""
        paths = []
        for blob in (False, True):
            query = (self.File.select(self.File.remote_path).distinct()
                     .where(self._in_dir(archive, timecode, blob),
                            self.File.remote_md5sum == self.File.local_md5sum,
                            fn.coalesce(self.File.ignore, 0) == 0, self.File.refused.is_null()))
            paths += [r.remote_path for r in query if not is_finalization_file(r.remote_path)]
        return paths

    def finalize(self, tcdir_id: int, local_path: Path, remote_path: str, md5: str, identity: Identity,
                 now: float, num_files: int) -> bool:
        """Register the finalization file (``md5`` and ``identity`` as its writer
        hashed it) and mark the directory, in one transaction.

        Refused (False) when the directory changed since its file was written:
        a row that slipped in would otherwise have an id below the new
        finalization file's and never count as late.
        """
        with self.db.atomic("IMMEDIATE"):
            row = self.TimecodeDir.get_by_id(tcdir_id)
            if row.finalized:
                return False
            if (self.has_unverified(row.archive_name, row.timecode)
                    or len(self.remote_paths(row.archive_name, row.timecode)) != num_files):
                return False
            file = self.File.create(
                local_path=str(local_path), remote_path=remote_path,
                archive_name=row.archive_name, local_md5sum=md5,
                timestamp=now, failed_copy_attempts=0, deletable=True, ignore=False,
                seal=self.catalog.seal(row.archive_name, str(local_path), remote_path, md5, identity),
                **identity._asdict(),
            )
            (self.TimecodeDir.update(completed=True, synced=True, finalized=True, finalize_file_id=file.id)
             .where(self.TimecodeDir.id == tcdir_id).execute())
            return True
