"""Every md5 the catalog ever recorded for a file, kept by SQLite triggers.

The end state cannot tell whether a partial file was once registered and
shipped: its row is later updated to the final content. So tests of
"complete files only" install triggers that copy every local_md5sum
written to supersync_v0 (by INSERT or UPDATE, by any writer) into an
audit table, and assert that none but the final content's was ever there.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from watcher.catalog import Catalog

SCHEMA = """
CREATE TABLE IF NOT EXISTS test_md5_audit (local_path TEXT, local_md5sum TEXT);
CREATE TRIGGER IF NOT EXISTS test_md5_audit_insert AFTER INSERT ON supersync_v0
BEGIN INSERT INTO test_md5_audit VALUES (NEW.local_path, NEW.local_md5sum); END;
CREATE TRIGGER IF NOT EXISTS test_md5_audit_update AFTER UPDATE OF local_md5sum ON supersync_v0
BEGIN INSERT INTO test_md5_audit VALUES (NEW.local_path, NEW.local_md5sum); END;
"""


def install(database: Path) -> None:
    """Create the catalog (the agent's schema) and the audit triggers in it."""
    Catalog(database).close()
    with sqlite3.connect(database) as db:
        db.executescript(SCHEMA)


def md5s_recorded(database: Path, path: Path | str) -> list[str]:
    """Every local_md5sum written for ``path``, in order (repeats included)."""
    with sqlite3.connect(database, timeout=30) as db:
        return [m for (m,) in db.execute(
            "SELECT local_md5sum FROM test_md5_audit WHERE local_path = ? ORDER BY rowid", (str(path),))]
