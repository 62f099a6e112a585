"""Fault injection: the agent is a real process, killed, frozen and starved.

Each test holds one of DESIGN.md's "Promises that tests must hold" and
checks the END STATE: the catalog's rows and the archive's files, byte for
byte. The agent runs as ``watcher run --config FILE`` (tests/agent_process.py);
pause points (watcher/faults.py) let a test SIGKILL it at an exact instant.
"""

from __future__ import annotations

import mmap
import os
import sqlite3
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests import md5_audit

from tests.catalog_rows import md5, rows, rows_of, shipped_as, verified, write_files
from tests.waiting import wait_until
from watcher.catalog import Catalog
from watcher.faults import POINTS
from watcher.rsync import BATCH_TREE_PREFIX

# Ten-digit ctimes far in the past: their timecode directory (16000) is
# complete at once, so it is finalized as soon as its files are verified.
TIMECODE = 16000
FILES = {
    "1600000000_a.dat": b"first file\n",
    "obs/1600000100_b.dat": os.urandom(1 << 20),
    "obs/sub dir/1600000200_c.g3": b"\0\1\2 third file" * 1000,
}


# -- reading the end state ------------------------------------------------------------


def tcdirs(database: Path) -> list[dict]:
    with sqlite3.connect(database, timeout=30) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM timecode_dirs_v0 ORDER BY id")]


def finalization_rows(all_rows: list[dict]) -> list[dict]:
    return [r for r in all_rows if r["remote_path"].endswith("_finalized.yaml")]


def far_files(far: Path) -> dict[str, bytes]:
    """Every file under the archive directory (hidden ones included) and its bytes."""
    found = {}
    for top, _dirs, names in os.walk(far):
        for name in names:
            path = Path(top) / name
            found[str(path.relative_to(far))] = path.read_bytes()
    return found


def timecoded_deployment(setup, **archive_options):
    far = setup.archive(**archive_options)
    inbox = setup.rule(remote_path="{timecode}/{relpath}")
    return far, inbox


def all_done(database: Path, local: dict[str, bytes], deleted: bool = False) -> bool:
    """Every file verified (and removed, when retention is on) and its directory finalized."""
    all_rows = rows(database)
    data = [r for r in all_rows if r["local_path"] in local]
    fin = finalization_rows(all_rows)
    return (len({r["local_path"] for r in data}) == len(local)
            and all(verified(r) for r in data)
            and (not deleted or all(r["removed"] is not None for r in data))
            and bool(fin) and all(verified(r) for r in fin)
            and all(d["finalized"] for d in tcdirs(database) if d["timecode"] == TIMECODE))


