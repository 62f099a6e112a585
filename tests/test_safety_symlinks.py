"""Nothing outside a watched tree is ever read, shipped or deleted: a path is
registered, hashed, shipped and deleted only if no component below the watch
root is a symlink (DESIGN.md, promise 7; issue 8).

Real agents on real files: symlinks made with os.symlink (as ``ln -s``) while
the agent runs, before it starts, over ssh, in a polled tree; data moved away
and replaced by a link; a registered file swapped for a link before it could
be shipped. What is checked: the catalog, the far files, the outside files,
and ``watcher status --json`` run as a real command.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.agent_process import watcher_command
from tests.status_command import SHOWN
from tests.ssh_support import ssh_archive_options
from tests.waiting import wait_until


# -- helpers ------------------------------------------------------------------------

def status(setup) -> dict:
    """``watcher status --json --config <rules>``, run as a real command."""
    done = subprocess.run(watcher_command("status", "--json", "--config", str(setup.write())),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode in SHOWN, done.stderr
    return json.loads(done.stdout)


def symlink_problems(setup, archive: str = "arch") -> int:
    return status(setup)[archive].get("problems", {}).get("symlinks", 0)


def far_contents(far: Path) -> dict[str, bytes]:
    """Every regular file under a far directory (links not followed), by relative path."""
    found = {}
    for dirpath, _dirs, files in os.walk(far):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                found[os.path.relpath(path, far)] = Path(path).read_bytes()
    return found


def assert_nowhere_in(far: Path, secret: bytes) -> None:
    holders = [name for name, data in far_contents(far).items() if secret in data]
    assert not holders, f"the outside secret was shipped as {holders}"


def make_secret(directory: Path, name: str = "secret.txt") -> tuple[Path, bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    data = f"SECRET-{uuid.uuid4().hex}\n".encode()
    path = directory / name
    path.write_bytes(data)
    return path, data


def verified(catalog, path) -> bool:
    rows = catalog.files.rows_for_path(str(path))
    return len(rows) == 1 and rows[0].verified


def rows_under(catalog, archive: str, directory: Path) -> list[str]:
    prefix = str(directory).rstrip("/") + "/"
    return [r.local_path for r in catalog.reports.known_files(archive, 0)
            if r.local_path == str(directory) or r.local_path.startswith(prefix)]


def ship_a_control_file(setup, catalog, inbox: Path, name: str = "control.dat") -> Path:
    """A plain file written after the link: once it is shipped and deleted, the
    agent has handled the link's events, and its retention has run."""
    control = inbox / name
    control.write_bytes(os.urandom(64))
    wait_until(lambda: catalog.files.rows_for_path(str(control))
               and (catalog.files.rows_for_path(str(control))[0].removed or 0) > 0,
               timeout=15, message=f"{name} shipped, verified and deleted by retention")
    assert not control.exists()
    return control


def wait_for_the_links_to_be_handled(setup, catalog, links: list[Path], count: int) -> None:
    """Until status counts the links, or a regression registered one (which the
    assertions that follow then name)."""
    wait_until(lambda: symlink_problems(setup) >= count
               or any(rows_under(catalog, "arch", link) for link in links),
               timeout=15, message=f"status to count {count} symlink(s)")


# -- a link created in the tree ----------------------------------------------------------

def test_a_link_to_an_outside_file_made_while_the_agent_runs_is_reported_and_never_shipped(
        setup, start_agent, tmp_path):
    far = setup.archive(delete_local_after=0.5)
    inbox = setup.rule()
    secret, data = make_secret(tmp_path / "outside")
    start_agent(setup)
    catalog = setup.catalog()
    os.symlink(secret, inbox / "x")
    wait_for_the_links_to_be_handled(setup, catalog, [inbox / "x"], 1)
    ship_a_control_file(setup, catalog, inbox)
    assert catalog.files.rows_for_path(str(inbox / "x")) == []
    assert_nowhere_in(far, data)
    assert secret.read_bytes() == data
    assert (inbox / "x").is_symlink()
    assert symlink_problems(setup) == 1


