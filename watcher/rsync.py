"""Move a batch to its destination and read back the far side's md5 sums.

One rsync call carries a whole batch, its files listed NUL-separated on
standard input: each file, opened by the agent without following any
symlink, stands in a temporary tree as a link named as its remote path to
the descriptor rsync inherits (see ``_Listing``), so any local name can go
to any remote name and nothing but the opened file is read. Then one command reads the md5 of every file of the batch,
the paths going NUL-separated on standard input (never through a shell or
an option parser). A local destination is hashed in-process.

The far account is trusted to hash honestly, not to keep its tree clean: a
file counts only if rsync reported sending it (``--out-format``) and the far
md5 was read from a path with no symlink anywhere below the base (checked
on the far side with ``realpath``); the far rsync must be one that refuses
to write through such links (3.5 or later, checked once per destination).

Commands are built as argument lists by pure functions and run in one
place, which turns an exit status into a typed ``TransferError``, classed
by its cause: the archive's (nothing charged) or a file's.
"""

from __future__ import annotations

import array
import errno
import fcntl
from collections import OrderedDict
import itertools
import logging
import os
import posixpath
import re
import select
import shlex
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import sh

from watcher.config import Archive
from watcher.durable import SYNCFS_FILES, hash_durably, raise_descriptor_limit
from watcher.faults import checkpoint
from watcher.far_side import (MD5_HEADER, SERVE_MIN_RSYNC, SERVE_REFUSED, SERVE_REQUEST, SYNC_FAILED, TEMP_NAME,
                              drop_identical_copies)
from watcher.rules import REPLACED_DIR, remote_path_problem
from watcher.safefs import Beneath, Trees, open_in, split_beneath
from watcher.ssh import ssh_args, stop_master

log = logging.getLogger(__name__)

# rsync and ssh exit codes that say the connection failed, not the files.
CONNECTION_EXIT_CODES = {255, 5, 10, 12, 30, 35}
# rsync exit codes that describe the archive or its host, not a file: usage
# (an rsync that does not take our options), protocol, the base directory,
# an action not supported, IPC, memory. Nothing is charged; the worker backs off.
ARCHIVE_EXIT_CODES = {1, 2, 3, 4, 6, 13, 14, 21, 22}
# File I/O: a full disk ends the receiver with 11, and so does one far file
# that cannot be written (EFBIG, EIO): a "batch" error, backed off a few
# times, then blamed on files as a batch of which nothing arrived.
BATCH_EXIT_CODES = {11}
RSYNC_EXIT_MEANINGS = {
    1: "syntax or usage error", 2: "protocol incompatibility", 3: "errors selecting input/output files, dirs",
    4: "requested action not supported", 5: "error starting client-server protocol",
    10: "error in socket I/O", 11: "error in file I/O", 12: "error in rsync protocol data stream",
    13: "errors with program diagnostics", 14: "error in IPC code", 22: "error allocating memory",
    23: "partial transfer due to error", 30: "timeout in data send/receive"}
# What in rsync's complaints says the whole archive is in trouble: the error
# that ends a line (a file's name, earlier in it, cannot end one: rsync
# writes a newline in a name as \#012).
ARCHIVE_FULL = re.compile(rb": (?:No space left on device|Disk quota exceeded) \(\d+\)\s*$",
                          re.MULTILINE)
# rsync's temporary files untouched this long (status change time) are left
# over from a copy cut off: a running copy writes at least every copy_timeout.
TEMP_FILE_AGE = 3600.0
TEMP_WALK_TIMEOUT = 600.0  # seconds the far side may take to walk the base looking for them
# The oldest rsync that refuses to write through a symlink below the destination
# (3.4), its implied parents under --relative included (3.5.0: CVE-2026-53785;
# the agent's --files-from implies --relative).
MIN_RSYNC_VERSION = (3, 5)
SHELL_TEXT = ("the archive host's login shell prints text, so rsync and the md5 command cannot "
              "talk through it: make its startup files (~/.bashrc ...) print nothing when not "
              "interactive")
# Far-side hashing speed assumed when giving a remote md5 command its time,
# and the time allowed for each file's fsync (a busy disk's, tens of ms).
MIN_HASH_RATE = 20e6
FSYNC_ALLOWANCE = 0.05


class TransferError(Exception):
    """A batch could not be moved or checked.

    ``kind`` is "connection" (the network or the far host: back off and
    retry, the files are not to blame), "archive" (the archive itself: its
    rsync too old, its login shell printing text, its disk full, its base
    directory unwritable; backed off the same way, nothing charged),
    "batch" (rsync's file I/O failed: the archive, or one file of the batch;
    backed off a few times, then judged as a batch of which nothing arrived)
    or "timeout" (a transfer or command stalled: killed, retried the same way).
    """

    def __init__(self, kind: str, message: str, command: list[str] | None = None):
        super().__init__(message)
        self.kind = kind
        self.command = command


class Stopped(Exception):
    """The agent is stopping; the command was abandoned."""


@dataclass(frozen=True)
class Item:
    """One file of a batch."""

    id: int
    local_path: str
    remote_path: str
    local_md5sum: str
    size: int | None = None
    # Maybe an edit: the far copy under its name may be an earlier version of
    # this very file, which this agent verified (Destination.may_be_edit;
    # the send checks the file opened is that file).
    edit: bool = False


class FarCheck(NamedTuple):
    """One file of a shipped batch: the md5 sent, and the far copy's (None: none was read)."""

    sent: str
    found: str | None


class Sent(NamedTuple):
    """A batch copied: the items handed to rsync, and those refused before
    it (unopenable, or not reported sent), which are charged without a far md5;
    ``said``: rsync's complaint (see ``said``) when it left some unsent, else ""."""

    sent: list[Item]
    refused: list[Item]
    said: str = ""


class BatchResult(NamedTuple):
    """What a shipped batch came to: a FarCheck per row judged, and the items
    whose local file was gone (not charged: the caller marks them removed)."""

    checked: dict[int, FarCheck]
    missing: list[Item]


@dataclass
class Completed:
    exit_code: int
    stdout: bytes
    stderr: bytes


