"""socs 0.6.4's own catalog code, to check watcher against the real thing.

A conftest plugin (tests/conftest.py lists it). The ``socs`` fixture is the
module ``socs.db.suprsync`` that socs' SupRsync agent and pysmurf monitor
use; a test that asks for it skips, saying what to install, when socs
cannot be imported. socs' package requirements (ocs, numpy, pysnmp...) are
not needed for that module: scripts/test installs it with

    pip install sqlalchemy txaio twisted
    pip install --no-deps socs==0.6.4

``socs_iteration`` makes the catalog calls of one iteration of socs' agent
loop (socs/agents/suprsync/agent.py, ``run``) in its order, with its
handler: what an operator who goes back to socs runs on the catalog.
"""

from __future__ import annotations

import time
import warnings
from importlib import metadata

import pytest

SOCS_VERSION = "0.6.4"
INSTALL = f"pip install sqlalchemy txaio twisted && pip install --no-deps socs=={SOCS_VERSION}"


@pytest.fixture(scope="session")
def socs():
    """``socs.db.suprsync`` of socs 0.6.4, or a skip naming what to install."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SQLAlchemy 2 on socs' 1.4-style declarative_base
            from socs.db import suprsync
        found = metadata.version("socs")
    except (ImportError, metadata.PackageNotFoundError) as exc:
        pytest.skip(f"socs {SOCS_VERSION} cannot be imported ({exc}); to run the tests against "
                    f"socs' own code: {INSTALL}")
    if found != SOCS_VERSION:
        pytest.skip(f"socs {found} is installed; these tests check socs {SOCS_VERSION}: {INSTALL}")
    return suprsync


def socs_iteration(socs, db_path, archive: str, remote_basedir, file_root, instance_id: str,
                   delete_after: float | None = None, max_copy_attempts: int = 5,
                   files_per_batch: int = 500, chmod: str = "g+rwX,o+rX") -> list:
    """One iteration of socs' agent loop on a local archive, with socs'
    defaults: copy, create the week's timecode dirs, archive stats,
    delete, update the timecode dirs. Returns copy_files' answer. socs' loop
    survives only sqlalchemy's OperationalError and subprocess errors: any
    other exception, which would end socs' agent, is raised here."""
    srfm = socs.SupRsyncFilesManager(str(db_path))
    try:
        handler = socs.SupRsyncFileHandler(srfm, archive, str(remote_basedir), cmd_timeout=5,
                                           copy_timeout=20, chmod=chmod)
        copied = handler.copy_files(max_copy_attempts=max_copy_attempts, num_files=files_per_batch)
        srfm.create_all_timecode_dirs(archive, min_ctime=time.time() - 7 * 24 * 3600)
        srfm.get_archive_stats(archive)
        if delete_after is not None:
            handler.delete_files(delete_after)
        srfm.update_all_timecode_dirs(archive, str(file_root), instance_id)
        return copied
    finally:
        srfm._engine.dispose()
