"""Running under systemd: notifications, the watchdog's heartbeats, journald
log lines, and the unit drop-in a configuration needs.

Everything here is inert outside systemd: without NOTIFY_SOCKET nothing is
sent, without JOURNAL_STREAM (naming our own stderr) logs keep their
timestamps. It imports nothing of watcher's: the agent feeds it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

DEFAULT_MARGIN = 60.0  # seconds of slack for a thread's progress without a watchdog (the unit's WatchdogSec)


# -- sd_notify --------------------------------------------------------------------


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message.encode(), address)
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)


def watchdog_interval() -> float | None:
    """WatchdogSec in seconds when systemd watches this process (WATCHDOG_USEC,
    and WATCHDOG_PID if set is ours), else None."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


def status_line(pending: dict[str, int | None], cap: int, degraded: dict[str, str]) -> str:
    """systemd's STATUS= text: pending files per archive (``cap`` or more: "cap+",
    as only that many are counted) and the degraded archives with their error."""
    parts = []
    for name, count in pending.items():
        text = "?" if count is None else (f"{cap}+" if count >= cap else str(count))
        part = f"{name}: {text} pending"
        if name in degraded:
            part += f", degraded ({degraded[name]})"
        parts.append(part)
    return "; ".join(parts)[:1000].replace("\n", " ")


# -- heartbeats -------------------------------------------------------------------


class Heart:
    """One long-lived thread's progress: when it last showed it was alive, and
    how long it may go without (``allowance``, seconds). A thread waiting with
    a timeout is alive until that timeout, plus its allowance; ``idle()``,
    when given, says it has nothing to do (an observer with no events queued);
    ``alive()``, when given, says its thread still runs."""

    def __init__(self, name: str, allowance: float, idle: Callable[[], bool] | None = None,
                 alive: Callable[[], bool] | None = None):
        self.name, self.allowance, self._idle, self._alive = name, allowance, idle, alive
        self.last = time.monotonic()
        self.until = 0.0  # the end of a timed wait in progress

    def beat(self) -> None:
        self.last, self.until = time.monotonic(), 0.0

    def waiting(self, seconds: float | None) -> None:
        now = time.monotonic()
        self.last, self.until = now, math.inf if seconds is None else now + seconds

    def stalled(self, now: float) -> str | None:
        """Why this thread is not progressing, or None."""
        if self._alive is not None and not self._alive():
            return f"thread {self.name} has ended"
        if self._idle is not None and self._idle():
            self.last = now
            return None
        silent = now - max(self.last, self.until)
        if silent > self.allowance:
            return f"thread {self.name} has shown no progress for {silent:.0f} s (allowed {self.allowance:.0f} s)"
        return None


class Heartbeats:
    """The hearts of the agent's threads, found by thread name: a thread beats
    its own heart (``beat()``) without being handed it. A pool thread named
    ``PREFIX_N`` (concurrent.futures) beats the heart registered for PREFIX."""

    def __init__(self, margin: float | None = None):
        self.margin = DEFAULT_MARGIN if margin is None else margin
        self._by_thread: dict[str, Heart] = {}
        self._hearts: dict[str, Heart] = {}
        self._lock = threading.Lock()

    def register(self, name: str, allowance: float, threads: tuple[str, ...] = (),
                 idle: Callable[[], bool] | None = None,
                 alive: Callable[[], bool] | None = None) -> Heart:
        """A heart for thread ``name`` (and ``threads`` working for it), allowed
        ``allowance`` seconds without progress, plus the margin."""
        heart = Heart(name, allowance + self.margin, idle, alive)
        with self._lock:
            self._hearts[name] = heart
            for thread in (name, *threads):
                self._by_thread[thread] = heart
        return heart

    def forget(self, name: str) -> None:
        with self._lock:
            heart = self._hearts.pop(name, None)
            for thread in [t for t, h in self._by_thread.items() if h is heart]:
                del self._by_thread[thread]

    def current(self) -> Heart | None:
        """The calling thread's heart, if it has one."""
        name = threading.current_thread().name
        heart = self._by_thread.get(name)
        if heart is None and "_" in name:
            heart = self._by_thread.get(name.rpartition("_")[0])
        return heart

    def beat(self) -> None:
        """The calling thread is making progress."""
        heart = self.current()
        if heart is not None:
            heart.beat()

    def forgive(self) -> None:
        """Every thread counts as having just shown progress: the whole process
        was stopped (SIGSTOP, a debugger) or starved, so silence says nothing."""
        now = time.monotonic()
        with self._lock:
            for heart in self._hearts.values():
                heart.last = max(heart.last, now)

    def stalled(self) -> dict[str, str]:
        """``{thread: why}`` for each thread that is not progressing (empty: all are)."""
        now = time.monotonic()
        with self._lock:
            hearts = list(self._hearts.values())
        return {h.name: why for h in hearts if (why := h.stalled(now))}


