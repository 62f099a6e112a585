"""A real, throw-away sshd on 127.0.0.1 for the test suite (pytest plugin).

watcher ships files with rsync over ssh, so mocking ssh would test nothing
that matters.  `SshServer` runs the system's /usr/sbin/sshd with its own
keys and config in a temporary directory; no system file is modified
(/etc/ssh is never touched), except that when running as root we create
the login user `watchertest` and sshd's privilege separation dir
/run/sshd if they are missing.

When the tests run as root (CI), sshd runs as root but the tests log in as
the unprivileged `watchertest`, so "a directory the ssh user cannot write"
is a real permission failure.  Otherwise sshd runs unprivileged and the
login user is the current user.

Load with `pytest_plugins = ["tests.sshd"]` in tests/conftest.py.
"""
from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.waiting import wait_until

LOGIN_USER_WHEN_ROOT = "watchertest"
START_TIMEOUT = 15.0


def _ensure_login_user() -> pwd.struct_passwd:
    """Return the account tests log in as, creating `watchertest` if root."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.getuid())
    name = LOGIN_USER_WHEN_ROOT
    if subprocess.run(["id", name], capture_output=True).returncode != 0:
        # "-p *": useradd's default password "!" means *locked*, and with
        # UsePAM no sshd refuses even key logins to locked accounts.
        # "*" is merely "no password works".  Exit 9 = created concurrently.
        r = subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash",
                            "-p", "*", name], capture_output=True, text=True)
        if r.returncode not in (0, 9):
            raise RuntimeError(f"useradd {name} failed: {r.stderr}")
    if _password_field(name).startswith("!"):
        subprocess.run(["usermod", "-p", "*", name], check=True)
    return pwd.getpwnam(name)


def _password_field(name: str) -> str:
    with open("/etc/shadow") as f:
        for line in f:
            fields = line.split(":")
            if fields[0] == name:
                return fields[1]
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children_map() -> dict[int, list[int]]:
    """ppid -> [pid] for every process, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # comm (field 2) may contain spaces/parens: split after last ')'
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def _process_tree(roots: set[int]) -> set[int]:
    """`roots` and all their current descendants."""
    tree, todo, children = set(), list(roots), _children_map()
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo.extend(children.get(pid, []))
    return tree


def _kill_tree(root: int) -> None:
    """SIGKILL `root` and all its descendants.

    sshd calls setsid() in every per-connection child, so killing the
    process group is not enough.  We SIGSTOP the tree until it stops
    growing (so nothing forks or gets re-parented to init behind our
    back), then SIGKILL everything we saw.
    """
    seen: set[int] = set()
    while new := _process_tree(seen | {root}) - seen:
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        seen |= new
    for pid in seen:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _may_traverse(path: Path, pw: pwd.struct_passwd) -> bool:
    """Whether user `pw` may search (x bit) directory `path`."""
    if pw.pw_uid == os.geteuid():
        return os.access(path, os.X_OK)
    st = path.stat()
    if st.st_uid == pw.pw_uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in os.getgrouplist(pw.pw_name, pw.pw_gid):
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def force_rmtree(path: str | os.PathLike) -> None:
    """rmtree that also copes with dirs a test made read-only."""
    def onerror(func, p, exc_info):
        parent = os.path.dirname(p)
        try:
            os.chmod(parent, 0o700)
            os.chmod(p, 0o700)
        except OSError:
            pass
        try:
            func(p)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            shutil.rmtree(p, ignore_errors=True)
    if os.path.lexists(path):
        shutil.rmtree(path, onerror=onerror)


