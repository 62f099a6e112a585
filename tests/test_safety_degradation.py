"""Nothing degrades silently, and no walk leads out of the tree.

A directory or file the agent may not read, directory watches lost to the
inotify limit, a watch root deleted and made again: each shows in `watcher
status` (text and JSON) and is logged once at WARNING with what to do; what
was held back ships once the cause is gone. Polling never follows a
symlink. A far copy that keeps mismatching is tried again at growing
intervals, without holding up other files.

Root reads anything, so tests that need a permission error run the agent as
root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (setpriv): file modes
then bind it as they bind any user. The inotify watch limit is lowered for
the agent alone, in a user namespace of its own.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.catalog_rows import row_of, rows, verified
from tests.status_command import problems, status, wait_for_problems
from tests.waiting import wait_until
from tests.agent_logs import LIMITED_WATCHES, shipped, warnings_about

# In a user namespace of its own, with the inotify watch limit given after it.


# -- helpers -----------------------------------------------------------------------




# -- polling and scans never follow a symlink -----------------------------------------


@pytest.mark.parametrize("poll", [True, False], ids=["poll", "inotify"])
@pytest.mark.parametrize("when", ["before start", "while running"])
def test_no_walk_follows_a_symlink_out_of_the_tree_or_round_a_loop(setup, start_agent, tmp_path, poll, when):
    """Links to a directory outside, to a file outside, and up to the tree's own
    parent (a loop) are neither followed nor shipped, and retention deletes nothing
    outside; each link is reported once. The polling observer and the scans are
    the walks; a file beside the links ships and is deleted as usual."""
    far = setup.archive(delete_local_after=0.5)
    inbox = setup.rule(poll=poll, settle=0.2)
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    kept = {outside / "secret.dat": b"not yours", outside / "deep" / "more.dat": b"nor this"}
    for path, content in kept.items():
        path.write_bytes(content)
    (inbox / "sub").mkdir()
    links = {inbox / "out": outside, inbox / "sub" / "up": Path(".."), inbox / "secret.dat": outside / "secret.dat"}

    def make_links():
        for link, target in links.items():
            os.symlink(target, link)

    if when == "before start":
        make_links()
    start_agent(setup)
    if when == "while running":
        make_links()
    mine = inbox / "sub" / "mine.dat"
    mine.write_bytes(b"mine")
    wait_until(lambda: not mine.exists(), timeout=15, message="mine.dat shipped, verified and deleted")
    wait_for_problems(setup, {"symlinks": len(links)})

    assert all(path.read_bytes() == content for path, content in kept.items()), "retention deleted outside files"
    assert [r["local_path"] for r in rows(setup.database)] == [str(mine)]
    assert sorted(str(p.relative_to(far)) for p in far.rglob("*") if p.is_file()) == ["sub/mine.dat"]
    assert "PROBLEM: 3 symlinks" in status(setup).stdout


# -- unreadable directories and files ---------------------------------------------------


@pytest.mark.parametrize("poll", [False, True], ids=["inotify", "poll"])
def test_an_unreadable_directory_is_reported_once_and_ships_once_it_can_be_read(
        setup, agent_processes, without_dac, poll):
    """One unreadable before the start (the start-up scan meets it), one made
    unreadable as it appears (its creation event): both counted in status, one
    WARNING each saying what to do; their files ship once they may be read."""
    setup.top["rescan_interval"] = 1
    far = setup.archive()
    inbox = setup.rule(poll=poll, settle=0.2)
    early = inbox / "early"
    early.mkdir()
    (early / "a.dat").write_bytes(b"a")
    early.chmod(0)
    agent = agent_processes(setup).start().wait_ready()
    wait_for_problems(setup, {"unreadable directories": 1}, agent)

    late = inbox / "late"
    os.mkdir(late, 0)
    (late / "b.dat").write_bytes(b"b")  # the test itself is root with every capability
    wait_for_problems(setup, {"unreadable directories": 2}, agent)
    text = status(setup).stdout
    assert "PROBLEM: 2 unreadable directories; latest: cannot read directory" in text, text
    assert "permission" in text
    assert not any(r["local_path"].startswith((str(early), str(late))) for r in rows(setup.database))

    early.chmod(0o755)
    late.chmod(0o755)
    agent.wait_for(lambda: shipped(setup.database, far, early / "a.dat", "early/a.dat")
                   and shipped(setup.database, far, late / "b.dat", "late/b.dat"),
                   message="the files of both directories shipped once readable")
    wait_for_problems(setup, {}, agent)
    (late / "c.dat").write_bytes(b"c")  # watched like any other directory now
    agent.wait_for(lambda: shipped(setup.database, far, late / "c.dat", "late/c.dat"), message="c.dat shipped")
    for directory in (early, late):
        assert len(warnings_about(agent.log(), f"cannot read directory {directory} ")) == 1, agent.log_tail()
    assert "Traceback" not in agent.log()


def test_an_unreadable_file_is_reported_once_and_ships_once_it_can_be_read(setup, agent_processes, without_dac):
    """One unreadable file found by the start-up scan, one closed after writing
    while the agent runs: counted, one WARNING each; both ship when readable."""
    setup.top["rescan_interval"] = 1
    far = setup.archive()
    inbox = setup.rule(settle=0.2)
    early = inbox / "early.dat"
    early.write_bytes(b"early")
    early.chmod(0)
    agent = agent_processes(setup).start().wait_ready()
    late = inbox / "late.dat"
    fd = os.open(late, os.O_WRONLY | os.O_CREAT, 0)  # unreadable from its first byte
    os.write(fd, b"late")
    os.close(fd)
    wait_for_problems(setup, {"unreadable files": 2}, agent)
    assert "PROBLEM: 2 unreadable files" in status(setup).stdout
    assert not any(r["local_path"] in (str(early), str(late)) for r in rows(setup.database))

    early.chmod(0o644)
    late.chmod(0o644)
    agent.wait_for(lambda: shipped(setup.database, far, early, "early.dat")
                   and shipped(setup.database, far, late, "late.dat"), message="both files shipped")
    wait_for_problems(setup, {}, agent)
    for path in (early, late):
        assert len(warnings_about(agent.log(), f"cannot read {path}:")) == 1, agent.log_tail()


# -- directory watches lost to the inotify watch limit -----------------------------------


def test_directories_left_without_an_inotify_watch_are_reported_and_watched_again(setup, agent_processes,
                                                                                     agent_prefix):
    """The agent runs in a user namespace whose inotify watch limit is three: the
    root and two new directories get watches, a third does not (watchdog drops that
    error). Status says so, with the sysctl to raise; its files still ship through
    the rescan; once the limit is raised the rescan watches it again and the
    problem goes."""
    if subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True).returncode:
        pytest.skip("no user namespaces here")
    agent_prefix(*LIMITED_WATCHES, "3")
    setup.top["rescan_interval"] = 1
    far = setup.archive()
    inbox = setup.rule(settle=0.2)
    agent = agent_processes(setup).start().wait_ready()
    for name in ("a", "b", "c"):
        (inbox / name).mkdir()
    wait_for_problems(setup, {"lost watches": 1}, agent)
    text = status(setup).stdout
    assert "PROBLEM: 1 lost watches" in text and "fs.inotify.max_user_watches" in text, text
    (inbox / "c" / "one.dat").write_bytes(b"one")
    agent.wait_for(lambda: shipped(setup.database, far, inbox / "c" / "one.dat", "c/one.dat"),
                   message="a file of the unwatched directory shipped by the rescan")

    raised = subprocess.run(["nsenter", "--target", str(agent.pid), "--user", "sh", "-c",
                             "echo 100 > /proc/sys/user/max_inotify_watches"], capture_output=True, text=True)
    assert raised.returncode == 0, raised.stderr
    wait_for_problems(setup, {}, agent)
    (inbox / "c" / "two.dat").write_bytes(b"two")
    agent.wait_for(lambda: shipped(setup.database, far, inbox / "c" / "two.dat", "c/two.dat"),
                   message="a file of the directory watched again shipped")
    assert len(warnings_about(agent.log(), "have no inotify watch")) == 1, agent.log_tail()
    assert "Traceback" not in agent.log()


# -- a watch root deleted, or moved away, and made again -------------------------------------


@pytest.mark.parametrize("poll", [False, True], ids=["inotify", "poll"])
@pytest.mark.parametrize("how", ["deleted", "moved away"])
def test_a_watch_root_that_goes_is_reported_and_watched_again_when_it_is_back(
        setup, start_agent, tmp_path, caplog, poll, how):
    """The root goes: status shows it, one WARNING says to make it again. It comes
    back (a new directory): the problem goes and files written there ship, with
    no rescan due (only the new watch can have seen them). A root moved away is
    not followed: what is written in it now is no longer the tree's."""
    far = setup.archive()
    inbox = setup.rule(poll=poll, settle=0.2)  # rescan_interval: 300 s
    start_agent(setup)
    (inbox / "before.dat").write_bytes(b"before")
    wait_until(lambda: shipped(setup.database, far, inbox / "before.dat", "before.dat"), timeout=15)

    away = tmp_path / "inbox.old"
    with caplog.at_level(logging.WARNING):
        if how == "deleted":
            shutil.rmtree(inbox)
        else:
            os.rename(inbox, away)
        wait_for_problems(setup, {"missing watch roots": 1})  # status --config answers meanwhile
        assert f"PROBLEM: 1 missing watch roots; latest: watched directory {inbox} is gone" \
            in status(setup).stdout
        if how == "moved away":
            (away / "stray.dat").write_bytes(b"no longer in the tree")
        inbox.mkdir()
        wait_for_problems(setup, {})
    (inbox / "after.dat").write_bytes(b"after")
    wait_until(lambda: shipped(setup.database, far, inbox / "after.dat", "after.dat"), timeout=15,
               message="a file written in the new root shipped")
    assert not any("stray" in r["local_path"] or r["local_path"].startswith(str(away))
                   for r in rows(setup.database))
    gone = [r for r in caplog.records if r.levelno == logging.WARNING and f"{inbox} is gone" in r.getMessage()]
    assert len(gone) == 1, [r.getMessage() for r in caplog.records]


