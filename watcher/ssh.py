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
import stat
import subprocess
import tempfile

from watcher.config import Archive, ssh_path_problem

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
    if a.ssh_cipher:
        args += ["-o", "Ciphers=" + a.ssh_cipher]
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
    wrong = ssh_path_problem(path)  # the configuration refused such paths already
    if wrong:
        raise ValueError(f"{what} {path!r}: {wrong}")
    if not path.startswith("/"):
        path = "./" + path  # never ~ (a home directory)
    return '"' + path.replace("%", "%%") + '"'


def control_socket(archive: Archive, control_dir: str) -> str:
    """The archive's socket: one per archive and per set of connection
    settings, 16 hex digits (ssh adds 17 characters while making it)."""
    a = archive
    settings = "\0".join(str(x) for x in (a.name, a.ssh_host, a.ssh_port, a.ssh_key, a.known_hosts,
                                          a.accept_new_host_keys, a.ssh_cipher))
    return os.path.join(control_dir, hashlib.sha256(settings.encode()).hexdigest()[:16])


def make_control_dir() -> str:
    """A private directory for ssh control sockets, named with the agent's
    pid and start time so that a later agent can tell it from a running
    one's (even when the pid has been reused)."""
    pid = os.getpid()
    return tempfile.mkdtemp(prefix=f"{CONTROL_DIR_PREFIX}{pid}-{_started(pid) or 0}-", dir=CONTROL_DIR_BASE)


def remove_control_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def stop_master(archive: Archive, control_dir: str) -> None:
    """Ask the archive's shared connection, if one runs, to exit."""
    try:
        subprocess.run(ssh_args(archive, control_dir) + ["-O", "exit", "--", archive.ssh_host],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=5)
    except (subprocess.TimeoutExpired, OSError, ValueError):
        pass


def remove_stale_control_dirs(base: str = CONTROL_DIR_BASE) -> int:
    """Stop the masters and remove the control directories of agents that
    are gone (killed: nothing cleaned up); returns how many.

    Only our own uid's real directories count, and only when no process
    runs with the pid and start time in the name (start times count clock
    ticks since boot, so a reused pid is told apart, and a clock set
    forward or back changes nothing).
    """
    removed = 0
    try:
        names = os.listdir(base)
    except OSError:
        return 0
    for name in names:
        pid, start, rest = (name[len(CONTROL_DIR_PREFIX):].split("-", 2) + ["", ""])[:3]
        if not name.startswith(CONTROL_DIR_PREFIX) or not (pid.isdigit() and start.isdigit() and rest):
            continue  # not ours (or an older agent's, whose pid is unknown)
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or _runs(int(pid), int(start)):
            continue
        for socket in _sockets(path):
            _exit_master(socket)
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


def _runs(pid: int, start: int) -> bool:
    """Whether the process that made a directory (``pid``, started at ``start``) still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another account's process
    now = _started(pid)
    return now is None or not start or now == start  # unknown: assume it is the owner


def _started(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (proc(5) stat field 22)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _sockets(directory: str) -> list[str]:
    try:
        return [e.path for e in os.scandir(directory) if stat.S_ISSOCK(e.stat(follow_symlinks=False).st_mode)]
    except OSError:
        return []


def _exit_master(socket: str) -> None:
    """Ask the master listening on ``socket`` to exit (the host is not used)."""
    try:
        subprocess.run(["ssh", "-F", "/dev/null", "-o", "ControlPath=" + ssh_path(socket, "control socket"),
                        "-O", "exit", "x"],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=5)
    except (subprocess.TimeoutExpired, OSError, ValueError):
        pass
