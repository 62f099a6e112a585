"""The catalog: socs' SupRsync tables plus watcher's columns, and every query.

Layout: ``states`` (what pending, verified, ... mean, in SQL and Python),
``schema`` (tables, indexes, models, row types), ``store`` (the open file and
its migration), and one module of queries per concern (``files``,
``far_names``, ``shipping``, ``removals``, ``timecode_dirs``, ``reports``),
reached as attributes of a ``Catalog``.
"""

from watcher.catalog.far_names import Claims
from watcher.catalog.schema import (
    File, NewFile, PendingRow, Registered, TimecodeDir, identity_columns, identity_of_row, to_db_path,
)
from watcher.catalog.store import BUSY_TIMEOUT, Catalog

__all__ = [
    "BUSY_TIMEOUT", "Catalog", "Claims", "File", "NewFile", "PendingRow", "Registered", "TimecodeDir",
    "identity_columns", "identity_of_row", "to_db_path",
]