# -- a watch root missing at start (an unmounted disk) ----------------------------------------


def test_a_watch_root_missing_at_start_is_a_degraded_rule_and_is_watched_and_scanned_when_it_appears(
        setup, agent_processes, tmp_path):
    """`watcher run` starts (exit 2 would stop the healthy rules, and systemd would
    not restart it); the other rule ships; status --config shows the missing root
    as a problem of its archive only, with one WARNING. The disk is mounted (a
    directory with files appears at the path): they ship with no rescan due."""
    far, other_far = setup.archive(), setup.archive("other")
    inbox = setup.rule(settle=0.2)  # rescan_interval: 300 s
    disk = setup.rule("disk", archive="other", settle=0.2)
    disk.rmdir()
    agent = agent_processes(setup).start().wait_ready()
    agent.wait_for(lambda: problems(setup, "other") == {"missing watch roots": 1}, message="the missing root")
    assert problems(setup, "arch") == {}
    assert f"PROBLEM: 1 missing watch roots; latest: watched directory {disk} does not exist" \
        in status(setup).stdout
    (inbox / "a.dat").write_bytes(b"a")
    agent.wait_for(lambda: shipped(setup.database, far, inbox / "a.dat", "a.dat"), message="the other rule")

    mounted = tmp_path / "mounted"
    (mounted / "sub").mkdir(parents=True)
    (mounted / "sub" / "old.dat").write_bytes(b"written before the mount")
    os.rename(mounted, disk)
    agent.wait_for(lambda: shipped(setup.database, other_far, disk / "sub" / "old.dat", "sub/old.dat"),
                   message="a file that was on the disk shipped")
    wait_for_problems(setup, {}, agent)
    (disk / "new.dat").write_bytes(b"new")
    agent.wait_for(lambda: shipped(setup.database, other_far, disk / "new.dat", "new.dat"),
                   message="a file written on the disk shipped")
    assert len(warnings_about(agent.log(), f"{disk} does not exist")) == 1, agent.log_tail()
    assert "Traceback" not in agent.log()