def assert_shipped_exactly_once(database: Path, far: Path, local: dict[str, bytes],
                                remote_of, deleted: bool = False) -> None:
    """The promise's end state, checked from the catalog and the archive directory.

    One row per local path, verified; far copies byte-identical; nothing else
    in the archive (no partial or temporary file); the timecode directory
    finalized exactly once, its finalization file shipped and describing
    all its files.
    """
    all_rows = rows(database)
    for path, content in local.items():
        mine = [r for r in all_rows if r["local_path"] == path]
        assert len(mine) == 1, f"{path} has {len(mine)} catalog rows: {mine}"
        row = mine[0]
        assert verified(row), f"{path} not verified: {row}"
        assert row["remote_path"] == remote_of(path)
        if deleted:
            assert row["removed"] and row["removed"] > 0, f"{path} not deleted by retention: {row}"
            assert not os.path.exists(path), f"{path} marked removed but still there"
        else:
            assert row["removed"] is None, f"{path} unexpectedly removed: {row}"
            assert Path(path).read_bytes() == content
    fin = finalization_rows(all_rows)
    per_dir: dict[tuple[str, str], int] = {}
    for r in fin:
        name = r["remote_path"].rsplit("/", 1)[-1]        # {now}_{archive}_{timecode}_finalized.yaml
        timecode = name[: -len("_finalized.yaml")].rsplit("_", 1)[-1]
        per_dir[(r["archive_name"], timecode)] = per_dir.get((r["archive_name"], timecode), 0) + 1
    assert per_dir == {("arch", str(TIMECODE)): 1}, f"finalization rows per directory: {per_dir}"
    [fin_row] = fin
    assert verified(fin_row)
    [tcdir] = [d for d in tcdirs(database) if d["timecode"] == TIMECODE]
    assert tcdir["finalized"] and tcdir["finalize_file_id"] == fin_row["id"]

    found = far_files(far)
    expected = {remote_of(p): c for p, c in local.items()}
    fin_far = found.get(fin_row["remote_path"])
    assert fin_far is not None, f"finalization file {fin_row['remote_path']} not in the archive"
    assert set(found) == set(expected) | {fin_row["remote_path"]}, \
        f"unexpected files in the archive: {sorted(set(found) - set(expected) - {fin_row['remote_path']})}"
    for remote, content in expected.items():
        assert found[remote] == content, f"far copy of {remote} differs"
    summary = yaml.safe_load(fin_far)
    assert summary["timecode"] == TIMECODE and summary["num_files"] == len(local)
    assert summary["archive_name"] == "arch"
    assert summary["subdirs"] == sorted({remote_of(p).split("/")[1] for p in local
                                         if remote_of(p).count("/") > 1})


def assert_no_partial_or_stray_file(far: Path, expected: dict[str, bytes], file_root: Path) -> None:
    """Whatever the archive holds right now is whole: each file byte-identical to its
    source (a finalization file to the local one of its name), nothing else (no rsync
    temporary file such as .name.XXXXXX)."""
    for remote, content in far_files(far).items():
        parts = remote.split("/")
        if remote in expected:
            assert content == expected[remote], f"partial or wrong file under the final name {remote}"
        elif len(parts) == 4 and parts[1] == "suprsync" and parts[3].endswith("_finalized.yaml"):
            local = file_root / parts[0] / parts[2] / parts[3]
            assert local.exists() and local.read_bytes() == content, f"{remote} differs from {local}"
        else:
            raise AssertionError(f"stray file in the archive: {remote}")


def written_finalization_files(file_root: Path) -> list[Path]:
    return sorted(file_root.rglob("*_finalized.yaml"))


# -- promise 3: kill -9 at any instant ------------------------------------------------------


@pytest.mark.parametrize("point", POINTS)
def test_agent_killed_at_a_pause_point_ships_every_file_exactly_once_after_restart(
        point, setup, agent_processes):
    """Promise 3: SIGKILL at each pause point, start again: nothing lost, nothing twice.

    Every file ends with one verified row and a byte-identical far copy, no
    partial or temporary file is left in the archive, the timecode directory
    gets exactly one finalization file, and (at "deleting") a local file is
    deleted at most once, with the catalog saying so.
    """
    retention = point == "deleting"
    far, inbox = timecoded_deployment(setup, **({"delete_local_after": 1} if retention else {}))
    local = write_files(inbox, FILES)
    agent = agent_processes(setup)
    agent.start(pause_at=point)
    agent.wait_paused()
    agent.kill()
    assert "Traceback" not in agent.log()
    remote_of = lambda p: f"{TIMECODE}/{os.path.relpath(p, inbox)}"  # noqa: E731
    assert_no_partial_or_stray_file(far, {remote_of(p): c for p, c in local.items()}, setup.file_root)
    orphans = written_finalization_files(setup.file_root) if point == "finalizing" else []
    if point == "finalizing":
        # Its YAML is written but was never registered. Restart in a later second,
        # so the new finalization file cannot simply overwrite it under the same name.
        [orphan] = orphans
        written_at = int(orphan.name.split("_", 1)[0])
        wait_until(lambda: time.time() >= written_at + 1, timeout=3, message="the next second")

    agent.start().wait_ready()
    agent.wait_for(lambda: all_done(setup.database, local, deleted=retention), timeout=40,
                   message=f"every file verified{' and deleted' if retention else ''} and finalized")
    assert agent.terminate() == 0
    assert_shipped_exactly_once(setup.database, far, local, remote_of, deleted=retention)
    registered = {r["local_path"] for r in finalization_rows(rows(setup.database))}
    assert not registered & {str(o) for o in orphans}, "the unregistered finalization file was registered"
    assert not [o for o in orphans if o.exists()], "the unregistered finalization file was left behind"
    assert "Traceback" not in agent.log()


