"""Counts and listings: `watcher status`, `watcher list`, socs' getters.

Each answer is read from indexes where the agent's own queries are; the
states counted are those of watcher.catalog.states.
"""

from __future__ import annotations

from typing import Iterator

from peewee import fn

from watcher.catalog.schema import File, Queries, case, raw
from watcher.catalog.states import PENDING, STATES


# What `watcher status` counts (states overlap: see watcher.catalog.states).
COUNTED = ("pending", "verified", "failed", "removed", "ignored", "refused")


class Reports(Queries):
    """Read-only questions about an archive."""

    def archive_names(self) -> list[str]:
        """Archives with files (walks the remote-path index's distinct prefixes)."""
        names, last = [], None
        while True:
            query = self.File.select(self.File.archive_name).order_by(self.File.archive_name).limit(1)
            if last is not None:
                query = query.where(self.File.archive_name > last)
            row = query.first()
            if row is None:
                return names
            last = row.archive_name
            names.append(last)

    def stats(self, archive: str, max_attempts: int, now: float) -> dict:
        """Counts for `watcher status`: one pass over the archive's rows."""
        def count(name: str, then=1):
            return fn.SUM(case(raw(STATES[name].sql(max_attempts)), then)).alias(name)

        row = (self.File.select(
            fn.COUNT(self.File.id).alias("files"),
            *(count(name) for name in COUNTED),
            fn.SUM(case(raw(STATES["pending"].sql(max_attempts)), fn.coalesce(self.File.size, 0))).alias("bytes_pending"),
        ).where(self.File.archive_name == archive).dicts().get())
        stats = {k: int(v or 0) for k, v in row.items()}
        oldest = self.catalog.shipping.pending(archive, 1, max_attempts)
        stats["oldest_pending_age"] = (now - oldest[0].timestamp) if oldest else None
        stats["finalized_until"] = self.finalized_until(archive, now)
        last = self.File.select().where(self.File.archive_name == archive).order_by(self.File.id.desc()).first()
        stats["last_file_added"] = last.local_path if last else None
        done = (self.File.select().where(self.File.archive_name == archive, self.File.remote_md5sum == self.File.local_md5sum)
                .order_by(self.File.copied.desc(nulls="LAST")).first())
        stats["last_file_verified"] = done.local_path if done else None
        return stats

    def finalized_until(self, archive: str, now: float) -> float:
        """socs' meaning: every not-ignored file registered before this time is verified.

        Unlike socs, a file that is gone for good (removed) no longer holds it back.
        """
        first = self.finalized_until_query(archive).first()
        return first.timestamp - 1 if first else now

    def finalized_until_query(self, archive: str):
        return (self.File.select(self.File.timestamp)
                .where(self.File.archive_name == archive, raw(PENDING))
                .order_by(self.File.timestamp).limit(1))

    def list_files(self, archive: str, state: str | None, max_attempts: int) -> Iterator[File]:
        """An archive's rows in registration order, all or those in one state."""
        query = self.File.select().where(self.File.archive_name == archive)
        if state is not None:
            query = query.where(raw(STATES[state].sql(max_attempts)))
        return query.order_by(self.File.timestamp, self.File.id).iterator()

    def known_files(self, archive: str, min_timestamp: float) -> list[File]:
        """Every row of an archive registered after a time (socs' get_known_files)."""
        return list(self.File.select()
                    .where(self.File.archive_name == archive, self.File.timestamp > min_timestamp)
                    .order_by(self.File.timestamp))
