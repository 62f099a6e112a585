"""A far copy that is the only copy of some content is never overwritten: a
local name reused after its first file was shipped and deleted gets a
versioned far name (``name.~2~``, ``name.~3~``), the same content keeps the
name, and a file whose far name is held by a row whose file vanished (its
directory renamed) is registered, not refused (DESIGN.md, promise 8; issue 8).

Real agents on real files with a short retention, and the producers' API
(``watcher.db.add_file``, ``Catalog.add_file``, socs' files manager).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.agent_process import watcher_command
from tests.status_command import SHOWN
from tests.waiting import wait_until
from watcher.agent import Agent
from watcher.db import Catalog, SupRsyncFilesManager, add_file, create_file


# -- helpers ----------------------------------------------------------------------------

def status(setup) -> dict:
    """``watcher status --json --config <rules>``, run as a real command."""
    done = subprocess.run(watcher_command("status", "--json", "--config", str(setup.write())),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode in SHOWN, done.stderr
    return json.loads(done.stdout)


RSYNC_TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9]{6}")


def far_contents(far: Path) -> dict[str, bytes]:
    """The far files under their names: not the copies rsync keeps in
    .watcher-replaced/ (where one identical to its file's new copy is
    removed again), nor the hidden ``.name.XXXXXX`` file an rsync is
    writing at this moment (renamed over its final name when complete)."""
    found = {}
    for dirpath, dirs, files in os.walk(far):
        if Path(dirpath) == far and ".watcher-replaced" in dirs:
            dirs.remove(".watcher-replaced")
        for name in files:
            path = Path(dirpath) / name
            if RSYNC_TEMPORARY.fullmatch(name) or path.is_symlink():
                continue
            try:
                found[str(path.relative_to(far))] = path.read_bytes()
            except FileNotFoundError:
                continue  # gone since the walk (a name seen before fails FarCopiesStay.check)
    return found


def deleted_rows(catalog: Catalog, path: Path) -> list:
    return [r for r in catalog.files.rows_for_path(str(path)) if (r.removed or 0) > 0]


class FarCopiesStay:
    """Far files seen once must keep their content: none is ever overwritten
    with other content (checked at every poll)."""

    def __init__(self, far: Path):
        self.far = far
        self.seen: dict[str, bytes] = {}

    def check(self) -> None:
        now = far_contents(self.far)
        for name, data in self.seen.items():
            assert name in now, f"far copy {name} disappeared"
            assert now[name] == data, f"far copy {name} was overwritten: {data!r} -> {now[name]!r}"
        for name, data in now.items():
            self.seen.setdefault(name, data)


def write_and_wait_until_deleted(catalog: Catalog, path: Path, data: bytes, far_copies: FarCopiesStay,
                                 generation: int) -> None:
    """One generation of a local name: written, shipped, verified, deleted by retention."""
    assert not path.exists()
    path.write_bytes(data)

    def gone() -> bool:
        far_copies.check()
        return len(deleted_rows(catalog, path)) == generation and not path.exists()

    wait_until(gone, timeout=15, message=f"generation {generation} of {path.name} shipped and deleted")
    far_copies.check()


# -- a name reused by the agent's own files ---------------------------------------------------

def test_a_reused_name_never_overwrites_the_only_far_copy_of_an_earlier_file(setup, start_agent):
    far = setup.archive(delete_local_after=0.5)
    inbox = setup.rule()
    start_agent(setup)
    catalog = setup.catalog()
    c = inbox / "c"
    copies = FarCopiesStay(far)
    write_and_wait_until_deleted(catalog, c, b"monday\n", copies, 1)
    assert far_contents(far) == {"c": b"monday\n"}
    write_and_wait_until_deleted(catalog, c, b"tuesday\n", copies, 2)
    assert far_contents(far) == {"c": b"monday\n", "c.~2~": b"tuesday\n"}
    write_and_wait_until_deleted(catalog, c, b"wednesday\n", copies, 3)
    assert far_contents(far) == {"c": b"monday\n", "c.~2~": b"tuesday\n", "c.~3~": b"wednesday\n"}
    # The content the far name already holds keeps the name: no new version.
    write_and_wait_until_deleted(catalog, c, b"monday\n", copies, 4)
    assert far_contents(far) == {"c": b"monday\n", "c.~2~": b"tuesday\n", "c.~3~": b"wednesday\n"}
    assert [r.remote_path for r in catalog.files.rows_for_path(str(c))] == ["c", "c.~2~", "c.~3~", "c"]
    assert all(r.verified for r in catalog.files.rows_for_path(str(c)))


def test_a_reused_name_in_a_subdirectory_gets_its_version_beside_the_first(setup, start_agent):
    far = setup.archive(delete_local_after=0.5)
    inbox = setup.rule(remote_path="{timecode}/{relpath}")
    start_agent(setup)
    catalog = setup.catalog()
    (inbox / "obs").mkdir()
    c = inbox / "obs" / "1700000000_c.dat"
    copies = FarCopiesStay(far)
    write_and_wait_until_deleted(catalog, c, b"first\n", copies, 1)
    write_and_wait_until_deleted(catalog, c, b"second\n", copies, 2)
    data = {name: d for name, d in far_contents(far).items() if name.startswith("17000/")}
    assert data == {"17000/obs/1700000000_c.dat": b"first\n", "17000/obs/1700000000_c.dat.~2~": b"second\n"}


def test_a_log_recreated_and_appended_across_generations_keeps_every_line(setup, start_agent):
    far = setup.archive(delete_local_after=0.5)
    inbox = setup.rule()
    start_agent(setup)
    catalog = setup.catalog()
    log = inbox / "app.log"
    copies = FarCopiesStay(far)
    written: list[bytes] = []
    for generation in range(1, 4):
        lines = [b"generation %d line %d\n" % (generation, n) for n in range(1, 4)]
        log.write_bytes(lines[0])  # recreate
        for line in lines[1:]:
            with open(log, "ab") as f:  # append, one close event each
                f.write(line)
        written += lines

        def gone() -> bool:
            copies.check()
            return len(deleted_rows(catalog, log)) == generation and not log.exists()

        wait_until(gone, timeout=15, message=f"generation {generation} of the log shipped and deleted")
        on_far_side = b"".join(far_contents(far).values())
        missing = [line for line in written if line not in on_far_side]
        assert not missing, f"lines lost after generation {generation}: {missing}"
    assert sorted(far_contents(far)) == ["app.log", "app.log.~2~", "app.log.~3~"]


def test_a_name_reused_the_moment_retention_deletes_it_never_overwrites_its_far_copy(
        setup, start_agent):
    """A producer writes ``c`` again as soon as retention has deleted it, while
    that retention round is still deleting other files: the new content is a
    new file, not a change of the one just deleted."""
    far = setup.archive(delete_local_after=0.5)
    inbox = setup.rule()
    # Retention only when the test says: one round takes c and the others at once.
    agent = start_agent(setup, housekeeping_interval=3600)
    catalog = setup.catalog()
    c = inbox / "c"
    c.write_bytes(b"monday\n")
    wait_until(lambda: catalog.files.rows_for_path(str(c)), timeout=10)
    (inbox / "others").mkdir()
    others = 499  # registered after c: deleted after it in the same round
    for i in range(others):
        (inbox / "others" / f"f{i:03d}").write_bytes(b"other %d" % i)
    wait_until(lambda: sum(r.verified for r in catalog.reports.known_files("arch", 0)) == others + 1,
               timeout=15, message="every file verified")
    wait_until(lambda: catalog.removals.deletable("arch", time.time(), 0.5, 0.5, others + 1)
               and len(catalog.removals.deletable("arch", time.time(), 0.5, 0.5, others + 1)) == others + 1,
               timeout=5, message="every file past its retention")
    copies = FarCopiesStay(far)
    copies.check()
    stop = threading.Event()

    def producer() -> None:
        while not stop.is_set():
            if not os.path.lexists(c):
                c.write_bytes(b"tuesday\n")
                return
            stop.wait(0.001)

    thread = threading.Thread(target=producer, name="test-producer")
    thread.start()
    try:
        agent.retain_once()
    finally:
        stop.set()
        thread.join()
    assert c.read_bytes() == b"tuesday\n", "the round did not delete c"

    def tuesday_shipped() -> bool:
        agent.retain_once()
        copies.check()
        return b"tuesday\n" in far_contents(far).values()

    agent.rescan()  # the periodic rescan, now: a file whose registration was lost is found
    wait_until(tuesday_shipped, timeout=10, message="tuesday shipped under a name of its own")
    copies.check()
    assert far_contents(far)["c"] == b"monday\n"


# -- a directory renamed inside the tree ------------------------------------------------------

def _rename_keeps_far_names(setup, start_agent, wait_for_verified: bool) -> None:
    far = setup.archive()
    inbox = setup.rule(remote_path="{name}")  # far names without the directory
    start_agent(setup)
    catalog = setup.catalog()
    (inbox / "d1").mkdir()
    files = {"a.dat": b"alpha", "b.dat": b"bravo"}
    for name, data in files.items():
        (inbox / "d1" / name).write_bytes(data)
    if wait_for_verified:
        wait_until(lambda: all(catalog.files.rows_for_path(str(inbox / "d1" / n))
                               and catalog.files.rows_for_path(str(inbox / "d1" / n))[0].verified
                               for n in files), timeout=15)
    else:
        wait_until(lambda: all(catalog.files.rows_for_path(str(inbox / "d1" / n)) for n in files), timeout=15)
    os.rename(inbox / "d1", inbox / "d2")

    def registered_again() -> bool:
        rows = [catalog.files.rows_for_path(str(inbox / "d2" / n)) for n in files]
        return all(len(r) == 1 and r[0].verified for r in rows)

    wait_until(registered_again, timeout=15, message="the renamed files registered and verified")
    for name, data in files.items():
        [row] = catalog.files.rows_for_path(str(inbox / "d2" / name))
        assert row.remote_path == name
        [old] = catalog.files.rows_for_path(str(inbox / "d1" / name))
        assert old.removed is not None, "the vanished file's row still holds its far name"
    assert far_contents(far) == files

    def nothing_pending() -> bool:
        s = status(setup)["arch"]
        assert "far names taken" not in s.get("problems", {}), s["problems"]
        return s["pending"] == 0 and s["failed"] == 0

    wait_until(nothing_pending, timeout=10, message="status to show nothing pending")


def test_a_directory_renamed_after_shipping_is_registered_again_under_its_far_names(
        setup, start_agent):
    _rename_keeps_far_names(setup, start_agent, wait_for_verified=True)


def test_a_directory_renamed_before_shipping_is_registered_again_under_its_far_names(
        setup, start_agent):
    _rename_keeps_far_names(setup, start_agent, wait_for_verified=False)


# -- the producers' API -------------------------------------------------------------------------

def _producers_deployment(setup, start_agent, tmp_path):
    """A running agent whose archive takes files producers register under
    tmp_path/produced (an API root) and deletes them 0.5 s after. Returns
    (far, catalog, produced)."""
    produced = tmp_path / "produced"
    produced.mkdir()
    far = setup.archive(delete_local_after=0.5, api_roots=[str(produced)])
    setup.rule()
    start_agent(setup)
    return far, setup.catalog(), produced


def test_the_api_gives_a_reused_name_with_other_content_a_version_and_keeps_it_for_the_same(
        setup, start_agent, tmp_path):
    far, catalog, produced = _producers_deployment(setup, start_agent, tmp_path)
    p = produced / "c.dat"
    copies = FarCopiesStay(far)

    def shipped_and_deleted(generation: int) -> None:
        def gone() -> bool:
            copies.check()
            return len(deleted_rows(catalog, p)) == generation and not p.exists()
        wait_until(gone, timeout=15, message=f"generation {generation} shipped and deleted")

    p.write_bytes(b"monday\n")
    assert add_file(str(p), "c.dat", "arch", db_path=str(setup.database)).remote_path == "c.dat"
    shipped_and_deleted(1)
    p.write_bytes(b"tuesday\n")
    assert catalog.add_file(str(p), "c.dat", "arch").remote_path == "c.dat.~2~"
    shipped_and_deleted(2)
    p.write_bytes(b"wednesday\n")
    assert add_file(str(p), "c.dat", "arch", db_path=str(setup.database)).remote_path == "c.dat.~3~"
    shipped_and_deleted(3)
    p.write_bytes(b"monday\n")  # what c.dat holds: the name is kept
    assert catalog.add_file(str(p), "c.dat", "arch").remote_path == "c.dat"
    shipped_and_deleted(4)
    assert far_contents(far) == {"c.dat": b"monday\n", "c.dat.~2~": b"tuesday\n",
                                 "c.dat.~3~": b"wednesday\n"}


def test_a_producer_registering_the_same_file_again_keeps_its_far_name(setup, tmp_path):
    """socs' behaviour: add_file for a file already registered, same content,
    inserts a row under the same name (no version, no refusal)."""
    setup.archive()
    setup.write()
    catalog = setup.catalog()
    p = tmp_path / "kept.dat"
    p.write_bytes(b"same content")
    first = catalog.add_file(str(p), "kept.dat", "arch")
    again = add_file(str(p), "kept.dat", "arch", db_path=str(setup.database))
    srfm = SupRsyncFilesManager(str(setup.database))
    srfm.add_file(str(p), "kept.dat", "arch")
    rows = catalog.files.rows_for_path(str(p))
    assert [r.remote_path for r in rows] == ["kept.dat"] * 3
    assert first.remote_path == again.remote_path == "kept.dat"


def test_socs_files_manager_gives_a_reused_name_with_other_content_a_version(
        setup, start_agent, tmp_path):
    far, catalog, produced = _producers_deployment(setup, start_agent, tmp_path)
    srfm = SupRsyncFilesManager(str(setup.database))
    p = produced / "produced.dat"
    p.write_bytes(b"first")
    srfm.add_file(str(p), "produced.dat", "arch")
    wait_until(lambda: len(deleted_rows(catalog, p)) == 1 and not p.exists(), timeout=15)
    p.write_bytes(b"second")
    with srfm.Session.begin() as session:  # as socs producers batch their files
        session.add_all([create_file(str(p), "produced.dat", "arch")])
    wait_until(lambda: len(deleted_rows(catalog, p)) == 2 and not p.exists(), timeout=15)
    assert [r.remote_path for r in catalog.files.rows_for_path(str(p))] == ["produced.dat", "produced.dat.~2~"]
    assert far_contents(far) == {"produced.dat": b"first", "produced.dat.~2~": b"second"}


# -- a verified file replaced by another file (another inode) while the agent runs -------------

def _remove_and_write(path: Path, data: bytes, scratch: Path) -> None:
    path.unlink()
    path.write_bytes(data)


def _rename_over(path: Path, data: bytes, scratch: Path) -> None:
    (scratch / "new").write_bytes(data)
    os.rename(scratch / "new", path)


def _rsync_t(path: Path, data: bytes, scratch: Path) -> None:
    (scratch / path.name).write_bytes(data)
    subprocess.run(["rsync", "-t", str(scratch / path.name), str(path)], check=True)


REPLACEMENTS = {"rm then write": _remove_and_write, "rename over": _rename_over, "rsync -t": _rsync_t}


@pytest.mark.parametrize("how", list(REPLACEMENTS), ids=[k.replace(" ", "_") for k in REPLACEMENTS])
def test_a_verified_file_replaced_by_another_file_keeps_its_far_copy_and_the_new_one_gets_a_version(
        setup, start_agent, tmp_path, how):
    far = setup.archive()  # keeps local files: the first is gone only because it was replaced
    inbox = setup.rule()
    start_agent(setup)
    catalog = setup.catalog()
    far_copies = FarCopiesStay(far)
    c = inbox / "c.dat"
    c.write_bytes(b"first")
    wait_until(lambda: any(r.verified for r in catalog.files.rows_for_path(str(c))), timeout=15)
    far_copies.check()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    REPLACEMENTS[how](c, b"second", scratch)

    def both_shipped() -> bool:
        far_copies.check()
        return far_contents(far) == {"c.dat": b"first", "c.dat.~2~": b"second"}

    wait_until(both_shipped, timeout=15, message="the replacement shipped beside the first copy")
    rows = catalog.files.rows_for_path(str(c))
    assert [(r.remote_path, r.removed is not None) for r in rows] == [("c.dat", True), ("c.dat.~2~", False)]


def test_a_file_replaced_while_the_agent_is_stopped_never_overwrites_the_first_far_copy(
        setup, start_agent, tmp_path):
    """At start, retention meets the new file before the registrar does: it
    must not take it for an edit of the first (and ship it over its copy)."""
    far = setup.archive()
    inbox = setup.rule()
    first = start_agent(setup)
    catalog = setup.catalog()
    a = inbox / "zz" / "a.dat"
    a.parent.mkdir()
    a.write_bytes(b"FIRST content\n")
    wait_until(lambda: any(r.verified for r in catalog.files.rows_for_path(str(a))), timeout=15)
    first.stop()
    (inbox / "zz" / ".a.tmp").write_bytes(b"SECOND content\n")
    os.rename(inbox / "zz" / ".a.tmp", a)  # another inode, other content, same name
    setup.archives["arch"]["delete_local_after"] = 1
    far_copies = FarCopiesStay(far)
    far_copies.check()
    agent = Agent(setup.config(), housekeeping_interval=0.2)
    try:
        agent.housekeep_once(now=time.time() + 60)  # retention first, before any scan
        far_copies.check()
        agent.start()
        _second_shipped_then_deleted(a, far, far_copies)
    finally:
        agent.stop()


def _second_shipped_then_deleted(a: Path, far: Path, far_copies: FarCopiesStay) -> None:
    def second_shipped_and_deleted() -> bool:
        far_copies.check()
        return not a.exists()

    wait_until(second_shipped_and_deleted, timeout=20, message="the new file shipped, then deleted")
    assert far_contents(far) == {"zz/a.dat": b"FIRST content\n", "zz/a.dat.~2~": b"SECOND content\n"}