def test_a_link_to_an_outside_directory_exposes_none_of_its_files(setup, start_agent, tmp_path):
    far = setup.archive(delete_local_after=0.5)
    inbox = setup.rule()
    outside = tmp_path / "outside" / "dir"
    secret, data = make_secret(outside)
    (outside / "deeper").mkdir()
    other, other_data = make_secret(outside / "deeper", "other.txt")
    start_agent(setup)
    catalog = setup.catalog()
    os.symlink(outside, inbox / "d")
    # A file written into the linked directory afterwards appears at inbox/d/late.txt too.
    late, late_data = make_secret(outside, "late.txt")
    wait_for_the_links_to_be_handled(setup, catalog, [inbox / "d"], 1)
    ship_a_control_file(setup, catalog, inbox)
    assert rows_under(catalog, "arch", inbox / "d") == []
    assert rows_under(catalog, "arch", outside) == []
    for d in (data, other_data, late_data):
        assert_nowhere_in(far, d)
    assert secret.read_bytes() == data and other.read_bytes() == other_data
    assert late.read_bytes() == late_data
    assert symlink_problems(setup) == 1


def test_a_link_present_before_the_agent_starts_is_reported_by_the_start_up_scan(
        setup, start_agent, tmp_path):
    far = setup.archive(delete_local_after=0.5)
    inbox = setup.rule()
    secret, data = make_secret(tmp_path / "outside")
    (inbox / "sub").mkdir()
    os.symlink(secret, inbox / "sub" / "x")
    os.symlink(secret.parent, inbox / "d")
    os.symlink("..", inbox / "sub" / "up")
    agent = start_agent(setup)
    catalog = setup.catalog()
    ship_a_control_file(setup, catalog, inbox)
    assert catalog.files.rows_for_path(str(inbox / "sub" / "x")) == []
    assert rows_under(catalog, "arch", inbox / "d") == []
    assert rows_under(catalog, "arch", inbox / "sub" / "up") == []
    assert_nowhere_in(far, data)
    assert secret.read_bytes() == data
    wait_until(lambda: symlink_problems(setup) == 3, timeout=10,
               message="status to count the three symlinks the start-up scan met")
    agent.rescan()  # each is reported once, not once a scan
    agent.rescan()
    assert symlink_problems(setup) == 3
    assert rows_under(catalog, "arch", inbox / "sub" / "up") == []


def test_a_relative_link_climbing_out_of_the_tree_is_never_followed(setup, start_agent, tmp_path):
    far = setup.archive(delete_local_after=0.5)
    inbox = setup.rule()
    secret, data = make_secret(tmp_path / "outside")  # tmp/outside/secret.txt
    (inbox / "sub").mkdir()
    start_agent(setup)
    catalog = setup.catalog()
    os.symlink("../../outside/secret.txt", inbox / "sub" / "x")  # from tmp/inbox/sub
    assert (inbox / "sub" / "x").read_bytes() == data  # it does lead out
    wait_for_the_links_to_be_handled(setup, catalog, [inbox / "sub" / "x"], 1)
    ship_a_control_file(setup, catalog, inbox / "sub")
    assert catalog.files.rows_for_path(str(inbox / "sub" / "x")) == []
    assert_nowhere_in(far, data)
    assert secret.read_bytes() == data
    assert symlink_problems(setup) == 1


def test_a_link_to_a_file_inside_the_tree_ships_that_file_once_and_never_the_link(
        setup, start_agent):
    far = setup.archive(delete_local_after=0.5)
    inbox = setup.rule()
    start_agent(setup)
    catalog = setup.catalog()
    run = inbox / "run1.dat"
    run.write_bytes(b"the run's data")
    os.symlink("run1.dat", inbox / "latest")  # as data-taking software often keeps one
    wait_for_the_links_to_be_handled(setup, catalog, [inbox / "latest"], 1)
    wait_until(lambda: not run.exists(), timeout=15, message="run1.dat shipped and deleted")
    assert catalog.files.rows_for_path(str(inbox / "latest")) == []
    assert far_contents(far) == {"run1.dat": b"the run's data"}
    assert os.path.islink(inbox / "latest")  # left alone, dangling now
    assert symlink_problems(setup) == 1


