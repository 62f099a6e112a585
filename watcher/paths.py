"""Timecodes and the names derived from them: pure rules, no I/O.

A timecode is the first five digits of a ten-digit unix time, about one a
day; a remote path's first directory names it. A directory is *complete*
when its archive has a file in a newer one that is not in the future, or
when more than a whole timecode has passed since it. Finalization files
have socs' names, defined here once: written, recognised and cleaned up by
these functions only.
"""

from __future__ import annotations

import re

TEMPLATE_FIELDS = ("relpath", "name", "stem", "suffix", "parent", "timecode", "ctime")
# ASCII digits only: directories are looked up by their text ("17960/"),
# which another spelling of the same number would never match.
_CTIME = re.compile(r"(?<![0-9])([0-9]{10})(?![0-9])")
_TIMECODE_DIR = re.compile(r"^([1-9][0-9]{4})/")
FINALIZED_SUFFIX = "_finalized.yaml"
# One timecode: a producer's clock ahead of ours, or local time taken for
# UTC (14 hours at most), is still a time, and a file then lands at most in
# the next directory. Further out, a number is no time of this data.
FUTURE_TOLERANCE = 1e5


def plausible_time(t: float, now: float) -> bool:
    """Whether a unix time may name a timecode directory.

    From 2001-09-09 on: only a ten-digit time has its timecode as its first
    five digits, and ten digits with a leading zero would name a directory
    ("09466/") that the catalog, looking directories up by their number,
    never finds. Up to one timecode after ``now``: further out, a phone
    number or a clock set to 2100 would put files in a directory that stays
    open for a century.
    """
    return 1e9 <= t <= now + FUTURE_TOLERANCE


def is_ctime(text: str, now: float) -> bool:
    """Whether text (a path's number, a regex group) is a plausible ten-digit unix time."""
    return bool(_CTIME.fullmatch(text)) and plausible_time(int(text), now)


def find_ctime(relpath: str, now: float) -> str | None:
    """The first ten-digit number in a path that is a plausible unix time, as text, or None."""
    for found in _CTIME.finditer(relpath):
        if plausible_time(int(found.group(1)), now):
            return found.group(1)
    return None


def timecode_of(remote_path: str) -> int | None:
    """The timecode directory a remote path lies in, or None.

    A future one counts (its rows exist and are finalized in their time);
    one with a leading zero does not (see plausible_time).
    """
    found = _TIMECODE_DIR.match(remote_path) if isinstance(remote_path, str) else None
    return int(found.group(1)) if found else None


def timecode_now(now: float) -> int:
    return int(now // 1e5)


def subdirs_of(remote_paths: list[str]) -> list[str]:
    """The second-level directories of a timecode directory's files (socs' `subdirs`)."""
    found = set()
    for path in remote_paths:
        parts = path.split("/") if isinstance(path, str) else []
        if len(parts) > 2:
            found.add(parts[1])
    return sorted(found)


def is_complete(timecode: int, newest_timecode: int | None, now: float) -> bool:
    """Whether a directory expects no more files: its archive has a newer one
    that is not in the future, or more than a whole timecode has passed.

    A directory in the future (a bogus path, a clock far ahead, whoever
    registered it) makes no other complete early, and is not complete
    itself before its own time.
    """
    newer = newest_timecode is not None and timecode < newest_timecode <= timecode_now(now)
    return newer or timecode_now(now) - timecode > 1


def finalization_name(second: int, archive: str, timecode: int) -> str:
    """socs' name of a finalization file: ``{second}_{archive}_{timecode}_finalized.yaml``."""
    return f"{second}_{archive}_{timecode}{FINALIZED_SUFFIX}"


def finalization_remote_path(tc_now: int, instance_id: str, name: str) -> str:
    """Where socs ships a finalization file written in timecode ``tc_now``."""
    return f"{tc_now}/suprsync/{instance_id}/{name}"


def is_finalization_file(remote_path: str) -> bool:
    """Finalization files never reopen the directory they land in."""
    parts = remote_path.split("/") if isinstance(remote_path, str) else []
    return len(parts) == 4 and parts[1] == "suprsync" and parts[3].endswith(FINALIZED_SUFFIX)


def finalization_leftover(archive: str) -> re.Pattern:
    """Names an archive's finalization files may have in file_root, including
    the temporary ones a crash leaves (state_files.write_atomic's)."""
    return re.compile(rf"^\.?\d+_{re.escape(archive)}_\d{{5}}{re.escape(FINALIZED_SUFFIX)}"
                      r"(\.[0-9a-f]{16})?(\.tmp)?$")