def run(argv: list[str], *, stdin: bytes | None = None, timeout: float | None = None,
        stop: threading.Event | None = None, pass_fds: list[int] = (),
        umask: int | None = None, stall: float | None = None) -> Completed:
    """Run a command once (through sh, plain pipes), abandoning it when ``stop`` is set.

    Raises TransferError("timeout") when it runs longer than ``timeout`` (the
    whole process group is killed) and Stopped when the agent stops first.
    ``pass_fds``: descriptors the command inherits (at the same numbers; they
    must be inheritable: every command is started with all others closed).
    ``umask``: the command's own (the modes of the directories it makes).
    ``stall``: once the command has read and written nothing for that long
    (a stopped rsync, one stuck in the kernel, which its own --timeout never
    ends), looking at ``stop`` no longer counts as the thread's progress
    (watcher.service's heartbeats): the watchdog's pings stop and systemd
    restarts the agent.
    """
    log.debug("running %r", argv)
    deadline = None if timeout is None else time.monotonic() + timeout
    proc = sh.Command(argv[0])(
        *argv[1:], _in=stdin, _bg=True, _bg_exc=False, _tty_out=False,
        _ok_code=list(range(256)), _return_cmd=True, _new_session=True,
        **({"_pass_fds": set(pass_fds)} if pass_fds else {}),
        **({"_preexec_fn": lambda: os.umask(umask)} if umask is not None else {}))
    # Poll, never proc.wait(timeout=...): when that sees the exit it marks the
    # command waited for without joining sh's reader threads, so stdout could
    # be read short or empty. The final proc.wait() below joins them.
    # Between polls, wait on a pidfd (readable at the exit, so a batch's
    # commands do not each lose up to a poll interval); else sleep 2-50 ms.
    pidfd, pause = _pidfd(proc.process.pid), 0.002
    poller = select.poll()  # not select(): a batch's descriptors push numbers past 1024
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    io, moved = None, time.monotonic()
    try:
        while proc.process.is_alive()[0]:
            if pidfd is not None:
                poller.poll(100)
            else:
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
            quiet = False
            if stall is not None:
                now_io = _io_counts(proc.process.pid)
                if now_io != io or now_io is None:
                    io, moved = now_io, time.monotonic()
                quiet = time.monotonic() - moved > stall
            # a plain look at the event, which counts as no progress, once quiet
            if stop is not None and (threading.Event.is_set(stop) if quiet else stop.is_set()):
                _kill(proc)
                raise Stopped(argv[0])
            if deadline is not None and time.monotonic() > deadline:
                _kill(proc)
                raise TransferError("timeout", f"{argv[0]} ran longer than {timeout:g}s and was killed", argv)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    try:
        proc.wait()
    except sh.SignalException as exc:
        raise TransferError("timeout", f"{argv[0]} was killed: {exc}", argv) from None
    return Completed(proc.exit_code, proc.stdout or b"", proc.stderr or b"")


def _io_counts(pid: int) -> tuple[int, int] | None:
    """Bytes a process has read and written so far (its /proc io), or None
    when they cannot be read (it is gone, or /proc is not Linux's)."""
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            fields = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
        return int(fields[b"rchar"]), int(fields[b"wchar"])
    except (OSError, KeyError, ValueError):
        return None


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when ``pid`` exits (Linux 5.3+), or None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _kill(proc) -> None:
    try:
        proc.process.kill_group()
    except OSError:
        pass
    try:
        proc.wait()
    except Exception:  # the signal's exception: expected, we sent it
        pass


# Lines of ssh's that name no cause: its box of @ around a warning, its note
# on a host key it added, its advice under "Permissions 0644 ... are too open"
# and under "REMOTE HOST IDENTIFICATION HAS CHANGED!".
_NOISE = re.compile("|".join((
    r"@*", r"Warning: Permanently added .*",
    r"It is required that your private key files are NOT accessible by others\.",
    r"This private key will be ignored\.", r"IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!",
    r"Someone could be eavesdropping on you right now .*", r"It is also possible that a host key has just been changed\.",
    r"The fingerprint for the .* key sent by the remote host is", r"SHA256:\S+", r"Please contact your system administrator\.",
    r"Add correct host key in .* to get rid of this message\.", r"remove with:", r"ssh-keygen -f .* -R .*")))
SAID_LIMIT = 700  # characters of a command's complaint kept in one line
LINE_LIMIT = 300  # of one line of it (a long file name)


def said(data: bytes, limit: int = SAID_LIMIT) -> str:
    """What a command said (its standard error), in one line that keeps the cause.

    rsync and ssh name the cause first (the mkdir that failed, the key's
    permissions) and sum up last (rsync's exit code): the lines are kept in
    order from the first, ssh's noise dropped, until ``limit``; then how many
    were left out, then the last line. Never a fixed tail, which cut the
    cause off the front."""
    lines: list[str] = []
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip().strip("@").strip()
        if line and not _NOISE.fullmatch(line) and (not lines or line != lines[-1]):
            lines.append(line if len(line) <= LINE_LIMIT else line[:LINE_LIMIT - 1] + "\u2026")
    if len(lines) <= 1:
        return "".join(lines)
    kept, size, last = [], len(lines[-1]), lines[-1]
    for line in lines[:-1]:
        if kept and size + len(line) + 3 > limit:
            break
        kept.append(line)
        size += len(line) + 3
    left = len(lines) - 1 - len(kept)
    return " | ".join(kept + ([f"\u2026 {left} more lines \u2026"] if left else []) + [last])


