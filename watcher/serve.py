"""The archive host's forced command: what a DAQ host's key may do there, and nothing else.

An administrator puts ``command="python -m watcher.serve --root DIR",restrict``
(the same as ``watcher serve``, starting faster) before
the agent's key in ``authorized_keys``; sshd then runs it for every
connection of that key, whatever the client asked, the request in
``SSH_ORIGINAL_COMMAND``. Only these requests are served:

- ``[umask NNNN &&] rsync --server ...``: rsync's receiver, its arguments
  checked against exactly what the agent sends (``RECEIVER_ARGS``): no
  ``--sender`` (no reads), no option naming a path (``--temp-dir``,
  ``--log-file``, ``--files-from``...), no ``--delete*``/``--remove*``; the
  batch's ``--backup-dir`` only as ``.watcher-replaced/NAME``; no file
  is given a setuid, setgid or sticky bit (``--chmod=Fugo-st``). The
  destination is opened below DIR one component at a time without
  following a link (made when missing), and rsync runs in it.
- ``watcher-serve version``: DIR's physical path and ``rsync --version``
  (the agent's ``pwd -P && exec rsync --version``).
- ``watcher-serve check BASE``: the start-up check (watcher.preflight's
  answer: rsync present, BASE writable or makable).
- ``watcher-serve md5 BASE [REPLACED]``: the far md5 of the NUL-separated
  ``./path`` names on standard input, each opened below BASE without
  following a link, fsynced beside the hashing with each directory up to
  BASE, then those above BASE that this account may read and write on
  BASE's file system, no higher than DIR (a verified copy is on stable
  storage before the agent may delete its local file), answered
  in watcher.rsync.parse_far_md5's form; copies in REPLACED identical to
  the file now under their name are removed.
- ``watcher-serve temp-files BASE AGE`` and ``watcher-serve clean BASE
  AGE``: rsync's hidden temporary files ``.NAME.XXXXXX`` left by a power
  cut mid-copy, untouched for AGE seconds (never less than
  ``--min-temp-age``): listed, then those the agent names removed.

With ``--append-only`` nothing that exists below DIR is changed: the
receiver skips existing names (see ``Server._append_only``), ``clean``
removes nothing and ``md5`` no replaced copy.

Anything else is refused with one line on standard error and exit 1.
rsync's own ``rrsync -wo`` is not used for the receiver: it allows rsync's
general option set (symlinks ``-l``, ``--link-dest``, ``--partial-dir``,
``--delete`` unless ``-no-del``...), where an allow-list of the agent's
own few arguments is stricter; it refuses the agent's ``umask NNNN &&``
prefix; its ``-no-overwrite`` is ``--ignore-existing``, which would charge
a retry of the same content; it is not installed everywhere; and the
hashing, fsync and clean-up requests need this command anyway.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time

from watcher.far_side import (MAX_NAMES, MD5_HEADER, REFUSED, SERVE_MIN_RSYNC, SERVE_REQUEST, SYNC_FAILED, TEMP_NAME,
                               drop_identical_copies)
from watcher.durable import hash_durably, raise_descriptor_limit
from watcher.rules import REPLACED_DIR
from watcher.safefs import Beneath, Identity, split_beneath, walk_fd

# The receiver's arguments the agent sends (watcher.rsync.Destination.rsync_args
# without -s): each must match one of these, whole. The short options: --backup
# (b), --omit-dir-times (O), --times (t), --perms (p), --ignore-times (I),
# --relative (R, from --files-from), --compress (z), then rsync's protocol
# capabilities (e.xxx).
SHORT = re.compile(r"-[bOtpIRz]+(?:e\.[A-Za-z]*)?")
RECEIVER_ARGS = [SHORT, re.compile(r"--log-format=%i"), re.compile(r"--timeout=\d{1,9}"),
                 re.compile(r"--bwlimit=\d{1,20}(?:\.\d{1,9})?[bBkKmMgGtTpP]?"),
                 re.compile(r"--no-implied-dirs"), re.compile(r"--mkpath"), re.compile(r"--fsync")]
BACKUP_DIR = re.compile(re.escape(REPLACED_DIR) + r"/(?!\.\.?\Z)[A-Za-z0-9._-]{1,200}")
UMASK = re.compile(r"0?[0-7]{3}")
MIN_TEMP_AGE = 600.0
# A base (a destination, or where to hash or clean) is an archive's directory.
MAX_BASE_DEPTH, MAX_BASE_LENGTH = 64, 1024
# A batch's names on standard input (md5, clean): a few MB at most, and not
# millions (each is a Python object, and the md5 answer repeats it).
MAX_NAMES_BYTES = 32 << 20


def run(argv: list[str] | None = None) -> int:
    """``python -m watcher.serve``: the same as ``watcher serve``, starting
    faster (it loads none of the agent's modules), for authorized_keys."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):  # one line, as the watcher command's (exit 2)
            self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")

    p = Parser(prog="watcher serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, metavar="DIR")
    p.add_argument("--append-only", action="store_true")
    p.add_argument("--min-temp-age", type=_duration, default=MIN_TEMP_AGE, metavar="DURATION")
    args = p.parse_args(argv)
    return main(args.root, min_temp_age=args.min_temp_age, append_only=args.append_only)


def _duration(text: str) -> float:
    from watcher.config import parse_duration  # only when given
    try:
        return parse_duration(text)
    except ValueError as exc:
        import argparse
        raise argparse.ArgumentTypeError(str(exc)) from None


def _open_dirs(start: int, parts: list[str], create: bool, refusal) -> int:
    """A new descriptor of start/parts, each component opened without
    following a link (made first when missing and ``create``). An OSError
    becomes Refused(refusal(i, exc, making)) when that gives a text."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.dup(start)
    try:
        for i, part in enumerate(parts):
            making = False
            try:
                try:
                    nfd = os.open(part, flags, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    making = True
                    try:
                        os.mkdir(part, 0o777, dir_fd=fd)
                    except FileExistsError:
                        pass
                    making = False
                    nfd = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                why = refusal(i, exc, making)
                if why:
                    raise Refused(why) from None
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


class _SyncFailed(Exception):
    """A file or directory of the batch could not be fsynced: nothing of it counts."""


class Refused(Exception):
    """A request that is not served: one line, exit 1."""


def main(root: str, min_temp_age: float = MIN_TEMP_AGE, append_only: bool = False,
         request: str | None = None) -> int:
    """Serve one request (``SSH_ORIGINAL_COMMAND`` when ``request`` is None)."""
    if request is None:
        request = os.environ.get("SSH_ORIGINAL_COMMAND")
    raise_descriptor_limit()  # a batch's directories stay open while its files are synced
    try:
        if request is None:
            raise Refused("no request: this command serves watcher agents through ssh "
                          "(SSH_ORIGINAL_COMMAND is not set)")
        server = Server(root, min_temp_age, append_only)
        return server.serve(request)
    except Refused as exc:
        print(f"{REFUSED}{exc}", file=sys.stderr)
        return 1


class Server:
    def __init__(self, root: str, min_temp_age: float, append_only: bool = False):
        self.root = os.path.realpath(root)
        self.given = root.rstrip("/") or "/"
        self.min_temp_age = min_temp_age
        self.append_only = append_only
        home = _home_below(self.root)
        if home is not None:
            raise Refused(f"--root {root} holds {home}, the far account's own: a key that may write "
                          "there could give itself a shell (.ssh/authorized_keys, .bashrc); serve a "
                          "directory outside the account's home")
        try:
            self.root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise Refused(f"--root {root}: {exc.strerror}") from None

    def serve(self, request: str) -> int:
        try:
            words = shlex.split(request)
        except ValueError as exc:
            raise Refused(f"{_shown(request)}: {exc}") from None
        if words[:1] == [SERVE_REQUEST]:
            return self._watcher_request(words[1:])
        if "rsync" in words[:4]:
            return self._receive(words)
        raise Refused(f"{_shown(request)}: not a request this key may make (an agent shipping "
                      "through it needs far_side: serve for the archive)")

    # -- paths below the root ----------------------------------------------------

    def _parts(self, base: str) -> list[str]:
        """The components of ``base`` below the root: a relative path is
        relative to it, an absolute one must lie in it; no ``..``."""
        path = base
        if path.startswith("/"):
            for top in (self.given, self.root):
                prefix = top if top == "/" else top + "/"
                if path == top or path.rstrip("/") == top or path.startswith(prefix):
                    path = path[len(top):]
                    break
            else:
                raise Refused(f"{base!r} is not below {self.given}")
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise Refused(f"{_shown(base)} climbs out with '..'")
        if REPLACED_DIR in parts:  # the kept copies are no base: their names look like anything
            raise Refused(f"{_shown(base)} is inside a {REPLACED_DIR} directory")
        if len(parts) > MAX_BASE_DEPTH or len(path) > MAX_BASE_LENGTH:
            raise Refused(f"{_shown(base)} is more than {MAX_BASE_DEPTH} directories or "
                          f"{MAX_BASE_LENGTH} characters deep")
        return parts

    def _walk(self, parts: list[str], create: bool) -> int:
        """A descriptor of root/parts, each component opened without following
        a link (and made, with the process's umask, when ``create``)."""
        def refusal(i: int, exc: OSError, making: bool) -> str | None:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                return f"{'/'.join(parts[:i + 1])} below {self.given} is not a directory (a symlink is not followed)"
            return None  # raised as it is: a missing base when not creating, among others

        return _open_dirs(self.root_fd, parts, create, refusal)

    def _physical(self, parts: list[str]) -> str:
        return "/".join([self.root.rstrip("/")] + parts) or "/"

    # -- rsync's receiver ----------------------------------------------------------

    def _receive(self, words: list[str]) -> int:
        if words[:1] == ["umask"]:
            if len(words) < 3 or not UMASK.fullmatch(words[1]) or words[2] != "&&":
                raise Refused(f"{_shown(shlex.join(words))}: only 'umask NNNN && rsync --server ...' is served")
            os.umask(int(words[1], 8))
            words = words[3:]
        os.umask(os.umask(0) | 0o002)  # no directory writable by every user of the host
        if words[:2] != ["rsync", "--server"]:
            raise Refused(f"{_shown(shlex.join(words))}: only rsync's receiver is served")
        args, rest, backup = [], words[2:], None
        while rest and rest[0] != ".":
            word = rest.pop(0)
            if word == "--backup-dir" and rest:
                word = "--backup-dir=" + rest.pop(0)
            if word.startswith("--backup-dir="):
                backup = word[len("--backup-dir="):]
                if not BACKUP_DIR.fullmatch(backup):
                    raise Refused(f"--backup-dir {backup!r}: only {REPLACED_DIR}/NAME is served")
                continue
            if word.startswith("--sender") or not any(p.fullmatch(word) for p in RECEIVER_ARGS):
                raise Refused(f"rsync option {word!r} is not served (this key may only deliver files)")
            args.append(word)
        if len(rest) != 2 or not args or not SHORT.fullmatch(args[0]) or any(
                SHORT.fullmatch(a) for a in args[1:]):
            raise Refused("rsync: expected the agent's options, '.' and one destination")
        if "b" in args[0].split("e.")[0] and backup is None:
            raise Refused("rsync --backup without --backup-dir is not served")
        if "R" in args[0].split("e.")[0] and "--no-implied-dirs" not in args:
            raise Refused("rsync --relative without --no-implied-dirs is not served (the agent always "
                          "sends it)")
        rsync = shutil.which("rsync")
        if rsync is None:
            raise Refused("no rsync on this host's PATH")
        _check_rsync_version(rsync)
        dest = self._walk(self._parts(rest[1]), create=True)
        if self.append_only:
            args, backup = self._append_only(args), None
        if backup is not None:
            pinned = self._backup_dir(dest, backup)
            os.set_inheritable(pinned, True)
            args += ["--backup", f"--backup-dir=/proc/self/fd/{pinned}"]
        os.fchdir(dest)
        # No setuid, setgid or sticky file: one of the far account's, run by
        # another user of the archive host, would act as that account. Nothing
        # writable by every user there (-p sends the client's modes): they could
        # change what was archived. (Group write stays: socs' chmod g+rwX.)
        argv = ["rsync", "--server", *args, "--chmod=Fugo-st,o-w", ".", "."]
        sys.stdout.flush()
        os.execv(rsync, argv)
        return 1  # not reached

    def _append_only(self, args: list[str]) -> list[str]:
        """The receiver's arguments with ``--append-only``: rsync's generator
        (which runs here, whatever the client) skips every name that exists
        (``--ignore-existing``: no file, its content or its mode is changed,
        nor is one replaced by a directory), says so (``--info=skip1``: the
        agent then asks the far md5, which verifies a retry of the same
        content), and keeps nothing aside (no ``--backup``). No other
        receiver of the root runs meanwhile (an exclusive lock, held through
        exec until rsync ends): between rsync's check that a name is free and
        its rename onto it, another session's file could land there and be
        replaced."""
        letters = args[0][1:].split("e.")[0]
        args = ["-" + letters.replace("b", "") + args[0][1 + len(letters):], *args[1:]]
        lock = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.set_inheritable(lock, True)
        return args + ["--ignore-existing", "--info=skip1"]

    def _backup_dir(self, dest: int, backup: str) -> int:
        """The batch's backup directory below the destination, made here
        without following a link, handed to rsync as a descriptor."""
        def refusal(i: int, exc: OSError, making: bool) -> str:
            if making:
                return f"{backup}: cannot be made: {exc.strerror}"
            return f"{backup}: not a directory ({exc.strerror}; a symlink is not followed)"

        return _open_dirs(dest, backup.split("/"), True, refusal)

    # -- watcher's own requests ------------------------------------------------------

    def _watcher_request(self, words: list[str]) -> int:
        what, args = (words[0], words[1:]) if words else ("", [])
        if what == "version" and not args:
            return self._version()
        if what == "check" and len(args) == 1:
            return self._check(args[0])
        if what == "md5" and len(args) in (1, 2):
            return self._md5(args[0], args[1] if len(args) == 2 else "")
        if what in ("temp-files", "clean") and len(args) == 2:
            try:
                age = max(float(args[1]), self.min_temp_age)
            except ValueError:
                raise Refused(f"{what}: AGE {args[1]!r} is not a number of seconds") from None
            if age != age or age == float("inf"):
                raise Refused(f"{what}: AGE {args[1]!r} is not a number of seconds")
            return self._temp_files(args[0], age, remove=what == "clean")
        raise Refused(f"{_shown(shlex.join([SERVE_REQUEST, *words]))}: not a request this key may make")

    def _version(self) -> int:
        rsync = shutil.which("rsync")
        sys.stdout.write(self.root + "\n")
        sys.stdout.flush()
        if rsync is None:
            raise Refused("no rsync on this host's PATH")
        os.execv(rsync, ["rsync", "--version"])
        return 1  # not reached

    def _check(self, base: str) -> int:
        """What watcher.preflight's far script answers: missing commands, and
        the first existing directory on the way to BASE if it cannot be written."""
        parts = self._parts(base)
        missing = "" if shutil.which("rsync") else " rsync"
        unwritable = ""
        fd = os.dup(self.root_fd)
        try:
            for i, part in enumerate(parts):
                try:
                    nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  dir_fd=fd)
                except FileNotFoundError:
                    parts = parts[:i]
                    break
                except OSError:
                    unwritable = base
                    break
                os.close(fd)
                fd = nfd
            if not unwritable and not os.access(f"/proc/self/fd/{fd}", os.W_OK | os.X_OK):
                unwritable = base if len(parts) == len(self._parts(base)) else self._physical(parts)
        finally:
            os.close(fd)
        from watcher.preflight import MARK  # the agent's module: loaded only for this rare request
        sys.stdout.buffer.write(MARK + b"\0".join(os.fsencode(f) for f in (missing, "", unwritable)) + b"\0")
        return 0

    def _md5(self, base: str, replaced: str) -> int:
        if replaced and not BACKUP_DIR.fullmatch(replaced):
            raise Refused(f"md5: replaced directory {replaced!r}: only {REPLACED_DIR}/NAME is served")
        parts = self._parts(base)
        try:
            base_fd = self._walk(parts, create=False)
        except FileNotFoundError:
            raise Refused(f"md5: {base}: no such directory below {self.given}") from None
        names = _names_on_stdin("md5")
        physical = os.fsencode(self._physical(parts))
        write = sys.stdout.buffer.write  # piece by piece: no second copy of the names in memory
        try:
            records, found = self._hash(base_fd, names, "" if self.append_only else replaced)
            if found:
                self._sync_above(base_fd, parts)
        except _SyncFailed as exc:  # none of the batch counts (the agent: the archive's trouble)
            sys.stderr.write(f"watcher serve: sync failed: {exc}\n")
            write(MD5_HEADER + physical + b"\0" + SYNC_FAILED + b"\0")
            return 123
        finally:
            os.close(base_fd)
        write(MD5_HEADER + physical + b"\0" + str(len(names)).encode() + b"\0")
        for name in names:
            write(name + b"\0")
        for name in names:
            write((physical + name[1:] if name in found else b"!") + b"\0")
        write(b"\0")
        for record in records:
            write(record + b"\0")
        write(b"\0")
        return 0

    def _sync_above(self, base_fd: int, parts: list[str]) -> None:
        """fsync the directories between the root (included) and the base,
        which hold the base's entry and which rsync's --mkpath may have made:
        from the base's parent up, each this account may read and write on
        the base's file system, up to the first that is not (as the shell's
        SYNC_ABOVE does)."""
        device = os.fstat(base_fd).st_dev
        for depth in reversed(range(len(parts))):
            try:
                fd = self._walk(parts[:depth], create=False)
                try:
                    if (not os.access(".", os.R_OK | os.W_OK, dir_fd=fd)
                            or os.fstat(fd).st_dev != device):
                        return
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except (OSError, Refused) as exc:  # one moved away meanwhile too: nothing counts
                raise _SyncFailed(f"{self._physical(parts[:depth])!r}: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None

    def _hash(self, base_fd: int, names: list[bytes], replaced: str) -> tuple[list[bytes], set[bytes]]:
        """md5sum -z records of the regular files named (``./path``), each
        reached without following a link and, with every directory from its
        own up to the base, fsynced beside the hashing (watcher.durable)."""
        relpaths = {os.fsdecode(name[2:]): name for name in names if name.startswith(b"./")}
        with Beneath(f"/proc/self/fd/{base_fd}") as tree:
            by_path, failed = hash_durably(tree, list(relpaths))
            if replaced:  # a failed batch too: the batch sent again must leave no identical copy behind
                drop_identical_copies(tree, replaced, by_path)
        if failed:
            raise _SyncFailed(failed)
        return ([md5.encode() + b"  " + relpaths[path] for path, md5 in by_path.items()],
                {relpaths[path] for path in by_path})

    # -- rsync's leftovers -----------------------------------------------------------

    def _temp_files(self, base: str, age: float, remove: bool) -> int:
        """List (or, for the names on standard input, remove) rsync's temporary
        files below BASE untouched for ``age`` seconds: regular files of this
        account with one link, named as rsync names them, whose status change
        time (which no one can set back) is that old. Nothing below
        REPLACED_DIR, and no symlink, is followed."""
        parts = self._parts(base)
        if remove and self.append_only:  # an archived file may be named like a temporary one
            return 0
        try:
            base_fd = self._walk(parts, create=False)
        except FileNotFoundError:
            return 0
        cutoff = time.time() - age
        out = []
        try:
            with Beneath(f"/proc/self/fd/{base_fd}") as tree:
                if remove:
                    names = [os.fsdecode(n) for n in _names_on_stdin("clean")]
                else:
                    names = list(_walk_files(base_fd))
                for rel in names:
                    path = os.path.join(tree.root, rel)
                    try:
                        split_beneath(path, tree.root)
                        if REPLACED_DIR in rel.split("/"):
                            continue
                        st = tree.lstat(path)
                        if not _stale_temp(rel.rpartition("/")[2], st, cutoff):
                            continue
                        if remove and not tree.unlink_if(path, Identity.of(st)):
                            continue
                    except (OSError, ValueError):
                        continue
                    out.append(os.fsencode(rel) + b"\0")
        finally:
            os.close(base_fd)
        sys.stdout.buffer.write(b"".join(out))
        return 0


def _stale_temp(name: str, st: os.stat_result, cutoff: float) -> bool:
    return (TEMP_NAME.fullmatch(name) is not None and stat.S_ISREG(st.st_mode)
            and st.st_nlink == 1 and st.st_uid == os.geteuid() and st.st_ctime < cutoff)


def _walk_files(base_fd: int):
    """Relative paths of the entries whose names look like rsync's temporary
    files, below the base (no link followed, no REPLACED_DIR at any depth)."""
    for top, _, _, files in walk_fd(base_fd, skip=REPLACED_DIR):
        for name in files:
            if TEMP_NAME.fullmatch(name):
                yield f"{top}/{name}" if top else name


def _home_below(root: str) -> str | None:
    """The far account's home, its .ssh or authorized_keys when at or below
    ``root`` (all physical paths), else None."""
    import pwd
    homes = {os.path.expanduser("~")}
    try:
        homes.add(pwd.getpwuid(os.geteuid()).pw_dir)
    except KeyError:
        pass
    top = root.rstrip("/") + "/"
    for home in sorted(h for h in homes if h.startswith("/")):
        for path in (home, f"{home}/.ssh", f"{home}/.ssh/authorized_keys"):
            real = os.path.realpath(path)
            if real == root or real.startswith(top):
                return path
    return None


def _check_rsync_version(rsync: str) -> None:
    """Refuse an rsync older than SERVE_MIN_RSYNC: the receiver's confinement below
    the destination is rsync's (a thief never runs the agent's check)."""
    try:
        out = subprocess.run([rsync, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise Refused(f"{rsync} --version: {exc}") from None
    found = re.search(rb"version\s+(\d+)\.(\d+)\.(\d+)", out)
    version = tuple(int(v) for v in found.groups()) if found else None
    if version is None or version < SERVE_MIN_RSYNC:
        shown = ".".join(map(str, version)) if version else "of unknown version"
        raise Refused(f"this host's rsync ({rsync}) is {shown}; watcher serve needs rsync "
                      f"{'.'.join(map(str, SERVE_MIN_RSYNC))} or later (older ones follow a planted "
                      "symlink when making the parents of a --relative name, CVE-2026-53785)")


def _names_on_stdin(what: str) -> list[bytes]:
    """The NUL-separated names on standard input, refused past MAX_NAMES_BYTES
    (held in memory, and the md5 answer repeats them)."""
    data = sys.stdin.buffer.read(MAX_NAMES_BYTES + 1)
    if len(data) > MAX_NAMES_BYTES or data.count(b"\0") > MAX_NAMES:
        raise Refused(f"{what}: more than {MAX_NAMES_BYTES >> 20} MiB or {MAX_NAMES} names on "
                      "standard input")
    return [n for n in data.split(b"\0") if n]


def _shown(text: str) -> str:
    """A request as shown in a refusal: one line, at most 200 characters."""
    text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return repr(text if len(text) <= 200 else text[:199] + "\u2026")


if __name__ == "__main__":
    sys.exit(run())
