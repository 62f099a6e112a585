"""Catalog rules that keep a file from being lost: one far name per local
file, timecode directories that see every name, and finalization that never
runs ahead of the rows."""

from __future__ import annotations

import os
import time

import pytest

from watcher.catalog import Catalog, NewFile
from watcher.finalize import update_timecode_dirs


@pytest.fixture
def catalog(tmp_path):
    c = Catalog(tmp_path / "catalog.db")
    yield c
    c.close()


def new(local, remote, md5="a" * 32, archive="arch"):
    return NewFile(local, remote, archive, md5, time.time(), True, 1, 1)


def test_a_far_name_already_taken_by_another_local_file_is_refused(catalog):
    catalog.add_files([new("/data/one.g3", "16000/x.g3")])
    with pytest.raises(ValueError, match="already taken by /data/one.g3"):
        catalog.add_files([new("/data/two.g3", "16000/x.g3", md5="b" * 32)])
    with pytest.raises(ValueError, match="already taken"):
        catalog.add_files([new("/data/3.g3", "16000/y.g3"), new("/data/4.g3", "16000/y.g3")])
    # the same file again (socs re-registering it) and another archive are fine
    catalog.add_files([new("/data/one.g3", "16000/x.g3"), new("/data/two.g3", "16000/x.g3", archive="other")])
    assert len(catalog.reports.known_files("arch", 0)) == 2


def test_registering_keeps_a_far_name_with_its_live_owner_or_the_first_file_of_the_list(catalog):
    catalog.add_files([new("/data/owner.g3", "16000/x.g3")])
    taken = catalog.files.register([new("/data/a.g3", "16000/x.g3"), new("/data/b.g3", "16000/x.g3"),
                                    new("/data/c.g3", "16000/y.g3"), new("/data/d.g3", "16000/y.g3")]).taken
    # x.g3 stays with its live owner: neither file of the list gets it; y.g3 goes to the first.
    assert taken == {("arch", "16000/x.g3"): "/data/owner.g3", ("arch", "16000/y.g3"): "/data/c.g3"}
    rows = {r.remote_path: r.local_path for r in catalog.reports.known_files("arch", 0)}
    assert rows == {"16000/x.g3": "/data/owner.g3", "16000/y.g3": "/data/c.g3"}
    assert len(catalog.reports.known_files("arch", 0)) == 2
    # A file listed twice is registered once.
    assert catalog.files.register([new("/data/e.g3", "16000/z.g3"), new("/data/e.g3", "16000/z.g3")]).taken == {}
    assert [r.local_path for r in catalog.reports.known_files("arch", 0)].count("/data/e.g3") == 1


def test_far_names_shared_by_different_content_are_contested(catalog):
    catalog.add_files([new("/data/one.g3", "16000/x.g3")])
    # another writer (socs) inserting straight into the table is not checked
    catalog.db.execute_sql(
        "INSERT INTO supersync_v0 (local_path, local_md5sum, archive_name, remote_path, timestamp) "
        "VALUES ('/data/two.g3', ?, 'arch', '16000/x.g3', 1)", ("b" * 32,))
    catalog.add_files([new("/data/three.g3", "16000/z.g3")])
    assert catalog.far_names.contested("arch", ["16000/x.g3", "16000/z.g3"]) == {"16000/x.g3"}


def test_a_non_utf8_name_keeps_its_timecode_directory_open_until_verified(catalog, tmp_path):
    name = os.fsdecode(b"16000/caf\xe9.g3")
    row = catalog.add_files([new("/data/c.g3", name)])[0]
    catalog.timecode_dirs.derive()
    assert catalog.timecode_dirs.has_unverified("arch", 16000)
    catalog.shipping.record({row.id: ("a" * 32, "a" * 32)}, time.time())
    assert not catalog.timecode_dirs.has_unverified("arch", 16000)
    assert catalog.timecode_dirs.remote_paths("arch", 16000) == [name]


def shipped_and_finalized(catalog, tmp_path):
    """One verified file in timecode directory 16000, and the directory finalized."""
    data = tmp_path / "d.g3"
    data.write_bytes(b"d")
    row = catalog.add_file(str(data), "16000/d.g3", "arch")
    catalog.shipping.record({row.id: (row.local_md5sum, row.local_md5sum)}, time.time())
    catalog.timecode_dirs.derive()
    assert update_timecode_dirs(catalog, "arch", tmp_path / "fin", "inst") == 1
    return row


def test_finalization_files_make_no_timecode_directory_of_their_own(catalog, tmp_path):
    shipped_and_finalized(catalog, tmp_path)
    catalog.timecode_dirs.derive()
    # only the data directory: the finalization file's own directory would
    # otherwise be finalized empty two timecodes later, and so on forever
    assert [t.timecode for t in catalog.TimecodeDir.select()] == [16000]


def test_a_far_copy_found_missing_reopens_its_finalized_directory(catalog, tmp_path):
    row = shipped_and_finalized(catalog, tmp_path)
    assert not catalog.timecode_dirs.open_dirs("arch")
    catalog.removals.mark_unverified({row.id: None})
    assert [t.timecode for t in catalog.timecode_dirs.open_dirs("arch")] == [16000]
