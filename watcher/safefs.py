"""Open, check and unlink files beneath a root without ever following a symlink.

Every component below the root is opened relative to its parent's
descriptor with ``O_NOFOLLOW``, so what is read, shipped or deleted is
what lies in the tree at that moment: a symlink anywhere below the root
(``ln -s /etc/shadow x``, a data directory moved away and replaced by a
link) stops the walk with ``SymlinkInPath`` instead of leading out of the
tree. The root itself may be a symlink (``/data`` often is).

A file's identity is what a user cannot forge cheaply: device, inode,
size, modification and status-change times (``cp -p``, ``rsync -t`` and
``touch -d`` restore an mtime, but setting it changes the ctime).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
from typing import NamedTuple

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a fifo put in a file's place must not hang the agent.
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


class SymlinkInPath(OSError):
    """A component below the root is a symlink: the path is not followed."""

    def __init__(self, path: str):
        super().__init__(errno.ELOOP, "a component is a symlink, not followed", path)


class Identity(NamedTuple):
    """What a file was when it was hashed."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "Identity":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def replaced(recorded: "Identity | None", st: os.stat_result) -> bool:
    """Whether the path of a file recorded as ``recorded`` now holds another
    file (another inode: removed and written again, or a file renamed over
    it), whose content must not overwrite the far copy of the first. A
    rewrite in place keeps the inode and is an edit; so, unavoidably, is a
    new file that is given the freed inode number at once (its delete event
    tells, when it is seen). The device is not compared: NFS and btrfs may
    number it anew at every mount."""
    return recorded is not None and recorded.ino != st.st_ino


def root_of(path: str, roots) -> str:
    """The longest of ``roots`` that contains ``path``; ValueError when none
    does: a file outside every root is never opened, whoever named it (a
    catalog row is a request, see watcher.roots)."""
    best = ""
    for root in roots:
        root = str(root).rstrip("/") or "/"
        prefix = root if root == "/" else root + "/"
        if path.startswith(prefix) and len(root) > len(best):
            best = root
    if not best:
        raise ValueError(f"{path} is outside every root the agent may act in")
    return best


def split_beneath(path: str, root: str) -> tuple[str, str]:
    """(directory relative to root, file name) of a path inside ``root``."""
    prefix = root if root.endswith("/") else root + "/"
    if not path.startswith(prefix):
        raise ValueError(f"{path} is not below {root}")
    rel = path[len(prefix):]
    padded = f"/{rel}/"
    if "//" in padded or "/./" in padded or "/../" in padded:
        raise ValueError(f"{path} is not a plain path below {root}")
    parent, _, name = rel.rpartition("/")
    return parent, name