class ProgressEvent(threading.Event):
    """The agent's stop event: every loop of the agent looks at it or waits on
    it, so a thread that does is alive (a thread polling a running rsync looks
    every 0.1 s), and one waiting on it with a timeout is alive until then."""

    def __init__(self, hearts: Heartbeats):
        super().__init__()
        self._hearts = hearts

    def is_set(self) -> bool:
        self._hearts.beat()
        return super().is_set()

    def wait(self, timeout: float | None = None) -> bool:
        heart = self._hearts.current()
        if heart is None:
            return super().wait(timeout)
        heart.waiting(timeout)
        try:
            return super().wait(timeout)
        finally:
            heart.beat()


# -- journald ---------------------------------------------------------------------

PRIORITIES = ((logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))  # else 7 (debug)


def journal_stream(stream=None) -> bool:
    """Whether ``stream`` (stderr) is connected to journald: JOURNAL_STREAM
    names its device and inode (set by systemd for the service's own stderr;
    a program it starts with stderr elsewhere must not take it for its own)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``: journald reads the syslog priority N from the
    prefix (so `journalctl -p warning` works) and adds its own timestamp."""

    def __init__(self):
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in PRIORITIES if record.levelno >= level), 7)
        text = super().format(record)
        # journald splits lines: each continuation (a traceback) keeps the priority
        return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))


def log_formatter(stream=None) -> logging.Formatter:
    """The journald format under systemd, else timestamped lines."""
    if journal_stream(stream):
        return JournalFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


# -- the drop-in for a configuration ------------------------------------------------

SYSTEM_CONFIG_DIR = Path("/etc/watcher")  # the unit runs /etc/watcher/%i.yaml
SYSTEM_STATE_DIR = Path("/var/lib/watcher")  # the unit's StateDirectory=watcher/%i is below it
HOME_DIRS = ("/home", "/root", "/run/user")  # what ProtectHome=yes hides


class DropInError(ValueError):
    """A path the drop-in cannot name safely: one line."""


def unit_path(path: str | os.PathLike, prefix: str = "") -> str:
    """``path`` as a word of ReadWritePaths= and its kin, after ``prefix``
    ("-": ignored when missing): in double quotes (spaces), ``%`` doubled
    (specifiers). A path with a quote, a backslash or a
    control character is refused rather than escaped: systemd's unescaping
    differs between settings and versions."""
    text = os.fspath(path)
    if any("\udc80" <= c <= "\udcff" for c in text):
        raise DropInError(f"{text!r} is not UTF-8: systemd cannot name it")
    if any(c in "\"'\\" or ord(c) < 32 or ord(c) == 127 for c in text):
        raise DropInError(f"{text!r} has a quote, a backslash or a control character: name it in the "
                          "drop-in by hand")
    return '"' + prefix + text.replace("%", "%%") + '"'


def instance_name(config_path: str | os.PathLike) -> str:
    """The instance a configuration runs as: watcher@NAME for /etc/watcher/NAME.yaml."""
    return Path(config_path).stem


