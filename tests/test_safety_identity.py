"""A file's identity is (device, inode, size, mtime_ns, ctime_ns): a shipped
file rewritten in place with the same size and its old modification time
restored is hashed and shipped again, and never deleted while the far copy
holds its old content (DESIGN.md, promise 2; issue 8).

Real agents on real files, edited the ways a user or a tool does it: ``dd
conv=notrunc`` then ``touch -d @old``, Python writing in place then
``os.utime(ns=...)``, ``cp -p`` and ``rsync -t`` of another file of the same
size and time, and an edit made while the agent is stopped. While waiting,
every poll asserts the invariant: the local file is never gone while the far
copy differs from the last local content.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.waiting import wait_until

SIZE = 4096


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def verified(catalog, path) -> bool:
    rows = catalog.files.rows_for_path(str(path))
    return len(rows) == 1 and rows[0].verified


# -- the edits: same size, old modification time restored --------------------------------

def restore_mtime(path: Path, before: os.stat_result) -> None:
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns), follow_symlinks=False)


def dd_then_touch(path: Path, new: bytes, before: os.stat_result, scratch: Path) -> None:
    source = scratch / "new.bin"
    source.write_bytes(new)
    subprocess.run(["dd", f"if={source}", f"of={path}", "conv=notrunc", "status=none"], check=True)
    seconds, ns = divmod(before.st_mtime_ns, 10**9)
    subprocess.run(["touch", "-m", "-d", f"@{seconds}.{ns:09d}", str(path)], check=True)


def python_in_place_then_utime(path: Path, new: bytes, before: os.stat_result, scratch: Path) -> None:
    fd = os.open(path, os.O_WRONLY)  # no O_CREAT, no O_TRUNC: the same inode, rewritten
    try:
        os.pwrite(fd, new, 0)
    finally:
        os.close(fd)
    restore_mtime(path, before)


def _same_size_same_time(new: bytes, before: os.stat_result, scratch: Path) -> Path:
    other = scratch / "other.bin"
    other.write_bytes(new)
    os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
    return other


def cp_p(path: Path, new: bytes, before: os.stat_result, scratch: Path) -> None:
    subprocess.run(["cp", "-p", str(_same_size_same_time(new, before, scratch)), str(path)], check=True)


def rsync_t(path: Path, new: bytes, before: os.stat_result, scratch: Path) -> None:
    # -I: same size and time would make rsync's quick check skip the file.
    subprocess.run(["rsync", "-t", "-I", str(_same_size_same_time(new, before, scratch)), str(path)],
                   check=True)


def rsync_t_inplace(path: Path, new: bytes, before: os.stat_result, scratch: Path) -> None:
    subprocess.run(["rsync", "-t", "-I", "--inplace", str(_same_size_same_time(new, before, scratch)),
                    str(path)], check=True)


EDITS = {
    "dd conv=notrunc then touch -d": dd_then_touch,
    "python in place then os.utime": python_in_place_then_utime,
    "cp -p": cp_p,
    "rsync -t": rsync_t,
    "rsync -t --inplace": rsync_t_inplace,
}


def edit_keeping_size_and_mtime(path: Path, new: bytes, scratch: Path, how) -> None:
    assert path.exists(), "the file was deleted before the test could edit it"
    before = os.stat(path)
    assert before.st_size == len(new)
    how(path, new, before, scratch)
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns), \
        "the edit did not keep the size and modification time"
    assert path.read_bytes() == new


# -- waiting while checking the invariant --------------------------------------------------------

def newest_row(catalog, local: Path):
    return catalog.files.rows_for_path(str(local))[-1]


class FarMustFollow:
    """Polls a local file and its far copy (under the far name its newest row
    has: an edit in place keeps the name, a file written anew at the path
    gets a version name beside the first copy); fails at once if the local
    file is gone while that far copy is not the last content written locally,
    or if the first far copy was overwritten with other content than the last."""

    def __init__(self, catalog, local: Path, far_base: Path, first: bytes, latest: bytes):
        self.catalog, self.local, self.far_base = catalog, local, far_base
        self.first, self.latest = first, latest
        self.first_far = far_base / local.name
        self.polls = 0

    def check(self) -> bool:
        """True once the local file is gone (and the far copy is the latest content)."""
        self.polls += 1
        first_now = self.first_far.read_bytes() if self.first_far.exists() else None
        assert first_now in (self.first, self.latest), "the first far copy was overwritten"
        if os.path.lexists(self.local):
            return False
        far_path = self.far_base / newest_row(self.catalog, self.local).remote_path
        far = far_path.read_bytes() if far_path.exists() else None
        assert far == self.latest, (
            "the local file was deleted while the far copy "
            + ("is missing" if far is None else "holds other (old) content"))
        return True


def shipped_again_then_deleted(catalog, local: Path, far_base: Path, old: bytes, new: bytes,
                               housekeep=None, timeout: float = 15) -> None:
    watch = FarMustFollow(catalog, local, far_base, old, new)

    def done() -> bool:
        if housekeep is not None:
            housekeep()  # a round of retention as often as the test can: the worst case
        return watch.check()

    wait_until(done, timeout=timeout, interval=0.02,
               message="the edited file shipped again and only then deleted")
    row = newest_row(catalog, local)
    assert row.local_md5sum == md5(new), "the edit was never hashed"
    assert row.remote_md5sum == md5(new)
    assert (row.removed or 0) > 0
    assert (far_base / row.remote_path).read_bytes() == new


# -- the tests -------------------------------------------------------------------------------

@pytest.mark.parametrize("how", list(EDITS), ids=[k.replace(" ", "_") for k in EDITS])
def test_a_shipped_file_rewritten_with_its_size_and_mtime_kept_is_shipped_again_before_deletion(
        setup, start_agent, tmp_path, how):
    far = setup.archive(delete_local_after=0.5)
    inbox = setup.rule()
    # Retention runs only when the test says, so that the file is surely still
    # here for the edit; afterwards, a round at every poll.
    agent = start_agent(setup, housekeeping_interval=3600)
    catalog = setup.catalog()
    c = inbox / "c.dat"
    old, new = os.urandom(SIZE), os.urandom(SIZE)
    c.write_bytes(old)
    wait_until(lambda: verified(catalog, c), timeout=15)
    assert (far / "c.dat").read_bytes() == old
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    edit_keeping_size_and_mtime(c, new, scratch, EDITS[how])
    shipped_again_then_deleted(catalog, c, far, old, new, housekeep=agent.housekeep_once)


def test_an_edit_made_while_the_agent_is_stopped_is_noticed_before_any_deletion(
        setup, start_agent, tmp_path):
    far = setup.archive(delete_local_after=0.5)
    inbox = setup.rule()
    first = start_agent(setup, housekeeping_interval=3600)  # ships, deletes nothing
    catalog = setup.catalog()
    files = {inbox / "a.dat": os.urandom(SIZE), inbox / "b.dat": os.urandom(SIZE)}
    for path, data in files.items():
        path.write_bytes(data)
    wait_until(lambda: all(verified(catalog, p) for p in files), timeout=15)
    first.stop()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    new = {p: os.urandom(SIZE) for p in files}
    edit_keeping_size_and_mtime(inbox / "a.dat", new[inbox / "a.dat"], scratch, dd_then_touch)
    edit_keeping_size_and_mtime(inbox / "b.dat", new[inbox / "b.dat"], scratch, cp_p)
    # The new agent's retention runs at once, beside its start-up scan.
    start_agent(setup)
    watches = [FarMustFollow(catalog, p, far, files[p], new[p]) for p in files]
    wait_until(lambda: all([w.check() for w in watches]), timeout=15, interval=0.02,
               message="both edited files shipped again and only then deleted")
    for p in files:
        row = newest_row(catalog, p)
        assert row.local_md5sum == md5(new[p])
        assert (far / row.remote_path).read_bytes() == new[p]


def test_a_file_touched_back_to_its_old_time_without_new_content_keeps_its_proof(
        setup, start_agent, tmp_path):
    """The other side of identity: a changed ctime means hash again, not ship
    again; the same content is deleted on its existing far copy."""
    far = setup.archive(delete_local_after=0.5)
    inbox = setup.rule()
    agent = start_agent(setup, housekeeping_interval=3600)
    catalog = setup.catalog()
    c = inbox / "c.dat"
    data = os.urandom(SIZE)
    c.write_bytes(data)
    wait_until(lambda: verified(catalog, c), timeout=15)
    copied = catalog.files.rows_for_path(str(c))[0].copied
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    edit_keeping_size_and_mtime(c, data, scratch, python_in_place_then_utime)
    shipped_again_then_deleted(catalog, c, far, data, data, housekeep=agent.housekeep_once)
    assert catalog.files.rows_for_path(str(c))[0].copied == copied, "the same content was shipped again"