def test_a_link_loop_in_the_tree_registers_each_real_file_once(setup, start_agent):
    far = setup.archive()
    inbox = setup.rule()
    (inbox / "sub").mkdir()
    start_agent(setup)
    catalog = setup.catalog()
    os.symlink("..", inbox / "sub" / "up")
    real = inbox / "sub" / "real.dat"
    real.write_bytes(b"real")
    wait_until(lambda: verified(catalog, real), timeout=15)
    wait_for_the_links_to_be_handled(setup, catalog, [inbox / "sub" / "up"], 1)
    later = inbox / "later.dat"
    later.write_bytes(b"later")
    wait_until(lambda: verified(catalog, later), timeout=15)
    paths = [r.local_path for r in catalog.reports.known_files("arch", 0)]
    assert sorted(paths) == sorted([str(later), str(real)])
    assert sorted(far_contents(far)) == ["later.dat", "sub/real.dat"]
    assert symlink_problems(setup) == 1


def test_a_link_to_an_outside_file_is_never_shipped_over_ssh(sshd, remote_dir, setup, start_agent,
                                                             tmp_path):
    base = remote_dir / "archive base"
    setup.archive("arch", **ssh_archive_options(sshd, base, delete_local_after=0.5))
    inbox = setup.rule()
    secret, data = make_secret(tmp_path / "outside")
    start_agent(setup)
    catalog = setup.catalog()
    os.symlink(secret, inbox / "x")
    (inbox / "sub").mkdir()
    os.symlink("../../outside/secret.txt", inbox / "sub" / "y")
    wait_for_the_links_to_be_handled(setup, catalog, [inbox / "x", inbox / "sub" / "y"], 2)
    ship_a_control_file(setup, catalog, inbox)
    assert catalog.files.rows_for_path(str(inbox / "x")) == []
    assert catalog.files.rows_for_path(str(inbox / "sub" / "y")) == []
    assert "control.dat" in far_contents(base)
    assert_nowhere_in(base, data)
    assert secret.read_bytes() == data
    assert symlink_problems(setup) == 2


def test_a_polled_tree_never_enters_a_link_to_an_outside_directory(setup, start_agent, tmp_path):
    far = setup.archive(delete_local_after=0.5)
    inbox = setup.rule(poll=True)
    outside = tmp_path / "outside" / "dir"
    secret, data = make_secret(outside)
    start_agent(setup)
    catalog = setup.catalog()
    os.symlink(outside, inbox / "d")
    (inbox / "sub").mkdir()
    os.symlink("..", inbox / "sub" / "up")
    wait_for_the_links_to_be_handled(setup, catalog, [inbox / "d", inbox / "sub" / "up"], 2)
    ship_a_control_file(setup, catalog, inbox)
    assert rows_under(catalog, "arch", inbox / "d") == []
    assert [p for p in (r.local_path for r in catalog.reports.known_files("arch", 0)) if "/up/" in p] == []
    assert_nowhere_in(far, data)
    assert secret.read_bytes() == data
    assert symlink_problems(setup) == 2


# -- data moved away and replaced by a link -------------------------------------------------