def _below(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def dropin(config, config_path: str | os.PathLike) -> str:
    """The drop-in (``watcher@NAME.service.d/paths.conf``) that lets the
    hardened unit reach what ``config`` names: ReadWritePaths for the watched
    trees, api_roots, the catalog's directory, file_root and local archives'
    bases (below the instance's own state directory: writable already);
    ReadOnlyPaths for ssh keys and known_hosts (written when new host keys are
    accepted). Paths below /home, /root or /run/user are bound into the
    ProtectHome=tmpfs view instead. Raises DropInError for a path it cannot name."""
    name = instance_name(config_path)
    state = str(SYSTEM_STATE_DIR / name)
    writable: dict[str, str] = {}  # path -> why
    readable: dict[str, str] = {}
    must_exist: list[str] = []
    for rule in config.rules:
        writable.setdefault(str(rule.watch), "watched (retention deletes there)")
    for archive in config.archives.values():
        for root in getattr(archive, "api_roots", ()) or ():
            writable.setdefault(str(root), f"api_roots of {archive.name}")
    for path, why in ((config.database.parent, "the catalog's directory"), (config.file_root, "file_root")):
        writable.setdefault(str(path), why)
        must_exist.append(str(path))
    for archive in config.archives.values():
        if archive.is_remote:
            for path, what in ((archive.ssh_key, "ssh_key"), (archive.known_hosts, "known_hosts")):
                if path is None:
                    continue
                if what == "known_hosts" and archive.accept_new_host_keys:
                    writable.setdefault(str(Path(path).parent), f"known_hosts of {archive.name} (new keys)")
                else:
                    readable.setdefault(str(path), f"{what} of {archive.name}")
        else:
            writable.setdefault(str(archive.remote_basedir), f"archive {archive.name}")
            must_exist.append(str(archive.remote_basedir))
    if any(a.is_remote and a.accept_new_host_keys and a.known_hosts is None for a in config.archives.values()):
        writable.setdefault("-%h/.ssh", "ssh's own known_hosts (new host keys are added)")
    lines = [f"# Drop-in for watcher@{name}.service, from {config_path}:",
             f"#   systemctl edit watcher@{name}   (or save as "
             f"/etc/systemd/system/watcher@{name}.service.d/paths.conf, then systemctl daemon-reload)",
             "# What the agent may write besides its state directory (ProtectSystem=strict), and read",
             "# though hidden (ProtectHome=yes). Made again by `watcher config systemd` after an edit.",
             "[Service]"]
    home_binds: list[str] = []
    for path in [p for p in writable if any(p != q and _below(p, q) for q in writable)]:
        del writable[path]  # writable through a directory above it (file_root beside the catalog)
    for path, why in writable.items():
        if path.startswith("-%h"):
            lines += [f"# {why}", f"ReadWritePaths={path}"]
            continue
        if _below(path, state):
            lines.append(f"# {why}: {path} is in the state directory, writable already")
            continue
        if path in must_exist:
            lines.append(f"# {why}: make it before the first start (the agent cannot, outside these paths)")
            word = unit_path(path)
        else:  # "-": a tree that is missing (an unmounted disk) must not stop the whole service
            lines.append(f"# {why}")
            word = unit_path(path, "-")
        if any(_below(path, h) for h in HOME_DIRS):
            home_binds.append(f"BindPaths={word}")
        else:
            lines.append(f"ReadWritePaths={word}")
    for path, why in readable.items():
        word = unit_path(path)
        lines.append(f"# {why}")
        if any(_below(path, h) for h in HOME_DIRS):
            home_binds.append(f"BindReadOnlyPaths={word}")
        else:
            lines.append(f"ReadOnlyPaths={word}")
    if home_binds:
        lines += ["# Paths below /home, /root or /run/user: an empty home, with only these bound into it",
                  "ProtectHome=tmpfs", *home_binds]
    return "\n".join(lines) + "\n"
