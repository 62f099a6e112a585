"""Start-up checks (watcher/preflight.py), with the real agent and a real sshd.

An ssh key that ssh ignores (group or others may read it) stops `watcher run`
with one line and exit status 2. What can change while the agent runs (a
far base directory the far account cannot write, a far PATH without
md5sum, a local base the agent cannot write, an inotify watch limit below
the directories to watch) lets it start: one WARNING and a problem of the
archive in `watcher status`, gone once the cause is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.agent_process import watcher_command
from tests.catalog_rows import row_of, verified
from tests.ssh_support import make_far_dir_writable, ssh_archive_options, unwritable_far_dir
from tests.status_command import problems, status, wait_for_problems
from tests.agent_logs import LIMITED_WATCHES, warnings_about


def run_refused(setup) -> str:
    """`watcher run` on the setup: it must refuse with one line, exit 2; the line."""
    done = subprocess.run(watcher_command("run", "--config", str(setup.write())), capture_output=True,
                          text=True, timeout=60, cwd=setup.root)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def far_shipped(database: Path, far: Path, path: Path, remote: str) -> bool:
    row = row_of(database, path)
    return bool(row and verified(row)) and (far / remote).is_file() \
        and (far / remote).read_bytes() == path.read_bytes()


# -- an ssh key that ssh ignores: refused ---------------------------------------------


def test_an_ssh_key_others_may_read_stops_the_start_with_one_line_and_a_private_one_ships(
        sshd, remote_dir, setup, agent_processes):
    key = setup.root / "keys" / "id_ed25519"
    key.parent.mkdir()
    shutil.copyfile(sshd.client_key, key)
    key.chmod(0o644)
    setup.archive(**{**ssh_archive_options(sshd, remote_dir), "ssh_key": str(key)})
    inbox = setup.rule(settle=0.2)

    line = run_refused(setup)
    assert line == (f"watcher: {setup.root / 'rules.yaml'}: archives.arch.ssh_key: '{key}' may be read by "
                    f"group or others (mode 0644), so ssh ignores it and no connection to "
                    f"{sshd.ssh_target} can succeed; make it private: chmod 600 {key}")
    assert not setup.database.exists()  # refused before anything was touched

    key.chmod(0o600)
    agent = agent_processes(setup).start().wait_ready()
    (inbox / "a.dat").write_bytes(b"a")
    agent.wait_for(lambda: far_shipped(setup.database, remote_dir, inbox / "a.dat", "a.dat"),
                   message="a file shipped with the private key")


# -- the far side: findings, checked again -----------------------------------------------


@pytest.mark.parametrize("missing", [False, True], ids=["base", "parent-of-base"])
def test_a_far_base_the_far_account_cannot_write_is_a_problem_from_the_start_until_it_can(
        sshd, remote_dir, setup, agent_processes, missing):
    """No file is needed to find it: status says so at start. The agent starts
    (exit 2 would stop the other archives too) and checks again every rescan."""
    locked = unwritable_far_dir(sshd, remote_dir / "locked")
    base = locked / "base" if missing else locked
    setup.top["rescan_interval"] = 1
    setup.archive(**ssh_archive_options(sshd, base))
    inbox = setup.rule(settle=0.2)
    agent = agent_processes(setup).start().wait_ready()

    wait_for_problems(setup, {"unwritable base directories": 1}, agent)
    text = status(setup).stdout
    where = f"{sshd.ssh_target}:{base}"
    said = (f"cannot make its base directory {where}: {sshd.ssh_target}:{locked} cannot be written"
            if missing else f"cannot write its base directory {where}")
    assert said in text, text
    make_far_dir_writable(sshd, locked)
    wait_for_problems(setup, {}, agent)
    (inbox / "a.dat").write_bytes(b"a")
    agent.wait_for(lambda: far_shipped(setup.database, base, inbox / "a.dat", "a.dat"),
                   message="a file shipped once the base could be written")
    assert len(warnings_about(agent.log(), f"{where}")) == 1, agent.log_tail()
    assert "Traceback" not in agent.log()


@pytest.fixture(params=["md5sum", "sync"])
def path_without_md5sum(request) -> Path:
    """A directory of links to every command of /usr/bin and /bin but md5sum (or
    sync, which makes the far copies durable), readable by the far login."""
    bin_dir = Path(subprocess.check_output(["mktemp", "-d", "/tmp/watcher-far-bin-XXXXXX"], text=True).strip())
    bin_dir.chmod(0o755)
    for source in ("/usr/bin", "/bin"):
        for name in os.listdir(source):
            if name != request.param and not (bin_dir / name).exists():
                os.symlink(os.path.join(source, name), bin_dir / name)
    yield bin_dir
    shutil.rmtree(bin_dir)


def test_a_far_path_without_md5sum_is_a_problem_from_the_start(far_server, path_without_md5sum, setup,
                                                                  agent_processes):
    server = far_server(PATH=str(path_without_md5sum))
    base = server.remote_root()
    setup.archive(**ssh_archive_options(server, base))
    setup.rule(settle=0.2)
    agent = agent_processes(setup).start().wait_ready()

    wait_for_problems(setup, {"missing far commands": 1}, agent)
    text = status(setup).stdout
    missing = "md5sum" if not (path_without_md5sum / "md5sum").exists() else "sync"
    assert f"{server.ssh_target} lacks what the far md5 step needs: {missing} (" in text, text
    assert len(warnings_about(agent.log(), "lacks what the far md5 step needs")) == 1, agent.log_tail()


def test_a_far_host_with_everything_has_no_problem_and_is_asked_once(sshd, remote_dir, setup, agent_processes):
    setup.archive(**ssh_archive_options(sshd, remote_dir / "new" / "base"))  # made at the first copy
    setup.rule(settle=0.2)
    agent = agent_processes(setup).start().wait_ready()
    agent.wait_for(lambda: "start-up checks done: nothing found" in agent.log(), message="the checks")
    assert problems(setup) == {} and "WARNING" not in agent.log(), agent.log_tail()


# -- a local archive -----------------------------------------------------------------------


def test_a_local_base_the_agent_cannot_write_is_a_problem_from_the_start(setup, agent_processes, without_dac):
    locked = setup.root / "locked"
    locked.mkdir(mode=0o555)
    setup.top["rescan_interval"] = 1
    setup.archive(remote_basedir=locked / "far")
    setup.rule(settle=0.2)
    agent = agent_processes(setup).start().wait_ready()
    wait_for_problems(setup, {"unwritable base directories": 1}, agent)
    assert f"cannot make its base directory {locked / 'far'}: {locked} cannot be written" \
        in status(setup).stdout
    locked.chmod(0o755)
    wait_for_problems(setup, {}, agent)


# -- the inotify watch limit ---------------------------------------------------------------


def test_fewer_inotify_watches_than_directories_is_a_problem_naming_the_sysctl_and_the_number(
        setup, agent_processes, agent_prefix):
    """The agent runs in a user namespace whose watch limit is 20 (the host's
    fs.inotify.max_user_watches is left alone: other tests run meanwhile);
    the tree holds 44 directories."""
    if subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True).returncode:
        pytest.skip("no user namespaces here")
    agent_prefix(*LIMITED_WATCHES, "20")
    setup.archive()
    inbox = setup.rule(settle=0.2)
    for i in range(39):
        (inbox / f"d{i // 10}" / f"e{i}").mkdir(parents=True, exist_ok=True)
    needed = sum(1 for _ in os.walk(inbox))
    agent = agent_processes(setup).start().wait_ready()

    agent.wait_for(lambda: problems(setup).get("too few inotify watches") == 1,
                   message="status to show too few inotify watches")
    text = status(setup).stdout
    assert (f"inotify may watch 20 directories per account (fs.inotify.max_user_watches), fewer than "
            f"the {needed} directories below {inbox}") in text, text
    assert "sysctl fs.inotify.max_user_watches=524288" in text, text