class Beneath:
    """Directory descriptors below one root, opened once each without following
    links and kept until ``close()`` (a batch of files shares few directories).

    Thread-safe for lookups of directories already opened; open them from one thread.
    """

    def __init__(self, root: str):
        self.root = root
        self._dirs: dict[str, int] = {}

    def __enter__(self) -> "Beneath":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        dirs, self._dirs = self._dirs, {}
        for fd in dirs.values():
            os.close(fd)

    def dir_fd(self, reldir: str) -> int:
        """A descriptor of ``root/reldir``; SymlinkInPath when a component is a link."""
        fd = self._dirs.get(reldir)
        if fd is not None:
            return fd
        # From the deepest directory already open down (a loop, not recursion:
        # a path may have thousands of components).
        parts = reldir.split("/") if reldir else []
        known = len(parts)
        while known > 0 and "/".join(parts[:known]) not in self._dirs:
            known -= 1
        if known == 0 and "" not in self._dirs:
            self._dirs[""] = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        at = self._dirs["/".join(parts[:known])]
        for i in range(known, len(parts)):
            try:
                at = os.open(parts[i], DIR_FLAGS, dir_fd=self._dirs["/".join(parts[:i])])
            except OSError as exc:
                parent = self._dirs["/".join(parts[:i])]
                if exc.errno in (errno.ENOTDIR, errno.ELOOP) and _is_link(parts[i], parent):
                    raise SymlinkInPath(os.path.join(self.root, *parts[:i + 1])) from None
                raise
            self._dirs["/".join(parts[:i + 1])] = at
        return at

    def still_in_place(self, reldir: str) -> bool:
        """Whether the directory opened for ``reldir`` is still the one a fresh
        walk from the root reaches (it was not moved out and replaced since)."""
        held = os.fstat(self.dir_fd(reldir))
        try:
            with Beneath(self.root) as fresh:
                now = os.fstat(fresh.dir_fd(reldir))
        except (OSError, ValueError):
            return False
        return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)

    def open(self, path: str) -> int:
        """A read-only descriptor of a file below the root, opened without
        following any link; SymlinkInPath when one is in the way."""
        parent, name = split_beneath(path, self.root)
        return open_in(self.dir_fd(parent), name, path)

    def lstat(self, path: str) -> os.stat_result:
        """The stat of the entry itself (a symlink is a symlink)."""
        parent, name = split_beneath(path, self.root)
        return os.stat(name, dir_fd=self.dir_fd(parent), follow_symlinks=False)

    def unlink_if(self, path: str, expected: Identity) -> bool:
        """Unlink the entry at ``path`` if it still is the file of ``expected``
        (same device and inode, unchanged) in the directory a fresh walk
        reaches; False, touching nothing, otherwise."""
        parent, name = split_beneath(path, self.root)
        at = self.dir_fd(parent)
        if not self.still_in_place(parent):
            return False
        st = os.stat(name, dir_fd=at, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or Identity.of(st) != expected:
            return False
        os.unlink(name, dir_fd=at)
        return True


class Trees:
    """A Beneath for each root a batch of files touches, opened on demand and
    closed together (a use as a context manager)."""

    def __init__(self, roots=()):
        self.roots = [str(r) for r in roots]
        self._trees: dict[str, Beneath] = {}

    def __enter__(self) -> "Trees":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        trees, self._trees = self._trees, {}
        for tree in trees.values():
            tree.close()

    def at(self, root: str) -> Beneath:
        """The tree of this root."""
        tree = self._trees.get(root)
        if tree is None:
            tree = self._trees[root] = Beneath(root)
        return tree

    def of(self, path: str) -> Beneath:
        """The tree of the innermost root that holds ``path``; ValueError when
        none does (see root_of)."""
        return self.at(root_of(path, self.roots))


# How deep walk_fd descends: it holds a descriptor per level.
MAX_WALK_DEPTH = 256


def walk_fd(top: int, skip: str = ""):
    """Like ``os.fwalk(topdown=False, follow_symlinks=False)`` below the
    directory ``top``: (relative path, descriptor, directory names, other
    names) of each directory, deepest first. A loop, not recursion (os.fwalk
    raised RecursionError on a tree 1000 deep, where rsync -R can make one),
    with one descriptor per level; directories named ``skip`` are not
    entered at any depth, nor any below MAX_WALK_DEPTH, nor one that cannot
    be opened or read. The descriptor is valid until the next step."""
    frames: list[tuple[str, int, list[str], list[str], list[str]]] = []

    def enter(rel: str, fd: int) -> None:
        dirs, others = [], []
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    try:
                        (dirs if entry.is_dir(follow_symlinks=False) else others).append(entry.name)
                    except OSError:
                        continue
        except OSError:
            pass
        frames.append((rel, fd, dirs, others, [d for d in dirs if d != skip]))

    enter("", os.dup(top))
    try:
        while frames:
            rel, fd, dirs, others, pending = frames[-1]
            if pending and len(frames) <= MAX_WALK_DEPTH:
                name = pending.pop()
                try:
                    sub = os.open(name, DIR_FLAGS, dir_fd=fd)
                except OSError:
                    continue
                enter(f"{rel}/{name}" if rel else name, sub)
                continue
            frames.pop()
            try:
                yield rel, fd, dirs, others
            finally:
                os.close(fd)
    finally:
        for frame in frames:
            os.close(frame[1])


def open_in(dir_fd: int, name: str, path: str, inheritable: bool = False) -> int:
    """A read-only descriptor of ``name`` in a directory, the name itself
    not followed (``path``, its full path, names it in errors); an
    ``inheritable`` one is not closed by exec (for a command's pass_fds)."""
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP and _is_link(name, dir_fd):
            raise SymlinkInPath(path) from None
        raise
    if inheritable:
        os.set_inheritable(fd, True)  # Python opens close-on-exec whatever the flags
    return fd


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)


class WriterCheck:
    """Answers of ``hold_against_writers``."""

    FREE = "free"          # nobody has it open for writing; a read lease now holds writers off
    WRITING = "writing"    # someone has it open for writing
    UNKNOWN = "unknown"    # a lease is not permitted (not the owner, no CAP_LEASE) or not supported


def hold_against_writers(fd: int) -> str:
    """Take a read lease on an open file: granted only while no process has
    it open for writing, and while held, an open for writing waits for us
    (up to the kernel's lease-break time). ``release_lease`` ends it.

    The kernel tells the lease holder of a break with SIGIO, whose default
    action ends the process: ``ignore_lease_breaks`` must have run."""
    try:
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
        return WriterCheck.FREE
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return WriterCheck.WRITING
        return WriterCheck.UNKNOWN


def ignore_lease_breaks() -> None:
    """Ignore SIGIO, which a broken lease sends (the break itself needs no
    answer: releasing the lease soon is enough). From the main thread, at start."""
    signal.signal(signal.SIGIO, signal.SIG_IGN)


def release_lease(fd: int) -> None:
    try:
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass


def open_subdir(dir_fd: int, name: str, path: str, create: bool = False) -> int:
    """A descriptor of the directory ``name`` in a directory, made first when
    ``create`` and missing (mkdir relative to the descriptor, the process's
    umask applies), never followed when it is a link: SymlinkInPath then
    (``path`` names it), NotADirectoryError for another kind of file."""
    if create:
        try:
            os.mkdir(name, dir_fd=dir_fd)
        except FileExistsError:
            pass
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP) and _is_link(name, dir_fd):
            raise SymlinkInPath(path) from None
        raise


def missing_for_good(path: str, dev: int | None = None) -> bool:
    """Whether a file that is not at ``path`` is gone for good, as far as the
    file system can tell: its directory is there, on the device the file
    was on when that is known. A missing directory, or another device in its
    place (the mount point of a disk not mounted), may be a disk that comes
    back: its rows must not be marked removed, or files registered through
    the API (which no scan finds again) would never ship or be deleted."""
    try:
        st = os.stat(os.path.dirname(path))
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and (dev is None or st.st_dev == dev)

