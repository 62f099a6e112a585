"""Timecodes must be plausible: a ten-digit number in a path that is no
time, or a modification time far off, never names a future timecode
directory; and a future directory, whoever registered it, never makes the
others complete early (today's directory would be finalized at once and
again after every new file). A real agent on real files, then the rules
themselves with a fixed clock."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.waiting import wait_until
from watcher.catalog import Catalog
from watcher.rules import template_fields
from watcher.finalize import update_timecode_dirs
from watcher.paths import FINALIZED_SUFFIX, find_ctime, is_complete, timecode_now, timecode_of

YEAR_2100 = 4_102_444_800
YEAR_1990 = 631_152_000  # nine digits: its first five are no timecode


@dataclass(frozen=True)
class Variant:
    relpath: str          # formatted with now=int(now); empty: a catalog row instead of a file
    expected: str         # its remote path, formatted with now and today
    mtime: int | None = None  # None: now
    options: dict = field(default_factory=dict)
    stale_flag: bool = False  # an old version marked today's directory complete


VARIANTS = {
    "number in a file name": Variant("call_5551234567.dat", "{today}/call_5551234567.dat"),
    "number in a directory name": Variant("5551234567/obs.dat", "{today}/5551234567/obs.dat"),
    "bogus number before a real ctime": Variant("9999999999/{now}_obs.dat", "{today}/9999999999/{now}_obs.dat"),
    "regex ctime group": Variant(
        "9876543210_x.dat", "{today}/{now}/9876543210_x.dat",
        options={"match": r"^(?P<ctime>[0-9]{10})_", "remote_path": "{timecode}/{ctime}/{name}"}),
    "mtime in 2100": Variant("hk/data.g3", "{today}/hk/data.g3", mtime=YEAR_2100),
    "number before 2001": Variant("0946684800_x.dat", "{today}/0946684800_x.dat"),
    "mtime before 2001": Variant("old/data.g3", "{today}/old/data.g3", mtime=YEAR_1990),
    "catalog row": Variant("", "55512/x"),
    "catalog row and a stale flag": Variant("", "55512/x", stale_flag=True),
}


def move_in(staging: Path, inbox: Path, relpath: str, mtime: float, data: bytes = b"x") -> Path:
    """Write a file with a given modification time outside the tree and move
    its top-level entry in whole, so that it is never seen with another mtime."""
    path = staging / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    top = relpath.split("/")[0]
    os.rename(staging / top, inbox / top)
    return inbox / relpath


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_an_implausible_timecode_lands_today_and_finalizes_nothing_early(variant, setup, start_agent, tmp_path):
    now = time.time()
    today = timecode_now(now)
    far = setup.archive()
    inbox = setup.rule(**{"remote_path": "{timecode}/{relpath}", **variant.options})
    staging = tmp_path / "staging"
    catalog = setup.catalog()
    if not variant.relpath:  # socs, or an old watcher version, registered it
        outside = tmp_path / "socs"
        outside.mkdir()
        setup.archives["arch"]["api_roots"] = [str(outside)]
        (outside / "x").write_bytes(b"socs")
        catalog.add_file(outside / "x", "55512/x", "arch")
        (outside / "today.dat").write_bytes(b"today")
        catalog.add_file(outside / "today.dat", f"{today}/today.dat", "arch")
        if variant.stale_flag:
            catalog.timecode_dirs.derive()
            [tcdir] = [t for t in catalog.timecode_dirs.open_dirs("arch") if t.timecode == today]
            catalog.timecode_dirs.set_flags(tcdir.id, completed=True)
    # Housekeeping runs when the test says, right after the files it must count.
    agent = start_agent(setup, housekeeping_interval=3600)
    if variant.relpath:
        bogus = move_in(staging, inbox, variant.relpath.format(now=int(now)), variant.mtime or now)
        [row] = wait_until(lambda: catalog.files.rows_for_path(str(bogus)), message="the bogus file's row")
        remote = row.remote_path
    else:
        remote = "55512/x"
    expected = variant.expected.format(now=int(now), today=today)
    assert remote == expected
    wait_until(lambda: (far / expected).exists(), timeout=20, message=f"{expected} on the far side")

    def shipped_and_housekept(count):
        wait_until(lambda: len(catalog.reports.known_files("arch", 0)) >= count
                   and all(r.verified for r in catalog.reports.known_files("arch", 0)), timeout=20,
                   message=f"{count} files verified")
        wait_until(agent.timecodes_once, message="housekeeping while nothing waits to be registered")
        assert not [r.remote_path for r in catalog.reports.known_files("arch", 0)
                    if r.remote_path.endswith(FINALIZED_SUFFIX)]
        assert not list(setup.file_root.rglob(f"*{FINALIZED_SUFFIX}"))
        assert not [t.timecode for t in catalog.TimecodeDir.select() if t.completed]

    shipped_and_housekept(2 if not variant.relpath else 1)
    for i in range(2):  # each one used to be a late file of a finalized directory
        more = move_in(staging, inbox, f"{int(now)}_more{i}.dat", now, data=b"more %d" % i)
        wait_until(lambda: catalog.files.rows_for_path(str(more)), message="the new file's row")
        assert catalog.files.rows_for_path(str(more))[0].remote_path.startswith(f"{today}/")
        shipped_and_housekept(3 + i if not variant.relpath else 2 + i)


def test_a_future_directory_is_complete_only_in_its_own_time(tmp_path):
    catalog = Catalog(tmp_path / "catalog.db")
    try:
        now = time.time()
        today = timecode_now(now)
        for remote in (f"{today}/a.dat", "55512/x"):
            local = tmp_path / remote.replace("/", "_")
            local.write_bytes(remote.encode())
            row = catalog.add_file(local, remote, "arch")
            catalog.shipping.record({row.id: (row.local_md5sum, row.local_md5sum)}, now)
        catalog.timecode_dirs.derive()
        assert catalog.timecode_dirs.newest("arch", today) == today
        assert catalog.timecode_dirs.newest("arch", today - 1) is None
        assert update_timecode_dirs(catalog, "arch", tmp_path / "fin", "inst", now) == 0
        # when 55512 is two timecodes old, both are complete and finalized, each once
        later = 55514 * 1e5
        assert update_timecode_dirs(catalog, "arch", tmp_path / "fin", "inst", later) == 2
        assert update_timecode_dirs(catalog, "arch", tmp_path / "fin", "inst", later + 1) == 0
    finally:
        catalog.close()


# -- the rules, with a fixed clock -----------------------------------------------------

NOW = 1_796_000_000.0  # timecode 17960


def test_is_complete_ignores_newer_directories_in_the_future():
    assert not is_complete(17960, 55512, NOW)
    assert not is_complete(55512, 55512, NOW)
    assert not is_complete(55512, None, NOW)
    assert is_complete(17959, 17960, NOW)
    assert is_complete(17958, None, NOW)
    assert is_complete(55512, 55512, 55514 * 1e5)


@pytest.mark.parametrize("relpath, ctime", [
    ("call_5551234567.dat", None),                  # in 2145
    ("5551234567/1795999000_x.dat", "1795999000"),  # the first plausible number counts
    ("0946684800_x.dat", None),                     # 2000, written with a leading zero
    ("1000000000_x.dat", "1000000000"),             # the first ten-digit time (2001)
    ("1796100000_x.dat", "1796100000"),             # one timecode ahead: clocks disagree
    ("1796100001_x.dat", None),                     # further: no time of this data
    ("\u0661\u0667\u0669\u0665\u0669\u0669\u0669\u0660\u0660\u0660_x.dat", None),  # not ASCII digits
])
def test_find_ctime_takes_only_plausible_ten_digit_times(relpath, ctime):
    assert find_ctime(relpath, NOW) == ctime


@pytest.mark.parametrize("relpath, groups, mtime, ctime", [
    ("call_5551234567.dat", {}, 1_795_999_000.5, "1795999000"),  # path ctime -> mtime
    ("call_5551234567.dat", {}, YEAR_2100, "1796000000"),        # -> now
    ("hk/data.g3", {}, YEAR_2100, "1796000000"),                 # mtime in the future -> now
    ("hk/data.g3", {}, YEAR_1990, "1796000000"),                 # nine digits -> now
    ("hk/data.g3", {}, None, "1796000000"),                      # no mtime -> now
    ("hk/data.g3", {}, 1_796_099_999.0, "1796099999"),           # within the tolerance
    ("9876543210_x.dat", {"ctime": "9876543210"}, 1_795_999_000.0, "1795999000"),
    ("1795990000/1795980000_x.dat", {"ctime": "1795980000"}, 1.7e9, "1795980000"),
    ("1795990000/x.dat", {"ctime": None}, 1.7e9, "1795990000"),  # optional group not matched
    ("1795990000/x.dat", {"ctime": "17959"}, 1.7e9, "1700000000"),  # a group that is no ctime
])
def test_ctime_and_timecode_fields_fall_back_to_the_mtime_then_to_now(relpath, groups, mtime, ctime):
    fields = template_fields(relpath, groups, mtime, NOW)
    assert (fields["ctime"], fields["timecode"]) == (ctime, ctime[:5])


def test_a_timecode_directory_is_named_by_five_ascii_digits_not_starting_with_zero():
    assert timecode_of("17960/a") == 17960
    assert timecode_of("55512/x") == 55512  # a future one is still a directory; completion waits
    assert timecode_of("09466/x") is None
    assert timecode_of("\u0661\u0667\u0669\u0666\u0660/x") is None
