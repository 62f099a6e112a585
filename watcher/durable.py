"""Far copies onto stable storage while they are hashed.

A verified copy must survive a power cut on its host, so each file and
each directory above it is fsynced before the batch counts (DESIGN.md,
"durable before deleted"). Done one after another, each fsync waits for
its write-out before the file is hashed; done beside the hashing, the disk
writes while the CPU hashes, as the shell's far command does with a `sync`
process in the background. ``Syncer`` is that background for Python code
(``watcher serve`` and a local archive, through ``hash_durably``):
descriptors handed to it are fsynced on its own thread and closed, and
``finish`` says whether every one succeeded. A batch of many files first
syncs the whole file system (``syncfs``: one write-out instead of one per
file); each file's own fsync after it is cheap and reports that file's
own write error.
"""

from __future__ import annotations

import os
import queue
import stat
import threading

from watcher.hashing import md5_of_fd
from watcher.safefs import Beneath, split_beneath

SYNCFS_FILES = 64  # a batch of this many files or more first syncs its whole file system
_HANDOFF = 32  # files handed to the syncer at once (one queue operation, not one a file)
_PENDING = 16  # hand-offs waiting for the syncer at most (the hashing waits beyond)


def hash_durably(tree: Beneath, relpaths: list[str]) -> tuple[dict[str, str], str]:
    """The md5 of each regular file of ``relpaths`` below ``tree``'s root,
    each opened without following a link, and the first failure to put one
    of them or a directory from its own up to the root on stable storage
    ("" when all are: only then does any of them count). Paths that are not
    plain, missing, or not regular files are left out."""
    found: dict[str, str] = {}
    submitted: set[str] = set()  # directories handed to the syncer
    syncer = Syncer(os.dup(tree.dir_fd("")) if len(relpaths) >= SYNCFS_FILES else None)
    fds: list[tuple[int, str]] = []  # not yet handed over
    try:
        for relpath in relpaths:
            if len(fds) >= _HANDOFF:
                syncer.add(fds)
                fds = []
            path = os.path.join(tree.root, relpath)
            try:
                parent, _ = split_beneath(path, tree.root)
                fd = tree.open(path)
            except (OSError, ValueError):
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                fds.append((os.dup(fd), repr(relpath)))
                try:
                    while parent not in submitted:
                        fds.append((os.dup(tree.dir_fd(parent)), repr(parent or ".")))
                        submitted.add(parent)
                        parent = parent.rpartition("/")[0] if parent else parent
                except OSError as exc:  # a directory that cannot be synced: nothing counts
                    syncer.fail(f"{relpath!r}: {exc.strerror or exc}")
                found[relpath] = md5_of_fd(fd)[0]
            except OSError:
                continue
            finally:
                os.close(fd)
    finally:
        syncer.add(fds)
        failed = syncer.finish()
    return found, failed


def syncfs(fd: int) -> None:
    """syncfs(2) of the file system of ``fd``; its result is not relied on:
    each file's fsync after it reports its own errors."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).syncfs(fd)
    except (OSError, AttributeError):
        pass


class Syncer:
    """fsync descriptors on a thread of its own, in the order given.

    ``add(fds)`` hands over (descriptor, what it is) pairs (the syncer
    closes the descriptors); ``fail(why)`` says that something could not
    even be handed over; ``finish()`` waits for all and returns the first
    failure ("" if none)."""

    def __init__(self, syncfs_fd: int | None = None):
        self._queue: queue.Queue = queue.Queue(_PENDING)
        self._failed = ""
        self._thread = threading.Thread(target=self._run, args=(syncfs_fd,), name="watcher-fsync", daemon=True)
        self._thread.start()

    def add(self, fds: list[tuple[int, str]]) -> None:
        self._queue.put((fds, ""))

    def fail(self, why: str) -> None:
        self._queue.put(((), why))

    def finish(self) -> str:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        return self._failed

    def _run(self, syncfs_fd: int | None) -> None:
        """Nothing here raises: a dead syncer would leave ``add`` waiting for good."""
        if syncfs_fd is not None:
            syncfs(syncfs_fd)
            _close(syncfs_fd)
        while (job := self._queue.get()) is not None:
            fds, failed = job
            self._failed = self._failed or failed
            for fd, what in fds:
                if not self._failed:  # after a failure nothing counts: the rest are only closed
                    try:
                        os.fsync(fd)
                    except OSError as exc:
                        self._failed = f"{what}: {exc.strerror or exc}"
                _close(fd)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
