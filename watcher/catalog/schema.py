"""The catalog's tables, columns, indexes and row types.

The tables and columns of ``socs.db.suprsync`` are kept exactly (a fresh
catalog is created with socs' own DDL) so that socs code can keep writing
to the same file. watcher only adds nullable columns, indexes, two tables
of its own (watcher_meta, watcher_counts) and the triggers that count.
Every query the agent runs per cycle walks a partial index over the rows
that still need work, so its cost follows the batch, not the table.
"""

from __future__ import annotations

import os
import re
from typing import Iterator, NamedTuple

from peewee import (
    SQL, AutoField, BooleanField, Case, CharField, Field, FloatField, IntegerField, Model, SqliteDatabase,
)

from watcher.catalog.states import (
    ATTEMPTS, DELETABLE, DELETABLE_BY_RULE, PENDING, STATES, UNVERIFIED, VERIFIED, is_verified, state_of,
)
from watcher.safefs import Identity

CHUNK = 500  # bound parameters per IN (...) query

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

# Indexes `watcher status` walks for its latest rows (Reports.stats).
# Every row has an md5 (socs: NOT NULL): ARCHIVE_ROWS holds for all, but
# only a query that names it walks watcher_archive_rows. Without ANALYZE,
# SQLite would walk a plain (archive_name) index, rather than sort, for
# every `archive_name = ? ... ORDER BY id` query, such as far-name lookups.
ARCHIVE_ROWS = "local_md5sum IS NOT NULL"
STATUS_INDEXES = (
    # an archive's rows by id (an index's entries end with the rowid): the last one added
    f"CREATE INDEX IF NOT EXISTS watcher_archive_rows ON supersync_v0 (archive_name) WHERE {ARCHIVE_ROWS}",
    # verified rows by copy time: the last one verified
    f"CREATE INDEX IF NOT EXISTS watcher_verified_copied ON supersync_v0 (archive_name, copied) WHERE {VERIFIED}",
)


# -- counts kept by SQLite: `watcher status` and metrics in O(1) -------------------
#
# socs and its producers write the catalog too, so the counts are kept by
# triggers on supersync_v0, whoever writes it: files and bytes per class of
# rows, a class being the archive and the value of each key below for a row.
# The keys are states.py's definitions, verbatim: every counted state is a
# condition on them (Reports.stats), pending and failed for any attempt limit.
# Nothing but the numbers shown to operators may rest on these counts: any
# writer of the catalog can change them, and a REPLACE of an existing row is
# not seen (SQLite fires no delete trigger for it; nobody writes one).
COUNT_KEYS = {
    "is_verified": STATES["verified"].where,
    "is_removed": STATES["removed"].where,
    "is_ignored": STATES["ignored"].where,
    "is_refused": STATES["refused"].where,
    "is_unshipped": PENDING,  # pending or failed: the attempts say which
}
# The columns the keys read: a trigger copies them from NEW or OLD.
COUNTED_COLUMNS = ("archive_name", "local_md5sum", "remote_md5sum", "removed", "ignore", "refused",
                   "failed_copy_attempts", "size")

# attempts has no type, so a value keeps its type and compares as ATTEMPTS
# does; rowid table, plain INSERT and no UPSERT: any SQLite that reads the
# partial indexes (3.8) runs the triggers.
COUNTS_TABLE = f"""CREATE TABLE IF NOT EXISTS watcher_counts (
    archive_name VARCHAR NOT NULL, {", ".join(f"{k} INTEGER NOT NULL" for k in COUNT_KEYS)}, attempts NOT NULL,
    files INTEGER NOT NULL, bytes INTEGER NOT NULL,
    UNIQUE (archive_name, {", ".join(COUNT_KEYS)}, attempts))"""
_KEY_NAMES = ("archive_name", *COUNT_KEYS, "attempts")


def _keys_of(source: str) -> str:
    """A SELECT of the class of each row of ``source`` (the migration's count)."""
    flags = ", ".join(f"CASE WHEN ({where}) THEN 1 ELSE 0 END AS {key}" for key, where in COUNT_KEYS.items())
    return f"SELECT archive_name, {flags}, {ATTEMPTS} AS attempts, coalesce(size, 0) AS size FROM {source}"


_COLUMN = re.compile(r'"?\b(' + "|".join(COUNTED_COLUMNS) + r')\b"?')


def _class_of(ref: str) -> dict[str, str]:
    """The class of a trigger's NEW or OLD row: the same texts, their columns read from ``ref``.
    (Not a subquery over NEW: SQLite would build a table for it at every row.)"""
    def of(sql: str) -> str:
        return _COLUMN.sub(lambda m: f'{ref}."{m.group(1)}"', sql)
    return {"archive_name": of("archive_name"),
            **{key: f"CASE WHEN ({of(where)}) THEN 1 ELSE 0 END" for key, where in COUNT_KEYS.items()},
            "attempts": of(ATTEMPTS)}


def _count(ref: str, sign: str) -> str:
    """Statements adding (``+``) or taking away (``-``) one row's file and bytes.
    A class met for the first time is inserted when the UPDATE changed nothing."""
    keys = _class_of(ref)
    update = (f"UPDATE watcher_counts SET files = files {sign} 1, bytes = bytes {sign} coalesce({ref}.size, 0) "
              f"WHERE {' AND '.join(f'{k} = {v}' for k, v in keys.items())};")
    if sign == "-":
        return update
    return (f"{update}\n  INSERT INTO watcher_counts ({', '.join(keys)}, files, bytes) "
            f"SELECT {', '.join(keys.values())}, 1, coalesce({ref}.size, 0) WHERE changes() = 0;")


