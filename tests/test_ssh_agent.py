"""The whole agent with an archive over ssh: files dropped into a watched
directory arrive on the far side through one shared ssh connection, and
stopping the agent closes that connection and removes its control directory."""
from __future__ import annotations

import glob
import os
import subprocess

from tests.ssh_support import control_sockets, processes_mentioning, ssh_archive_options
from tests.waiting import wait_until
from watcher.agent import Agent
from watcher.ssh import CONTROL_DIR_BASE, CONTROL_DIR_PREFIX


def test_agent_ships_over_one_shared_ssh_connection_and_stop_closes_it(sshd, remote_dir, setup):
    base = remote_dir / "archive base"
    setup.archive("arch", **ssh_archive_options(sshd, base))
    inbox = setup.rule()
    agent = Agent(setup.config(), housekeeping_interval=0.2)
    agent.start()
    stopped = False
    try:
        wait_until(lambda: agent.scans_done >= 1, timeout=10, message="the start-up scan")
        (inbox / "sub").mkdir()
        files = {"a.dat": os.urandom(2000), "sub/b.dat": b"b\n"}
        for name, data in files.items():
            (inbox / name).write_bytes(data)
        catalog = setup.catalog()
        try:
            wait_until(lambda: all((base / n).is_file() and (base / n).read_bytes() == d
                                   for n, d in files.items()), timeout=20,
                       message="both files on the far side")
            wait_until(lambda: all(r.verified for n in files
                                   for r in catalog.files.rows_for_path(str(inbox / n))) and
                       all(catalog.files.rows_for_path(str(inbox / n)) for n in files),
                       timeout=10, message="both files verified in the catalog")
        finally:
            catalog.close()

        # the agent runs in this process: its control directory is named after our pid
        [control_dir] = glob.glob(os.path.join(CONTROL_DIR_BASE, f"{CONTROL_DIR_PREFIX}{os.getpid()}-*"))
        assert os.path.isdir(control_dir)
        assert os.stat(control_dir).st_mode & 0o077 == 0  # private
        [socket] = control_sockets(control_dir)
        check = subprocess.run(agent.destinations["arch"].ssh_args()
                               + ["-O", "check", "--", sshd.ssh_target],
                               capture_output=True, text=True, timeout=10)
        assert check.returncode == 0 and "Master running" in check.stderr, check.stderr
        masters = processes_mentioning(control_dir)
        assert masters

        agent.stop()
        stopped = True

        assert not os.path.exists(control_dir)
        wait_until(lambda: not processes_mentioning(control_dir), timeout=10,
                   message="the ssh master (and any ssh using the control dir) to exit")
    finally:
        if not stopped:
            agent.stop()
