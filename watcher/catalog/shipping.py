"""What the transfer worker ships next, and what it found arrived."""

from __future__ import annotations

from typing import Mapping

from watcher.catalog.schema import File, PendingRow, Queries, from_db_path
from watcher.catalog.states import ATTEMPTS, PENDING

# The worker's query, every cycle: walks the pending index (states.PENDING
# named verbatim), so its cost follows the batch. tests/test_catalog.py plans
# exactly this text; socs' get_copyable_files reads whole rows through it.
_PENDING_WHERE = (f"FROM supersync_v0 WHERE archive_name = ? AND {PENDING} AND {ATTEMPTS} < ? "
                  "ORDER BY timestamp, id LIMIT ?")
PENDING_SQL = f"SELECT id, local_path, remote_path, local_md5sum, size, timestamp {_PENDING_WHERE}"
_RECORD_VERIFIED = ("UPDATE supersync_v0 SET remote_md5sum = ?, copied = ? "
                    "WHERE id = ? AND local_md5sum = ?")
_RECORD_FAILED = ("UPDATE supersync_v0 SET remote_md5sum = ?, "
                  "failed_copy_attempts = coalesce(failed_copy_attempts, 0) + 1 "
                  "WHERE id = ? AND local_md5sum = ?")


class Shipping(Queries):
    """The transfer worker's queries."""

    def pending(self, archive: str, limit: int, max_attempts: int) -> list[PendingRow]:
        """The oldest rows of an archive that still need a verified copy, as
        tuples: a batch is thousands of rows, and a model object each costs."""
        cursor = self.db.execute_sql(PENDING_SQL, (archive, max_attempts, limit))
        return [PendingRow(i, from_db_path(local), from_db_path(remote), md5, size, ts)
                for i, local, remote, md5, size, ts in cursor.fetchall()]

    def pending_files(self, archive: str, limit: int, max_attempts: int) -> list[File]:
        """The same rows as ``pending``, as whole model objects (socs' API)."""
        return list(self.File.raw(f"SELECT * {_PENDING_WHERE}", archive, max_attempts, limit))

    def record(self, results: Mapping[int, tuple[str, str | None]], now: float) -> tuple[int, int]:
        """Store far md5 sums of a batch: ``{id: (md5 sent, md5 found or None)}``.

        A row whose content changed while it travelled (its local md5 is no
        longer the one sent) is left pending and not charged an attempt.
        Returns (verified, failed) counts.
        """
        good = [(found, now, file_id, sent) for file_id, (sent, found) in results.items()
                if found is not None and found == sent]
        bad = [(found, file_id, sent) for file_id, (sent, found) in results.items()
               if found is None or found != sent]
        verified = failed = 0
        with self.db.atomic("IMMEDIATE"):
            # Plain SQL, one call each, as in Files.register: a batch is thousands of rows.
            if good:
                verified = self.db.cursor().executemany(_RECORD_VERIFIED, good).rowcount
            if bad:
                failed = self.db.cursor().executemany(_RECORD_FAILED, bad).rowcount
        return verified, failed