def batch_trees_of(pid: int) -> list[Path]:
    """The temporary symlink trees (watcher/rsync.py) a process left behind."""
    bases = {Path("/dev/shm"), Path(tempfile.gettempdir())}
    return [t for base in bases if base.is_dir() for t in base.glob(f"{BATCH_TREE_PREFIX}{pid}-*")]


def test_power_cut_during_a_transfer_leaves_no_partial_file_under_a_final_name(setup, agent_processes):
    """Promise 3: the agent and its rsync killed together mid-copy (a power cut): the
    final name never holds a partial file; after the restart it holds the whole file,
    registered once.

    Known limit (rsync's, reported): the killed rsync's hidden temporary file
    (.name.XXXXXX) stays beside it; nothing ever ships or reads it.
    """
    far = setup.archive(bwlimit="300")  # KiB/s: the copy takes seconds
    # A far name that is not the end of the local path: shipped through a batch symlink tree.
    inbox = setup.rule(remote_path="renamed/{name}")
    local = write_files(inbox, {"big.dat": os.urandom(3 << 20)})
    agent = agent_processes(setup).start()

    def temporary_files():
        return [name for name in far_files(far) if os.path.basename(name).startswith(".")] if far.exists() else []

    temps = agent.wait_for(temporary_files, message="rsync's temporary file in the archive")
    assert not (far / "renamed" / "big.dat").exists()
    killed = agent.pid
    agent.kill_with_children()
    assert not (far / "renamed" / "big.dat").exists(), "a partial file under the final name"
    assert batch_trees_of(killed), "the killed agent's batch tree should still be there"

    del setup.archives["arch"]["bwlimit"]
    setup.write()
    agent.start().wait_ready()
    assert not batch_trees_of(killed), "the new agent did not clear the killed one's batch tree"
    agent.wait_for(lambda: one_verified_row_each(setup.database, list(local)), message="big.dat shipped")
    assert (far / "renamed" / "big.dat").read_bytes() == local[str(inbox / "big.dat")]
    assert set(far_files(far)) <= {"renamed/big.dat", *temps}
    assert len(rows(setup.database)) == 1


# -- promise 1: complete files only, changes shipped again -----------------------------------


def test_a_file_still_open_when_its_new_directory_is_scanned_has_only_its_final_md5_recorded(
        setup, agent_processes):
    """Promise 1, the scan's rule: a file made with its directory before the agent
    watches it (the agent frozen meanwhile) arrives with no events of its own; the
    directory's scan finds it open for writing and must not take it for complete.
    Written in chunks over ~3 s, it is registered once done: the catalog never held
    another md5 for it (a partial file registered, then shipped again, would leave
    the same end state)."""
    far = setup.archive()
    inbox = setup.rule()
    md5_audit.install(setup.database)
    agent = agent_processes(setup).start().wait_ready()
    chunks = [os.urandom(32 << 10) for _ in range(15)]
    path = inbox / "new run" / "slow.dat"
    agent.freeze()
    try:
        path.parent.mkdir()
        f = open(path, "wb")
        f.write(chunks[0])
        f.flush()
    finally:
        agent.thaw()
    with f:
        for chunk in chunks[1:]:
            time.sleep(0.2)  # the writer's pace (under the rule's 0.5 s settle), not a wait
            f.write(chunk)
            f.flush()
    content = b"".join(chunks)
    agent.wait_for(lambda: shipped_as(setup.database, far, path, "new run/slow.dat", content),
                   message="the final content verified on both sides")
    assert path.read_bytes() == content
    assert set(md5_audit.md5s_recorded(setup.database, path)) == {md5(content)}


