"""Fault injection by load: a burst faster than events are read, a huge backlog, idleness.

These are bounds, not speed tests: every file of a burst ends registered once
and verified; memory stays bounded with 100,000 files waiting; an agent with
nothing to do uses no CPU worth measuring.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path


from watcher.catalog import Catalog

BURST = 50_000
BACKLOG = 100_000
MAX_RSS_MB = 150
MAX_IDLE_CPU = 0.02  # of one core

PRODUCER = textwrap.dedent("""
    import os, sys
    inbox, count, per_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for i in range(count):
        if i % per_dir == 0:
            os.mkdir(os.path.join(inbox, "d%03d" % (i // per_dir)))
        with open(os.path.join(inbox, "d%03d" % (i // per_dir), "f%05d.dat" % i), "wb") as f:
            f.write(b"%d\\n" % i)
""")


def burst_content(i: int) -> bytes:
    return b"%d\n" % i


def count_rows(database: Path, where: str = "1") -> int:
    with sqlite3.connect(database, timeout=30) as db:
        return db.execute(f"SELECT count(*) FROM supersync_v0 WHERE {where}").fetchone()[0]


def test_a_burst_of_50000_small_files_is_registered_and_shipped_exactly_once(
        setup, agent_processes, memory_dir):
    """Promise 5: 50,000 files created by another process in a tight loop, far faster
    than events are read (in 100 new directories, whose first files come before their
    watches), all end registered exactly once and verified, byte for byte."""
    far = setup.archive(remote_basedir=memory_dir / "far")
    inbox = setup.rule(watch=str(memory_dir / "inbox"))
    agent = agent_processes(setup).start().wait_ready()
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", PRODUCER, str(inbox), str(BURST), "500"], check=True, timeout=120)
    created = time.monotonic() - started
    agent.wait_for(lambda: count_rows(setup.database, "remote_md5sum = local_md5sum") >= BURST,
                   timeout=180, message=f"{BURST} files verified")
    shipped = time.monotonic() - started
    print(f"\n{BURST} files: created in {created:.1f}s, all verified after {shipped:.1f}s")

    with sqlite3.connect(setup.database, timeout=30) as db:
        twice = db.execute("SELECT local_path, count(*) FROM supersync_v0 GROUP BY local_path "
                           "HAVING count(*) > 1 LIMIT 5").fetchall()
        assert not twice, f"registered more than once: {twice}"
        found = dict(db.execute("SELECT local_path, local_md5sum FROM supersync_v0 "
                                "WHERE remote_md5sum = local_md5sum AND removed IS NULL"))
    assert len(found) == BURST == count_rows(setup.database)
    for i in range(BURST):
        rel = f"d{i // 500:03d}/f{i:05d}.dat"
        content = burst_content(i)
        assert found[str(inbox / rel)] == hashlib.md5(content).hexdigest(), rel
        assert (far / rel).read_bytes() == content, rel
    assert len(list(far.rglob("*.dat"))) == BURST
    assert "Traceback" not in agent.log()


def closed_port() -> int:
    """A local port nothing listens on (so ssh to it is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def insert_backlog(database: Path, rows: list[tuple]) -> None:
    """Rows straight into socs' table (executemany), as a bulk producer would."""
    Catalog(database).close()  # the schema
    with sqlite3.connect(database) as db:
        db.executemany(
            "INSERT INTO supersync_v0 (local_path, local_md5sum, archive_name, remote_path, timestamp,"
            " remote_md5sum, copied, failed_copy_attempts, deletable, ignore, size, mtime_ns)"
            " VALUES (?, ?, 'arch', ?, ?, ?, ?, 0, 1, 0, ?, ?)", rows)


def walked_every_row(database: Path) -> bool:
    """The housekeeper has derived timecode directories from every row."""
    with sqlite3.connect(database, timeout=30) as db:
        meta = dict(db.execute("SELECT key, value FROM watcher_meta"))
        top = db.execute("SELECT max(id) FROM supersync_v0").fetchone()[0]
    return any(k.startswith("tcdir") and v == str(top) for k, v in meta.items())


def test_memory_stays_bounded_with_100000_files_waiting_for_an_unreachable_archive(
        setup, agent_processes):
    """Resource bound: with 100,000 pending rows (the archive unreachable, so they stay
    pending and are charged nothing) the agent's resident memory stays under 150 MB."""
    data = setup.root / "backlog"
    setup.archive(ssh_host="nobody@127.0.0.1", ssh_port=closed_port(), remote_basedir="/nowhere",
                  cmd_timeout=2, api_roots=[str(data)])
    setup.rule()
    data.mkdir()
    sources = []
    for k in range(10):  # real files, so none is marked missing; many rows share one
        path = data / f"source-{k}.dat"
        path.write_bytes(os.urandom(1000))
        st = path.stat()
        sources.append((str(path), hashlib.md5(path.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns))
    now = time.time()
    insert_backlog(setup.database, [
        (src[0], src[1], f"{17000 + i % 50}/backlog/{i:06d}.dat", now - BACKLOG + i, None, None, src[2], src[3])
        for i, src in ((i, sources[i % 10]) for i in range(BACKLOG))])

    agent = agent_processes(setup).start().wait_ready()
    agent.wait_for(lambda: (agent.health() or {}).get("archives", {}).get("arch", {}).get("degraded"),
                   timeout=30, message="the archive reported unreachable")
    agent.wait_for(lambda: walked_every_row(setup.database), timeout=60,
                   message="timecode directories derived from every row")
    peak = agent.peak_rss_mb()
    print(f"\npeak resident memory with {BACKLOG} pending rows: {peak:.0f} MB")
    assert peak < MAX_RSS_MB, f"peak RSS {peak:.0f} MB"
    assert count_rows(setup.database, "remote_md5sum IS NULL AND removed IS NULL"
                                      " AND failed_copy_attempts = 0") == BACKLOG
    assert "Traceback" not in agent.log()


def test_an_idle_agent_with_a_large_catalog_uses_no_measurable_cpu(setup, agent_processes):
    """Resource bound: once its work is done, an agent over a catalog of 100,000
    verified rows uses under 2% of one core (5 s of /proc/PID/stat), so per-cycle
    queries cost in proportion to the work, not to the table."""
    far = setup.archive()
    inbox = setup.rule(remote_path="{timecode}/{relpath}")
    now = time.time()
    md5 = hashlib.md5(b"old").hexdigest()
    insert_backlog(setup.database, [
        (f"/data/old/{i:06d}.dat", md5, f"16000/old/{i:06d}.dat", now - 86400 * 30 + i, md5, now, 3, 0)
        for i in range(BACKLOG)])
    agent = agent_processes(setup).start().wait_ready()
    (inbox / "1600000000_new.dat").write_bytes(b"the last file of its day")
    agent.wait_for(lambda: count_rows(setup.database, "remote_md5sum = local_md5sum") >= BACKLOG + 2,
                   timeout=60, message="the new file and the finalization file verified")
    agent.wait_for(lambda: walked_every_row(setup.database), timeout=60,
                   message="timecode directories derived from every row")
    assert (far / "16000" / "1600000000_new.dat").read_bytes() == b"the last file of its day"
    used = agent.cpu_use_over(5.0)
    print(f"\nidle CPU over 5 s with {BACKLOG} rows: {used:.2%} of one core; RSS {agent.rss_mb():.0f} MB")
    assert used < MAX_IDLE_CPU, f"idle agent used {used:.1%} of a core"
    assert agent.rss_mb() < MAX_RSS_MB