# -- a far copy that keeps mismatching backs off ------------------------------------------


def test_a_far_mismatch_waits_longer_before_each_attempt_and_holds_up_no_other_file(setup, start_agent):
    """The far name is a directory (rsync cannot put the file there), so each
    attempt fails. Attempts come 1, 2, 4 s apart (not 10 in half a second), and
    files dropped meanwhile ship at once."""
    far = setup.archive(max_copy_attempts=4)
    inbox = setup.rule(settle=0.2)
    (far / "blocked.dat").mkdir(parents=True)
    (far / "blocked.dat" / "keep").write_bytes(b"x")
    start_agent(setup, housekeeping_interval=0.2)
    blocked = inbox / "blocked.dat"
    blocked.write_bytes(b"cannot land")
    seen: dict[int, float] = {}

    def attempts() -> int:
        row = row_of(setup.database, blocked)
        n = row["failed_copy_attempts"] if row else 0
        seen.setdefault(n, time.monotonic())
        return n

    wait_until(lambda: attempts() >= 1, timeout=10, message="a first failed attempt")
    others = [inbox / f"other{i}.dat" for i in range(3)]
    for i, path in enumerate(others):
        path.write_bytes(b"other %d" % i)
    wait_until(lambda: all(shipped(setup.database, far, p, p.name) for p in others), timeout=5,
               message="other files shipped while blocked.dat waits")
    assert attempts() == 1
    wait_until(lambda: attempts() >= 4, timeout=15, interval=0.02, message="all four attempts")
    gaps = [seen[n + 1] - seen[n] for n in (1, 2, 3)]
    assert all(wait - 0.05 <= gap < wait + 0.9 for gap, wait in zip(gaps, [1, 2, 4])), gaps
    assert "1 failed" in status(setup).stdout