def test_file_appended_after_it_was_shipped_is_shipped_again_with_its_new_content(setup, agent_processes):
    """Promise 1: registered content changing later is noticed and shipped again (same row)."""
    far = setup.archive()
    inbox = setup.rule()
    agent = agent_processes(setup).start().wait_ready()
    path = inbox / "grows.dat"
    first = os.urandom(100_000)
    path.write_bytes(first)
    agent.wait_for(lambda: shipped_as(setup.database, far, path, "grows.dat", first),
                   message="the first version shipped")
    with open(path, "ab") as f:
        f.write(b"appended later\n")
    agent.wait_for(lambda: shipped_as(setup.database, far, path, "grows.dat", first + b"appended later\n"),
                   message="the appended version shipped")
    [row] = rows_of(setup.database, path)
    assert row["remote_md5sum"] == row["local_md5sum"] == md5(first + b"appended later\n")


def test_file_registered_then_deleted_before_shipping_is_marked_removed_not_retried(setup, agent_processes):
    """Promise 6: a registered file that vanished before its copy is marked removed (0) once;
    it is never charged attempts, never retried, and does not hold up the others."""
    far = setup.archive()
    inbox = setup.rule()
    gone, kept = inbox / "gone.dat", inbox / "kept.dat"
    gone.write_bytes(b"registered, then deleted")
    kept.write_bytes(b"registered and kept")
    catalog = Catalog(setup.database)
    catalog.add_file(str(gone), "gone.dat", "arch")
    catalog.add_file(str(kept), "kept.dat", "arch")
    catalog.close()
    gone.unlink()

    agent = agent_processes(setup).start().wait_ready()
    agent.wait_for(lambda: [r["removed"] for r in rows_of(setup.database, gone)] == [0],
                   message="the vanished file marked removed (0)")
    agent.wait_for(lambda: shipped_as(setup.database, far, kept, "kept.dat", b"registered and kept"),
                   message="the other file shipped")
    assert agent.terminate() == 0
    [row] = rows_of(setup.database, gone)
    assert row["removed"] == 0 and row["remote_md5sum"] is None
    assert (row["failed_copy_attempts"] or 0) == 0
    assert not (far / "gone.dat").exists()
    assert agent.log().count(f"{gone} disappeared before it was shipped") == 1


# -- promise 5: lost events ----------------------------------------------------------------------


def one_verified_row_each(database: Path, paths: list[str]) -> bool:
    """Every path has exactly one row and it is verified."""
    by_path: dict[str, list[dict]] = {}
    for r in rows(database):
        by_path.setdefault(r["local_path"], []).append(r)
    return all(len(by_path.get(p, [])) == 1 and verified(by_path[p][0]) for p in paths)


def assert_one_row_each_and_far_identical(database: Path, far: Path, local: dict[str, bytes], inbox: Path):
    counts: dict[str, int] = {}
    for r in rows(database):
        counts[r["local_path"]] = counts.get(r["local_path"], 0) + 1
    twice = {p: n for p, n in counts.items() if n > 1}
    assert not twice, f"registered more than once: {twice}"
    assert set(counts) == set(local), f"unexpected rows: {sorted(set(counts) ^ set(local))[:5]}"
    found = far_files(far)
    assert found == {os.path.relpath(p, inbox): c for p, c in local.items()}


