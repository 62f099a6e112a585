"""Deciding when a file is complete: the settle tracker and scans, on real files."""

from __future__ import annotations

import os
import threading
import time

from tests.waiting import wait_until
from watcher.config import Rule
from watcher.handlers import SettleTracker, closed_for_writing, scan


def test_a_file_open_for_writing_is_not_closed_and_a_closed_one_is(tmp_path):
    path = tmp_path / "f.dat"
    with open(path, "wb") as writer:
        writer.write(b"partial")
        writer.flush()
        assert not closed_for_writing(str(path))
    assert closed_for_writing(str(path))
    with open(path, "rb"):  # a reader does not hold it open for writing
        assert closed_for_writing(str(path))


def test_a_scan_completes_a_fresh_closed_file_at_once_and_lets_an_open_one_settle(tmp_path):
    rule = Rule(watch=tmp_path, archive="arch", settle=30)
    (tmp_path / "closed.dat").write_bytes(b"done")
    completed = []
    settle = SettleTracker(completed.append)
    with open(tmp_path / "open.dat", "wb") as writer:
        writer.write(b"still writing")
        writer.flush()
        handed = scan([str(tmp_path)], [rule], lambda paths: {}, completed.extend, settle)
        assert handed == 2
        assert completed == [str(tmp_path / "closed.dat")]  # fresh, but nobody writes it
        assert len(settle) == 1  # the open one waits for quiet (or its close event)
    settle.stop()


def test_the_settle_tracker_completes_a_file_once_it_stays_unchanged(tmp_path):
    path = tmp_path / "slow.dat"
    path.write_bytes(b"a")
    completed = []
    settle = SettleTracker(completed.append)
    thread = threading.Thread(target=settle.run)
    thread.start()
    try:
        settle.track(str(path), 0.3)
        for _ in range(3):  # a slow writer keeps changing it: not complete
            time.sleep(0.15)
            with open(path, "ab") as f:
                f.write(b"b")
            settle.track(str(path), 0.3)
            assert completed == []
        wait_until(lambda: completed == [str(path)], timeout=5)
    finally:
        settle.stop()
        thread.join(5)
    assert os.path.getsize(path) == 4