def test_a_held_row_is_left_out_of_batches_until_its_wait_is_over(setup, tmp_path):
    """The worker alone, with a clock of its own: a row whose far copy did not
    match is not in the next batches until 1 s, then 2 s, have passed; a file
    registered meanwhile ships in the next batch."""
    from watcher.catalog import Catalog
    from watcher.roots import Roots
    from watcher.rsync import Destination
    from watcher.transfer import TransferWorker

    src = tmp_path / "src"  # where the files are registered from: an API root
    src.mkdir()
    far = setup.archive(max_copy_attempts=10, api_roots=[str(src)])
    setup.rule()
    config = setup.config()
    catalog = Catalog(setup.database)
    (far / "bad.dat").mkdir(parents=True)
    (far / "bad.dat" / "keep").write_bytes(b"x")
    bad = src / "bad.dat"
    bad.write_bytes(b"bad")
    catalog.add_file(str(bad), "bad.dat", "arch")
    now = [100.0]
    roots = Roots(config)
    worker = TransferWorker(catalog, config.archives["arch"],
                            Destination(config.archives["arch"], None, roots.of("arch")),
                            threading.Event(), clock=lambda: now[0], roots=roots)

    def attempts() -> int:
        return row_of(setup.database, bad)["failed_copy_attempts"]

    assert worker.step() and attempts() == 1
    assert not worker.step()  # held: nothing to ship
    good = src / "good.dat"
    good.write_bytes(b"good")
    catalog.add_file(str(good), "good.dat", "arch")
    assert worker.step() and verified(row_of(setup.database, good)) and attempts() == 1
    now[0] += 1.0
    assert worker.step() and attempts() == 2
    now[0] += 1.0
    assert not worker.step() and attempts() == 2  # the second wait is 2 s
    now[0] += 1.0
    assert worker.step() and attempts() == 3
    catalog.close()