@pytest.mark.parametrize("moved", ["d", "f.dat"], ids=["its directory", "the file"])
def test_a_verified_file_moved_away_and_replaced_by_a_link_is_not_deleted_through_it(
        setup, start_agent, tmp_path, moved):
    """The file, or the directory it lies in, is moved elsewhere and a link to it
    takes its place: retention deletes nothing through the link."""
    far = setup.archive(delete_local_after=0.5)
    inbox = setup.rule()
    # Housekeeping (and so retention) only when the test says: the file must be
    # verified, and still here, when it or its directory is swapped for a link.
    agent = start_agent(setup, housekeeping_interval=3600)
    catalog = setup.catalog()
    rel = "d/f.dat" if moved == "d" else "f.dat"
    f = inbox / rel
    f.parent.mkdir(exist_ok=True)
    f.write_bytes(b"precious data")
    control = inbox / "control.dat"
    control.write_bytes(b"control")
    wait_until(lambda: verified(catalog, f) and verified(catalog, control), timeout=15)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rename(inbox / moved, elsewhere / moved)
    os.symlink(elsewhere / moved, inbox / moved)
    # Rounds of retention until the plain file of the same age is deleted, and some more.
    wait_until(lambda: agent.housekeep_once() or not control.exists(), timeout=10,
               message="retention to delete the plain control file")
    for _ in range(3):
        agent.housekeep_once()
    assert (elsewhere / rel).read_bytes() == b"precious data"
    assert (inbox / moved).is_symlink()
    [row] = catalog.files.rows_for_path(str(f))
    assert row.removed is None
    assert (far / rel).read_bytes() == b"precious data"
    wait_until(lambda: symlink_problems(setup) >= 1, timeout=10,
               message="status to show the symlink in the way")


# -- a registered file swapped for a link before it is shipped -----------------------------

def test_a_registered_file_swapped_for_a_link_before_it_ships_never_sends_the_link_target(
        setup, start_agent, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file where the archive's parent directory should be")
    far = setup.archive(remote_basedir=str(blocker / "far"), max_copy_attempts=30)
    inbox = setup.rule()
    secret, data = make_secret(tmp_path / "outside")
    start_agent(setup)
    catalog = setup.catalog()
    victim, companion = inbox / "victim.dat", inbox / "companion.dat"
    victim.write_bytes(b"victim's own data")
    companion.write_bytes(b"companion's data")

    def tried() -> bool:
        rows = catalog.files.rows_for_path(str(victim))
        return bool(rows) and ((rows[0].failed_copy_attempts or 0) > 0 or status(setup)["arch"]["degraded"])

    wait_until(tried, timeout=15, message="a failed attempt to ship the victim")
    link = inbox / ".victim.link"  # excluded name, renamed over the file at once
    os.symlink(secret, link)
    os.rename(link, victim)
    attempts_before = catalog.files.rows_for_path(str(victim))[0].failed_copy_attempts or 0
    blocker.unlink()
    wait_until(lambda: verified(catalog, companion), timeout=20,
               message="the companion shipped once the archive works")

    def victim_tried_again_and_never_verified():
        [row] = catalog.files.rows_for_path(str(victim))
        assert not row.verified, "the link was shipped and verified"
        return (row.failed_copy_attempts or 0) >= attempts_before + 2

    # Attempts once the archive works refuse the link (and are charged).
    wait_until(victim_tried_again_and_never_verified, timeout=15,
               message="two more attempts at the victim")
    wait_until(lambda: symlink_problems(setup) >= 1, timeout=10, message="status to count the link")
    assert not os.path.lexists(far / "victim.dat")
    assert_nowhere_in(far, data)
    assert secret.read_bytes() == data


# -- what stays allowed ------------------------------------------------------------------------

def test_a_watch_root_that_is_itself_a_link_is_watched_shipped_and_cleaned_as_usual(
        setup, start_agent, tmp_path):
    """Only components below the root count: /data is often a link."""
    far = setup.archive(delete_local_after=0.5)
    real = tmp_path / "real-inbox"
    (real / "sub").mkdir(parents=True)
    os.symlink(real, tmp_path / "inbox")
    inbox = setup.rule("inbox")  # the link
    assert inbox.is_symlink()
    (real / "before.dat").write_bytes(b"before the start")
    start_agent(setup)
    catalog = setup.catalog()
    (inbox / "sub" / "after.dat").write_bytes(b"after the start")
    for name in ("before.dat", "sub/after.dat"):
        wait_until(lambda: not (real / name).exists(), timeout=15,
                   message=f"{name} shipped and deleted through the linked root")
    assert far_contents(far) == {"before.dat": b"before the start", "sub/after.dat": b"after the start"}
    assert symlink_problems(setup) == 0
    assert all((r.removed or 0) > 0 and r.verified for r in catalog.reports.known_files("arch", 0))
