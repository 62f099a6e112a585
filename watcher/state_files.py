"""The agent's own files (lock, health, temporary names) in directories others may write.

Producers in the catalog group must write the catalog's directory (SQLite
makes its -wal and -shm files there), so any of them can plant a symlink,
a FIFO, a directory or a hard link where the agent, often root, is about
to write. Every name is therefore opened relative to a descriptor of its
directory with ``O_NOFOLLOW``, a temporary name is new (``O_EXCL``, an
unpredictable suffix) and renamed over the final one, and a file the agent
keeps (its lock) must be a regular file of its own with one link before
anything is written to it. Which directories may be shared at all, and
with whom, is ``directory_problem``'s to say: the agent refuses the rest.
"""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import stat
from pathlib import Path

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted at the name must not hang the agent.
NOFOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
PROTECTED_HARDLINKS = "/proc/sys/fs/protected_hardlinks"
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


class UnsafeStateFile(Exception):
    """A state file or directory the agent will not use: someone else may control it.

    The agent refuses to start with it as with a bad configuration (exit
    status 2, which the unit does not restart): an operator must look."""


def open_dir(path: str | os.PathLike) -> int:
    """A descriptor of a configured directory (the path itself may hold links:
    only the configuration names it; its writers are checked separately)."""
    return os.open(path, DIR_FLAGS)


def describe(st: os.stat_result, euid: int | None = None) -> str | None:
    """Why an entry the agent meant to own is not one it can trust, or None."""
    euid = os.geteuid() if euid is None else euid
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISREG(st.st_mode):
        return f"is not a regular file (a {_kind(st.st_mode)})"
    if st.st_uid != euid:
        return f"is owned by {_user(st.st_uid)}, not by the agent's account {_user(euid)}"
    if st.st_nlink != 1:
        return f"has {st.st_nlink} hard links (another name of the same file lies elsewhere)"
    return None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def lock_path(database: str | os.PathLike, archive: str | None = None) -> str:
    """The catalog's lock file, or an archive's (archive names are file names: see config)."""
    base = os.fspath(database)
    return f"{base}-watcher.lock" if archive is None else f"{base}-watcher-{archive}.lock"


def locked(path: str | os.PathLike) -> bool | None:
    """Whether some process holds an flock on the file at ``path`` (as an
    agent holds its archive's lock file for its lifetime), from /proc/locks:
    seen without taking the lock, which could make an agent starting just
    then refuse to. None when it cannot be told (no such file, no /proc)."""
    try:
        st = os.stat(path, follow_symlinks=False)
        with open("/proc/locks") as f:
            table = f.read()
    except OSError:
        return None
    me = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(fields[1] == "FLOCK" and fields[5] == me
               for fields in (line.split() for line in table.splitlines()) if len(fields) > 5)


