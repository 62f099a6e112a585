"""Finalization (watcher/finalize.py) in a running agent: a complete, fully
shipped timecode directory gets one finalization file, and a late file
reopens it for a newer one."""

from __future__ import annotations

import os
import time

import yaml

from tests.catalog_rows import verified_once
from tests.waiting import wait_until


def test_a_timecode_directory_is_finalized_exactly_once_and_again_for_a_late_file(setup, start_agent, tmp_path):
    far = setup.archive()
    inbox = setup.rule(remote_path="{timecode}/{relpath}")
    # Housekeeping runs only when the test says, so that what is finalized is known.
    agent = start_agent(setup, housekeeping_interval=3600)
    # A directory of an old timecode (complete at once), moved in whole.
    staged = tmp_path / "staged"
    obs = staged / "obs_1600000000"
    obs.mkdir(parents=True)
    for i in range(3):
        (obs / f"1600000{i:03d}_data.g3").write_bytes(os.urandom(200))
    (staged / "plots").mkdir()
    (staged / "plots" / "1600000500_p.png").write_bytes(b"png")
    os.rename(staged, inbox / "batch")
    obs = inbox / "batch" / "obs_1600000000"
    catalog = setup.catalog()

    def finalizations():
        return [r for r in catalog.reports.known_files("arch", 0) if r.remote_path.endswith("_16000_finalized.yaml")]

    wait_until(lambda: len(catalog.reports.known_files("arch", 0)) == 4
               and all(r.verified for r in catalog.reports.known_files("arch", 0)), timeout=20)
    wait_until(agent.timecodes_once, message="housekeeping while nothing waits to be registered")
    wait_until(lambda: len(finalizations()) == 1 and finalizations()[0].verified, timeout=20)
    for _ in range(3):
        agent.housekeep_once()
    assert len(finalizations()) == 1
    fin = finalizations()[0]
    summary = yaml.safe_load((far / fin.remote_path).read_text())
    assert set(summary) == {"timecode", "num_files", "subdirs", "finalized_at", "finalized_until",
                            "archive_name", "instance_id"}
    assert summary["timecode"] == 16000
    assert summary["num_files"] == 4
    assert summary["subdirs"] == ["batch"]
    assert summary["archive_name"] == "arch"
    assert summary["instance_id"] == "test-instance"
    tc_now = int(time.time() // 1e5)
    assert fin.remote_path.startswith(f"{tc_now}/suprsync/test-instance/")
    assert fin.local_path.startswith(str(setup.file_root / str(tc_now) / "test-instance"))

    # A late file reopens the directory: a newer finalization counts it.
    (obs / "1600000999_late.g3").write_bytes(b"late")
    wait_until(lambda: verified_once(catalog, obs / "1600000999_late.g3"), timeout=20)
    wait_until(agent.timecodes_once, message="housekeeping while nothing waits to be registered")
    wait_until(lambda: len(finalizations()) == 2 and all(r.verified for r in finalizations()), timeout=20)
    newest = max(finalizations(), key=lambda r: r.id)
    assert yaml.safe_load((far / newest.remote_path).read_text())["num_files"] == 5
    tcdir = [t for t in catalog.TimecodeDir.select() if t.timecode == 16000 and t.archive_name == "arch"]
    assert len(tcdir) == 1 and tcdir[0].finalized and tcdir[0].finalize_file_id == newest.id
