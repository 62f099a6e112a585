"""One archive's ssh settings never serve another (issue 9).

Who the agent connects to, and as whom, is decided by each archive's
ssh_host, ssh_port, ssh_key, known_hosts and accept_new_host_keys. The
attacks played here, with a real sshd, real ssh and rsync, real agents:

- a second archive on the same user@host:port whose key is not authorised,
  or whose known_hosts pins another host key, rides the first archive's
  shared connection (ssh's ``%C`` ignores key and known_hosts);
- a known_hosts path with a space, a quote, ``#`` or ``%`` that ssh's option
  parser splits or expands, so a changed host key is taken for a new one;
- an ssh_key path with ``%`` that ssh expands into another file;
- a master connection and control directory left by an agent killed with
  SIGKILL, and control directories that are not stale (a running agent's,
  another account's, a planted link), which must be left alone.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.ssh_support import processes_mentioning, ssh_archive, ssh_archive_options
from tests.waiting import wait_until
from watcher.health import read_health
from watcher.ssh import (CONTROL_DIR_PREFIX, make_control_dir, remove_control_dir,
                         remove_stale_control_dirs, ssh_args, stop_master)


# -- helpers ------------------------------------------------------------------------

def new_key(path: Path) -> Path:
    """A fresh ed25519 key pair at ``path`` (0600, as ssh requires)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "watcher-test", "-f", str(path)],
                   check=True)
    return path


def copy_key(sshd, path: Path) -> Path:
    """The authorised client key, copied to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sshd.client_key, path)
    path.chmod(0o600)
    return path


def known_hosts_file(sshd, path: Path, right: bool) -> Path:
    """A known_hosts for the test sshd's address pinning its real host key,
    or (``right=False``) another host's key, as after a change of host."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if right:
        shutil.copyfile(sshd.known_hosts, path)
    else:
        other = new_key(path.parent / f"other-host-{time.monotonic_ns()}")
        kind, key = Path(f"{other}.pub").read_text().split()[:2]
        path.write_text(f"[{sshd.host}]:{sshd.port} {kind} {key}\n")
    return path


def verified(setup, path: Path) -> bool:
    catalog = setup.catalog()
    try:
        rows = catalog.files.rows_for_path(str(path))
        return bool(rows) and all(r.verified for r in rows)
    finally:
        catalog.close()


def archive_state(setup, name: str) -> dict:
    return ((read_health(setup.database) or {}).get("archives") or {}).get(name) or {}


def assert_refused_and_degraded(setup, archive: str, local: Path, far_copy: Path, shipped: str) -> None:
    """The archive degrades over a file just written, which is neither shipped
    (``shipped`` says what it would mean) nor verified."""
    wait_until(lambda: archive_state(setup, archive).get("degraded") or far_copy.exists(),
               timeout=30, message=f"archive {archive} degraded (or, wrongly, shipped)")
    assert not far_copy.exists(), shipped
    assert not verified(setup, local)
    assert archive_state(setup, archive)["degraded"] is True


def masters_of(sshd) -> dict[int, str]:
    """Live ssh master processes connected to the test sshd, with their control
    directories (a master's title is ``ssh: <socket> [mux]``)."""
    found = {}
    for pid in processes_mentioning("[mux]"):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").strip("\0")
            sockets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            tcp = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in tcp:
            fields = line.split()
            if (int(fields[2].split(":")[1], 16) == sshd.port and f"socket:[{fields[9]}]" in sockets
                    and title.startswith("ssh: ") and title.endswith(" [mux]")):
                found[pid] = os.path.dirname(title[len("ssh: "):-len(" [mux]")])
    return found