_CHANGED = " OR ".join(f'OLD."{c}" IS NOT NEW."{c}"' for c in COUNTED_COLUMNS)
# name -> exact text (sqlite_master keeps it): a catalog whose triggers differ gets these, and counts afresh.
COUNT_TRIGGERS = {
    "watcher_counts_insert": f"CREATE TRIGGER watcher_counts_insert AFTER INSERT ON supersync_v0 BEGIN\n"
                             f"  {_count('NEW', '+')}\nEND",
    "watcher_counts_delete": f"CREATE TRIGGER watcher_counts_delete AFTER DELETE ON supersync_v0 BEGIN\n"
                             f"  {_count('OLD', '-')}\nEND",
    "watcher_counts_update": f"CREATE TRIGGER watcher_counts_update AFTER UPDATE OF "
                             f"{', '.join(chr(34) + c + chr(34) for c in COUNTED_COLUMNS)} ON supersync_v0 "
                             f"WHEN {_CHANGED} BEGIN\n  {_count('OLD', '-')}\n  {_count('NEW', '+')}\nEND",
}
# One pass over the table, when the triggers are made (in their transaction).
COUNTS_FILL = (
    "DELETE FROM watcher_counts",
    f"INSERT INTO watcher_counts ({', '.join(_KEY_NAMES)}, files, bytes) "
    f"SELECT {', '.join(_KEY_NAMES)}, COUNT(*), SUM(size) FROM ({_keys_of('supersync_v0')}) "
    f"GROUP BY {', '.join(_KEY_NAMES)}",
)


# Non-UTF-8 file names are stored as text, not BLOBs: socs' code (a site
# going back to socs) reads every path as a str. Each byte that is not
# UTF-8 becomes ESC and two hex digits, and ESC itself (a Unicode
# noncharacter no producer writes) ESC ESC; every other name is stored as
# it is, as socs and older watchers stored it.
ESC = "\uffff"
_ESCAPED = re.compile("\uffff(\uffff|[89a-f][0-9a-f])")


class StoredPath(str):
    """A path as the catalog stores it (to_db_path's result): PathField
    passes it through, so a query given one does not escape it twice."""

    __slots__ = ()


def to_db_path(path: str | bytes | os.PathLike) -> StoredPath:
    """The stored text of a path: itself if it is UTF-8 without ESC, else escaped."""
    if isinstance(path, StoredPath):
        return path
    path = os.fsdecode(path)
    if ESC not in path:
        try:
            path.encode("utf-8")
            return StoredPath(path)
        except UnicodeEncodeError:  # its one spelling; a surrogate no name has raises (a ValueError)
            path = os.fsdecode(os.fsencode(path))
    return StoredPath("".join(
        ESC + ESC if c == ESC else f"{ESC}{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else c
        for c in path))


def from_db_path(value):
    """The path a stored value names: escaped text decoded, an older
    watcher's BLOB read as the bytes it is."""
    if isinstance(value, bytes):
        return os.fsdecode(value)
    if isinstance(value, str) and ESC in value:
        return _ESCAPED.sub(lambda m: ESC if m.group(1) == ESC else chr(0xDC00 + int(m.group(1), 16)), value)
    return value


class PathField(Field):
    """A VARCHAR column that keeps any file name byte-exact, as text socs can read."""

    field_type = "VARCHAR"

    def db_value(self, value):
        return None if value is None else to_db_path(value)

    def python_value(self, value):
        return from_db_path(value)


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
        return is_verified(self)

    def state(self, max_attempts: int) -> str:
        """Its one word (watcher.catalog.states)."""
        return state_of(self, max_attempts)

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


def chunks(items: list, size: int = CHUNK) -> Iterator[list]:
    """Slices of at most ``size``: SQLite bounds the parameters of one query."""
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


class PendingRow(NamedTuple):
    """A row the transfer worker ships: its pending query's columns, no model object."""

    id: int
    local_path: str
    remote_path: str
    local_md5sum: str
    size: int | None
    timestamp: float


INSERT_FILE = (
    'INSERT INTO supersync_v0 (local_path, remote_path, archive_name, local_md5sum, "timestamp", '
    'failed_copy_attempts, deletable, "ignore", size, mtime_ns, retain, dev, ino, ctime_ns, seal) '
    "VALUES (?, ?, ?, ?, ?, 0, ?, 0, ?, ?, ?, ?, ?, ?, ?)")


def insert_params(f: NewFile) -> tuple:
    """INSERT_FILE's parameters but the seal (Catalog.insert_params adds it)."""
    return (to_db_path(f.local_path), to_db_path(f.remote_path), f.archive_name, f.local_md5sum,
            f.timestamp, bool(f.deletable), f.size, f.mtime_ns, f.retain, f.dev, f.ino, f.ctime_ns)


def raw(sql: str) -> SQL:
    """A condition written in SQL (a state's predicate), for a peewee query."""
    return SQL(f"({sql})")


def case(cond, then) -> Case:
    return Case(None, [(cond, then)], 0)


class Queries:
    """The base of the query modules' classes: one open catalog's connection and models."""

    def __init__(self, catalog):
        self.catalog = catalog
        self.db = catalog.db
        self.File = catalog.File
        self.TimecodeDir = catalog.TimecodeDir