def size_text(n: float) -> str:
    """Bytes for a log line or a status: 512 B, 3.4 MiB, 1.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Destination:
    """Where an archive's files go: a local directory, or a directory over ssh."""

    def __init__(self, archive: Archive, control_dir: str | None = None,
                 local_roots: tuple[str, ...] = ()):
        """``local_roots``: the watched trees (and where finalization files are
        written); no symlink below one is followed when a file is sent."""
        self.archive = archive
        self._control_dir = control_dir
        self._roots = tuple(str(r) for r in local_roots)
        self._max_files = _descriptor_budget()
        self._rsync_checked = False
        # remote path -> the --backup-dir of the batch that last sent it, until its far md5 ran
        self._replaced: dict[str, str] = {}
        self._replaced_lock = threading.Lock()
        # Rows this agent verified: id -> (local path, remote path, dev, ino) of
        # the file sent, newest last (see may_be_edit); and those sent, not yet judged.
        self._verified: OrderedDict[int, tuple] = OrderedDict()
        self._sent: dict[int, tuple] = {}
        self._home: str | None = None  # the far login's working directory, as rsync sees it
        # the far account's key may run only watcher.serve (a forced command)
        self.serve = archive.is_remote and archive.far_side == "serve"
        mode = far_dir_mode(archive.chmod)
        # the receiving rsync's umask, which alone decides the mode of the directories it makes
        self._far_umask = None if mode is None else 0o777 & ~mode

    # -- building commands (pure) --------------------------------------------

    def ssh_args(self) -> list[str]:
        """ssh with its options, connection sharing included."""
        return ssh_args(self.archive, self._control_dir)

    def rsync_args(self, source: str, replaced_dir: str = "") -> list[str]:
        """One rsync call that copies the files listed on its standard input
        (``--files-from``, NUL-separated, relative to ``source``; see
        ``_Listing``) into the base directory.

        ``--no-implied-dirs``: no directory is sent as an entry, so existing
        far directories, the base directory included, keep their permissions
        (with ``--perms`` they would get a local directory's mode plus
        ``chmod``, and a ``chmod`` such as ``u=rw`` would leave them
        unusable). With ``chmod``, the ones rsync makes get far_dir_mode's
        mode through the receiving rsync's umask (``--rsync-path`` over ssh,
        the process's own here); without, the far side's default.
        ``--no-dirs`` (``--files-from`` implies ``--dirs``) and no
        ``--recursive``: a listed path that has become a directory is
        skipped, neither copied with its contents nor made an empty
        directory under a file's far name; the md5 check charges it.
        ``--copy-links`` follows the listing's own links, each to a
        descriptor of a file the agent opened; the source is always that
        private tree, never a watched one. ``--out-format`` reports each
        file sent (see ``reported_names``). ``--backup-dir``: a far file a
        copy replaces (an edit, a retry after a bad copy, a name a catalog
        writer chose) is moved to ``replaced_dir`` (relative to the base,
        below REPLACED_DIR), never destroyed, whatever the catalog says.
        """
        a = self.archive
        args = ["rsync", "--no-dirs", "--copy-links", "--times", "--omit-dir-times",
                "--ignore-times", "--mkpath", "--no-implied-dirs",
                # -s: --secluded-args (--protect-args before 3.2.7); not to a
                # forced command, which must see the receiver's arguments to check
                # them (rsync then escapes them for the far shell itself)
                *([] if self.serve else ["-s"]),
                "--files-from=-", "--from0",
                # A line per file sent, names escaped only as rsync_escaped() says.
                "--8-bit-output", f"--out-format={OUT_FORMAT}",
                f"--timeout={max(1, int(a.copy_timeout))}"]
        if replaced_dir:
            args += ["--backup", f"--backup-dir={replaced_dir}"]
        if a.chmod:
            args += ["--perms", f"--chmod={a.chmod}"]
        if a.compression:
            args.append("--compress")
        if a.bwlimit:
            args.append(f"--bwlimit={a.bwlimit}")
        if a.fsync == "file":
            args.append("--fsync")  # besides the batch's sync (directories): stricter, slower
        if a.is_remote:
            args += ["--rsh", " ".join(shlex.quote(x) for x in self.ssh_args())]
            if self._far_umask is not None:
                args.append(f"--rsync-path=umask {self._far_umask:04o} && rsync")
            dest = f"{a.ssh_host}:{_dir_arg(a.remote_basedir)}"
        else:
            dest = _dir_arg(a.remote_basedir)
        return args + ["--", source, dest]

    def remote_md5_args(self, replaced_dir: str = "") -> list[str]:
        """A far command that hashes the NUL-separated paths on its standard
        input, with what proves no symlink was followed (see ``parse_far_md5``);
        and that removes from ``replaced_dir`` (the batch's ``--backup-dir``)
        each copy identical to the file now under its name (a copy rewritten
        after a restart or a lost connection), then its empty directories."""
        if self.serve:
            return self._serve_args("md5", self.archive.remote_basedir, *([replaced_dir] if replaced_dir else []))
        script = (f"cd -P -- {shlex.quote(self.archive.remote_basedir)} && "
                  f"printf '{MD5_HEADER.decode()}%s\\0' \"$PWD\" && "
                  f"R={shlex.quote(replaced_dir)} && export R && "
                  f"xargs -0 -r sh -c {shlex.quote(MD5_CHUNK)} sh; rc=$?; "
                  f"{{ [ -z \"$R\" ] || [ ! -d \"$R\" ] || [ -h \"${{R%/*}}\" ] || [ -h \"$R\" ] || "
                  f"find \"$R\" -depth -type d -empty -delete && rmdir -- \"${{R%/*}}\"; }} 2>/dev/null; "
                  f"exit $rc")
        return self.ssh_args() + ["--", self.archive.ssh_host, script]

    def rsync_version_args(self) -> list[str]:
        """The command that says which rsync the receiving side runs (and,
        over ssh, in which directory the far login starts)."""
        if not self.archive.is_remote:
            return ["rsync", "--version"]
        if self.serve:  # the serving root's physical path, then rsync's version
            return self._serve_args("version")
        return self.ssh_args() + ["--", self.archive.ssh_host, "pwd -P && exec rsync --version"]

    def _serve_args(self, *words: str) -> list[str]:
        """A request to the archive's forced command (watcher.serve): one
        fixed verb and its quoted arguments, which ssh hands over as
        SSH_ORIGINAL_COMMAND."""
        return self.ssh_args() + ["--", self.archive.ssh_host,
                                  " ".join([SERVE_REQUEST, *(shlex.quote(w) for w in words)])]

    def preflight_args(self, script: str) -> list[str]:
        """The start-up check's command (watcher.preflight): its far script
        in a shell, or the forced command's ``check`` request."""
        if self.serve:
            return self._serve_args("check", self.archive.remote_basedir)
        return self.ssh_args() + ["--", self.archive.ssh_host,
                                  f"b={shlex.quote(self.archive.remote_basedir)}\n{script}"]

    # -- checks ----------------------------------------------------------------

    def check_rsync(self, stop: threading.Event | None = None) -> None:
        """Refuse an rsync older than MIN_RSYNC_VERSION on the receiving side
        (it writes through a symlink planted below the base directory); once
        per destination, before its first copy. Raises TransferError("archive")."""
        if self._rsync_checked:
            return
        a = self.archive
        where = f"the archive host {a.ssh_host}" if a.is_remote else "this host"
        argv = self.rsync_version_args()
        result = run(argv, timeout=a.cmd_timeout, stop=stop)
        if a.is_remote and result.exit_code == 255:
            raise TransferError("connection", f"ssh exited 255: {said(result.stderr)}", argv)
        out = result.stdout
        if a.is_remote:
            home, _, out = out.partition(b"\n")
            if not home.startswith(b"/") and (home or out):
                raise TransferError("archive", f"{SHELL_TEXT} (it printed {said(home, 80)!r})", argv)
            self._home = os.fsdecode(home)
        found = re.match(rb"rsync\s+version\s+v?(\d+)\.(\d+)(?:\.(\d+))?", out)
        if found is None:
            if a.is_remote and out.strip() and not out.startswith(b"rsync"):
                raise TransferError("archive", f"{SHELL_TEXT} (it printed {said(out, 80)!r})", argv)
            raise TransferError("archive", f"no usable rsync on {where}: `rsync --version` exited "
                                f"{result.exit_code}: {said(result.stderr or out)}", argv)
        version = tuple(int(v or 0) for v in found.groups())
        if self.serve and version < SERVE_MIN_RSYNC:  # the serving side refuses each receiver
            raise TransferError(
                "archive", f"{where} runs rsync {'.'.join(map(str, version))}; watcher serve needs rsync "
                f"{'.'.join(map(str, SERVE_MIN_RSYNC))} or later there (older ones make the parents of a "
                "name through a planted symlink)", argv)
        if version[:2] < MIN_RSYNC_VERSION:
            raise TransferError(
                "archive", f"{where} runs rsync {'.'.join(map(str, version))}; watcher needs rsync "
                f"{'.'.join(map(str, MIN_RSYNC_VERSION))} or later there (older ones write through "
                f"a symlink below the base directory)", argv)
        self._rsync_checked = True

    def _base_as_rsync_names_it(self) -> str | None:
        """The base directory as the receiving rsync writes it in its messages
        (its working directory at start, then the operand), or None when unknown."""
        base = self.archive.remote_basedir
        if not base.startswith("/"):
            home = self._home if self.archive.is_remote else os.getcwd()
            if not home:
                return None
            base = home.rstrip("/") + "/" + base
        return posixpath.normpath(base)

    # -- running them ------------------------------------------------------------

    def send(self, items: list[Item], stop: threading.Event | None = None) -> Sent:
        """Copy a batch with one rsync call; return the items handed to rsync,
        those refused, and what rsync said when it left some unsent.

        Raises TransferError for a connection failure or a stall.
        """
        with _Listing(self._roots, self._max_files) as listing:
            sent, refused = listing.add_all(items)
            if not sent and not refused:  # not even one file could be opened
                raise TransferError("connection", "out of file descriptors: raise the agent's "
                                    "LimitNOFILE (no file of the batch could be opened)")
            if not sent:
                return Sent(sent, refused)
            self.check_rsync(stop)
            source, names = listing.source_and_data()
            # A far file a copy replaces is kept, unless the batch is one of
            # edits (the far copies are earlier versions of the very files
            # opened): no catalog row, whatever its history says, destroys an archived copy.
            with self._replaced_lock:
                for item, ident in zip(sent, listing.identities):
                    self._sent[item.id] = (item.local_path, item.remote_path, *ident)
                edits = all(self._sent[i.id][-1] is not None and self._verified.get(i.id) == self._sent[i.id]
                            for i in sent)
            replaced = "" if edits else replaced_dir_name()
            argv = self.rsync_args(source, replaced)
            result = run(argv, stdin=names, stop=stop, pass_fds=listing.fds,
                         umask=None if self.archive.is_remote else self._far_umask,
                         stall=self.archive.copy_timeout)
            if replaced:
                with self._replaced_lock:
                    self._replaced.update((i.remote_path, replaced) for i in sent)
        self._classify(result, argv)
        reported = reported_names(result.stdout)
        unreported = [i for i in sent if rsync_escaped(os.fsencode(i.remote_path)) not in reported]
        complaint = ""
        if result.exit_code != 0 or unreported:
            # Some files failed (permissions, a far directory in the way, a
            # link rsync would not write through): those rsync did not report
            # are charged without a far md5, which could only read something else.
            complaint = f"rsync exited {result.exit_code}: {said(result.stderr)}"
            log.warning("%d of %d files not reported sent; %s", len(unreported), len(sent), complaint)
        if unreported:
            skip = {i.id for i in unreported}
            sent = [i for i in sent if i.id not in skip]
            refused = refused + unreported
        return Sent(sent, refused, complaint)

    def _classify(self, result: Completed, argv: list[str]) -> None:
        """Raise TransferError when rsync's exit says the archive or the
        connection failed, not a file: nothing is then charged."""
        code, err = result.exit_code, result.stderr
        if code in (0, 23, 24) and not (code == 23 and self._archive_trouble(err)):
            return
        meaning = RSYNC_EXIT_MEANINGS.get(code)
        message = f"rsync exited {code}{f' ({meaning})' if meaning else ''}: {said(err)}"
        if b"is your shell clean" in err or b"protocol version mismatch" in err:
            raise TransferError("archive", f"{SHELL_TEXT}; {message}", argv)
        if self.archive.far_side == "serve" and SERVE_REFUSED.search(err):  # rsync says exit 12
            raise TransferError("archive", f"the archive host's watcher serve refused the batch; {message}", argv)
        if code in CONNECTION_EXIT_CODES:
            raise TransferError("connection", message, argv)
        if ARCHIVE_FULL.search(err):
            raise TransferError("archive", f"the archive's disk is full or over quota; {message}", argv)
        if code == 23:
            raise TransferError("archive", f"the archive's base directory cannot be written; {message}", argv)
        if code in ARCHIVE_EXIT_CODES:
            raise TransferError("archive", f"the archive refused the batch; {message}", argv)
        if code in BATCH_EXIT_CODES and REPLACED_DIR.encode() in err:
            raise TransferError("archive", f"the archive's {REPLACED_DIR} directory, where replaced "
                                f"far copies are kept, cannot be written; {message}", argv)
        if code in BATCH_EXIT_CODES:
            raise TransferError("batch", f"the archive could not write the batch; {message}", argv)
        log.warning("%s", message)  # anything else: the far md5 judges each file

    def _archive_trouble(self, stderr: bytes) -> bool:
        """Whether rsync's complaints (exit 23) are about the archive as a
        whole: no space, over quota, or the base directory not writable."""
        if ARCHIVE_FULL.search(stderr):
            return True
        base = self._base_as_rsync_names_it()
        if base is None:
            return False
        base = rsync_escaped(os.fsencode(base))
        for line in stderr.split(b"\n"):
            # mkstemp "BASE/.name.XXXXXX" failed: a file directly in the base;
            # mkdir "BASE/dir" failed: a directory directly in it.
            found = re.search(rb'(?:mkstemp|mkdir) "(.*)" failed: (?:Permission denied|Read-only)', line)
            if found and posixpath.dirname(found.group(1).rstrip(b"/")) == base:
                return True
        return False

    def far_md5(self, remote_paths: list[str], stop: threading.Event | None = None,
                total_bytes: int = 0) -> dict[str, str]:
        """md5 of each far file that exists, keyed by its remote path."""
        if not remote_paths:
            return {}
        replaced = self._replaced_dir_of(remote_paths)
        if not self.archive.is_remote:
            return _local_md5(self.archive.remote_basedir, remote_paths, replaced)
        argv = self.remote_md5_args(replaced)
        # "./": md5sum reads its standard input for a path "-", even after "--".
        stdin = b"".join(b"./" + os.fsencode(p) + b"\0" for p in remote_paths)
        # A batch that replaced far copies may compare each with its new one too.
        timeout = (self.archive.cmd_timeout + total_bytes / MIN_HASH_RATE * (3 if replaced else 1)
                   + len(remote_paths) * FSYNC_ALLOWANCE)
        result = run(argv, stdin=stdin, timeout=timeout, stop=stop)
        if result.exit_code == 255:
            raise TransferError("connection", f"ssh exited 255: {said(result.stderr)}", argv)
        if result.exit_code not in (0, 123):  # 123: some files were missing
            raise TransferError("connection", f"remote md5 exited {result.exit_code}: {said(result.stderr)}", argv)
        return {os.fsdecode(name[2:]): md5
                for name, md5 in parse_far_md5(result.stdout, result.stderr).items()}

    def clean_temp_files(self, far_names: Callable[[list[str]], set[str]],
                         stop: threading.Event | None = None) -> list[str]:
        """Remove rsync's temporary files (``.NAME.XXXXXX``) that a copy cut
        off (a far power cut) left below the base; returns the paths removed.

        The far side lists the regular files of the far account with one
        link named so, untouched (status change time) for TEMP_FILE_AGE,
        none below REPLACED_DIR, no link followed; of them, only one whose
        NAME is a far name this archive ships, and which is no far name
        itself (``far_names``: which of the paths given the catalog has), is
        removed, checked again on the far side: an archived file named like
        a temporary one stays. Over ssh only. Raises TransferError when the
        far side cannot be asked."""
        if not self.archive.is_remote:
            return []
        age = f"{max(TEMP_FILE_AGE, 3 * self.archive.copy_timeout):.0f}"
        timeout = max(self.archive.cmd_timeout, TEMP_WALK_TIMEOUT)  # a walk of the whole base
        argv, stdin = self._temp_files_args(age)
        listed = run(argv, stdin=stdin, timeout=timeout, stop=stop)
        if listed.exit_code != 0:
            raise TransferError("connection" if listed.exit_code == 255 else "archive",
                                f"listing rsync's temporary files exited {listed.exit_code}: "
                                f"{said(listed.stderr)}", argv)
        temps = {}
        for name in (os.fsdecode(n).removeprefix("./") for n in listed.stdout.split(b"\0") if n):
            parent, _, leaf = name.rpartition("/")
            found = TEMP_NAME.fullmatch(leaf)
            if found:
                temps[name] = posixpath.join(parent, found.group(1))
        known = far_names(sorted(set(temps) | set(temps.values()))) if temps else set()
        chosen = [t for t, target in temps.items() if target in known and t not in known]
        removed: list[str] = []
        for start in range(0, len(chosen), 500):
            argv, stdin = self._temp_files_args(age, chosen[start:start + 500])
            done = run(argv, stdin=stdin, timeout=timeout, stop=stop)
            if done.exit_code != 0:
                raise TransferError("archive", f"removing rsync's temporary files exited "
                                    f"{done.exit_code}: {said(done.stderr)}", argv)
            removed += [os.fsdecode(n).removeprefix("./") for n in done.stdout.split(b"\0") if n]
        return removed

    def _temp_files_args(self, age: str, remove: list[str] | None = None) -> tuple[list[str], bytes | None]:
        """The far command that lists rsync's stale temporary files below the
        base (or removes those of ``remove`` that still are), and its input:
        watcher.serve's request, or GNU find, which follows no link and
        deletes relative to the directory it found the file in."""
        base = self.archive.remote_basedir
        if self.serve:
            if remove is None:
                return self._serve_args("temp-files", base, age), None
            return self._serve_args("clean", base, age), b"".join(os.fsencode(p) + b"\0" for p in remove)
        # best effort: a directory find may not read is passed over, as by serve
        script = (f"cd -P -- {shlex.quote(base)} 2>/dev/null || exit 0; c=$(($(date +%s) - {age})) && "
                  f"{{ find . ")
        same = f"-type f -links 1 -user \"$(id -u)\" ! -newerct \"@$c\" "
        if remove is None:
            script += f"-path ./{REPLACED_DIR} -prune -o {same}-name '.?*.??????' -print0 2>/dev/null; true; }}"
        else:  # -delete turns -prune off: the paths named are never below REPLACED_DIR
            paths = " -o ".join(f"-path {shlex.quote('./' + _glob_escaped(p))}" for p in remove)
            script += f"! -path './{REPLACED_DIR}/*' {same}\\( {paths} \\) -print0 -delete 2>/dev/null; true; }}"
        return self.ssh_args() + ["--", self.archive.ssh_host, script], None

    # -- what this agent verified: edits ---------------------------------------

    def may_be_edit(self, row_id: int, local_path: str, remote_path: str) -> bool:
        """Whether this agent verified this row, under the same local and far
        names, and has not deleted its file since: its far copy is then maybe
        an earlier version of the same file, which a new copy replaces
        without keeping it (an edit: a log appended to and shipped again).
        From the agent's memory, never the catalog, which others write; the
        send checks that the file it opens is the very file verified."""
        with self._replaced_lock:
            known = self._verified.get(row_id)
        return known is not None and known[:2] == (local_path, remote_path)

    def verified(self, item: Item) -> None:
        """Remember a row verified (see may_be_edit), the least recent forgotten past VERIFIED_REMEMBERED."""
        with self._replaced_lock:
            sent = self._sent.pop(item.id, None)
            if sent is None or sent[:2] != (item.local_path, item.remote_path):
                return
            self._verified[item.id] = sent
            self._verified.move_to_end(item.id)
            while len(self._verified) > VERIFIED_REMEMBERED:
                self._verified.popitem(last=False)

    def forget(self, row_ids) -> None:
        """Rows whose file was deleted or is gone: a file at their path later is another."""
        with self._replaced_lock:
            for row_id in row_ids:
                self._verified.pop(row_id, None)
                self._sent.pop(row_id, None)

    def _replaced_dir_of(self, remote_paths: list[str]) -> str:
        """The ``--backup-dir`` of the batch that last sent these paths ("" if
        none: retention's check), forgotten once asked for."""
        with self._replaced_lock:
            dirs = {self._replaced.pop(p, "") for p in remote_paths}
        dirs.discard("")
        return dirs.pop() if len(dirs) == 1 else ""

    def close(self) -> None:
        """Stop the shared ssh connection, if one was started."""
        if self.archive.is_remote and self._control_dir:
            stop_master(self.archive, self._control_dir)


