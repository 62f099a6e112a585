"""Retention (watcher/retention.py) in a running agent: a local file is
deleted only when verified, deletable and past its time, and one that
cannot be deleted is left, held back rather than tried every round."""

from __future__ import annotations

import os

from tests.catalog_rows import verified_once
from tests.undeletable import allow_deletion, refuse_deletion
from tests.waiting import wait_until


def test_retention_deletes_only_verified_deletable_files_past_their_time(setup, start_agent, tmp_path):
    far = setup.archive(delete_local_after=1)
    inbox = setup.rule("inbox")
    keep = setup.rule("keep", deletable=False)
    forever = setup.rule("forever", delete_local_after="never")
    longer = setup.rule("longer", delete_local_after="1h")
    agent = start_agent(setup)
    files = {name: d / f"{name}.dat" for name, d in
             [("inbox", inbox), ("keep", keep), ("forever", forever), ("longer", longer)]}
    for p in files.values():
        p.write_bytes(os.urandom(64))
    # A file registered by a producer but never copied (its archive row stays pending).
    unshipped = tmp_path / "unshipped.dat"
    unshipped.write_bytes(b"x")
    catalog = setup.catalog()
    # A wrong md5: its copy never verifies, so it must never be deleted.
    catalog.add_file(str(unshipped), "unshipped.dat", "arch", local_md5sum="0" * 32)
    wait_until(lambda: [r for r in catalog.files.rows_for_path(str(files["inbox"])) if (r.removed or 0) > 0],
               timeout=15, message="expired file not deleted")
    assert not files["inbox"].exists()
    assert (far / "inbox.dat").exists()
    wait_until(lambda: all(verified_once(catalog, files[n]) for n in ("keep", "forever", "longer")))
    for _ in range(3):  # a few more housekeeping rounds must not delete them
        agent.housekeep_once()
    for name in ("keep", "forever", "longer"):
        assert files[name].exists(), name
    assert unshipped.exists()
    assert catalog.files.rows_for_path(str(unshipped))[0].removed is None


def test_a_file_that_cannot_be_deleted_is_reported_once_and_left(setup, start_agent):
    setup.archive(delete_local_after=0.5)
    inbox = setup.rule()
    (inbox / "locked").mkdir()
    keep, goes = inbox / "locked" / "keep.dat", inbox / "goes.dat"
    keep.write_bytes(b"k")
    goes.write_bytes(b"g")
    agent = start_agent(setup)
    catalog = setup.catalog()
    wait_until(lambda: verified_once(catalog, keep))
    refuse_deletion(keep)
    try:
        wait_until(lambda: not goes.exists(), timeout=15)
        for _ in range(3):
            agent.housekeep_once()
        assert keep.exists()
        assert catalog.files.rows_for_path(str(keep))[0].removed is None
    finally:
        allow_deletion(keep)
    # Held back after its failure, not tried (and reported) again each round:
    # it stays even now that it could be deleted.
    for _ in range(3):
        agent.housekeep_once()
    assert keep.exists()
    assert catalog.files.rows_for_path(str(keep))[0].removed is None
