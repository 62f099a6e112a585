"""How the agent reaches an archive host: ssh's arguments, and the private
directory of the control sockets through which each archive's commands
share one connection.

Each archive has a master connection of its own: its socket is named by a
hash of every setting that decides who connects to whom, so an archive
whose key or pinned host key differs never rides another's connection
(ssh's ``%C`` hashes only user, host and port). Paths reach ssh so that its
option parser cannot change them: ``%`` is doubled where ssh expands
tokens, values are double-quoted (a space would split a known_hosts list),
and a path that cannot be passed unchanged is refused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile

from watcher.config import Archive

CONTROL_DIR_PREFIX = "watcher-ssh-"
CONTROL_DIR_BASE = "/tmp"  # short: a socket path holds at most 107 bytes
_PERSIST = 60  # seconds an idle master waits for the next command


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
        args += ["-o", "IdentityFile=" + ssh_path(a.ssh_key, "ssh_key"), "-o", "IdentitiesOnly=yes"]
    if a.known_hosts:
        args += ["-o", "UserKnownHostsFile=" + ssh_path(a.known_hosts, "known_hosts")]
    if control_dir:
        args += ["-o", "ControlMaster=auto",
                 "-o", "ControlPath=" + ssh_path(control_socket(archive, control_dir), "control path"),
                 "-o", f"ControlPersist={_PERSIST}"]
    return args


def ssh_path(path: str, what: str) -> str:
    """``path`` as the value of an ssh option that expands ``%`` tokens.

    Double quotes keep spaces, quotes and ``#`` in (ssh 8.7 and later also
    read backslash escapes inside them, older ones do not: a backslash is
    refused, as are ``"``, control characters and ``${``, which ssh
    expands as an environment variable with no way to escape it).
    """
    wrong = unpassable(path)
    if wrong:
        raise ValueError(f"{what} {path!r}: {wrong}")
    if not path.startswith("/"):
        path = "./" + path  # never ~ (a home directory)
    return '"' + path.replace("%", "%%") + '"'


def unpassable(path: str) -> str | None:
    """Why ssh cannot be given ``path`` unchanged, or None."""
    if '"' in path:
        return 'ssh cannot be given a path with a double quote (")'
    if "\\" in path:
        return "ssh cannot be given a path with a backslash"
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "ssh cannot be given a path with a control character (newline, tab, ...)"
    if "${" in path:
        return "ssh would read ${...} in a path as an environment variable"
    return None


def control_socket(archive: Archive, control_dir: str) -> str:
    """The archive's socket: one per archive and per set of connection
    settings, 16 hex digits (ssh adds 17 characters while making it)."""
    a = archive
    settings = "\0".join(str(x) for x in (a.name, a.ssh_host, a.ssh_port, a.ssh_key, a.known_hosts,
                                          a.accept_new_host_keys))
    return os.path.join(control_dir, hashlib.sha256(settings.encode()).hexdigest()[:16])


def make_control_dir() -> str:
    """A private directory for ssh control sockets (short, to fit a socket path)."""
    return tempfile.mkdtemp(prefix=CONTROL_DIR_PREFIX, dir=CONTROL_DIR_BASE)


def remove_control_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def stop_master(archive: Archive, control_dir: str) -> None:
    """Ask the archive's shared connection, if one runs, to exit."""
    try:
        subprocess.run(ssh_args(archive, control_dir) + ["-O", "exit", "--", archive.ssh_host],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=5)
    except (subprocess.TimeoutExpired, OSError, ValueError):
        pass