def _glob_escaped(path: str) -> str:
    """``path`` as a find -path pattern that matches only itself."""
    return re.sub(r"([\\*?\[])", r"\\\1", path)


def _dir_arg(path: str) -> str:
    """A directory operand that cannot be read as an option."""
    path = path.rstrip("/") or "/"
    if path.startswith("-"):
        path = "./" + path
    return path + "/"


_batches = itertools.count(1)
# How many verified rows a destination remembers, to tell an edit of a file
# the agent shipped from a copy that replaces someone else's (may_be_edit).
VERIFIED_REMEMBERED = 100_000


def far_dir_mode(chmod: str | None) -> int | None:
    """The mode of the far directories copies make, or None (the far side's
    default) without ``chmod``: ``chmod`` applied to 0755, as socs' ``rsync
    -p --chmod`` applied it to the directories it sent (775 for its default
    ``g+rwX,o+rX``), the owner always keeping rwx (a ``u=rw`` would leave the
    archive's own directories unusable). Items for files only (``F...``) skip."""
    if not chmod:
        return None
    mode = 0o755
    for item in chmod.split(","):
        spec = item.lstrip("DF")
        if "F" in item[:len(item) - len(spec)]:
            continue
        if spec.isdigit():
            mode = int(spec, 8) & 0o777
            continue
        who = re.match(r"[ugoa]*", spec).group()
        mask = 0o755 if not who else 0  # no one named: all, less rsync's usual umask (022)
        for c in who:
            mask |= {"u": 0o700, "g": 0o070, "o": 0o007, "a": 0o777}[c]
        for op, perms in re.findall(r"([-+=])([ugo]|[rwxXst]*)", spec[len(who):]):
            if perms in ("u", "g", "o"):  # g=u: the bits another class has
                bits = mask & 0o111 * (mode >> {"u": 6, "g": 3, "o": 0}[perms] & 7)
            else:
                bits = mask & sum({"r": 0o444, "w": 0o222, "x": 0o111, "X": 0o111}.get(p, 0)
                                  for p in set(perms))
            mode = mode | bits if op == "+" else mode & ~bits if op == "-" else (mode & ~mask) | bits
    return mode | 0o700