class SshServer:
    """One sshd on 127.0.0.1:port, with its own keys, config and temp dir."""

    host = "127.0.0.1"

    def __init__(self) -> None:
        self.pw = _ensure_login_user()
        self.user = self.pw.pw_name
        self.is_root = os.geteuid() == 0
        # Both dirs live under /tmp and are 0755: sshd reads the
        # AuthorizedKeysFile *as the login user*, and the user must be able
        # to reach its remote dirs (pytest's /tmp/pytest-of-root is 0700).
        self.dir = Path(tempfile.mkdtemp(prefix="watcher-sshd-"))
        self.dir.chmod(0o755)
        self._remote_base = Path(tempfile.mkdtemp(prefix="watcher-remote-"))
        self._remote_base.chmod(0o755)
        self.host_key = self.dir / "host_ed25519"
        self.client_key = self.dir / "client_ed25519"
        self.authorized_keys = self.dir / "authorized_keys"
        self.known_hosts = self.dir / "known_hosts"
        self.config = self.dir / "sshd_config"
        self.log = self.dir / "sshd.log"
        for key, comment in ((self.host_key, "watcher-test-host"),
                             (self.client_key, "watcher-test-client")):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "",
                            "-C", comment, "-f", str(key)], check=True)
        shutil.copyfile(f"{self.client_key}.pub", self.authorized_keys)
        self.authorized_keys.chmod(0o644)
        self.port = _free_port()
        self._proc: subprocess.Popen | None = None
        self._write_config()

    @property
    def ssh_target(self) -> str:
        return f"{self.user}@{self.host}"

    def _write_config(self) -> None:
        self.config.write_text(f"""\
ListenAddress {self.host}
Port {self.port}
HostKey {self.host_key}
PidFile {self.dir}/sshd.pid
AuthorizedKeysFile {self.authorized_keys}
AllowUsers {self.user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
X11Forwarding no
PermitUserEnvironment no
MaxStartups 100
MaxSessions 100
Subsystem sftp internal-sftp
LogLevel VERBOSE
""")
        # (AcceptEnv is left unset: the default accepts no variables.)
        host_pub = (Path(f"{self.host_key}.pub").read_text().split()[:2])
        self.known_hosts.write_text(f"[{self.host}]:{self.port} {' '.join(host_pub)}\n")

    # -- lifecycle -------------------------------------------------------

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start sshd (on the same port as before) and wait until it answers."""
        if self.is_running():
            return
        if self.is_root:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        sshd = shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:" + os.environ.get("PATH", ""))
        if sshd is None:
            raise RuntimeError("sshd not found (apt-get install openssh-server)")
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                [sshd, "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        wait_until(self._answers, timeout=START_TIMEOUT,
                   message=f"sshd to accept connections on port {self.port}")

    def _answers(self) -> bool:
        """True once sshd sends its SSH banner; raises if sshd died."""
        if self._proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {self._proc.returncode}:\n"
                               + self.log.read_text(errors="replace")[-3000:])
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                return s.recv(8).startswith(b"SSH-")
        except OSError:
            return False

    def stop(self) -> None:
        """Kill sshd and every connection it serves; the port then refuses."""
        if self._proc is None:
            return
        _kill_tree(self._proc.pid)
        self._proc.wait()
        self._proc = None
        wait_until(lambda: not self._accepts_tcp(), timeout=5,
                   message=f"port {self.port} to refuse connections")

    def _accepts_tcp(self) -> bool:
        try:
            socket.create_connection((self.host, self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def cleanup(self) -> None:
        self.stop()
        force_rmtree(self._remote_base)
        force_rmtree(self.dir)

    # -- client side -----------------------------------------------------

    def ssh_options(self) -> list[str]:
        """ssh client options that reach this server and nothing else.

        -F /dev/null ignores ~/.ssh/config and /etc/ssh/ssh_config so the
        developer's own settings cannot change test behaviour.
        """
        return ["-F", "/dev/null", "-p", str(self.port),
                "-i", str(self.client_key),
                "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "StrictHostKeyChecking=yes",
                "-o", "ConnectTimeout=10",
                "-o", "LogLevel=ERROR"]

    def ssh_command(self, *remote_argv: str | bytes) -> list[str]:
        """argv running `remote_argv` on the server, with argv semantics.

        ssh joins its arguments into one string for the remote shell, so
        each argument is shell-quoted here: hostile names arrive intact.
        To use shell syntax, pass it explicitly: ("sh", "-c", "a | b").
        """
        quoted = [shlex.quote(os.fsdecode(a)) for a in remote_argv]
        return ["ssh", *self.ssh_options(), "--", self.ssh_target, *quoted]

    def rsync_rsh(self) -> str:
        """Value for `rsync -e` (rsync splits it on whitespace itself)."""
        return shlex.join(["ssh", *self.ssh_options()])

    # -- forced commands ---------------------------------------------------

    def login_python(self) -> list[str]:
        """How the login user runs this checkout's Python with its packages (the
        tests' interpreter may lie where that user may not go, e.g. /root:
        then the system's of the same version, given the same packages)."""
        import site
        import sys
        python = sys.executable
        if self.is_root and subprocess.run(["runuser", "-u", self.user, "--", "test", "-x", python]).returncode:
            python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
        project = str(Path(__file__).resolve().parent.parent)
        return ["env", f"PYTHONPATH={':'.join([project, *site.getsitepackages()])}",
                "PYTHONDONTWRITEBYTECODE=1", python]

    def add_forced_key(self, key: Path, command: str) -> str:
        """Make a new key at ``key`` whose every login runs ``command`` (an
        authorized_keys ``command="...",restrict`` line); returns the line,
        for remove_key."""
        assert '"' not in command
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "forced", "-f", str(key)],
                       check=True)
        line = f'command="{command}",restrict {Path(f"{key}.pub").read_text().strip()}\n'
        with open(self.authorized_keys, "a") as f:
            f.write(line)
        return line

    def remove_key(self, line: str) -> None:
        self.authorized_keys.write_text(self.authorized_keys.read_text().replace(line, ""))

    # -- far-side directories --------------------------------------------

    def remote_root(self) -> Path:
        """A fresh empty dir owned by the login user, reachable by it."""
        path = Path(tempfile.mkdtemp(dir=self._remote_base))
        path.chmod(0o755)
        if self.is_root:
            os.chown(path, self.pw.pw_uid, self.pw.pw_gid)
        return path

    def make_remote_dir(self, path: str | os.PathLike) -> Path:
        """Create `path` (and missing parents) writable by the login user.

        Raises ValueError if an existing ancestor is not traversable by
        the user: use a path under remote_root() instead.
        """
        path = Path(path).absolute()
        missing = [p for p in (path, *path.parents) if not p.exists()]
        for ancestor in path.parents:
            if ancestor.exists() and not _may_traverse(ancestor, self.pw):
                raise ValueError(f"{self.user} cannot traverse {ancestor}; "
                                 "use SshServer.remote_root()")
        path.mkdir(parents=True, exist_ok=True)
        for p in missing:
            p.chmod(0o755)
            if self.is_root:
                os.chown(p, self.pw.pw_uid, self.pw.pw_gid)
        return path


# -- fixtures ----------------------------------------------------------------

@pytest.fixture(scope="session")
def sshd_server():
    """One sshd for the whole run (per xdist worker)."""
    server = SshServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def sshd(sshd_server):
    """The running server; restarted afterwards if the test stopped it."""
    sshd_server.start()
    yield sshd_server
    sshd_server.start()


@pytest.fixture
def remote_dir(sshd):
    """A fresh empty far-side dir writable by the ssh login user.

    Depends on `sshd` so the server is running (and restarted after).
    """
    path = sshd.remote_root()
    yield path
    force_rmtree(path)


@pytest.fixture
def canary_dir(sshd_server):
    """Empty dir both the test process and the ssh user can create files in.

    For tests.hostile_names: a name that gets executed by a shell on
    either side of the connection leaves a CANARY* file here.
    """
    path = sshd_server.remote_root()
    yield str(path)
    force_rmtree(path)
