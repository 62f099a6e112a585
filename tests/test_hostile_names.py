"""No file name, however hostile, is interpreted by a shell or as an option,
on either side of an ssh connection: every one ships byte for byte, is
verified, and no canary fires (tests/hostile_names.py)."""
from __future__ import annotations

import os

from tests.hostile_names import canary_fired, fired_canaries, hostile_names
from tests.ssh_support import md5, row, ssh_archive, ssh_archive_options
from tests.waiting import wait_until
from watcher.agent import Agent


def _content(name: bytes) -> bytes:
    return b"content of " + name + b"\n"


def _register_bytes(catalog, src: bytes, entries: dict[bytes, bytes]) -> dict[bytes, int]:
    """Create src/<local name> for each {local name: remote path} and register it."""
    os.makedirs(src, exist_ok=True)
    ids = {}
    for name, remote in entries.items():
        local = os.path.join(src, name)
        with open(local, "wb") as f:
            f.write(_content(name))
        ids[name] = catalog.add_file(os.fsdecode(local), os.fsdecode(remote), "arch").id
    return ids


def test_every_hostile_name_ships_over_ssh_byte_for_byte_and_none_is_executed(
        sshd, remote_dir, canary_dir, tmp_path, catalog, make_worker, tool_log):
    names = hostile_names(canary_dir)
    # The far base directory is hostile too: a $(...) that fires a canary if run.
    [dollar] = [n for n in names if n.startswith(b"$(")]
    base = os.path.join(os.fsencode(remote_dir), b"far base 'q' " + dollar)
    archive = ssh_archive(sshd, os.fsdecode(base), files_per_batch=1000)
    # Each file goes into a far directory of the same hostile name.
    ids = _register_bytes(catalog, os.fsencode(tmp_path / "src"),
                          {name: name + b"/" + name for name in names})

    assert make_worker(archive).step() is True

    assert not canary_fired(canary_dir), fired_canaries(canary_dir)
    far_names = set(os.listdir(base))
    assert far_names == set(names), (far_names - set(names), set(names) - far_names)
    for name in names:
        with open(os.path.join(base, name, name), "rb") as f:
            assert f.read() == _content(name), name
    unverified = [name for name, file_id in ids.items() if not row(catalog, file_id).verified]
    assert unverified == []
    assert all(row(catalog, i).failed_copy_attempts == 0 for i in ids.values())
    # One rsync and one md5 command carried them all, with no name on a command line.
    assert len(tool_log.rsync_calls()) == 1 and len(tool_log.md5_calls()) == 1
    # (Only the base directory's name may appear: it is an operand.)
    others = [n for n in names if b"CANARY" in n and n != dollar]
    assert others and not [n for n in others for call in tool_log.calls() if n in call]


def test_names_with_a_leading_dash_non_utf8_bytes_or_255_bytes_ship_at_the_top_of_the_archive(
        sshd, remote_dir, canary_dir, tmp_path, catalog, make_worker):
    dashed = [n for n in hostile_names(canary_dir) if n.startswith(b"-")]
    assert b"-rf" in dashed and any(n.startswith(b"--rsync-path=") for n in dashed)
    names = dashed + [b"\xff\xfe bad utf8", b"latin1 caf\xe9", b"-\xff",
                      b"n" * 255, "\u00e9".encode() * 127 + b"x"]
    assert len(names[-2]) == 255 and len(names[-1]) == 255
    archive = ssh_archive(sshd, remote_dir)
    src = os.fsencode(tmp_path / "src")
    ids = _register_bytes(catalog, src, {name: name for name in names})

    assert make_worker(archive).step() is True

    far = os.fsencode(remote_dir)
    far_names = set(os.listdir(far))
    assert far_names == set(names), (far_names - set(names), set(names) - far_names)
    for name in names:
        with open(os.path.join(far, name), "rb") as f:
            assert f.read() == _content(name), name
        r = row(catalog, ids[name])
        assert r.verified and r.remote_md5sum == md5(_content(name)), name
        assert os.fsencode(r.local_path) == os.path.join(src, name)
        assert os.fsencode(r.remote_path) == name
    assert not canary_fired(canary_dir), fired_canaries(canary_dir)


def test_agent_ships_hostile_names_dropped_into_its_inbox_over_ssh(
        sshd, remote_dir, canary_dir, setup):
    # Names the default rule does not exclude (it skips dot files).
    names = [n for n in hostile_names(canary_dir) if not n.startswith(b".")]
    base = remote_dir / "base"
    setup.archive("arch", **ssh_archive_options(sshd, base))
    inbox = os.fsencode(setup.rule(remote_path="{relpath}"))
    agent = Agent(setup.config(), housekeeping_interval=0.2)
    agent.start()
    try:
        wait_until(lambda: agent.scans_done >= 1, timeout=10, message="the start-up scan")
        for name in names:
            with open(os.path.join(inbox, name), "wb") as f:
                f.write(_content(name))

        def arrived() -> list[bytes]:
            missing = []
            for name in names:
                try:
                    with open(os.path.join(os.fsencode(base), name), "rb") as f:
                        if f.read() != _content(name):
                            missing.append(name)
                except OSError:
                    missing.append(name)
            return missing

        wait_until(lambda: not arrived(), timeout=30,
                   message=f"every hostile name on the far side (missing: {arrived()[:5]})")
        catalog = setup.catalog()
        try:
            wait_until(lambda: all(
                [r.verified for r in catalog.files.rows_for_path(os.fsdecode(os.path.join(inbox, n)))]
                == [True] for n in names), timeout=10,
                message="one verified row per hostile name")
        finally:
            catalog.close()
    finally:
        agent.stop()
    assert not canary_fired(canary_dir), fired_canaries(canary_dir)