def replaced_dir_name(now: float | None = None) -> str:
    """This batch's directory of replaced far files: its UTC time, the agent's
    pid and a count, so no two batches share one (rsync would overwrite an
    earlier batch's backup of the same name)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"{REPLACED_DIR}/{stamp}-{os.getpid()}-{next(_batches)}"


BATCH_TREE_PREFIX = "watcher-batch-"


def remove_stale_batch_trees() -> int:
    """Remove batch trees whose agent is gone (killed mid-batch); returns how many."""
    base = _scratch_dir() or tempfile.gettempdir()
    removed = 0
    try:
        names = os.listdir(base)
    except OSError:
        return 0
    for name in names:
        pid = name[len(BATCH_TREE_PREFIX):].split("-", 1)[0]
        if not name.startswith(BATCH_TREE_PREFIX) or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its agent (or a process that took its pid) still runs
        except ProcessLookupError:
            pass
        except OSError:
            continue
        shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        removed += 1
    return removed


def _scratch_dir() -> str | None:
    """Where batch trees go: a memory file system when there is one.

    A symlink whose target is longer than 60 bytes costs ext4 a data block
    (about 0.6 ms here, most of a small file's shipping time); on tmpfs, 6 us.
    """
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


class _Listing:
    """The file list of one rsync call, laid out as the remote paths.

    Each file is opened by the agent below its root without following any
    symlink (safefs), and stands in a private temporary tree as a symlink
    named as its remote path to ``/proc/self/fd/N``, a descriptor rsync
    inherits. rsync follows only those links (``--copy-links``): each leads
    to the very file the agent opened, whatever has been renamed or
    replaced in the watched tree since, so no symlink of the tree is ever
    followed, and any local name can go to any remote name. A use as a
    context manager closes the descriptors and removes the tree.
    """

    def __init__(self, roots: tuple[str, ...] = (), max_files: int | None = None):
        self._trees = Trees(roots)
        self._max_files = max_files
        self._remotes: list[str] = []
        self._tree: str | None = None
        self._made: set[str] = set()
        self._taken: set[str] = set()
        self._parent_fds: dict[str, int] = {}  # per local directory (owned by _trees)
        self._top = ""
        self.fds: list[int] = []
        # (dev, ino, generation) of each file listed: which incarnation of an inode
        # number it is (a file deleted and written again may get the same number)
        self.identities: list[tuple[int, int, int | None]] = []

    def __enter__(self) -> "_Listing":
        return self

    def __exit__(self, *exc) -> None:
        for fd in self.fds:
            os.close(fd)
        self._trees.close()
        if self._tree is not None:
            try:  # the links it made, then its directories, deepest first: no listing needed
                for remote in self._remotes:
                    os.unlink(f"{self._top}/{remote}")
                for made in sorted(self._made, key=len, reverse=True):
                    os.rmdir(made)
            except OSError:
                pass
            shutil.rmtree(self._tree, ignore_errors=True)

    def source_and_data(self) -> tuple[str, bytes]:
        """rsync's source directory and its NUL-separated ``--files-from`` list."""
        # A line starting with "#" or ";" would be a comment to rsync; "./"
        # keeps it a name (--no-implied-dirs: "." itself is not sent).
        return self._top + "/", b"".join(
            (b"./" if rel.startswith(("#", ";")) else b"") + os.fsencode(rel) + b"\0"
            for rel in self._remotes)

    def add_all(self, items: list[Item]) -> tuple[list[Item], list[Item]]:
        """List a batch; return (listed, refused).

        A remote path that could leave the base directory is refused, for
        the caller to charge, and so is a file that cannot be opened (gone:
        ``batch_results`` tells) or lies below a symlink, and a remote path that clashes with another of the batch
        (``a`` beside ``a/b``: a row some other writer inserted). Files past
        ``max_files`` (descriptors) wait for a later batch.
        """
        sent, refused = [], []
        for item in items:
            if item.remote_path in self._taken:
                continue  # two rows for one remote name: the second waits a batch
            if self._max_files is not None and len(self.fds) + len(self._parent_fds) >= self._max_files:
                break
            try:
                problem = remote_path_problem(item.remote_path)
                if problem:
                    raise ValueError(problem)
                self._add(item)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    break  # out of descriptors: the agent's, not the file's; the rest wait
                if not isinstance(exc, FileNotFoundError):
                    log.error("refusing to ship %s as %r: %s", item.local_path, item.remote_path,
                              exc.strerror or exc)
                refused.append(item)
                continue
            except ValueError as exc:
                log.error("refusing to ship %s as %r: %s", item.local_path, item.remote_path, exc)
                refused.append(item)
                continue
            self._taken.add(item.remote_path)
            sent.append(item)
        return sent, refused

    def _dir_fd(self, parent: str) -> int:
        """A descriptor of a local directory, reached from its root without
        following links (once per directory and batch)."""
        fd = self._parent_fds.get(parent)
        if fd is None:
            tree = self._trees.of(parent + "/")
            fd = self._parent_fds[parent] = tree.dir_fd(split_beneath(parent + "/x", tree.root)[0])
        return fd

    def _add(self, item: Item) -> None:
        # A name that is no regular file (a fifo, a directory put in its
        # place) is opened without blocking; rsync then skips it and the md5
        # check charges it.
        if self._tree is None:
            self._tree = tempfile.mkdtemp(prefix=f"{BATCH_TREE_PREFIX}{os.getpid()}-", dir=_scratch_dir())
            self._top = self._tree + "/t"
        local = item.local_path
        parent, _, name = local.rpartition("/")
        fd = open_in(self._dir_fd(parent), name, local, inheritable=True)
        try:
            link = f"{self._top}/{item.remote_path}"
            link_dir = link.rpartition("/")[0]
            if link_dir not in self._made:  # a batch shares few directories: make each once
                os.makedirs(link_dir, exist_ok=True)
                self._made.add(link_dir)
            os.symlink(f"/proc/self/fd/{fd}", link)
        except BaseException:
            os.close(fd)
            raise
        st = os.fstat(fd)
        self.fds.append(fd)
        self.identities.append((st.st_dev, st.st_ino, inode_generation(fd)))
        self._remotes.append(item.remote_path)


OUT_FORMAT = "%i %n"
# A file sent, or one already there ('<' sent to a far host, '>' received by
# a local receiver, '.' unchanged), and its name.
_SENT = re.compile(rb"[<>.]f\S* (.*)\Z", re.S)
# A file the receiver skipped because its name exists (``watcher serve --append-only``
# runs it with --ignore-existing --info=skip1): the far md5 judges it too.
_EXISTS = re.compile(rb"(.+) exists\Z", re.S)
_ESCAPED = re.compile(rb"\\(?=#[0-9]{3})|[\x00-\x08\x0a-\x1f]")


def rsync_escaped(name: bytes) -> bytes:
    """A name as rsync writes it in its output with ``--8-bit-output``: a
    control character but tab, and a backslash that starts ``\\#ddd``, become
    ``\\#ooo`` (octal); other bytes stay as they are."""
    return _ESCAPED.sub(lambda m: b"\\#%03o" % m.group()[0], name)


def reported_names(stdout: bytes) -> set[bytes]:
    """The (escaped) names that rsync's ``--out-format`` lines report sent or unchanged.

    The sender prints a line when it sends a file the far side asked for: a
    file the far side would not take (below a symlinked directory, in a
    directory it cannot make) has none. One the far side took and then
    failed to write is reported all the same; the far md5 catches it."""
    found = set()
    for line in stdout.split(b"\n"):
        sent = _SENT.match(line) or _EXISTS.match(line)
        if sent:
            found.add(sent.group(1))
    return found


# The far md5 command's output begins with MD5_HEADER and the base's physical
# path; then, for each of xargs' chunks of names, what MD5_CHUNK prints: the
# count and the names, the realpath of each, an empty record, the md5sum
# records, an empty record (all NUL-terminated; no name or path is empty);
# then, when the chunk's files could not be synced, SYNC_FAILED.
# The chunk's regular files, each directory above them up to the base and
# the base itself go to stable storage (coreutils' sync fsyncs each
# argument; one call for the chunk) while they are hashed, and the chunk
# counts only once that is done (SYNC_CHECK), so that what was hashed
# survives a power cut: no verified copy, and no local file deleted, rests
# on the far page cache (what md5sum reads is what the fsync writes). The
# names, as given ("./a/b"), never pass through a shell.
# A chunk of SYNCFS_FILES files or more first syncs the base's whole file
# system (syncfs: one write-out instead of one per file: see
# benchmarks/bench_far_sync.py); the per-file fsync after it, then cheap,
# still reports each file's own write error.
SYNCFS_PART = f'[ "$#" -lt {SYNCFS_FILES} ] || sync -f . 2>/dev/null; '
# No sort between the list and sync: a stage that fails there would leave
# xargs nothing to sync and exiting 0 (the shell reports the last stage
# only). A directory is listed once for a run of files in it; one listed
# again is fsynced again, which costs little once it is clean.
# Then the directories above the base that the first batch's --mkpath may
# have made, which hold the base's entry (SYNC_ABOVE): from the base's
# parent up, each one the account may read and write on the base's file
# system, stopping at the first that is not (no file or directory could
# have been made in it, or it is a mount point's side of another file
# system, such as an autofs /home, whose directories cannot be fsynced).
SYNC_ABOVE = ('{ v=$(stat -c %d .) && d=$PWD && while [ -n "$d" ]; do d=${d%/*}; a=${d:-/}; '
              '[ -r "$a" ] && [ -w "$a" ] && [ "$(stat -c %d -- "$a")" = "$v" ] || break; '
              'printf "%s\\0" "$a"; done | xargs -0r sync --; }')
SYNC_START = ('{ ' + SYNCFS_PART +
              '{ l=; for p; do [ -f "$p" ] && [ ! -h "$p" ] || continue; printf "%s\\0" "$p"; '
              'd=${p%/*}; [ "$d" = "$l" ] && continue; l=$d; '
              'while [ "$d" != . ] && [ "$d" != "${d%/*}" ]; do printf "%s\\0" "$d"; d=${d%/*}; done; '
              'done; printf ".\\0"; } | xargs -0r sync -- && ' + SYNC_ABOVE + '; } & s=$!; ')
SYNC_CHECK = f'wait "$s" || {{ printf "{SYNC_FAILED.decode()}\\0"; exit 1; }}'
MD5_CHUNK = (SYNC_START + 'printf "%s\\0" "$#" "$@"; realpath -z -m -- "$@"; printf "\\0"; '
             'md5sum -z -- "$@"; printf "\\0"; '
             # the batch's replaced copies identical to what now stands there (no output),
             # before the sync's verdict: a failed batch sent again leaves no copy behind
             # (none through a symlink: R, its parent, or a directory between R and the copy)
             '[ -z "$R" ] || [ ! -d "$R" ] || [ -h "${R%/*}" ] || [ -h "$R" ] || '
             'for p; do [ -f "$R/$p" ] && [ ! -h "$R/$p" ] && '
             '[ "$(realpath -e -- "$R/$p")" = "$PWD/$R/${p#./}" ] && '
             '[ ! -h "$p" ] && ! [ "$p" -ef "$R/$p" ] && '  # never a file compared with itself
             'cmp -s -- "$p" "$R/$p" && rm -f -- "$R/$p"; done 2>/dev/null; ' + SYNC_CHECK)


def parse_far_md5(output: bytes, stderr: bytes = b"") -> dict[bytes, str]:
    """The md5 of each name (as sent, ``./path``) that was read without
    following a symlink: its realpath is the base's physical path joined
    with the name, so no component below the base, the last one included,
    is a link. A chunk whose records do not line up counts for nothing.

    Raises TransferError("archive") when the output is not the command's
    (a login shell printing text) or realpath printed nothing (none there).
    """
    if not output.startswith(MD5_HEADER + b"/"):
        if output:
            raise TransferError("archive", f"{SHELL_TEXT} (the md5 command's output began "
                                f"{said(output.split(MD5_HEADER)[0][:80], 80)!r})")
        raise TransferError("archive", f"the far md5 command printed nothing: {said(stderr)}")
    records = output.split(b"\0")
    base = records[0][len(MD5_HEADER):].rstrip(b"/")
    found: dict[bytes, str] = {}
    i, end = 1, len(records) - 1  # the last record follows the final NUL: empty, or cut short
    while i < end:
        if records[i] == SYNC_FAILED:  # after a chunk: all the output counts for nothing
            raise TransferError("archive", "the archive host could not put the batch on stable "
                                f"storage (sync failed), so none of it counts as verified: {said(stderr)}")
        if not records[i].isdigit():
            log.warning("far md5 output out of line at record %d; the rest is not trusted", i)
            break
        count = int(records[i])
        names = records[i + 1:i + 1 + count]
        try:
            real_end = records.index(b"", i + 1 + count, end)
            md5_end = records.index(b"", real_end + 1, end)
        except ValueError:
            break  # a cut chunk
        reals = records[i + 1 + count:real_end]
        i = md5_end + 1
        if len(names) != count:
            break
        if not reals:
            raise TransferError("archive", f"realpath printed nothing on the archive host (GNU "
                                f"coreutils needed there): {said(stderr)}")
        if len(reals) != count:
            log.warning("far md5: realpath answered %d of %d names (%s); none of them is trusted",
                        len(reals), count, said(stderr))
            continue
        direct = {name for name, real in zip(names, reals)
                  if name.startswith(b"./") and real == base + name[1:]}
        for name, md5 in _md5sum_records(records[real_end + 1:md5_end]):
            if name in direct:
                found[name] = md5
    return found


def _md5sum_records(records: list[bytes]):
    """(name, md5) of ``md5sum -z`` records (``<32 hex>  <name>``): names are not escaped."""
    for record in records:
        if len(record) >= 35 and record[32:34] in (b"  ", b" *"):
            yield record[34:], record[:32].decode("ascii", "replace")


def _local_md5(basedir: str, remote_paths: list[str], replaced_dir: str = "") -> dict[str, str]:
    """md5 of the far files of a local archive, opened below the base
    directory without following links (a link there proves nothing), each
    fsynced with the directories above it up to the base beside the hashing
    (watcher.durable), then those above the base (as SYNC_START does far
    away; a failure raises TransferError("archive")); the copies in
    ``replaced_dir`` identical to them are removed (see
    ``Destination.remote_md5_args``)."""
    with Beneath(basedir.rstrip("/") or "/") as tree:
        found, failed = hash_durably(tree, remote_paths)  # no base: nothing found, no failure
        if replaced_dir:  # a failed sync too: the batch sent again must leave no identical copy behind
            drop_identical_copies(tree, replaced_dir, found)
    if failed:
        raise TransferError("archive", f"the archive could not put {failed} on stable storage, "
                            "so the batch does not count as verified")
    if found:
        _fsync_above(basedir)
    return found


def _fsync_above(base: str) -> None:
    """fsync the directories above the base that rsync's --mkpath may have
    made (see SYNC_ABOVE): from its parent up, each the agent may read and
    write on the base's file system, up to the first that is not."""
    path = os.path.realpath(base)
    try:
        device = os.stat(path).st_dev
    except OSError:
        return  # no base: nothing below it was found either
    while (parent := os.path.dirname(path)) != path:
        path = parent
        try:
            if not os.access(path, os.R_OK | os.W_OK) or os.stat(path).st_dev != device:
                return
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise TransferError("archive", f"the archive could not put {path!r} on stable storage "
                                f"({exc.strerror}), so the batch does not count as verified") from None
        try:
            _fsync(fd, path)
        finally:
            os.close(fd)


def _fsync(fd: int, what: str) -> None:
    """fsync, its failure the archive's (TransferError): nothing counts as
    verified that a power cut could take back."""
    try:
        os.fsync(fd)
    except OSError as exc:
        raise TransferError("archive", f"the archive could not put {what!r} on stable storage "
                            f"(fsync: {exc.strerror}), so the batch does not count as verified") from None


FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long)


