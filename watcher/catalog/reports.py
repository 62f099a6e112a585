"""Counts and listings: `watcher status`, `watcher list`, socs' getters.

Each answer is read from indexes where the agent's own queries are; the
states counted are those of watcher.catalog.states, read from the counts
SQLite keeps (schema.COUNT_KEYS), so a status costs the same at any size.
"""

from __future__ import annotations

from typing import Iterator

from watcher.catalog.schema import ARCHIVE_ROWS, File, Queries, from_db_path, raw
from watcher.catalog.states import ATTEMPTS, PENDING, STATES, VERIFIED


# What `watcher status` counts (states overlap: see watcher.catalog.states),
# each as a condition on a class of the counts table (schema.COUNT_KEYS).
COUNTED = {
    "pending": "is_unshipped = 1 AND attempts < {max}",
    "verified": "is_verified = 1",
    "failed": "is_unshipped = 1 AND attempts >= {max}",
    "removed": "is_removed = 1",
    "ignored": "is_ignored = 1",
    "refused": "is_refused = 1",
}
# Each row's one word (states.ORDER: the first state that holds), on the
# same classes: these add up to the archive's files. removed_verified: the
# removed rows that were verified first (retention's, not files found gone).
BY_STATE = {
    "pending": "is_unshipped = 1 AND attempts < {max}",
    "failed": "is_unshipped = 1 AND attempts >= {max}",
    "verified": "is_removed = 0 AND is_ignored = 0 AND is_refused = 0 AND is_verified = 1",
    "removed": "is_removed = 1",
    "ignored": "is_removed = 0 AND is_ignored = 1",
    "refused": "is_removed = 0 AND is_ignored = 0 AND is_refused = 1",
    "removed_verified": "is_removed = 1 AND is_verified = 1",
}
# The last verified row: walks watcher_verified_copied from its end.
LAST_COPIED_SQL = (f"SELECT copied FROM supersync_v0 WHERE archive_name = ? AND {VERIFIED} "
                   "ORDER BY copied DESC, id DESC LIMIT 1")
LAST_VERIFIED_SQL = (f"SELECT local_path FROM supersync_v0 WHERE archive_name = ? AND {VERIFIED} "
                     "ORDER BY copied DESC, id DESC LIMIT 1")
LAST_VERIFIED_TIME_SQL = (f"SELECT copied FROM supersync_v0 WHERE archive_name = ? AND {VERIFIED} "
                          "ORDER BY copied DESC, id DESC LIMIT 1")
# What holds finalized_until back: the first entry of watcher_pending_v2
# (states.PENDING named verbatim), as finalized_until_query reads it.
HOLDER_SQL = (f"SELECT id, local_path, {ATTEMPTS} FROM supersync_v0 WHERE archive_name = ? AND {PENDING} "
              "ORDER BY timestamp LIMIT 1")


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
        """Counts for `watcher status` and metrics, from the counts table and
        the first entry of an index each: no pass over the archive's rows.

        Only for showing: any writer of the catalog can change the counts.
        Of rows verified at the same time, the last verified is the last added.
        """
        stats = self.counts(archive, max_attempts)
        oldest = self.catalog.shipping.pending(archive, 1, max_attempts)
        stats["oldest_pending_age"] = (now - oldest[0].timestamp) if oldest else None
        stats["finalized_until"] = self.finalized_until(archive, now)
        holder = self.finalized_until_holder(archive)
        # named when a failed file holds it (a pending one is on its way)
        stats["finalized_until_held_by"] = (holder["local_path"] if holder and holder["attempts"] >= max_attempts
                                            else None)
        last = self.last_added_query(archive).first()
        stats["last_file_added"] = last.local_path if last else None
        done = self.db.execute_sql(LAST_VERIFIED_SQL, (archive,)).fetchone()
        stats["last_file_verified"] = from_db_path(done[0]) if done else None
        return stats

    def last_verified_time(self, archive: str) -> float | None:
        """When the archive's newest verified copy was verified (the first
        entry of watcher_verified_copied from its end), or None."""
        row = self.db.execute_sql(LAST_VERIFIED_TIME_SQL, (archive,)).fetchone()
        return row[0] if row else None

    def counts(self, archive: str, max_attempts: int) -> dict[str, int]:
        """files, each state of COUNTED and bytes_pending, summed over the
        archive's classes of rows (a few dozen rows, whatever the table holds)."""
        def where(name):
            return COUNTED[name].format(max=int(max_attempts))
        sums = [f"SUM(CASE WHEN {where(name)} THEN files ELSE 0 END)" for name in COUNTED]
        row = self.db.execute_sql(
            f"SELECT SUM(files), {', '.join(sums)}, SUM(CASE WHEN {where('pending')} THEN bytes ELSE 0 END) "
            "FROM watcher_counts WHERE archive_name = ?", (archive,)).fetchone()
        return dict(zip(("files", *COUNTED, "bytes_pending"), (int(v or 0) for v in row)))

    def last_times(self, archive: str) -> tuple[float | None, float | None]:
        """When the archive's last file was added, and its last verified one
        verified: the ends of the two indexes stats() reads its files from."""
        last = self.last_added_query(archive).first()
        done = self.db.execute_sql(LAST_COPIED_SQL, (archive,)).fetchone()
        return (last.timestamp if last else None), (done[0] if done else None)

    def by_state(self, archive: str, max_attempts: int) -> dict[str, int]:
        """The archive's files by their one word (BY_STATE), read as counts() is."""
        sums = [f"SUM(CASE WHEN {where.format(max=int(max_attempts))} THEN files ELSE 0 END)"
                for where in BY_STATE.values()]
        row = self.db.execute_sql(f"SELECT {', '.join(sums)} FROM watcher_counts WHERE archive_name = ?",
                                  (archive,)).fetchone()
        return dict(zip(BY_STATE, (int(v or 0) for v in row)))

    def last_added_query(self, archive: str):
        """The archive's row of highest id: the first entry of watcher_archive_rows from its end."""
        return (self.File.select().where(self.File.archive_name == archive, raw(ARCHIVE_ROWS))
                .order_by(self.File.id.desc()).limit(1))

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

    def finalized_until_holder(self, archive: str) -> dict | None:
        """The row that holds finalized_until back (the oldest pending or
        failed one: the first entry of the pending index), or None: its id,
        local path and attempts, for `watcher status` to name it."""
        row = self.db.execute_sql(HOLDER_SQL, (archive,)).fetchone()
        return None if row is None else {"id": row[0], "local_path": from_db_path(row[1]), "attempts": row[2]}

    def attempts(self, file_ids: list[int]) -> dict[int, int]:
        """Failed attempts of some rows, by id (a batch's files not verified)."""
        found = {}
        for i in range(0, len(file_ids), 500):
            chunk = file_ids[i:i + 500]
            found.update(self.db.execute_sql(
                f"SELECT id, {ATTEMPTS} FROM supersync_v0 WHERE id IN ({', '.join('?' * len(chunk))})",
                chunk).fetchall())
        return found

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
