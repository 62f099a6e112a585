"""The sshd fixture is real: commands, rsync, stop/start and permissions."""
from __future__ import annotations

import os
import subprocess

import pytest

from tests.hostile_names import HOSTILE_NAMES, fired_canaries, hostile_names


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, timeout=60, **kw)


def test_command_runs_as_login_user(sshd):
    r = run(sshd.ssh_command("id", "-un"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == sshd.user


def test_ssh_command_keeps_argv_intact(sshd, canary_dir):
    names = hostile_names(canary_dir)
    r = run(sshd.ssh_command("printf", r"%s\0", *names))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(b"\0")[:-1] == names
    assert not fired_canaries(canary_dir)


def test_rsync_copies_into_remote_dir(sshd, remote_dir, tmp_path):
    src = tmp_path / "hello.txt"
    src.write_text("hello over ssh\n")
    r = run(["rsync", "-e", sshd.rsync_rsh(), str(src),
             f"{sshd.ssh_target}:{remote_dir}/"])
    assert r.returncode == 0, r.stderr
    copied = remote_dir / "hello.txt"
    assert copied.read_text() == "hello over ssh\n"
    assert copied.stat().st_uid == sshd.pw.pw_uid


def test_stop_refuses_and_kills_master_then_start_works(sshd, tmp_path):
    control = tmp_path / "cm"
    master = ["-o", "ControlMaster=auto", "-o", f"ControlPath={control}",
              "-o", "ControlPersist=60"]
    argv = sshd.ssh_command("true")
    with_master = argv[:1] + master + argv[1:]
    assert run(with_master).returncode == 0
    assert control.exists()  # a live ControlMaster holds a connection

    sshd.stop()
    assert run(argv).returncode == 255
    # The master's server side was killed too, so reusing it fails.
    assert run(with_master).returncode == 255

    sshd.start()
    r = run(argv)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: as a normal user "
                    "the login user owns every dir the test could create")
def test_login_user_cannot_write_root_dir(sshd, sshd_server):
    locked = sshd_server.remote_root() / "root-owned"
    locked.mkdir(mode=0o755)
    os.chown(locked, 0, 0)
    r = run(sshd.ssh_command("touch", f"{locked}/x"))
    assert r.returncode != 0
    assert b"Permission denied" in r.stderr
    assert not (locked / "x").exists()


def test_hostile_names_are_valid_file_names(tmp_path):
    assert len(HOSTILE_NAMES) >= 24
    for name in hostile_names(str(tmp_path)):
        (tmp_path / os.fsdecode(name)).write_bytes(b"x")
    assert len(os.listdir(tmp_path)) == len(HOSTILE_NAMES)
    assert not fired_canaries(str(tmp_path))


def test_make_remote_dir_is_writable_over_ssh(sshd, remote_dir):
    target = sshd.make_remote_dir(remote_dir / "a" / "b c")
    r = run(sshd.ssh_command("touch", f"{target}/x"))
    assert r.returncode == 0, r.stderr
    assert (target / "x").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: only then is the "
                    "login user someone else")
def test_make_remote_dir_refuses_unreachable_parent(sshd, tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    with pytest.raises(ValueError, match="remote_root"):
        sshd.make_remote_dir(hidden / "x")
