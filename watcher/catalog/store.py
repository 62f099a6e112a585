"""One open catalog: the SQLite file, its migration, and its query modules.

A ``Catalog`` holds the connection and the models bound to it; the queries
live in one module per concern, reached as attributes so that each caller
names what it works with:

- ``catalog.files``: registering files and the operator's edits;
- ``catalog.far_names``: who may have which far name;
- ``catalog.shipping``: what the transfer worker ships and what arrived;
- ``catalog.removals``: what retention may delete, and its claims;
- ``catalog.timecode_dirs``: timecode directories and their finalization;
- ``catalog.reports``: counts and listings for the operator and socs.

``add_file``/``add_files`` stay on the catalog itself: they are socs'
producer API. A query module uses another's queries (through the catalog,
so no import shows it) only downward in pyproject.toml's catalog layers:
files and removals reopen timecode directories, reports reads the pending
query.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
import urllib.parse
from pathlib import Path
from typing import Iterable

from peewee import SQL, DatabaseError, OperationalError, SqliteDatabase

from watcher.catalog.far_names import FarNames
from watcher.catalog.files import Files
from watcher.catalog.removals import Removals
from watcher.catalog.reports import Reports
from watcher.catalog.schema import (
    ADDED_COLUMNS, COUNT_TRIGGERS, COUNTS_FILL, COUNTS_TABLE, INDEXES, INSERT_FILE, OBSOLETE_INDEXES, SOCS_DDL,
    STATUS_INDEXES, File, NewFile, bind_models, chunks, from_db_path, identity_columns, identity_of_row,
    insert_params, to_db_path,
)
from watcher.catalog.shipping import Shipping
from watcher.catalog.timecode_dirs import TimecodeDirs
from watcher.hashing import hash_with_identity
from watcher.rules import remote_path_problem
from watcher.safefs import Identity
from watcher.seal import Sealer

log = logging.getLogger(__name__)

# Seconds a write waits for another process's lock before it is retried
# (WATCHER_BUSY_TIMEOUT shortens it for the fault-injection tests).
BUSY_TIMEOUT = float(os.environ.get("WATCHER_BUSY_TIMEOUT") or 10.0)


def create_shared(path: Path) -> None:
    """Make a missing catalog file with mode 0666 less the umask: SQLite
    would make it 0644 less the umask, and socs producers in the catalog
    group (the unit's UMask=0007 gives 0660) could then not write it. Its
    -wal and -shm take its mode. An existing file, or a link, is left alone."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666))
    except FileExistsError:
        pass


class NotACatalog(Exception):
    """A file that cannot be used as a catalog; the message is one line
    naming it and what it is instead."""


def _sqlite_problem(path: Path, exc: DatabaseError) -> NotACatalog:
    text = str(exc)
    if "not a database" in text:
        return NotACatalog(f"{path}: not a catalog (not a SQLite database)")
    if "locked" in text or "busy" in text:
        return NotACatalog(f"{path}: the catalog is locked by another process ({text}); try again")
    if "readonly" in text:  # SQLite must make -wal/-shm beside a WAL catalog to read it
        return NotACatalog(f"{path}: cannot read the catalog: {text} (reading a catalog needs its "
                           "-wal and -shm files, which SQLite makes beside it when no agent runs: "
                           "run this as an account that may write that directory, or while the agent runs)")
    return NotACatalog(f"{path}: cannot read the catalog: {text}")


class Catalog:
    """One SQLite catalog file, safe to share between threads (a connection each)."""

    def __init__(self, path: str | os.PathLike, busy_timeout: float = BUSY_TIMEOUT,
                 sealer: Sealer | None = None, read_only: bool = False):
        """``sealer``: the agent's (watcher.seal); rows it writes with an md5
        it computed are sealed. Without one (socs, the commands) none are.
        ``read_only``: for the commands that only look (`watcher status`):
        SQLite's mode=ro, nothing created or migrated; NotACatalog when the
        file is not a catalog this watcher has opened (an unrelated SQLite
        file stays as it was)."""
        self.path = Path(path)
        self.sealer = sealer
        self.read_only = read_only
        if read_only:
            self.db = SqliteDatabase(
                f"file:{urllib.parse.quote(os.path.abspath(self.path))}?mode=ro", uri=True,
                timeout=busy_timeout, pragmas={"busy_timeout": int(busy_timeout * 1000)},
                check_same_thread=False)
            self.File, self.TimecodeDir = bind_models(self.db)
            self._check_readable()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            create_shared(self.path)
            self.db = SqliteDatabase(
                str(self.path),
                timeout=busy_timeout,
                pragmas={"journal_mode": "wal", "busy_timeout": int(busy_timeout * 1000),
                         "synchronous": "normal"},
                check_same_thread=False,
            )
            # Models of this catalog's own, so two catalogs in one process never mix.
            self.File, self.TimecodeDir = bind_models(self.db)
            self.migrate()
        self.far_names = FarNames(self)
        self.timecode_dirs = TimecodeDirs(self)
        self.files = Files(self)
        self.shipping = Shipping(self)
        self.removals = Removals(self)
        self.reports = Reports(self)
        if not read_only:
            self._blob_paths_to_text()

    def close(self) -> None:
        self.db.close()

    def _check_readable(self) -> None:
        """Raise NotACatalog unless the file holds socs' tables with watcher's
        columns and counts (a socs catalog gets them when the agent, or a
        command that writes, first opens it)."""
        if not self.path.is_file():
            raise NotACatalog(f"{self.path}: no such catalog" if not self.path.exists()
                              else f"{self.path}: not a catalog (not a file)")
        try:
            names = {row[0] for row in self.db.execute_sql("SELECT name FROM sqlite_master")}
            if not {"supersync_v0", "timecode_dirs_v0"} <= names:
                raise NotACatalog(f"{self.path}: not a catalog (a SQLite database without "
                                  "socs' supersync_v0 and timecode_dirs_v0 tables)")
            columns = {c.name for c in self.db.get_columns("supersync_v0")}
            if "watcher_counts" not in names or any(c not in columns for t, c, _ in ADDED_COLUMNS
                                                    if t == "supersync_v0"):
                raise NotACatalog(f"{self.path}: a socs catalog that watcher has not opened yet: "
                                  "start the agent (or `watcher add`) once to add its columns and counts")
        except DatabaseError as exc:
            self.db.close()
            raise _sqlite_problem(self.path, exc) from None
        except NotACatalog:
            self.db.close()
            raise

    @staticmethod
    def refusal(path: str | os.PathLike) -> str | None:
        """Why an existing file must not be opened for writing as a catalog
        (it would be turned into one): a file that is not SQLite, or a SQLite
        database holding other tables and not socs'. None for a catalog, an
        empty file or no file."""
        path = Path(path)
        if not path.exists() or (path.is_file() and path.stat().st_size == 0):
            return None
        if not path.is_file():
            return f"{path}: not a catalog (not a file)"
        try:
            db = sqlite3.connect(f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro", uri=True)
            try:
                names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            finally:
                db.close()
        except sqlite3.DatabaseError as exc:
            return str(_sqlite_problem(path, exc))
        if names and "supersync_v0" not in names:
            return (f"{path}: not a catalog (a SQLite database with other tables: "
                    f"{', '.join(sorted(names)[:5])}); it is left as it is")
        return None

    def migrate(self) -> None:
        """Create socs' tables if missing; add watcher's columns and indexes.

        A catalog that already has them all is only read, so opening one that
        another process holds locked (`watcher status`) does not wait for it.
        """
        if self._migrated():
            return
        with self.db.atomic("IMMEDIATE"):
            for ddl in SOCS_DDL:
                self.db.execute_sql(ddl)
            for table, column, kind in ADDED_COLUMNS:
                have = {c.name for c in self.db.get_columns(table)}
                if column not in have:
                    self.db.execute_sql(f'ALTER TABLE {table} ADD COLUMN "{column}" {kind}')
            for name in OBSOLETE_INDEXES:
                self.db.execute_sql(f"DROP INDEX IF EXISTS {name}")
            for ddl in INDEXES + STATUS_INDEXES:
                self.db.execute_sql(ddl)
            self._count_with_triggers()

    def _triggers(self) -> dict[str, str]:
        return dict(self.db.execute_sql(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND name GLOB 'watcher_counts_*'").fetchall())

    def _count_with_triggers(self) -> None:
        """Make the counting triggers (schema.COUNT_TRIGGERS) unless the catalog
        has them as they are, and count every row once, in the migration's
        transaction: no write falls between the count and the triggers."""
        self.db.execute_sql(COUNTS_TABLE)
        if self._triggers() == COUNT_TRIGGERS:
            return
        for name in self._triggers():
            self.db.execute_sql(f'DROP TRIGGER "{name}"')
        for ddl in COUNT_TRIGGERS.values():
            self.db.execute_sql(ddl)
        for sql in COUNTS_FILL:
            self.db.execute_sql(sql)

    def _blob_paths_to_text(self) -> None:
        """Store as text (to_db_path's) the paths an older watcher stored as
        BLOBs, which socs' code cannot read. SQLite sorts every BLOB after
        all text, so the path indexes find them without reading the table.
        A catalog that cannot be written now keeps them (they are still read)."""
        blob = SQL("?", [b""])
        F = self.File
        found = {r.id for r in F.select(F.id).where(F.local_path >= blob)}
        for archive in self.reports.archive_names():
            found.update(r.id for r in F.select(F.id).where(F.archive_name == archive, F.remote_path >= blob))
        if not found:
            return
        try:
            with self.db.atomic("IMMEDIATE"):
                for chunk in chunks(sorted(found)):
                    rows = self.db.execute_sql(
                        f"SELECT id, local_path, remote_path FROM supersync_v0 WHERE id IN "
                        f"({', '.join('?' * len(chunk))})", chunk).fetchall()
                    self.db.cursor().executemany(
                        "UPDATE supersync_v0 SET local_path = ?, remote_path = ? WHERE id = ?",
                        [(to_db_path(from_db_path(local)), to_db_path(from_db_path(remote)), i)
                         for i, local, remote in rows])
        except OperationalError as exc:
            log.warning("%s: %d rows keep non-UTF-8 paths as BLOBs, which socs cannot read, "
                        "until watcher can write the catalog: %s", self.path, len(found), exc)
            return
        log.info("%s: %d rows now store their non-UTF-8 paths as text", self.path, len(found))

    def meta_get(self, key: str, default: str | None = None) -> str | None:
        """A value of watcher's own table (what the agent remembers across starts)."""
        cursor = self.db.execute_sql("SELECT value FROM watcher_meta WHERE key = ?", (key,))
        row = cursor.fetchone()
        return row[0] if row else default

    def meta_set(self, key: str, value: str) -> None:
        self.db.execute_sql("INSERT OR REPLACE INTO watcher_meta (key, value) VALUES (?, ?)", (key, value))

    def _migrated(self) -> bool:
        names = {row[0] for row in self.db.execute_sql("SELECT name FROM sqlite_master")}
        wanted = ({"supersync_v0", "timecode_dirs_v0", "watcher_counts"}
                  | {ddl.split(" EXISTS ", 1)[1].split()[0] for ddl in INDEXES + STATUS_INDEXES})
        if not wanted <= names or names & set(OBSOLETE_INDEXES) or self._triggers() != COUNT_TRIGGERS:
            return False
        return all(column in {c.name for c in self.db.get_columns(table)}
                   for table, column, _kind in ADDED_COLUMNS)

    def add_file(self, local_path, remote_path, archive_name, local_md5sum=None,
                 timestamp=None, deletable=True) -> File:
        """Register one file (socs' signature); hashes it when no md5 is given.
        Its timecode directory's row is written with it, as socs' add_file does."""
        local_path = os.fspath(local_path)
        identity = None  # an md5 we did not compute is checked by hashing before any deletion
        if local_md5sum is None:
            local_md5sum, identity = hash_with_identity(local_path)
        new = NewFile(local_path, os.fspath(remote_path), archive_name, local_md5sum,
                      time.time() if timestamp is None else timestamp,
                      True if deletable is None else bool(deletable), **identity_columns(identity))
        return self.add_files([new], timecode_dirs=True)[0]

    def add_files(self, files: Iterable[NewFile], *, refuse_taken: bool = True,
                  timecode_dirs: bool = False) -> list[File]:
        """Register many files in one transaction (one commit, not one per file).

        Returns the new rows. Raises ValueError, writing nothing, when a
        remote path could leave its archive or (``refuse_taken``) is another
        live local file's; socs' sessions insert such a row anyway, as socs
        does, and the transfer ships it once the name is free
        (FarNames.claims_for_rows). A far name whose verified copy holds
        other content of a file that is gone is never overwritten: the file
        gets a version name (see FarNames.claims_for_files). ``timecode_dirs``: write
        the files' timecode directory rows in the same transaction. (The
        agent's registrar uses catalog.files.register, which skips refused files instead.)
        """
        files = list(files)
        for f in files:
            problem = remote_path_problem(f.remote_path)
            if problem:
                raise ValueError(f"remote path {f.remote_path!r} of {f.local_path} {problem}")
        with self.db.atomic("IMMEDIATE"):
            claims = self.far_names.claims_for_files(files)
            if claims.taken and refuse_taken:
                (archive, remote), local = next(iter(claims.taken.items()))
                raise ValueError(f"remote path {remote!r} of archive {archive} is already "
                                 f"taken by {local}: one far copy would overwrite the other")
            files = claims.apply(files)
            made = []
            for f in files:
                cursor = self.db.execute_sql(INSERT_FILE, self.insert_params(f))
                made.append(self.File(
                    id=cursor.lastrowid, local_path=f.local_path, remote_path=f.remote_path,
                    archive_name=f.archive_name, local_md5sum=f.local_md5sum,
                    timestamp=f.timestamp, failed_copy_attempts=0,
                    deletable=f.deletable, ignore=False, size=f.size,
                    mtime_ns=f.mtime_ns, retain=f.retain, dev=f.dev, ino=f.ino, ctime_ns=f.ctime_ns,
                ))
            if timecode_dirs:
                self.timecode_dirs.ensure_for(made)
        return made

    def seal(self, archive, local_path, remote_path, md5, identity) -> str | None:
        """The seal of what the agent hashed (None without a sealer, or an identity)."""
        if self.sealer is None:
            return None
        return self.sealer.seal(archive, local_path, remote_path, md5, identity)

    def insert_params(self, f: NewFile) -> tuple:
        """INSERT_FILE's parameters for a new file, sealed if the agent hashed it."""
        return (*insert_params(f), self.seal(f.archive_name, f.local_path, f.remote_path,
                                             f.local_md5sum, identity_of_row(f)))

    def sealed(self, row) -> bool:
        """Whether the agent provably hashed a row's file as its columns say
        (its md5 and identity are then facts, not a writer's claims)."""
        return self.sealer is not None and self.sealer.valid(row)

    def trusted_identity(self, row) -> Identity | None:
        """A row's identity if the agent sealed it, else None: the file is then
        hashed before its md5 is relied on (a writer of the catalog can copy
        any identity from stat)."""
        return identity_of_row(row) if self.sealed(row) else None