def ssh_true(archive, control_dir: str) -> subprocess.CompletedProcess:
    """A remote command through the archive's ssh arguments, as the md5 step runs one."""
    return subprocess.run(ssh_args(archive, control_dir) + ["--", archive.ssh_host, "echo reached"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


# -- one master per archive --------------------------------------------------------

def intruder_settings(sshd, tmp_path: Path, kind: str) -> dict:
    """ssh_key and known_hosts of an archive that must not get in."""
    if kind == "unauthorised key":
        return dict(ssh_key=str(new_key(tmp_path / "intruder" / "id_ed25519")))
    assert kind == "other host key pinned"
    return dict(known_hosts=str(known_hosts_file(sshd, tmp_path / "intruder" / "known_hosts", right=False)))


@pytest.mark.parametrize("kind", ["unauthorised key", "other host key pinned"])
def test_an_archive_that_cannot_connect_never_ships_through_another_archives_connection(
        sshd, remote_dir, setup, start_agent, tmp_path, kind):
    far_good, far_bad = remote_dir / "good", remote_dir / "bad"
    setup.archive("good", **ssh_archive_options(sshd, far_good))
    setup.archive("bad", **{**ssh_archive_options(sshd, far_bad), **intruder_settings(sshd, tmp_path, kind)})
    good_inbox = setup.rule("inbox-good", archive="good")
    bad_inbox = setup.rule("inbox-bad", archive="bad")
    start_agent(setup)

    (good_inbox / "first.dat").write_bytes(b"good archive opens its connection\n")
    wait_until(lambda: verified(setup, good_inbox / "first.dat"), timeout=30,
               message="the good archive's file verified (its master connection up)")
    (bad_inbox / "second.dat").write_bytes(b"must not ride the good archive's connection\n")
    assert_refused_and_degraded(setup, "bad", bad_inbox / "second.dat", far_bad / "second.dat",
                                f"{kind}: shipped through the other archive's master")
    assert not archive_state(setup, "good").get("degraded")


@pytest.mark.parametrize("kind", ["unauthorised key", "other host key pinned"])
def test_a_remote_command_never_rides_another_archives_master(sshd, tmp_path, kind):
    """The md5 step's chain (ssh_args, no rsync): the first archive's master is up."""
    control = make_control_dir()
    good = ssh_archive(sshd, "good", name="good")
    bad = ssh_archive(sshd, "bad", name="bad", **intruder_settings(sshd, tmp_path, kind))
    try:
        first = ssh_true(good, control)
        assert first.returncode == 0 and "reached" in first.stdout, first.stderr
        second = ssh_true(bad, control)
        assert second.returncode == 255 and "reached" not in second.stdout, \
            f"{kind}: the remote command ran through the other archive's master"
    finally:
        stop_master(good, control)
        stop_master(bad, control)
        remove_control_dir(control)


# -- paths that ssh's option parser could split or expand --------------------------

HOSTILE_DIRS = ["with space", "per%hcent", "per%%cent", "comment #mark", "quote'd", "dollar$sign"]


@pytest.mark.parametrize("directory", HOSTILE_DIRS)
def test_a_known_hosts_path_pinning_another_key_refuses_the_host_whatever_its_name(
        sshd, remote_dir, setup, start_agent, tmp_path, directory):
    """accept_new_host_keys: a path read as other files (split, expanded) makes
    the real key look new and be accepted; a changed key must be refused."""
    known = known_hosts_file(sshd, tmp_path / directory / "known hosts", right=False)
    setup.archive("arch", **{**ssh_archive_options(sshd, remote_dir, accept_new_host_keys=True),
                             "known_hosts": str(known)})
    inbox = setup.rule()
    start_agent(setup)

    (inbox / "a.dat").write_bytes(b"for the pinned host only\n")
    assert_refused_and_degraded(setup, "arch", inbox / "a.dat", remote_dir / "a.dat",
                                f"{directory!r}: a changed host key was accepted")
    assert known.read_text().count("\n") == 1  # nothing was added to the pinned file
    direct = ssh_true(setup.config().archives["arch"], None)  # the md5 step's chain, without rsync
    assert direct.returncode == 255 and "reached" not in direct.stdout, direct.stderr


@pytest.mark.parametrize("directory", HOSTILE_DIRS)
def test_the_right_key_and_known_hosts_work_whatever_their_names(
        sshd, remote_dir, setup, start_agent, tmp_path, directory):
    key = copy_key(sshd, tmp_path / directory / "id key %h")
    known = known_hosts_file(sshd, tmp_path / directory / "known hosts %C", right=True)
    setup.archive("arch", **{**ssh_archive_options(sshd, remote_dir), "ssh_key": str(key),
                             "known_hosts": str(known)})
    inbox = setup.rule()
    start_agent(setup)

    (inbox / "a.dat").write_bytes(b"through hostile paths\n")
    wait_until(lambda: verified(setup, inbox / "a.dat") or archive_state(setup, "arch").get("degraded"),
               timeout=30, message="the file verified (or the archive degraded)")
    assert verified(setup, inbox / "a.dat"), archive_state(setup, "arch").get("last_error")
    assert (remote_dir / "a.dat").read_bytes() == b"through hostile paths\n"


@pytest.mark.parametrize("value", ['with"quote', "new\nline", "back\\slash", "${HOME}"])
@pytest.mark.parametrize("field", ["ssh_key", "known_hosts"])
def test_a_path_ssh_cannot_be_given_unchanged_is_refused_by_name(sshd, field, value):
    """A last guard behind the configuration check: never a path ssh would change."""
    archive = ssh_archive(sshd, "base", **{field: f"/tmp/{value}/x"})
    with pytest.raises(ValueError, match=field):
        ssh_args(archive, None)


# -- what a killed agent leaves ----------------------------------------------------

def test_a_killed_agents_master_and_control_directory_are_cleaned_by_the_next_start(
        sshd, remote_dir, setup, agent_processes):  # noqa: F811
    setup.archive("arch", **ssh_archive_options(sshd, remote_dir))
    inbox = setup.rule()
    before = masters_of(sshd)
    agent = agent_processes(setup).start().wait_ready()
    (inbox / "a.dat").write_bytes(b"opens the master\n")
    agent.wait_for(lambda: verified(setup, inbox / "a.dat"), 30, "the file verified")
    new = {pid: d for pid, d in masters_of(sshd).items() if pid not in before}
    assert len(new) == 1 and len(set(new.values())) == 1, new
    masters, [control_dir] = list(new), set(new.values())

    agent.kill()  # SIGKILL: no clean-up runs; the daemonised master lives on
    assert all(os.path.exists(f"/proc/{p}") for p in masters) and os.path.isdir(control_dir)

    agent.start().wait_ready()
    # Well within ControlPersist (60 s), so the master did not just time out.
    wait_until(lambda: not [p for p in masters if p in processes_mentioning(control_dir)]
               and not os.path.exists(control_dir),
               timeout=15, message=f"the stale master and {control_dir} to go")
    (inbox / "b.dat").write_bytes(b"the new agent ships\n")
    agent.wait_for(lambda: verified(setup, inbox / "b.dat"), 30, "the new agent's file verified")


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def started(pid: int) -> int:
    """Start time of a process in clock ticks since boot (proc(5) stat field 22)."""
    stat_line = Path(f"/proc/{pid}/stat").read_text()
    return int(stat_line[stat_line.rindex(")") + 2:].split()[19])


def control_dir_name(pid: int, start: int, rest: str) -> str:
    return f"/tmp/{CONTROL_DIR_PREFIX}{pid}-{start}-{rest}"


def test_stale_clean_up_leaves_running_agents_other_accounts_and_links_alone(outsider, tmp_path):
    live = subprocess.Popen(["sleep", "60"])  # a running agent
    made = []
    try:
        running = control_dir_name(live.pid, started(live.pid), "running")
        os.mkdir(running, 0o700)
        made.append(running)
        gone = dead_pid()
        stale = control_dir_name(gone, 1234, "stale")
        os.mkdir(stale, 0o700)
        Path(stale, "leftover").write_text("x")
        made.append(stale)
        theirs = control_dir_name(gone, 1234, "theirs")
        done = outsider.run(["mkdir", "-m", "700", theirs])
        assert done.returncode == 0, done.stderr
        made.append(theirs)
        target = tmp_path / "target"
        target.mkdir()
        (target / "keep").write_text("keep")
        planted = control_dir_name(gone, 1234, "link")
        os.symlink(target, planted)
        made.append(planted)

        remove_stale_control_dirs()

        assert not os.path.lexists(stale)
        assert os.path.isdir(running)
        assert os.path.isdir(theirs) and os.stat(theirs).st_uid == outsider.uid
        assert os.path.islink(planted) and (target / "keep").read_text() == "keep"
    finally:
        live.kill()
        live.wait()
        for path in made:
            if os.path.islink(path):
                os.unlink(path)
            elif os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)


def test_a_reused_pid_does_not_keep_a_stale_directory():
    """The pid in the name runs, but a process started at another time has
    it (a container's agent restarted as the same pid): stale."""
    older = control_dir_name(os.getpid(), started(os.getpid()) - 1, "older")
    mine = make_control_dir()
    os.mkdir(older, 0o700)
    try:
        remove_stale_control_dirs()
        assert not os.path.lexists(older)
        assert os.path.isdir(mine)  # the running process's own
    finally:
        shutil.rmtree(older, ignore_errors=True)
        remove_control_dir(mine)


def test_control_socket_paths_are_short_and_differ_per_archive(sshd):
    control = make_control_dir()
    try:
        assert stat.S_IMODE(os.stat(control).st_mode) == 0o700
        base = ssh_archive(sshd, "base")
        variants = [base, ssh_archive(sshd, "base", name="other"),
                    ssh_archive(sshd, "base", ssh_key="/k2"), ssh_archive(sshd, "base", known_hosts="/kh2"),
                    ssh_archive(sshd, "base", ssh_port=sshd.port + 1),
                    ssh_archive(sshd, "base", accept_new_host_keys=True),
                    ssh_archive(sshd, "base", ssh_host="other@127.0.0.1")]
        paths = []
        for archive in variants:
            args = ssh_args(archive, control)
            [path] = [a for a in args if a.startswith("ControlPath=")]
            paths.append(path)
            # ssh adds ".<16 random characters>" while it makes the socket; 108 bytes with the NUL
            assert len(path[len("ControlPath="):].strip('"').replace("%%", "%")) + 17 < 108
        assert len(set(paths)) == len(paths)
    finally:
        remove_control_dir(control)


# -- hosts rsync would misread ---------------------------------------------------------

def tree_outside(root: Path, known: set[Path]) -> list[str]:
    """Everything under ``root`` that the deployment (its catalog and state
    files included) did not make itself."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if not any(p == k or k in p.parents or p.name.startswith(k.name + "-") for k in known))


@pytest.mark.parametrize("host", [
    "watchertest@evil/tree",          # rsync: a local path under the working directory
    "watchertest@127.0.0.1:daemon",   # rsync: 'host:' then a path
    "watchertest@-oProxyCommand=x",   # ssh: an option
    "evil/tree@127.0.0.1",            # a '/' before the first ':'
    "other:user@127.0.0.1",           # rsync: host 'other'
])
def test_a_host_rsync_or_ssh_would_misread_is_refused_and_nothing_is_written_locally(
        sshd, setup, agent_processes, tmp_path, host):  # noqa: F811
    setup.archive("arch", **{**ssh_archive_options(sshd, "far base"), "ssh_host": host})
    inbox = setup.rule()
    (inbox / "a.dat").write_bytes(b"must not land in a local tree\n")
    config = setup.write()
    known = {inbox, config, setup.database, setup.file_root}
    agent = agent_processes(setup)
    agent.start()
    wait_until(lambda: (not agent.running() or tree_outside(tmp_path, known | set(agent.logs))
                        or archive_state(setup, "arch").get("degraded")),
               timeout=20, message="the agent to refuse its configuration (or, wrongly, to try it)")
    made = tree_outside(tmp_path, known | set(agent.logs))
    if agent.running():
        agent.kill()
    assert agent.wait(10) == 2, f"{host!r} was accepted: {made}\n{agent.log_tail()}"
    assert "ssh_host" in agent.log() and len(agent.log().strip().splitlines()) == 1, agent.log()
    assert tree_outside(tmp_path, known | set(agent.logs)) == []