def inode_generation(fd: int) -> int | None:
    """The file's inode generation (ext4, btrfs...), which changes when an
    inode number is given to a new file; None where the file system has none
    (tmpfs, NFS): a file there is never taken for an edit."""
    buf = array.array("l", [0])
    try:
        fcntl.ioctl(fd, FS_IOC_GETVERSION, buf, True)
    except OSError:
        return None
    return buf[0]


def _descriptor_budget() -> int:
    """How many files and directories a batch may hold open (a descriptor
    each while rsync runs): the soft limit is raised to the hard one, and a
    batch takes half of it, less a reserve (should other archives' batches
    and retention's round need more, the listing stops at EMFILE and the
    rest of the batch waits)."""
    return max(64, (raise_descriptor_limit() - 1024) // 2)


def ship_batch(dest: Destination, items: list[Item], stop: threading.Event | None = None) -> BatchResult:
    """Copy and verify a batch.

    Raises TransferError when the connection fails; nothing is then charged.
    """
    sent, refused, _ = send_batch(dest, items, stop)
    far = dest.far_md5([i.remote_path for i in sent], stop, sum(i.size or 0 for i in sent))
    return batch_results(sent, refused, far)


def send_batch(dest: Destination, items: list[Item], stop: threading.Event | None = None) -> Sent:
    """The copy half of ship_batch."""
    result = dest.send(items, stop)
    checkpoint("copied", lambda message: TransferError("connection", message))  # as if cut off
    return result


def batch_results(sent: list[Item], refused: list[Item], far: dict[str, str]) -> BatchResult:
    """The check half of ship_batch, given the far md5 sums.

    Only a file that was not verified is looked for on the local disk: one
    that is gone is not charged (the caller marks it removed).
    """
    results, missing = {}, []
    for item in sent:
        found = far.get(item.remote_path)
        if found != item.local_md5sum and not os.path.lexists(item.local_path):
            missing.append(item)
        else:
            results[item.id] = FarCheck(item.local_md5sum, found)
    for item in refused:  # charged, so they end failed
        if os.path.lexists(item.local_path):
            results[item.id] = FarCheck(item.local_md5sum, None)
        else:
            missing.append(item)
    return BatchResult(results, missing)