def open_lock(dir_fd: int, name: str, path: str) -> int:
    """A read-write descriptor of the lock file ``name`` (made when missing),
    never written through: not truncated on open, and refused (UnsafeStateFile)
    unless it is a regular file of the agent's own with one link. The lock's
    inode is what excludes a second agent, so a wrong one is not replaced
    behind another agent's back: an operator removes it."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644, dir_fd=dir_fd)
    except OSError as exc:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            raise exc from None
        why = describe(st) or exc.strerror
        raise UnsafeStateFile(_refusal(path, why)) from None
    why = describe(os.fstat(fd))
    if why:
        os.close(fd)
        raise UnsafeStateFile(_refusal(path, why))
    return fd


def _refusal(path: str, why: str) -> str:
    return (f"lock file {path} {why}: not using it (someone who may write its directory could have "
            "put it there to make the agent write elsewhere); look at it, remove it, and start again")


def temp_name(name: str) -> str:
    """A hidden, unpredictable temporary name beside ``name``."""
    return f".{name}.{secrets.token_hex(8)}.tmp"


def write_atomic(dir_fd: int, name: str, data: bytes, mode: int = 0o666, sync: bool = False) -> None:
    """Write ``name`` in a directory as a whole: into a new file (O_EXCL|O_NOFOLLOW,
    an unpredictable name), then renamed over the name. Whatever was planted at
    the name (a link, a FIFO, a hard link) is replaced, never written through.
    ``mode`` is masked by the umask, as open()'s is."""
    tmp = temp_name(name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, mode, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def read_own(dir_fd: int, name: str, limit: int = 1 << 20) -> bytes | None:
    """The content of a regular file of the agent's own, read without following
    a link or blocking on a FIFO; None for anything else."""
    try:
        fd = os.open(name, os.O_RDONLY | NOFOLLOW, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if describe(os.fstat(fd)):
            return None
        return os.read(fd, limit)
    finally:
        os.close(fd)


# -- who may write a directory ---------------------------------------------------


def _private_group(gid: int, owner: int) -> bool:
    """Whether a group has no member but the owner (Debian's user private groups)."""
    try:
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    owner_name = _user(owner)
    if any(member != owner_name for member in group.gr_mem):
        return False
    return all(p.pw_uid == owner for p in pwd.getpwall() if p.pw_gid == gid)


def _group_members(gid: int) -> str:
    try:
        group = grp.getgrgid(gid)
    except KeyError:
        return ""
    names = set(group.gr_mem) | {p.pw_name for p in pwd.getpwall() if p.pw_gid == gid}
    shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
    return f" (members: {shown})" if names else ""


def _writers_problem(st: os.stat_result, catalog_gid: int | None, euid: int, ancestor: bool) -> str | None:
    """Who besides the owner, root and the catalog group may write (or swap) a directory."""
    if st.st_uid not in (0, euid):
        return f"is owned by {_user(st.st_uid)}, who could {'replace what lies in it' if ancestor else 'change it'}"
    sticky = ancestor and st.st_mode & stat.S_ISVTX  # others may not rename what they do not own
    if st.st_mode & stat.S_IWOTH and not sticky:
        return "is writable by every account (o+w)" + ("" if ancestor else ", sticky or not")
    if st.st_mode & stat.S_IWGRP and not sticky and st.st_gid != catalog_gid \
            and not _private_group(st.st_gid, st.st_uid):
        return f"is writable by group {_group(st.st_gid)}{_group_members(st.st_gid)}"
    return None


def directory_problem(path: str | os.PathLike, what: str, catalog_group: str | None,
                      euid: int | None = None) -> str | None:
    """One line saying why a state directory may not be used, or None.

    It must be owned by root or the agent's account, and writable besides
    only by its group when that is the configured catalog group or a group of
    the owner alone (a user private group, with umask 002); never by others.
    Every ancestor (along the path as written and along its real path) must
    be as safe, except that a sticky one (/tmp) may be writable by all: from
    an ancestor that others may write, the directory could be swapped.
    """
    euid = os.geteuid() if euid is None else euid
    catalog_gid = None
    if catalog_group:
        try:
            catalog_gid = grp.getgrnam(catalog_group).gr_gid
        except KeyError:
            return f"{what} {path}: catalog_group {catalog_group!r} is no group of this host"
    path = os.path.abspath(path)
    fix = (f"make it writable only by its owner{' and group ' + catalog_group if catalog_group else ''} "
           f"(chmod o-w,g-w; chgrp {catalog_group or 'GROUP'} and chmod g+w for the catalog group), "
           "or set catalog_group")
    why = _writers_problem(os.stat(path), catalog_gid, euid, ancestor=False)
    if why:
        return f"{what} {path} {why}: refusing to use it; {fix}"
    for up in _ancestors(path):
        why = _writers_problem(os.stat(up), catalog_gid, euid, ancestor=True)
        if why:
            return (f"{what} {path} could be replaced: its ancestor {up} {why}; refusing to use it; "
                    "keep the state directory where only root and the agent's account can write its parents")
    return None


def _ancestors(path: str) -> list[str]:
    found: list[str] = []
    for start in (path, os.path.realpath(path)):
        up = os.path.dirname(start)
        while True:
            if up not in found:
                found.append(up)
            if up == "/":
                break
            up = os.path.dirname(up)
    return found


def hardlinks_protected() -> bool:
    """Whether the kernel refuses a hard link to a file its maker may not write."""
    try:
        return Path(PROTECTED_HARDLINKS).read_text().strip() != "0"
    except OSError:
        return True  # not Linux, or no /proc: nothing to say


def check_catalog_names(dir_fd: int, database: Path) -> str | None:
    """One line when the catalog or SQLite's files beside it are not what SQLite
    should open (a symlink: SQLite follows one at the catalog and writes its
    journal beside the target; a hard link at -wal or -shm is written through),
    or None. A missing one is fine: SQLite makes it."""
    for suffix in ("",) + SQLITE_SIDE_FILES:
        name = database.name + suffix
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            why = "is a symlink"
        elif not stat.S_ISREG(st.st_mode):
            why = f"is not a regular file (a {_kind(st.st_mode)})"
        elif st.st_nlink != 1:
            why = f"has {st.st_nlink} hard links (SQLite would write through it)"
        else:
            continue
        return (f"{database.parent / name} {why}: refusing to open the catalog (someone who may write "
                f"{database.parent} could have put it there); look at it, remove it, and start again")
    return None


def prepare(database: Path, file_root: Path, catalog_group: str | None) -> int:
    """Make the state directory and ``file_root`` when missing, refuse them
    (UnsafeStateFile) when others may write them or the names SQLite opens
    there, and return a descriptor of the state directory.

    A directory that the catalog group may write, on a kernel that lets
    anyone hard-link any file (fs.protected_hardlinks=0), is refused too:
    a member could link a root-only file at catalog.db-wal, and SQLite
    writes through hard links."""
    database.parent.mkdir(parents=True, exist_ok=True)
    Path(file_root).mkdir(parents=True, exist_ok=True)
    for path, what in ((database.parent, "state directory"), (Path(file_root), "file_root")):
        why = directory_problem(path, what, catalog_group)
        if why:
            raise UnsafeStateFile(why)
    fd = open_dir(database.parent)
    try:
        st = os.fstat(fd)
        if st.st_mode & stat.S_IWGRP and not _private_group(st.st_gid, st.st_uid) \
                and not hardlinks_protected():
            raise UnsafeStateFile(
                f"state directory {database.parent} is writable by group {_group(st.st_gid)} and "
                "fs.protected_hardlinks is 0: a member could hard-link any file where the agent writes; "
                "set 'sysctl fs.protected_hardlinks=1' or make the directory writable by its owner only")
        why = check_catalog_names(fd, database)
        if why:
            raise UnsafeStateFile(why)
    except BaseException:
        os.close(fd)
        raise
    return fd
