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
    """Each group of at most group_bytes (a bigger file alone) is committed,
    and its archive woken, once hashed: the first big file can ship while the
    next are hashed; a small file before a big one does not wait for it."""
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
    before, bigger = inbox / "before.dat", inbox / "bigger.dat"
    tracked = big + small + [before, bigger]

    def wake(archives):
        rows_at_each_wake.append(sum(len(catalog.files.rows_for_path(str(p))) for p in tracked))

    registrar = Registrar(catalog, setup.config(), SettleTracker(lambda path: None), wake,
                          threading.Event(), group_bytes=2 << 20)
    try:
        assert registrar.register([str(p) for p in big]) == 3
        assert rows_at_each_wake == [1, 2, 3]
        assert registrar.register([str(p) for p in small]) == 50  # 50 x 300 bytes: one group
        assert rows_at_each_wake == [1, 2, 3, 53]
        before.write_bytes(b"small, before the big ones")
        bigger.write_bytes(b"x" * (3 << 20))
        assert registrar.register([str(before), str(bigger)]) == 2
        assert rows_at_each_wake == [1, 2, 3, 53, 54, 55]  # the small file alone, first
    finally:
        registrar._hashers.shutdown()


def test_files_of_one_batch_that_want_one_far_name_are_judged_in_one_group(setup):
    """When a far name's last copy is of a file that is gone, the first of a
    batch's files that want the name gets a version name and the others are
    refused, however the batch is split into groups."""
    import sqlite3

    from watcher.handlers import SettleTracker
    from watcher.health import Health
    from watcher.registrar import Registrar

    setup.archive()
    inbox = setup.rule(remote_path="{name}")  # a template that can collide
    for d in "abc":
        (inbox / d).mkdir()
    gone = inbox / "c" / "same.dat"
    gone.write_bytes(b"shipped, verified and deleted")
    catalog = setup.catalog()
    health = Health(setup.database)
    registrars = []

    def registrar():
        registrars.append(Registrar(catalog, setup.config(), SettleTracker(lambda path: None),
                                    lambda archives: None, threading.Event(), health=health, group_bytes=1))
        return registrars[-1]

    try:
        assert registrar().register([str(gone)]) == 1
        with sqlite3.connect(setup.database) as db:
            db.execute("UPDATE supersync_v0 SET remote_md5sum = local_md5sum, removed = 1")
        gone.unlink()
        first, second = inbox / "a" / "same.dat", inbox / "b" / "same.dat"
        first.write_bytes(b"first")
        second.write_bytes(b"second")
        assert registrar().register([str(first), str(second)]) == 1
        assert [r.remote_path for r in catalog.files.rows_for_path(str(first))] == ["same.dat.~2~"]
        assert catalog.files.rows_for_path(str(second)) == []
        assert problems(setup) == {"far names taken": 1}
    finally:
        for r in registrars:
            r._hashers.shutdown()
        health.close()
