"""What retention may delete, and its claims on the rows it deletes.

A row is claimed (marked removed, flagged ``deleting``) before its file is
unlinked, so no moment exists in which a file is gone while its row says
live; an agent killed in between settles its claims at the next start.
"""

from __future__ import annotations

from peewee import SQL, fn

from watcher.catalog.schema import File, Queries, chunks, raw
from watcher.catalog.states import DELETABLE, DELETABLE_BY_RULE


class Removals(Queries):
    """Retention's queries."""

    def deletable(self, archive: str, now: float, default_retention: float | None,
                  min_retention: float, limit: int) -> list[File]:
        """Verified, deletable files of an archive whose retention has passed."""
        return list(self.deletable_query(archive, now, default_retention, min_retention, limit))

    def deletable_query(self, archive: str, now: float, default_retention: float | None,
                        min_retention: float, limit: int):
        # An archive that keeps its files has only the rows some rule expires to walk.
        kept = DELETABLE_BY_RULE if default_retention is None else DELETABLE
        query = (self.File.select()
                 .where(self.File.archive_name == archive)
                 .where(raw(kept))
                 .where(self.File.timestamp <= now - min_retention))
        if default_retention is None:
            query = query.where(self.File.timestamp + self.File.retain <= now)
        else:
            query = query.where(self.File.timestamp + fn.coalesce(self.File.retain, default_retention) <= now)
        return query.order_by(self.File.timestamp).limit(limit)

    def claim(self, rows: list[File], when: float) -> set[int]:
        """Mark removed, before their files are unlinked, the rows still
        verified with the md5 they hold and not removed; return the ids marked.

        Marking first leaves no moment in which a file is gone while its row
        says live: a new file at the same path is then registered as new (and
        never taken for an edit of the one deleted, whose far copy it would
        overwrite). The rows stay flagged ``deleting`` until ``end``
        says which files were unlinked; after a crash in between,
        ``claimed`` lists them for the agent to settle at start.
        """
        marked = set()
        with self.db.atomic("IMMEDIATE"):
            for row in rows:
                cursor = self.db.execute_sql(
                    "UPDATE supersync_v0 SET removed = ?, deleting = 1 WHERE id = ? AND removed IS NULL "
                    "AND local_md5sum = ? AND remote_md5sum = local_md5sum", (when, row.id, row.local_md5sum))
                if cursor.rowcount:
                    marked.add(row.id)
        return marked

    def end(self, deleted: list[int], kept: list[int]) -> None:
        """Rows claimed for removal: their files were unlinked, or kept after
        all: live again, unless another live row took their path meanwhile
        (a new file there was registered): then found gone."""
        with self.db.atomic("IMMEDIATE"):
            for chunk in chunks(deleted):
                self.File.update(deleting=None).where(self.File.id.in_(chunk)).execute()
            for chunk in chunks(kept):
                marks = ", ".join("?" * len(chunk))
                self.db.execute_sql(
                    "UPDATE supersync_v0 SET removed = CASE WHEN EXISTS (SELECT 1 FROM supersync_v0 AS o "
                    "WHERE o.local_path = supersync_v0.local_path AND o.archive_name = supersync_v0.archive_name "
                    "AND o.removed IS NULL AND o.id != supersync_v0.id) THEN 0 ELSE NULL END, deleting = NULL "
                    f"WHERE id IN ({marks})", chunk)

    def claimed(self) -> list[File]:
        """Rows claimed for removal by an agent that stopped before it said how it went."""
        return list(self.File.select().where(SQL("deleting IS NOT NULL")))

    def mark_unverified(self, found: dict[int, str | None]) -> None:
        """The far copy is gone or differs: record what is there, so it ships again."""
        with self.db.atomic("IMMEDIATE"):
            for file_id, md5 in found.items():
                self.File.update(remote_md5sum=md5).where(self.File.id == file_id).execute()
                row = self.File.get_by_id(file_id)
                self.catalog.timecode_dirs.reopen(row.archive_name, row.remote_path)  # it is no longer whole
