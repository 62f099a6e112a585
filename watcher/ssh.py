"""How the agent reaches an archive host: ssh's arguments, and the private
directory of the control sockets through which each archive's commands
share one connection."""

from __future__ import annotations

import shutil
import subprocess
import tempfile

from watcher.config import Archive


def ssh_args(archive: Archive, control_dir: str | None) -> list[str]:
    """ssh with its options, connection sharing included."""
    a = archive
    args = ["ssh", "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={max(1, int(a.cmd_timeout))}",
            "-o", f"ServerAliveInterval={max(1, int(a.copy_timeout // 3))}",
            "-o", "ServerAliveCountMax=3",
            "-o", "StrictHostKeyChecking=" + ("accept-new" if a.accept_new_host_keys else "yes")]
    if a.ssh_port:
        args += ["-p", str(a.ssh_port)]
    if a.ssh_key:
        args += ["-i", a.ssh_key, "-o", "IdentitiesOnly=yes"]
    if a.known_hosts:
        args += ["-o", f"UserKnownHostsFile={a.known_hosts}"]
    if control_dir:
        args += ["-o", "ControlMaster=auto", "-o", f"ControlPath={control_dir}/%C",
                 "-o", "ControlPersist=60"]
    return args


def make_control_dir() -> str:
    """A private directory for ssh control sockets (short, to fit a socket path)."""
    return tempfile.mkdtemp(prefix="watcher-ssh-", dir="/tmp")


def remove_control_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def stop_master(archive: Archive, control_dir: str) -> None:
    """Ask the archive's shared connection, if one runs, to exit."""
    try:
        subprocess.run(ssh_args(archive, control_dir) + ["-O", "exit", "--", archive.ssh_host],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=5)
    except (subprocess.TimeoutExpired, OSError):
        pass
