"""Who may have which far name.

Two live local files under one far name overwrite each other's copy, and a
far name whose verified copy belongs to a file that is gone holds the only
copy of that content. These rules apply to every row, whoever wrote it
(the agent's registrar, socs' add_file, any writer of the catalog).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from peewee import fn

from watcher.catalog.schema import NewFile, Queries, chunks, from_db_path, to_db_path


class ShippedRow(Protocol):
    """What the far-name rules read of a row about to be shipped."""

    id: int
    local_path: str
    remote_path: str
    local_md5sum: str


class Claims(NamedTuple):
    """Which far names a list of new files may have (FarNames.claims_for_files)."""

    taken: dict[tuple[str, str], str]      # (archive, remote path) -> the local file that keeps it
    versioned: dict[tuple[str, str], str]  # (local path, archive) -> the far name it gets instead

    def keeps(self, f: "NewFile") -> bool:
        """Whether ``f`` may have its far name (possibly as a version)."""
        return self.taken.get((f.archive_name, f.remote_path), f.local_path) == f.local_path

    def apply(self, files: list["NewFile"]) -> list["NewFile"]:
        """The files with their version names."""
        if not self.versioned:
            return files
        return [f._replace(remote_path=self.versioned.get((f.local_path, f.archive_name), f.remote_path))
                for f in files]


class FarNames(Queries):
    """The catalog's far-name queries and the rules that decide between claimants."""

    def claims_for_files(self, files: list[NewFile]) -> Claims:
        """Which far names these files may have.

        Two live local files under one far name overwrite each other's copy,
        and retention could then delete the one whose content is nowhere
        else: the name stays with another file's live row, or else with the
        first of these files to name it (``taken``). A far name whose latest
        verified copy belongs to a file that is gone (deleted by retention,
        or vanished) holds the only copy of that content: a file of other
        content gets ``name.~N~`` instead (N from 2, the first no row has),
        as GNU cp numbers its backups; the same content keeps the name.
        """
        by_archive: dict[str, set[str]] = {}
        for f in files:
            by_archive.setdefault(f.archive_name, set()).add(f.remote_path)
        holders: dict[tuple[str, str], set[str]] = {}  # live local files of each far name
        kept: dict[tuple[str, str], str] = {}  # md5 of the far copy a gone file left
        for archive, remotes in by_archive.items():
            live, gone = self._holders(archive, remotes)
            for remote, rows in live.items():
                holders[(archive, remote)] = {local for _id, local in rows}
            kept.update(((archive, remote), md5) for remote, md5 in gone.items())
        taken: dict[tuple[str, str], str] = {}
        first: dict[tuple[str, str], str] = {}
        versioned: dict[tuple[str, str], str] = {}
        named = {f.remote_path for f in files}
        for f in files:
            key = (f.archive_name, f.remote_path)
            others = holders.get(key, set()) - {f.local_path}
            if others:  # a live row of another file: it keeps the name
                taken.setdefault(key, min(others))
                continue
            owner = first.setdefault(key, f.local_path)  # within the list: the first keeps it
            if owner != f.local_path:
                taken.setdefault(key, owner)
            elif key in kept and kept[key] != f.local_md5sum and not holders.get(key):
                version = self._next_version(f.archive_name, f.remote_path, named)
                named.add(version)
                versioned[(f.local_path, f.archive_name)] = version
        return Claims(taken, versioned)

    def _holders(self, archive: str, remotes) -> tuple[dict[str, list[tuple[int, str]]], dict[str, str]]:
        """Who holds these far names: ({name: [(id, local path)] of live rows,
        oldest first}, {name: md5 of the newest verified copy whose file is gone})."""
        live: dict[str, list[tuple[int, str]]] = {}
        gone: dict[str, str] = {}
        for chunk in chunks([to_db_path(r) for r in remotes]):
            # Plain SQL, as in active_rows: peewee builds a long IN list slowly.
            marks = ", ".join("?" * len(chunk))
            cursor = self.db.execute_sql(
                "SELECT id, remote_path, local_path, removed IS NULL, local_md5sum FROM supersync_v0 "
                f"WHERE archive_name = ? AND remote_path IN ({marks}) "
                "AND (removed IS NULL OR remote_md5sum = local_md5sum) AND refused IS NULL ORDER BY id",
                (archive, *chunk))
            for row_id, remote, local, is_live, md5 in cursor.fetchall():
                if is_live:
                    live.setdefault(from_db_path(remote), []).append((row_id, from_db_path(local)))
                else:
                    gone[from_db_path(remote)] = md5  # the newest verified copy is what lies there
        return live, gone

    def claims_for_rows(self, archive: str, rows: list[ShippedRow]) -> Claims:
        """claims_for_files' rules for rows about to be shipped (PendingRow, or the
        transfer's items: anything with the ShippedRow fields), whoever wrote them (socs' own add_file and
        any writer of the catalog insert rows without the agent's claim):
        ``taken`` maps (archive, name) to the older live row's local file
        that keeps the name, for rows of other files; ``versioned`` maps
        (local path, archive) to the numbered far name a row gets because
        its name holds the only copy of other content. One indexed query
        per batch."""
        named = {row.remote_path for row in rows}
        live, gone = self._holders(archive, named)
        taken: dict[tuple[str, str], str] = {}
        versioned: dict[tuple[str, str], str] = {}
        for row in rows:
            row_id, local, remote, md5 = row.id, row.local_path, row.remote_path, row.local_md5sum
            older = [other for i, other in live.get(remote, ()) if other != local and i < row_id]
            if older:
                taken[(archive, remote)] = older[0]
            elif (remote in gone and gone[remote] != md5
                  and all(other == local for _i, other in live.get(remote, ()))):
                version = self._next_version(archive, remote, named)
                named.add(version)
                versioned[(local, archive)] = version
        return Claims(taken, versioned)

    def rename(self, renames: dict[int, str]) -> None:
        """Give rows the far names ``claims_for_rows`` numbered for them."""
        with self.db.atomic("IMMEDIATE"):
            for row_id, remote in renames.items():
                self.db.execute_sql("UPDATE supersync_v0 SET remote_path = ? WHERE id = ?",
                                    (to_db_path(remote), row_id))

    def _next_version(self, archive: str, remote_path: str, avoid: set[str]) -> str:
        """``remote_path.~N~`` with the smallest N >= 2 that no row of the archive has."""
        stem = f"{remote_path}.~"
        cursor = self.db.execute_sql(
            "SELECT remote_path FROM supersync_v0 WHERE archive_name = ? "
            "AND remote_path >= ? AND remote_path < ?",
            (archive, to_db_path(stem), to_db_path(remote_path + ".\x7f")))
        used = {from_db_path(r) for (r,) in cursor.fetchall()} | avoid
        n = 2
        while f"{stem}{n}~" in used:
            n += 1
        return f"{stem}{n}~"

    def contested(self, archive: str, remote_paths: list[str]) -> set[str]:
        """Far names that live rows of different content share (other writers can insert them).

        Such a far copy proves only one of the local files; retention deletes none of them.
        """
        contested: set[str] = set()
        for chunk in chunks([to_db_path(r) for r in remote_paths]):
            query = (self.File.select(self.File.remote_path)
                     .where(self.File.archive_name == archive, self.File.remote_path.in_(chunk),
                            self.File.removed.is_null(), self.File.refused.is_null())
                     .group_by(self.File.remote_path)
                     .having(fn.COUNT(self.File.local_md5sum.distinct()) > 1))
            contested.update(row.remote_path for row in query)
        return contested
