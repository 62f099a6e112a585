"""Agents that share one catalog, one per archive (as an SO site runs
watcher@timestreams and watcher@smurf on one suprsync.db)."""

from __future__ import annotations

from tests.conftest import Setup


def one_archive_each(tmp_path, names: dict[str, str | None]) -> dict:
    """A Setup per archive, all on one catalog and one file_root (as an SO
    site runs watcher@timestreams and watcher@smurf): {archive: (setup, far, inbox)}."""
    shared_db, shared_root = tmp_path / "state" / "catalog.db", tmp_path / "state" / "finalization"
    made = {}
    for archive, instance_id in names.items():
        s = Setup(tmp_path / archive)
        s.root.mkdir()
        s.database, s.file_root = shared_db, shared_root
        far = s.archive(archive, **({"instance_id": instance_id} if instance_id else {}))
        inbox = s.rule(archive=archive, remote_path="{timecode}/{relpath}")
        made[archive] = (s, far, inbox)
    return made
