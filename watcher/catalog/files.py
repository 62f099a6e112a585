"""Registering files, and the operator's edits of rows.

The registrar inserts in batches (one transaction, plain SQL) and records a
registered file's new content; the commands retry, ignore and look rows up.
"""

from __future__ import annotations

from typing import Callable

from peewee import fn

from watcher.catalog.far_names import Claims
from watcher.catalog.schema import (
    INSERT_FILE, File, NewFile, Queries, Registered, chunks, from_db_path, raw, to_db_path,
)
from watcher.catalog.states import UNVERIFIED
from watcher.safefs import Identity


def _active_rows_sql(count: int) -> str:
    return ("SELECT id, local_path, archive_name, remote_path, local_md5sum, size, mtime_ns, "
            "dev, ino, ctime_ns, seal "
            f"FROM supersync_v0 WHERE local_path IN ({', '.join('?' * count)}) "
            "AND removed IS NULL ORDER BY id")


class Files(Queries):
    """Registering, updating and looking up file rows."""

    def register(self, files: list[NewFile], vanished: Callable[[str], bool] | None = None,
                 replaced: list[int] = ()) -> Claims:
        """Insert, in one transaction, the files whose far name no other live
        local file has (under a version name where FarNames.claims_for_files gives
        one); return the claims, whose ``taken`` are the files left out.

        Of files sharing one far name within the list, the first is inserted;
        a file listed twice for one archive is inserted once (its first entry).
        The caller (the agent's registrar) has checked the remote paths.
        A live row holding a wanted name whose file ``vanished(path)`` says is
        gone (its directory renamed) is marked removed first, as the transfer
        would mark it, and the name is claimed again. So are the ``replaced``
        rows, whose path now holds another file (another inode) first.
        """
        first: dict[tuple[str, str], NewFile] = {}
        for f in files:
            first.setdefault((f.local_path, f.archive_name), f)
        files = list(first.values())
        with self.db.atomic("IMMEDIATE"):
            for chunk in chunks(list(replaced)):
                self.File.update(removed=0).where(self.File.id.in_(chunk), self.File.removed.is_null()).execute()
            claims = self.catalog.far_names.claims_for_files(files)
            listed = {f.local_path for f in files}
            gone = [(archive, remote, owner) for (archive, remote), owner in claims.taken.items()
                    if vanished is not None and owner not in listed and vanished(owner)]
            if gone:
                self.db.cursor().executemany(
                    "UPDATE supersync_v0 SET removed = 0 WHERE archive_name = ? AND remote_path = ? "
                    "AND local_path = ? AND removed IS NULL",
                    [(a, to_db_path(r), to_db_path(o)) for a, r, o in gone])
                claims = self.catalog.far_names.claims_for_files(files)
            self._insert(claims.apply([f for f in files if claims.keeps(f)]))
        return claims

    def _insert(self, files: list[NewFile]) -> None:
        # Plain SQL, one call for the lot: building each INSERT with peewee,
        # or even running it through execute_sql, cost more than SQLite's work.
        if files:
            self.db.cursor().executemany(INSERT_FILE, map(self.catalog.insert_params, files))

    def active_rows(self, local_paths: list[str]) -> dict[tuple[str, str], Registered]:
        """The newest not-removed row of each path, keyed by (path, archive)."""
        found: dict[tuple[str, str], Registered] = {}
        for chunk in chunks([to_db_path(p) for p in local_paths]):
            # Plain SQL and tuples: peewee builds an IN list of hundreds of
            # paths, and a model object per row, slower than SQLite runs it.
            for row in self.db.execute_sql(_active_rows_sql(len(chunk)), chunk).fetchall():
                row = Registered(row[0], from_db_path(row[1]), row[2], from_db_path(row[3]), *row[4:])
                found[(row.local_path, row.archive_name)] = row
        return found

    def update_content(self, file_id: int, md5: str, identity: Identity) -> bool:
        """A registered file changed (or was touched): record what it is now;
        new content ships again, same content keeps its far copy's proof.

        False, changing nothing, when the row was removed meanwhile (retention
        deleted its file, and this is a new file under the same path: it is
        registered as such, so that it never overwrites the far copy).
        """
        with self.db.atomic("IMMEDIATE"):
            row = self.File.get_by_id(file_id)
            if row.removed is not None:
                return False
            changed = row.local_md5sum != md5
            seal = self.catalog.seal(row.archive_name, row.local_path, row.remote_path, md5, identity)
            (self.File.update(local_md5sum=md5, seal=seal, **identity._asdict(),
                         **({"failed_copy_attempts": 0} if changed else {}))
             .where(self.File.id == file_id).execute())
            if changed:
                self.catalog.timecode_dirs.reopen(row.archive_name, row.remote_path)
            return True

    def mark_missing(self, file_ids: list[int], when: float = 0.0) -> None:
        """Files gone from disk: removed (0 = found already gone, as socs does);
        a row already removed keeps its time."""
        with self.db.atomic("IMMEDIATE"):
            for chunk in chunks(file_ids):
                (self.File.update(removed=when)
                 .where(self.File.id.in_(chunk), self.File.removed.is_null()).execute())

    def refuse(self, file_ids: list[int]) -> int:
        """Mark rows refused (their path is outside their archive's roots): no
        batch or retention round reads them again. Returns how many were marked."""
        count = 0
        with self.db.atomic("IMMEDIATE"):
            for chunk in chunks(list(file_ids)):
                marks = ", ".join("?" * len(chunk))
                count += self.db.execute_sql(
                    f"UPDATE supersync_v0 SET refused = 1 WHERE id IN ({marks}) AND refused IS NULL",
                    chunk).rowcount
        return count

    def readmit(self, admits: Callable[[str, str], bool], chunk: int = 5000) -> int:
        """Refused rows whose path ``admits(archive, path)`` now accepts (a root
        was added) take part again; reads only the refused rows. Returns how many."""
        readmitted, last = 0, 0
        while True:
            rows = self.db.execute_sql(
                "SELECT id, archive_name, local_path FROM supersync_v0 "
                "WHERE refused IS NOT NULL AND id > ? ORDER BY id LIMIT ?", (last, chunk)).fetchall()
            if not rows:
                return readmitted
            last = rows[-1][0]
            ids = [i for i, archive, path in rows if admits(archive, from_db_path(path))]
            if ids:
                with self.db.atomic("IMMEDIATE"):
                    for part in chunks(ids):
                        marks = ", ".join("?" * len(part))
                        readmitted += self.db.execute_sql(
                            f"UPDATE supersync_v0 SET refused = NULL WHERE id IN ({marks})", part).rowcount

    def rows_for_path(self, local_path: str) -> list[File]:
        return list(self.File.select().where(self.File.local_path == to_db_path(local_path)).order_by(self.File.id))

    def retry(self, archive: str, local_paths: list[str] | None = None) -> int:
        """Failed files become pending again (their attempts restart at 0)."""
        with self.db.atomic("IMMEDIATE"):
            query = (self.File.update(failed_copy_attempts=0)
                     .where(self.File.archive_name == archive, raw(UNVERIFIED),
                            fn.coalesce(self.File.failed_copy_attempts, 0) > 0))
            if local_paths is None:
                return query.execute()
            count = 0
            for chunk in chunks([to_db_path(p) for p in local_paths]):
                count += query.where(self.File.local_path.in_(chunk)).execute()
            return count

    def ignore(self, local_paths: list[str]) -> int:
        with self.db.atomic("IMMEDIATE"):
            count = 0
            for chunk in chunks([to_db_path(p) for p in local_paths]):
                count += self.File.update(ignore=True).where(self.File.local_path.in_(chunk)).execute()
            return count

    def known_remote_paths(self, archive: str, remote_paths: list[str]) -> set[str]:
        """Which of these far names rows of an archive have."""
        known: set[str] = set()
        for chunk in chunks([to_db_path(p) for p in remote_paths]):
            for row in self.File.select(self.File.remote_path).where(
                    self.File.archive_name == archive, self.File.remote_path.in_(chunk)):
                known.add(row.remote_path)
        return known

    def known_paths(self, local_paths: list[str]) -> set[str]:
        """Which of these paths have any row (for registering a tree once)."""
        known: set[str] = set()
        for chunk in chunks([to_db_path(p) for p in local_paths]):
            for row in self.File.select(self.File.local_path).where(self.File.local_path.in_(chunk)):
                known.add(row.local_path)
        return known