def test_files_created_while_the_agent_was_down_are_registered_by_the_start_up_scan(setup, agent_processes):
    """Promise 5: files that appeared while the agent was down are found at start, once each."""
    far = setup.archive()
    inbox = setup.rule()
    agent = agent_processes(setup).start().wait_ready()
    local = write_files(inbox, {"before.dat": b"shipped before the stop"})
    agent.wait_for(lambda: one_verified_row_each(setup.database, list(local)), message="before.dat shipped")
    assert agent.terminate() == 0

    local.update(write_files(inbox, {"while down.dat": b"written while the agent was down",
                                     "new dir/deeper/also down.dat": b"in a new tree"}))
    agent.start().wait_ready()
    agent.wait_for(lambda: one_verified_row_each(setup.database, list(local)),
                   message="the files written while down shipped")
    assert_one_row_each_and_far_identical(setup.database, far, local, inbox)


def test_a_tree_moved_in_at_once_is_registered_once_per_file(setup, agent_processes):
    """Promise 5: a directory tree prepared elsewhere and renamed into the watch at once
    (its files' own events never happen) is found, each file registered exactly once."""
    far = setup.archive()
    inbox = setup.rule()
    staging = setup.root / "staging" / "run 7"
    tree = {f"level1/level2-{i % 3}/file-{i}.dat": f"file {i}\n".encode() * (i + 1) for i in range(40)}
    write_files(staging, tree)
    agent = agent_processes(setup).start().wait_ready()
    os.rename(staging, inbox / "run 7")
    local = {str(inbox / "run 7" / rel): content for rel, content in tree.items()}
    agent.wait_for(lambda: one_verified_row_each(setup.database, list(local)), message="the moved tree shipped")
    assert_one_row_each_and_far_identical(setup.database, far, local, inbox)


def test_files_whose_events_overflowed_the_kernel_queue_are_found_by_a_rescan(
        setup, agent_processes, memory_dir):
    """Promise 5: events lost to an inotify queue overflow (the agent frozen while thousands
    of files arrive) cost nothing: a rescan registers every file, once."""
    far = setup.archive(remote_basedir=memory_dir / "far")
    inbox = setup.rule(watch=str(memory_dir / "inbox"))
    agent = agent_processes(setup).start().wait_ready()
    queue_size = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    count = queue_size // 2 + 2000  # each file makes at least two events (created, closed)
    agent.freeze()
    try:
        # In the watched directory itself: a new subdirectory would have no watch
        # yet, so its files would make no events to lose.
        local = write_files(inbox, {f"f{i}.dat": b"%d\n" % i for i in range(count)})
    finally:
        agent.thaw()
    agent.wait_for(lambda: one_verified_row_each(setup.database, list(local)), timeout=90,
                   message=f"all {count} files shipped")
    assert "overflow" in agent.log().lower(), "the queue did not overflow: the test proved nothing"
    assert_one_row_each_and_far_identical(setup.database, far, local, inbox)


def test_content_changed_without_any_event_is_found_by_the_periodic_rescan(setup, agent_processes):
    """Promise 5 (and 1): a change inotify never reports (a write through a shared memory
    map) is found by the periodic rescan and shipped again."""
    setup.top["rescan_interval"] = 1
    far = setup.archive()
    inbox = setup.rule()
    agent = agent_processes(setup).start().wait_ready()
    path = inbox / "mapped.dat"
    first, second = b"A" * 4096, b"B" * 4096
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, first)
    mapped = mmap.mmap(fd, len(first))
    os.close(fd)  # the map keeps the file open: its close event comes only when the map goes
    try:
        agent.wait_for(lambda: shipped_as(setup.database, far, path, "mapped.dat", first),
                       message="the first version shipped (complete once quiet)")
        seen = len(agent.log())
        mapped[:] = second  # no inotify event for this
        mapped.flush()
        agent.wait_for(lambda: shipped_as(setup.database, far, path, "mapped.dat", second), timeout=30,
                       message="the silently changed version shipped")
    finally:
        mapped.close()
    assert "scan found 1 new or changed files" in agent.log()[seen:]
