"""Where socs producers find the catalog: ``from watcher.db import ...``.

Code written for ``socs.db.suprsync`` changes only its import to use
watcher's catalog; this module keeps those names (and ``add_file``) here.
The catalog itself is the package watcher.catalog; socs' API is
watcher.suprsync.
"""

from watcher.catalog import Catalog, File, NewFile, TimecodeDir
from watcher.hashing import md5_of
from watcher.suprsync import SupRsyncFile, SupRsyncFilesManager, add_file, create_file

__all__ = ["Catalog", "File", "NewFile", "SupRsyncFile", "SupRsyncFilesManager", "TimecodeDir",
           "add_file", "create_file", "md5_of"]
