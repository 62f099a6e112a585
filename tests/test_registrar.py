"""The registrar (watcher/registrar.py): two local files never share a far
name, and what cannot be read as a regular file is skipped, seen through
the catalog, the files and `watcher status --json`."""

from __future__ import annotations

import os
import threading

from tests.status_command import problems, wait_for_problems
from tests.waiting import wait_until


def test_a_second_file_under_a_taken_far_name_is_not_registered_and_stays(setup, start_agent):
    far = setup.archive(delete_local_after=0.5)
    inbox = setup.rule(remote_path="{name}")  # a template that can collide
    start_agent(setup)
    (inbox / "a").mkdir()
    (inbox / "b").mkdir()
    first, second = inbox / "a" / "same.dat", inbox / "b" / "same.dat"
    first.write_bytes(b"first")
    catalog = setup.catalog()
    wait_until(lambda: catalog.files.rows_for_path(str(first)))
    second.write_bytes(b"second")
    wait_for_problems(setup, {"far names taken": 1})
    wait_until(lambda: not first.exists())  # shipped, verified, past retention: deleted
    assert (far / "same.dat").read_bytes() == b"first"
    assert second.read_bytes() == b"second"
    assert catalog.files.rows_for_path(str(second)) == []


def test_one_registration_batch_keeps_the_first_file_of_a_far_name_and_skips_a_fifo(setup):
    from watcher.handlers import SettleTracker
    from watcher.health import Health
    from watcher.registrar import Registrar

    setup.archive()
    inbox = setup.rule(remote_path="{name}")  # a template that can collide
    (inbox / "a").mkdir()
    (inbox / "b").mkdir()
    first, second, fifo = inbox / "a" / "same.dat", inbox / "b" / "same.dat", inbox / "pipe.dat"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    os.mkfifo(fifo)  # reading it would block the registrar for good
    catalog = setup.catalog()
    health = Health(setup.database)  # what `watcher status` reads
    try:
        registrar = Registrar(catalog, setup.config(), SettleTracker(lambda path: None),
                              lambda archives: None, threading.Event(), health=health)
        assert registrar.register([str(first), str(second), str(fifo)]) == 1
        [row] = catalog.files.rows_for_path(str(first))
        assert row.remote_path == "same.dat"
        assert catalog.files.rows_for_path(str(second)) == [] and catalog.files.rows_for_path(str(fifo)) == []
        assert problems(setup) == {"far names taken": 1}
    finally:
        health.close()


def test_a_burst_of_big_files_is_committed_file_by_file_and_small_files_at_once(setup):
    """Each group of about group_bytes is committed (and its archive woken)
    once hashed: the first big file can ship while the next are hashed."""
    from watcher.handlers import SettleTracker
    from watcher.registrar import Registrar

    setup.archive()
    inbox = setup.rule()
    big = [inbox / f"big{i}.dat" for i in range(3)]
    for i, path in enumerate(big):
        path.write_bytes(bytes([i]) * (3 << 20))  # above SMALL_FILE: hashed in the threads
    small = [inbox / f"small{i}.dat" for i in range(50)]
    for i, path in enumerate(small):
        path.write_bytes(b"%d" % i * 100)
    catalog = setup.catalog()
    rows_at_each_wake = []

    def wake(archives):
        rows_at_each_wake.append(sum(len(catalog.files.rows_for_path(str(p))) for p in big + small))

    registrar = Registrar(catalog, setup.config(), SettleTracker(lambda path: None), wake,
                          threading.Event(), group_bytes=2 << 20)
    assert registrar.register([str(p) for p in big]) == 3
    assert rows_at_each_wake == [1, 2, 3]
    assert registrar.register([str(p) for p in small]) == 50  # 50 x 300 bytes: one group
    assert rows_at_each_wake == [1, 2, 3, 53]
