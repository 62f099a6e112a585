"""Seals: proof, in a catalog row, that the agent itself hashed the row's file.

Producers in the catalog group can write every column of every row: a
row's md5 and identity (dev, ino, size, mtime, ctime) are only claims. So
that retention need not hash every file again before deleting it, the
agent seals what it computed: an HMAC, under a key only the agent's
account can read, of the row's archive, local path, remote path, md5 and
identity. A row without a valid seal (socs, the API, a forged or copied
column) is hashed by the agent before its file may be deleted.

The seal does not cover the row id: it attests a fact about a file (this
path, this identity, this content, shipped as this name), true for any row
that carries it. Copying it to another row claims nothing new.

The key lives beside the catalog, in a directory the catalog group may
write: it is opened without following links and used only when the
descriptor shows a regular file owned by the agent's uid, with one link,
mode 0600 (nobody else may read it) and the right length. Anything else
(a link, a file planted or hard-linked there by someone else, a changed
mode) is removed and a new key made with ``O_EXCL``: every seal is then
void, and files are hashed again before deletion (slow, never unsafe).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import secrets
import stat

log = logging.getLogger(__name__)

KEY_BYTES = 32
SEAL_HEX = 32  # 128 bits of HMAC-SHA256, as hex
_VERSION = b"watcher-seal-1"


def key_path(database: str | os.PathLike) -> str:
    return f"{os.fspath(database)}-watcher.key"


def _bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    return os.fsencode(value) if isinstance(value, str) else str(value).encode()


class Sealer:
    """Computes and checks seals with one key."""

    def __init__(self, key: bytes):
        if len(key) != KEY_BYTES:
            raise ValueError("a seal key is 32 bytes")
        self._key = key

    def seal(self, archive, local_path, remote_path, md5, identity) -> str | None:
        """The seal of these values; None when the identity is unknown."""
        if identity is None or None in tuple(identity):
            return None
        fields = [archive, local_path, remote_path, md5, *identity]
        message = b"\0".join([_VERSION, *(_bytes(f) for f in fields)])
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:SEAL_HEX]

    def valid(self, row) -> bool:
        """Whether a row's seal is the one its columns call for."""
        found = getattr(row, "seal", None)
        if not isinstance(found, str) or len(found) != SEAL_HEX:
            return False
        try:
            wanted = self.seal(row.archive_name, row.local_path, row.remote_path, row.local_md5sum,
                               (row.dev, row.ino, row.size, row.mtime_ns, row.ctime_ns))
        except (TypeError, ValueError, UnicodeError):
            return False
        return wanted is not None and hmac.compare_digest(wanted, found)


def load_key(database: str | os.PathLike) -> bytes:
    """The agent's seal key beside the catalog, made when missing or not
    trustworthy (see the module's docstring). Raises OSError when the state
    directory cannot be opened or written."""
    directory, name = os.path.split(key_path(database))
    dir_fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for _ in range(10):  # another process may race us at each step: start over
            key = _read_trusted(dir_fd, name, os.path.join(directory, name))
            if key is not None:
                return key
            key = _create(dir_fd, name)
            if key is not None:
                return key
        raise OSError(errno.EAGAIN, "the seal key keeps changing under the agent",
                      os.path.join(directory, name))
    finally:
        os.close(dir_fd)


def _read_trusted(dir_fd: int, name: str, path: str) -> bytes | None:
    """The key, if the file at ``name`` is one; None when it is missing or
    was refused (and then removed)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        _refuse(dir_fd, name, path, "is a symlink")
        return None
    try:
        st = os.fstat(fd)
        why = _untrusted(st)
        if why is None:
            key = os.read(fd, KEY_BYTES + 1)
            if len(key) == KEY_BYTES:
                return key
            why = "changed length while read"
    finally:
        os.close(fd)
    _refuse(dir_fd, name, path, why)
    return None


def _untrusted(st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not the agent's ({os.geteuid()})"
    if st.st_mode & 0o7077:
        return f"has mode {stat.S_IMODE(st.st_mode):04o}, not 0600"
    if st.st_nlink != 1:
        return f"has {st.st_nlink} links (a hard link made elsewhere)"
    if st.st_size != KEY_BYTES:
        return f"is {st.st_size} bytes, not {KEY_BYTES}"
    return None


def _refuse(dir_fd: int, name: str, path: str, why: str) -> None:
    log.warning("seal key %s %s: replacing it with a new key (rows sealed so far are "
                "hashed again before their files are deleted)", path, why)
    try:
        os.unlink(name, dir_fd=dir_fd)  # a link itself, never its target
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise OSError(errno.EISDIR, "a directory stands where the seal key goes", path) from None


def _create(dir_fd: int, name: str) -> bytes | None:
    """A new key written to a new file; None when another file took the name first."""
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
    except FileExistsError:
        return None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key
