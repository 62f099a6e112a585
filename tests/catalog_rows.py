"""The end state as tests read it: the catalog's rows through plain sqlite3
(no agent code, so a bug there cannot hide itself) and the far copies.
Shared by the test modules that check what a run left behind."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def rows(database: Path) -> list[dict]:
    """Every row of the file table, as dicts (plain sqlite3: no agent code)."""
    with sqlite3.connect(database, timeout=30) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM supersync_v0 ORDER BY id")]


def rows_of(database: Path, path: Path | str) -> list[dict]:
    return [r for r in rows(database) if r["local_path"] == str(path)]


def row_of(database: Path, path: Path) -> dict | None:
    """The newest row of a local path, or None."""
    found = rows_of(database, path)
    return found[-1] if found else None


def verified(row: dict) -> bool:
    return row["remote_md5sum"] is not None and row["remote_md5sum"] == row["local_md5sum"]


def verified_once(catalog, path) -> bool:
    """One row for the path, verified: read through a Catalog, for tests that
    already hold one."""
    rows = catalog.files.rows_for_path(str(path))
    return len(rows) == 1 and rows[0].verified


def shipped_as(database: Path, far: Path, path: Path, remote: str, content: bytes) -> bool:
    """One row for the path, verified with this content's md5, and the far copy is this content."""
    mine = rows_of(database, path)
    far_copy = far / remote
    return (len(mine) == 1 and verified(mine[0]) and mine[0]["local_md5sum"] == md5(content)
            and far_copy.exists() and far_copy.read_bytes() == content)


def write_files(inbox: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    """Create the files; return {absolute local path: content}."""
    out = {}
    for rel, content in files.items():
        path = inbox / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        out[str(path)] = content
    return out
