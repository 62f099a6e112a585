"""The catalog: socs' SupRsync tables, watcher's additive columns, every query.

The tables and columns of ``socs.db.suprsync`` are kept exactly (a fresh
catalog is created with socs' own DDL) so that socs code can keep writing
to the same file. watcher only adds nullable columns, indexes and one table
of its own. A file's state is derived from columns:

- pending:  remote_md5sum IS NOT local_md5sum, not removed, not ignored,
            not refused, attempts below the limit
- verified: remote_md5sum = local_md5sum
- failed:   unverified with attempts exhausted
- removed:  removed IS NOT NULL (0 when it was found already gone)
- refused:  refused IS NOT NULL: its path is outside its archive's roots
            (watcher.roots); never read, shipped or deleted

Every query the agent runs per cycle walks a partial index over the rows
that still need work, so its cost follows the batch, not the table.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

from peewee import (
    SQL, AutoField, BooleanField, Case, CharField, Field, FloatField, IntegerField,
    Model, SqliteDatabase, fn,
)

from watcher.rules import remote_path_problem
from watcher.safefs import Identity
from watcher.seal import Sealer
from watcher.timecode import is_finalization_file, timecode_of

log = logging.getLogger(__name__)

# Seconds a write waits for another process's lock before it is retried
# (WATCHER_BUSY_TIMEOUT shortens it for the fault-injection tests).
BUSY_TIMEOUT = float(os.environ.get("WATCHER_BUSY_TIMEOUT") or 10.0)
_CHUNK = 500  # bound parameters per IN (...) query

SOCS_DDL = (
    """CREATE TABLE IF NOT EXISTS supersync_v0 (
\tid INTEGER NOT NULL, 
\tlocal_path VARCHAR NOT NULL, 
\tlocal_md5sum VARCHAR NOT NULL, 
\tarchive_name VARCHAR NOT NULL, 
\tremote_path VARCHAR NOT NULL, 
\ttimestamp FLOAT NOT NULL, 
\tremote_md5sum VARCHAR, 
\tcopied FLOAT, 
\tremoved FLOAT, 
\tfailed_copy_attempts INTEGER, 
\tdeletable BOOLEAN, 
\t"ignore" BOOLEAN, 
\tPRIMARY KEY (id)
)""",
    """CREATE TABLE IF NOT EXISTS timecode_dirs_v0 (
\tid INTEGER NOT NULL, 
\ttimecode INTEGER NOT NULL, 
\tarchive_name VARCHAR NOT NULL, 
\tcompleted BOOLEAN, 
\tsynced BOOLEAN, 
\tfinalized BOOLEAN, 
\tfinalize_file_id INTEGER, 
\tPRIMARY KEY (id), 
\tFOREIGN KEY(finalize_file_id) REFERENCES supersync_v0 (id)
)""",
)

# (table, column, type): nullable, so socs keeps inserting without them.
ADDED_COLUMNS = (
    ("supersync_v0", "size", "INTEGER"),      # bytes when hashed
    ("supersync_v0", "mtime_ns", "INTEGER"),  # modification time when hashed
    ("supersync_v0", "retain", "FLOAT"),      # a rule's own retention, seconds
    ("supersync_v0", "dev", "INTEGER"),       # with ino and ctime_ns: which file was hashed
    ("supersync_v0", "ino", "INTEGER"),
    ("supersync_v0", "ctime_ns", "INTEGER"),
    ("supersync_v0", "deleting", "INTEGER"),  # 1 while retention unlinks the row's file
    ("supersync_v0", "refused", "INTEGER"),   # 1: its path is outside its archive's roots (watcher.roots)
    ("supersync_v0", "seal", "VARCHAR"),      # the agent's proof that it hashed the file (watcher.seal)
)

# The partial indexes' WHERE clauses are repeated verbatim in the queries
# below: SQLite uses a partial index only when the query names its terms.
UNVERIFIED = "remote_md5sum IS NOT local_md5sum AND removed IS NULL"
# Unverified, not ignored, not refused: what the next batch and finalized_until look at.
PENDING = f'{UNVERIFIED} AND coalesce("ignore", 0) = 0 AND refused IS NULL'
# Verified, still here, deletable, not refused: the only rows retention needs to see.
DELETABLE = ("removed IS NULL AND coalesce(deletable, 1) = 1 AND remote_md5sum = local_md5sum "
             "AND refused IS NULL")
# Those with a rule's own retention, for archives that otherwise keep everything.
DELETABLE_BY_RULE = f"{DELETABLE} AND retain IS NOT NULL"
# (Named anew when their WHERE clause changed: an old catalog keeps the old
# definition under the old name, which migrate() drops.)
INDEXES = (
    f"CREATE INDEX IF NOT EXISTS watcher_pending_v2 ON supersync_v0 (archive_name, timestamp) WHERE {PENDING}",
    f"CREATE INDEX IF NOT EXISTS watcher_deletable_v2 ON supersync_v0 (archive_name, timestamp) WHERE {DELETABLE}",
    f"CREATE INDEX IF NOT EXISTS watcher_deletable_by_rule_v2 ON supersync_v0 (archive_name, timestamp) WHERE {DELETABLE_BY_RULE}",
    "CREATE INDEX IF NOT EXISTS watcher_local_path ON supersync_v0 (local_path)",
    "CREATE INDEX IF NOT EXISTS watcher_remote_path ON supersync_v0 (archive_name, remote_path)",
    # whether a timecode directory still waits for a file: cost follows its unverified files
    f"CREATE INDEX IF NOT EXISTS watcher_unverified_path ON supersync_v0 (archive_name, remote_path) WHERE {UNVERIFIED}",
    "CREATE INDEX IF NOT EXISTS watcher_tcdir ON timecode_dirs_v0 (archive_name, timecode)",
    "CREATE INDEX IF NOT EXISTS watcher_deleting ON supersync_v0 (id) WHERE deleting IS NOT NULL",
    # refused rows, looked at again at start (an added root may admit them)
    "CREATE INDEX IF NOT EXISTS watcher_refused ON supersync_v0 (id) WHERE refused IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS watcher_meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
)
OBSOLETE_INDEXES = ("watcher_pending", "watcher_deletable", "watcher_deletable_by_rule")


def _create_shared(path: Path) -> None:
    """Make a missing catalog file with mode 0666 less the umask: SQLite
    would make it 0644 less the umask, and socs producers in the catalog
    group (the unit's UMask=0007 gives 0660) could then not write it. Its
    -wal and -shm take its mode. An existing file, or a link, is left alone."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666))
    except FileExistsError:
        pass


def to_db_path(path: str | os.PathLike) -> str | bytes:
    """Text for a path that is UTF-8, the raw bytes (a BLOB) for one that is not."""
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def _from_db_path(value):
    return os.fsdecode(value) if isinstance(value, bytes) else value


class PathField(Field):
    """A VARCHAR column that also keeps non-UTF-8 file names byte-exact."""

    field_type = "VARCHAR"

    def db_value(self, value):
        return None if value is None else to_db_path(value)

    def python_value(self, value):
        return os.fsdecode(value) if isinstance(value, bytes) else value


class _Base(Model):
    class Meta:
        legacy_table_names = False


class File(_Base):
    """A row of socs' ``supersync_v0``."""

    id = AutoField()
    local_path = PathField()
    local_md5sum = CharField()
    archive_name = CharField()
    remote_path = PathField()
    timestamp = FloatField()
    remote_md5sum = CharField(null=True)
    copied = FloatField(null=True)
    removed = FloatField(null=True)
    failed_copy_attempts = IntegerField(null=True, default=0)
    deletable = BooleanField(null=True, default=True)
    ignore = BooleanField(null=True, default=False)
    size = IntegerField(null=True)
    mtime_ns = IntegerField(null=True)
    retain = FloatField(null=True)
    dev = IntegerField(null=True)
    ino = IntegerField(null=True)
    ctime_ns = IntegerField(null=True)
    deleting = IntegerField(null=True)
    refused = IntegerField(null=True)
    seal = CharField(null=True)

    class Meta:
        table_name = "supersync_v0"

    @property
    def verified(self) -> bool:
        return self.remote_md5sum is not None and self.remote_md5sum == self.local_md5sum

    @property
    def identity(self) -> Identity | None:
        return identity_of_row(self)


def identity_of_row(row) -> Identity | None:
    """The identity recorded when the row's file was hashed; None for rows
    written by socs (or an older watcher), whose file is then hashed again."""
    found = Identity(row.dev, row.ino, row.size, row.mtime_ns, row.ctime_ns)
    return None if None in found else found


def identity_columns(identity: Identity | None) -> dict:
    """Column values of an identity, for NewFile(...) and updates."""
    if identity is None:
        return {"size": None, "mtime_ns": None, "dev": None, "ino": None, "ctime_ns": None}
    return identity._asdict()


class TimecodeDir(_Base):
    """A row of socs' ``timecode_dirs_v0``."""

    id = AutoField()
    timecode = IntegerField()
    archive_name = CharField()
    completed = BooleanField(null=True, default=False)
    synced = BooleanField(null=True, default=False)
    finalized = BooleanField(null=True, default=False)
    finalize_file_id = IntegerField(null=True)

    class Meta:
        table_name = "timecode_dirs_v0"


def bind_models(db: SqliteDatabase) -> tuple[type[File], type[TimecodeDir]]:
    """Copies of the models bound to one database."""
    bound_file = type("File", (File,), {"Meta": type("Meta", (), {"database": db, "table_name": "supersync_v0"})})
    bound_tc = type("TimecodeDir", (TimecodeDir,), {"Meta": type("Meta", (), {"database": db, "table_name": "timecode_dirs_v0"})})
    return bound_file, bound_tc


_md5_buffers = threading.local()


def md5_of(path: str | os.PathLike) -> str:
    """md5 of a file read in 1 MiB blocks (memory stays flat for any size)."""
    return md5_and_stat(path)[0]


def md5_and_stat(path: str | os.PathLike) -> tuple[str, os.stat_result]:
    """md5 of a file, and its stat taken through the same open file once read
    (so it describes the file that was read, even if the path was replaced).

    Each thread reuses one 1 MiB buffer: allocating it per read cost more
    than hashing a small file (40-80 us against 18 us for 4 KiB). A plain
    descriptor (no file object) and fstat keep a small file at one open,
    two reads, one fstat and one close.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a fifo put there meanwhile: no hang
    try:
        return md5_of_fd(fd)
    finally:
        os.close(fd)


def hash_with_identity(path: str) -> tuple[str, Identity | None]:
    """md5 of a file and its identity, or None for the identity when the file
    changed while it was read (it is then hashed again before any deletion)."""
    before = Identity.of(os.stat(path))
    md5, after = md5_and_stat(path)
    return md5, (before if Identity.of(after) == before else None)


def md5_of_fd(fd: int) -> tuple[str, os.stat_result]:
    """md5 of an open file read from its start, and its fstat once read."""
    buf = getattr(_md5_buffers, "buf", None)
    if buf is None:
        buf = _md5_buffers.buf = bytearray(1 << 20)
    view = memoryview(buf)
    h = hashlib.md5()
    offset = 0
    while n := os.preadv(fd, (buf,), offset):
        h.update(view[:n])
        offset += n
    return h.hexdigest(), os.fstat(fd)


def _chunks(items: list, size: int = _CHUNK) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class NewFile(NamedTuple):
    """A file to register: what ``add_file`` takes, plus what watcher knows.

    A named tuple: a burst builds tens of thousands of them.
    """

    local_path: str
    remote_path: str
    archive_name: str
    local_md5sum: str
    timestamp: float
    deletable: bool = True
    size: int | None = None
    mtime_ns: int | None = None
    retain: float | None = None
    dev: int | None = None
    ino: int | None = None
    ctime_ns: int | None = None


class Claims(NamedTuple):
    """Which far names a list of new files may have (Catalog.claim_remote_paths)."""

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


class Registered(NamedTuple):
    """What the registrar and scans need of a live row."""

    id: int
    local_path: str
    archive_name: str
    remote_path: str
    local_md5sum: str
    size: int | None
    mtime_ns: int | None
    dev: int | None
    ino: int | None
    ctime_ns: int | None
    seal: str | None = None

    @property
    def identity(self) -> Identity | None:
        return identity_of_row(self)


class Catalog:
    """One SQLite catalog file, safe to share between threads (a connection each)."""

    def __init__(self, path: str | os.PathLike, busy_timeout: float = BUSY_TIMEOUT,
                 sealer: Sealer | None = None):
        """``sealer``: the agent's (watcher.seal); rows it writes with an md5
        it computed are sealed. Without one (socs, the commands) none are."""
        self.path = Path(path)
        self.sealer = sealer
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _create_shared(self.path)
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

    def close(self) -> None:
        self.db.close()

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
            for ddl in INDEXES:
                self.db.execute_sql(ddl)

    def _migrated(self) -> bool:
        names = {row[0] for row in self.db.execute_sql("SELECT name FROM sqlite_master")}
        wanted = {"supersync_v0", "timecode_dirs_v0"} | {ddl.split(" EXISTS ", 1)[1].split()[0] for ddl in INDEXES}
        if not wanted <= names or names & set(OBSOLETE_INDEXES):
            return False
        return all(column in {c.name for c in self.db.get_columns(table)}
                   for table, column, _kind in ADDED_COLUMNS)

    # -- registering ------------------------------------------------------

    def add_file(self, local_path, remote_path, archive_name, local_md5sum=None,
                 timestamp=None, deletable=True) -> File:
        """Register one file (socs' signature); hashes it when no md5 is given."""
        local_path = os.fspath(local_path)
        identity = None  # an md5 we did not compute is checked by hashing before any deletion
        if local_md5sum is None:
            local_md5sum, identity = hash_with_identity(local_path)
        new = NewFile(local_path, os.fspath(remote_path), archive_name, local_md5sum,
                      time.time() if timestamp is None else timestamp,
                      True if deletable is None else bool(deletable), **identity_columns(identity))
        return self.add_files([new])[0]

    def add_files(self, files: Iterable[NewFile]) -> list[File]:
        """Register many files in one transaction (one commit, not one per file).

        Returns the new rows. Raises ValueError, writing nothing, when a
        remote path could leave its archive or is another live local file's.
        A far name whose verified copy holds other content of a file that is
        gone is never overwritten: the file gets a version name (see
        claim_remote_paths). (The agent's registrar uses register_files,
        which skips refused files instead.)
        """
        files = list(files)
        for f in files:
            problem = remote_path_problem(f.remote_path)
            if problem:
                raise ValueError(f"remote path {f.remote_path!r} of {f.local_path} {problem}")
        with self.db.atomic("IMMEDIATE"):
            claims = self.claim_remote_paths(files)
            if claims.taken:
                (archive, remote), local = next(iter(claims.taken.items()))
                raise ValueError(f"remote path {remote!r} of archive {archive} is already "
                                 f"taken by {local}: one far copy would overwrite the other")
            files = claims.apply(files)
            made = []
            for f in files:
                cursor = self.db.execute_sql(_INSERT_FILE, self._insert_params(f))
                made.append(self.File(
                    id=cursor.lastrowid, local_path=f.local_path, remote_path=f.remote_path,
                    archive_name=f.archive_name, local_md5sum=f.local_md5sum,
                    timestamp=f.timestamp, failed_copy_attempts=0,
                    deletable=f.deletable, ignore=False, size=f.size,
                    mtime_ns=f.mtime_ns, retain=f.retain, dev=f.dev, ino=f.ino, ctime_ns=f.ctime_ns,
                ))
        return made

    def register_files(self, files: list[NewFile], vanished: Callable[[str], bool] | None = None,
                       replaced: list[int] = ()) -> "Claims":
        """Insert, in one transaction, the files whose far name no other live
        local file has (under a version name where claim_remote_paths gives
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
            for chunk in _chunks(list(replaced)):
                self.File.update(removed=0).where(self.File.id.in_(chunk), self.File.removed.is_null()).execute()
            claims = self.claim_remote_paths(files)
            listed = {f.local_path for f in files}
            gone = [(archive, remote, owner) for (archive, remote), owner in claims.taken.items()
                    if vanished is not None and owner not in listed and vanished(owner)]
            if gone:
                self.db.cursor().executemany(
                    "UPDATE supersync_v0 SET removed = 0 WHERE archive_name = ? AND remote_path = ? "
                    "AND local_path = ? AND removed IS NULL",
                    [(a, to_db_path(r), to_db_path(o)) for a, r, o in gone])
                claims = self.claim_remote_paths(files)
            self._insert(claims.apply([f for f in files if claims.keeps(f)]))
        return claims

    def _insert(self, files: list[NewFile]) -> None:
        # Plain SQL, one call for the lot: building each INSERT with peewee,
        # or even running it through execute_sql, cost more than SQLite's work.
        if files:
            self.db.cursor().executemany(_INSERT_FILE, map(self._insert_params, files))

    def _insert_params(self, f: NewFile) -> tuple:
        return (*_insert_params(f), self._seal(f.archive_name, f.local_path, f.remote_path,
                                               f.local_md5sum, identity_of_row(f)))

    def _seal(self, archive, local_path, remote_path, md5, identity) -> str | None:
        """The seal of what the agent hashed (None without a sealer, or an identity)."""
        if self.sealer is None:
            return None
        return self.sealer.seal(archive, local_path, remote_path, md5, identity)

    def sealed(self, row) -> bool:
        """Whether the agent provably hashed a row's file as its columns say
        (its md5 and identity are then facts, not a writer's claims)."""
        return self.sealer is not None and self.sealer.valid(row)

    def trusted_identity(self, row) -> Identity | None:
        """A row's identity if the agent sealed it, else None: the file is then
        hashed before its md5 is relied on (a writer of the catalog can copy
        any identity from stat)."""
        return identity_of_row(row) if self.sealed(row) else None

    def claim_remote_paths(self, files: list[NewFile]) -> "Claims":
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
            live, gone = self._far_names(archive, remotes)
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

    def _far_names(self, archive: str, remotes) -> tuple[dict[str, list[tuple[int, str]]], dict[str, str]]:
        """Who holds these far names: ({name: [(id, local path)] of live rows,
        oldest first}, {name: md5 of the newest verified copy whose file is gone})."""
        live: dict[str, list[tuple[int, str]]] = {}
        gone: dict[str, str] = {}
        for chunk in _chunks([to_db_path(r) for r in remotes]):
            # Plain SQL, as in active_rows: peewee builds a long IN list slowly.
            marks = ", ".join("?" * len(chunk))
            cursor = self.db.execute_sql(
                "SELECT id, remote_path, local_path, removed IS NULL, local_md5sum FROM supersync_v0 "
                f"WHERE archive_name = ? AND remote_path IN ({marks}) "
                "AND (removed IS NULL OR remote_md5sum = local_md5sum) AND refused IS NULL ORDER BY id",
                (archive, *chunk))
            for row_id, remote, local, is_live, md5 in cursor.fetchall():
                if is_live:
                    live.setdefault(_from_db_path(remote), []).append((row_id, _from_db_path(local)))
                else:
                    gone[_from_db_path(remote)] = md5  # the newest verified copy is what lies there
        return live, gone

    def far_name_claims(self, archive: str, rows: list[tuple[int, str, str, str]]) -> Claims:
        """claim_remote_paths' rules for rows about to be shipped, ``(id, local
        path, remote path, md5)``, whoever wrote them (socs' own add_file and
        any writer of the catalog insert rows without the agent's claim):
        ``taken`` maps (archive, name) to the older live row's local file
        that keeps the name, for rows of other files; ``versioned`` maps
        (local path, archive) to the numbered far name a row gets because
        its name holds the only copy of other content. One indexed query
        per batch."""
        live, gone = self._far_names(archive, {remote for _i, _l, remote, _m in rows})
        taken: dict[tuple[str, str], str] = {}
        versioned: dict[tuple[str, str], str] = {}
        named = {remote for _i, _l, remote, _m in rows}
        for row_id, local, remote, md5 in rows:
            older = [other for i, other in live.get(remote, ()) if other != local and i < row_id]
            if older:
                taken[(archive, remote)] = older[0]
            elif (remote in gone and gone[remote] != md5
                  and all(other == local for _i, other in live.get(remote, ()))):
                version = self._next_version(archive, remote, named)
                named.add(version)
                versioned[(local, archive)] = version
        return Claims(taken, versioned)

    def rename_remote(self, renames: dict[int, str]) -> None:
        """Give rows the far names ``far_name_claims`` numbered for them."""
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
        used = {_from_db_path(r) for (r,) in cursor.fetchall()} | avoid
        n = 2
        while f"{stem}{n}~" in used:
            n += 1
        return f"{stem}{n}~"

    def contested_remote_paths(self, archive: str, remote_paths: list[str]) -> set[str]:
        """Far names that live rows of different content share (other writers can insert them).

        Such a far copy proves only one of the local files; retention deletes none of them.
        """
        contested: set[str] = set()
        for chunk in _chunks([to_db_path(r) for r in remote_paths]):
            query = (self.File.select(self.File.remote_path)
                     .where(self.File.archive_name == archive, self.File.remote_path.in_(chunk),
                            self.File.removed.is_null(), self.File.refused.is_null())
                     .group_by(self.File.remote_path)
                     .having(fn.COUNT(self.File.local_md5sum.distinct()) > 1))
            contested.update(row.remote_path for row in query)
        return contested

    def active_rows(self, local_paths: list[str]) -> dict[tuple[str, str], Registered]:
        """The newest not-removed row of each path, keyed by (path, archive)."""
        found: dict[tuple[str, str], Registered] = {}
        for chunk in _chunks([to_db_path(p) for p in local_paths]):
            # Plain SQL and tuples: peewee builds an IN list of hundreds of
            # paths, and a model object per row, slower than SQLite runs it.
            for row in self.db.execute_sql(_active_rows_sql(len(chunk)), chunk).fetchall():
                row = Registered(row[0], _from_db_path(row[1]), row[2], _from_db_path(row[3]), *row[4:])
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
            seal = self._seal(row.archive_name, row.local_path, row.remote_path, md5, identity)
            (self.File.update(local_md5sum=md5, seal=seal, **identity._asdict(),
                         **({"failed_copy_attempts": 0} if changed else {}))
             .where(self.File.id == file_id).execute())
            if changed:
                self.reopen_timecode_dir(row.archive_name, row.remote_path)
            return True

    def mark_missing(self, file_ids: list[int], when: float = 0.0) -> None:
        """Files gone from disk: removed (0 = found already gone, as socs does);
        a row already removed keeps its time."""
        with self.db.atomic("IMMEDIATE"):
            for chunk in _chunks(file_ids):
                (self.File.update(removed=when)
                 .where(self.File.id.in_(chunk), self.File.removed.is_null()).execute())

    # -- shipping ---------------------------------------------------------

    def pending_batch(self, archive: str, limit: int, max_attempts: int) -> list[File]:
        """The oldest files of an archive that still need a verified copy."""
        return list(self._pending_query(archive, limit, max_attempts))

    def pending_rows(self, archive: str, limit: int, max_attempts: int) -> list[tuple]:
        """pending_batch as (id, local_path, remote_path, local_md5sum, size) tuples:
        the transfer worker's query, without building a model object per row."""
        cursor = self.db.execute_sql(
            "SELECT id, local_path, remote_path, local_md5sum, size FROM supersync_v0 "
            f"WHERE archive_name = ? AND {PENDING} AND coalesce(failed_copy_attempts, 0) < ? "
            "ORDER BY timestamp, id LIMIT ?", (archive, max_attempts, limit))
        return [(i, _from_db_path(local), _from_db_path(remote), md5, size)
                for i, local, remote, md5, size in cursor.fetchall()]

    def refuse(self, file_ids: list[int]) -> int:
        """Mark rows refused (their path is outside their archive's roots): no
        batch or retention round reads them again. Returns how many were marked."""
        count = 0
        with self.db.atomic("IMMEDIATE"):
            for chunk in _chunks(list(file_ids)):
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
            ids = [i for i, archive, path in rows if admits(archive, _from_db_path(path))]
            if ids:
                with self.db.atomic("IMMEDIATE"):
                    for part in _chunks(ids):
                        marks = ", ".join("?" * len(part))
                        readmitted += self.db.execute_sql(
                            f"UPDATE supersync_v0 SET refused = NULL WHERE id IN ({marks})", part).rowcount

    def _pending_query(self, archive: str, limit: int, max_attempts: int):
        return (self.File.select()
                .where(self.File.archive_name == archive)
                .where(_raw(PENDING))
                .where(fn.coalesce(self.File.failed_copy_attempts, 0) < max_attempts)
                .order_by(self.File.timestamp, self.File.id)
                .limit(limit))

    def record_transfer(self, results: dict[int, tuple[str, str | None]], now: float) -> tuple[int, int]:
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
            # Plain SQL, one call each, as in _insert: a batch is thousands of rows.
            if good:
                verified = self.db.cursor().executemany(_RECORD_VERIFIED, good).rowcount
            if bad:
                failed = self.db.cursor().executemany(_RECORD_FAILED, bad).rowcount
        return verified, failed

    # -- retention --------------------------------------------------------

    def deletable_batch(self, archive: str, now: float, default_retention: float | None,
                        min_retention: float, limit: int) -> list[File]:
        """Verified, deletable files of an archive whose retention has passed."""
        return list(self._deletable_query(archive, now, default_retention, min_retention, limit))

    def _deletable_query(self, archive: str, now: float, default_retention: float | None,
                         min_retention: float, limit: int):
        # An archive that keeps its files has only the rows some rule expires to walk.
        kept = DELETABLE_BY_RULE if default_retention is None else DELETABLE
        query = (self.File.select()
                 .where(self.File.archive_name == archive)
                 .where(_raw(kept))
                 .where(self.File.timestamp <= now - min_retention))
        if default_retention is None:
            query = query.where(self.File.timestamp + self.File.retain <= now)
        else:
            query = query.where(self.File.timestamp + fn.coalesce(self.File.retain, default_retention) <= now)
        return query.order_by(self.File.timestamp).limit(limit)

    def known_files(self, archive: str, min_timestamp: float) -> list[File]:
        """Every row of an archive registered after a time (socs' get_known_files)."""
        return list(self.File.select()
                    .where(self.File.archive_name == archive, self.File.timestamp > min_timestamp)
                    .order_by(self.File.timestamp))

    def claim_removal(self, rows: list[tuple[int, str]], when: float) -> set[int]:
        """Mark removed, before their files are unlinked, the rows ``(id, md5)``
        still verified with that md5 and not removed; return the ids marked.

        Marking first leaves no moment in which a file is gone while its row
        says live: a new file at the same path is then registered as new (and
        never taken for an edit of the one deleted, whose far copy it would
        overwrite). The rows stay flagged ``deleting`` until ``end_removal``
        says which files were unlinked; after a crash in between,
        ``claimed_removals`` lists them for the agent to settle at start.
        """
        marked = set()
        with self.db.atomic("IMMEDIATE"):
            for file_id, md5 in rows:
                cursor = self.db.execute_sql(
                    "UPDATE supersync_v0 SET removed = ?, deleting = 1 WHERE id = ? AND removed IS NULL "
                    "AND local_md5sum = ? AND remote_md5sum = local_md5sum", (when, file_id, md5))
                if cursor.rowcount:
                    marked.add(file_id)
        return marked

    def end_removal(self, deleted: list[int], kept: list[int]) -> None:
        """Rows claimed for removal: their files were unlinked, or kept after
        all: live again, unless another live row took their path meanwhile
        (a new file there was registered): then found gone."""
        with self.db.atomic("IMMEDIATE"):
            for chunk in _chunks(deleted):
                self.File.update(deleting=None).where(self.File.id.in_(chunk)).execute()
            for chunk in _chunks(kept):
                marks = ", ".join("?" * len(chunk))
                self.db.execute_sql(
                    "UPDATE supersync_v0 SET removed = CASE WHEN EXISTS (SELECT 1 FROM supersync_v0 AS o "
                    "WHERE o.local_path = supersync_v0.local_path AND o.archive_name = supersync_v0.archive_name "
                    "AND o.removed IS NULL AND o.id != supersync_v0.id) THEN 0 ELSE NULL END, deleting = NULL "
                    f"WHERE id IN ({marks})", chunk)

    def claimed_removals(self) -> list[File]:
        """Rows claimed for removal by an agent that stopped before it said how it went."""
        return list(self.File.select().where(SQL("deleting IS NOT NULL")))

    def mark_unverified(self, found: dict[int, str | None]) -> None:
        """The far copy is gone or differs: record what is there, so it ships again."""
        with self.db.atomic("IMMEDIATE"):
            for file_id, md5 in found.items():
                self.File.update(remote_md5sum=md5).where(self.File.id == file_id).execute()
                row = self.File.get_by_id(file_id)
                self.reopen_timecode_dir(row.archive_name, row.remote_path)  # it is no longer whole

    # -- operator commands ------------------------------------------------

    def rows_for_path(self, local_path: str) -> list[File]:
        return list(self.File.select().where(self.File.local_path == to_db_path(local_path)).order_by(self.File.id))

    def list_files(self, archive: str, state: str | None, max_attempts: int) -> Iterator[File]:
        query = self.File.select().where(self.File.archive_name == archive)
        if state == "refused":
            query = query.where(self.File.refused.is_null(False))
        elif state in ("failed", "pending"):
            query = query.where(_raw(UNVERIFIED), fn.coalesce(self.File.ignore, 0) == 0,
                                self.File.refused.is_null())
            attempts = fn.coalesce(self.File.failed_copy_attempts, 0)
            query = query.where(attempts >= max_attempts if state == "failed" else attempts < max_attempts)
        return query.order_by(self.File.timestamp, self.File.id).iterator()

    def retry(self, archive: str, local_paths: list[str] | None = None) -> int:
        """Failed files become pending again (their attempts restart at 0)."""
        with self.db.atomic("IMMEDIATE"):
            query = (self.File.update(failed_copy_attempts=0)
                     .where(self.File.archive_name == archive, _raw(UNVERIFIED),
                            fn.coalesce(self.File.failed_copy_attempts, 0) > 0))
            if local_paths is None:
                return query.execute()
            count = 0
            for chunk in _chunks([to_db_path(p) for p in local_paths]):
                count += query.where(self.File.local_path.in_(chunk)).execute()
            return count

    def ignore(self, local_paths: list[str]) -> int:
        with self.db.atomic("IMMEDIATE"):
            count = 0
            for chunk in _chunks([to_db_path(p) for p in local_paths]):
                count += self.File.update(ignore=True).where(self.File.local_path.in_(chunk)).execute()
            return count

    def known_remote_paths(self, archive: str, remote_paths: list[str]) -> set[str]:
        """Which of these far names rows of an archive have."""
        known: set[str] = set()
        for chunk in _chunks([to_db_path(p) for p in remote_paths]):
            for row in self.File.select(self.File.remote_path).where(
                    self.File.archive_name == archive, self.File.remote_path.in_(chunk)):
                known.add(row.remote_path)
        return known

    def known_paths(self, local_paths: list[str]) -> set[str]:
        """Which of these paths have any row (for registering a tree once)."""
        known: set[str] = set()
        for chunk in _chunks([to_db_path(p) for p in local_paths]):
            for row in self.File.select(self.File.local_path).where(self.File.local_path.in_(chunk)):
                known.add(row.local_path)
        return known

    # -- status -------------------------------------------------------------

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
        attempts = fn.coalesce(self.File.failed_copy_attempts, 0)
        unverified = _raw(UNVERIFIED)
        live = (fn.coalesce(self.File.ignore, 0) == 0) & self.File.refused.is_null()

        def case(cond, then=1):
            return fn.SUM(_case(cond, then))

        row = (self.File.select(
            fn.COUNT(self.File.id).alias("files"),
            case(unverified & live & (attempts < max_attempts)).alias("pending"),
            case(self.File.remote_md5sum == self.File.local_md5sum).alias("verified"),
            case(unverified & live & (attempts >= max_attempts)).alias("failed"),
            case(self.File.removed.is_null(False)).alias("removed"),
            case(fn.coalesce(self.File.ignore, 0) != 0).alias("ignored"),
            case(self.File.refused.is_null(False)).alias("refused"),
            case(unverified & live & (attempts < max_attempts), fn.coalesce(self.File.size, 0)).alias("bytes_pending"),
        ).where(self.File.archive_name == archive).dicts().get())
        stats = {k: int(v or 0) for k, v in row.items()}
        oldest = self.pending_batch(archive, 1, max_attempts)
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
        first = self._finalized_until_query(archive).first()
        return first.timestamp - 1 if first else now

    def _finalized_until_query(self, archive: str):
        return (self.File.select(self.File.timestamp)
                .where(self.File.archive_name == archive, _raw(PENDING))
                .order_by(self.File.timestamp).limit(1))

    # -- timecode directories ------------------------------------------------

    def _meta_get(self, key: str, default: str | None = None) -> str | None:
        cursor = self.db.execute_sql("SELECT value FROM watcher_meta WHERE key = ?", (key,))
        row = cursor.fetchone()
        return row[0] if row else default

    def _meta_set(self, key: str, value: str) -> None:
        self.db.execute_sql("INSERT OR REPLACE INTO watcher_meta (key, value) VALUES (?, ?)", (key, value))

    def derive_timecode_dirs(self, chunk: int = 10000) -> int:
        """Create timecode rows for files added since the last call, whoever added them.

        Walks only rows newer than a remembered id. A file registered after a
        directory's finalization file (a late file) reopens the directory, so
        a newer finalization file counting it is written. Returns rows walked.
        """
        walked = 0
        while True:
            with self.db.atomic("IMMEDIATE"):
                last = int(self._meta_get("tcdir_scanned_id", "0"))
                # Plain SQL and tuples: a burst brings tens of thousands of rows.
                rows = self.db.execute_sql(
                    "SELECT id, archive_name, remote_path FROM supersync_v0 WHERE id > ? "
                    "ORDER BY id LIMIT ?", (last, chunk)).fetchall()
                if not rows:
                    return walked
                # one look-up per directory, not per row: a chunk holds a few directories
                newest: dict[tuple[str, int], int | None] = {}
                for file_id, archive, remote in rows:
                    remote = _from_db_path(remote)
                    timecode = timecode_of(remote)
                    # A finalization file makes no directory of its own: an idle
                    # archive would otherwise finalize an empty one every day.
                    if timecode is not None and not is_finalization_file(remote):
                        key = (archive, timecode)
                        newest[key] = max(newest.get(key, 0), file_id)
                for (archive, timecode), late in newest.items():
                    self._ensure_tcdir(archive, timecode, late)
                self._meta_set("tcdir_scanned_id", str(rows[-1][0]))
                walked += len(rows)

    def _ensure_tcdir(self, archive: str, timecode: int, file_id: int | None, force: bool = False) -> None:
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

    def reopen_timecode_dir(self, archive: str, remote_path: str) -> None:
        """A file of a finalized directory changed: finalize it again."""
        tc = timecode_of(remote_path)
        if tc is not None and not is_finalization_file(remote_path):
            self._ensure_tcdir(archive, tc, None, force=True)

    def newest_timecode(self, archive: str, until: int) -> int | None:
        """The newest timecode directory of an archive up to ``until`` (now's):
        a future one (a bogus row, a clock ahead) must not hide the real newest."""
        row = (self.TimecodeDir.select(fn.MAX(self.TimecodeDir.timecode).alias("tc"))
               .where(self.TimecodeDir.archive_name == archive, self.TimecodeDir.timecode <= until)
               .dicts().get())
        return row["tc"]

    def open_timecode_dirs(self, archive: str) -> list[TimecodeDir]:
        return list(self.TimecodeDir.select()
                    .where(self.TimecodeDir.archive_name == archive,
                           fn.coalesce(self.TimecodeDir.finalized, 0) == 0)
                    .order_by(self.TimecodeDir.timecode))

    def set_tcdir_flags(self, tcdir_id: int, **flags) -> None:
        self.TimecodeDir.update(**flags).where(self.TimecodeDir.id == tcdir_id).execute()

    def _in_tcdir(self, archive: str, timecode: int, blob: bool = False):
        """Rows under ``{timecode}/``, as a range of one index. Non-UTF-8 names
        are stored as BLOBs, which sort apart from text: ``blob`` asks for those."""
        lo, hi = f"{timecode}/", f"{timecode}0"  # '0' sorts right after '/'
        rp = self.File.remote_path
        if blob:
            return (self.File.archive_name == archive) & (rp >= SQL("?", [lo.encode()])) & (rp < SQL("?", [hi.encode()]))
        return (self.File.archive_name == archive) & (rp >= lo) & (rp < hi)

    def timecode_dir_has_unverified(self, archive: str, timecode: int) -> bool:
        """Whether a not-ignored file of the directory still waits for its copy."""
        return any(self._tcdir_unverified_query(archive, timecode, blob).exists() for blob in (False, True))

    def _tcdir_unverified_query(self, archive: str, timecode: int, blob: bool = False):
        return (self.File.select(self.File.id)
                .where(self._in_tcdir(archive, timecode, blob), _raw(UNVERIFIED),
                       fn.coalesce(self.File.ignore, 0) == 0, self.File.refused.is_null())
                .limit(1))

    def timecode_dir_remote_paths(self, archive: str, timecode: int) -> list[str]:
        """The verified files of a directory, once each (for its finalization file)."""
        paths = []
        for blob in (False, True):
            query = (self.File.select(self.File.remote_path).distinct()
                     .where(self._in_tcdir(archive, timecode, blob),
                            self.File.remote_md5sum == self.File.local_md5sum,
                            fn.coalesce(self.File.ignore, 0) == 0, self.File.refused.is_null()))
            paths += [r.remote_path for r in query if not is_finalization_file(r.remote_path)]
        return paths

    def finalize_timecode_dir(self, tcdir_id: int, local_path: Path, remote_path: str, now: float,
                              num_files: int) -> bool:
        """Register the finalization file and mark the directory, in one transaction.

        Refused (False) when the directory changed since its file was written:
        a row that slipped in would otherwise have an id below the new
        finalization file's and never count as late.
        """
        with self.db.atomic("IMMEDIATE"):
            row = self.TimecodeDir.get_by_id(tcdir_id)
            if row.finalized:
                return False
            if (self.timecode_dir_has_unverified(row.archive_name, row.timecode)
                    or len(self.timecode_dir_remote_paths(row.archive_name, row.timecode)) != num_files):
                return False
            md5, st = md5_and_stat(local_path)
            file = self.File.create(
                local_path=str(local_path), remote_path=remote_path,
                archive_name=row.archive_name, local_md5sum=md5,
                timestamp=now, failed_copy_attempts=0, deletable=True, ignore=False,
                seal=self._seal(row.archive_name, str(local_path), remote_path, md5, Identity.of(st)),
                **Identity.of(st)._asdict(),
            )
            (self.TimecodeDir.update(completed=True, synced=True, finalized=True, finalize_file_id=file.id)
             .where(self.TimecodeDir.id == tcdir_id).execute())
            return True


def _active_rows_sql(count: int) -> str:
    return ("SELECT id, local_path, archive_name, remote_path, local_md5sum, size, mtime_ns, "
            "dev, ino, ctime_ns, seal "
            f"FROM supersync_v0 WHERE local_path IN ({', '.join('?' * count)}) "
            "AND removed IS NULL ORDER BY id")


def _insert_params(f: NewFile) -> tuple:
    return (to_db_path(f.local_path), to_db_path(f.remote_path), f.archive_name, f.local_md5sum,
            f.timestamp, bool(f.deletable), f.size, f.mtime_ns, f.retain, f.dev, f.ino, f.ctime_ns)


_INSERT_FILE = (
    'INSERT INTO supersync_v0 (local_path, remote_path, archive_name, local_md5sum, "timestamp", '
    'failed_copy_attempts, deletable, "ignore", size, mtime_ns, retain, dev, ino, ctime_ns, seal) '
    "VALUES (?, ?, ?, ?, ?, 0, ?, 0, ?, ?, ?, ?, ?, ?, ?)")
_RECORD_VERIFIED = ("UPDATE supersync_v0 SET remote_md5sum = ?, copied = ? "
                    "WHERE id = ? AND local_md5sum = ?")
_RECORD_FAILED = ("UPDATE supersync_v0 SET remote_md5sum = ?, "
                  "failed_copy_attempts = coalesce(failed_copy_attempts, 0) + 1 "
                  "WHERE id = ? AND local_md5sum = ?")


def _raw(sql: str):
    return SQL(f"({sql})")


def _case(cond, then):
    return Case(None, [(cond, then)], 0)


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


# socs' API, importable from here as socs code imports it from socs.db.suprsync.
from watcher.compat import SupRsyncFile, SupRsyncFilesManager, create_file  # noqa: E402,F401
