"""Far copies onto stable storage while they are hashed.

A verified copy must survive a power cut on its host, so each file and
each directory above it is fsynced before the batch counts (DESIGN.md's
promise 2; README, "Durable before deleted"). Done one after another, each fsync waits for
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

import errno
import os
import queue
import resource
import stat
import threading

from watcher.hashing import md5_of_fd
from watcher.safefs import Beneath

SYNCFS_FILES = 64  # a batch of this many files or more first syncs its whole file system
_HANDOFF = 32  # descriptors handed to the syncer at once (one queue operation, not one a file)
_LOOK = 1.0  # seconds between looks at whether the syncer still runs, while waiting for it


def hash_durably(tree: Beneath, relpaths: list[str], limit: int | None = None) -> tuple[dict[str, str], str]:
    """The md5 of each regular file of ``relpaths`` below ``tree``'s root,
    each opened without following a link, and the first failure to put one
    of them or a directory from its own up to the root on stable storage
    ("" when all are: only then does any of them count). Paths that are not
    plain, missing, or not regular files are left out. At most ``limit``
    descriptors (by default a quarter of the process's limit) wait for the
    syncer at once: the hashing waits for it beyond."""
    found: dict[str, str] = {}
    submitted: set[str] = set()  # directories handed to the syncer
    try:
        syncfs_fd = os.dup(tree.dir_fd("")) if len(relpaths) >= SYNCFS_FILES else None
    except OSError as exc:
        return found, "" if exc.errno == errno.ENOENT else f"the base (syncfs: {exc.strerror or exc})"
    syncer = Syncer(syncfs_fd, limit)
    try:
        for relpath in relpaths:
            try:
                fd = tree.open(os.path.join(tree.root, relpath))  # ValueError: not a plain path below the root
            except (OSError, ValueError):
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode) or not _hand_over(syncer, tree, fd, relpath, submitted):
                    continue
                found[relpath] = md5_of_fd(fd)[0]
            except OSError:
                continue
            finally:
                os.close(fd)
    finally:
        failed = syncer.finish()
    return found, failed


def _hand_over(syncer: "Syncer", tree: Beneath, fd: int, relpath: str, submitted: set[str]) -> bool:
    """Hand a file and each directory from its own up to the root not yet
    handed over (``submitted``) to the syncer; False when the file itself
    could not be (no descriptor left: the host's trouble, not the file's).
    Any failure here is the batch's: nothing of it counts."""
    try:
        syncer.add(fd, repr(relpath))
    except OSError as exc:
        syncer.fail(f"{relpath!r} ({exc.strerror or exc})")
        return False
    parent = relpath.rpartition("/")[0]
    try:
        while parent not in submitted:
            syncer.add(tree.dir_fd(parent), repr(parent or "."))
            submitted.add(parent)
            parent = parent.rpartition("/")[0] if parent else parent
    except OSError as exc:
        syncer.fail(f"{relpath!r}'s directory ({exc.strerror or exc})")
    return True


def syncfs(fd: int) -> None:
    """syncfs(2) of the file system of ``fd``; its result is not relied on:
    each file's fsync after it reports its own errors."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).syncfs(fd)
    except Exception:  # no ctypes in this Python, no syncfs in this libc: the fsyncs still count
        pass


class Syncer:
    """fsync descriptors on a thread of its own, in the order given.

    ``add(fd, what)`` hands over a duplicate of ``fd`` (the syncer closes
    it); ``fail(why)`` says that something could not even be handed over;
    ``finish()`` waits for all and returns the first failure ("" if none).
    A syncer that stopped before the end (whatever stopped it) is a failure:
    nothing it was handed counts then, and nothing waits for it for good."""

    def __init__(self, syncfs_fd: int | None = None, limit: int | None = None):
        self._queue: queue.Queue = queue.Queue()
        self._slots = threading.BoundedSemaphore(limit or _default_limit())
        self._pending: list[tuple[int, str]] = []
        self._failed = ""
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(syncfs_fd,), name="watcher-fsync", daemon=True)
        try:
            self._thread.start()
        except BaseException:
            if syncfs_fd is not None:
                _close(syncfs_fd)
            raise

    def add(self, fd: int, what: str) -> None:
        if not self._slots.acquire(blocking=False):
            self._hand_off()
            while not self._slots.acquire(timeout=_LOOK):
                if not self._thread.is_alive():
                    return  # finish() reports it
        try:
            self._pending.append((os.dup(fd), what))
        except OSError:
            self._slots.release()
            raise
        if len(self._pending) >= _HANDOFF:
            self._hand_off()

    def fail(self, why: str) -> None:
        self._hand_off()
        self._queue.put(((), why))

    def finish(self) -> str:
        self._hand_off()
        self._queue.put(None)
        self._thread.join()
        while True:  # what a syncer that stopped left
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            for fd, _ in job[0] if job is not None else ():
                _close(fd)
        if not self._done:
            return self._failed or "the thread that fsyncs stopped before the end"
        return self._failed

    def _hand_off(self) -> None:
        if self._pending:
            self._queue.put((self._pending, ""))
            self._pending = []

    def _run(self, syncfs_fd: int | None) -> None:
        try:
            if syncfs_fd is not None:
                syncfs(syncfs_fd)
                _close(syncfs_fd)
            while (job := self._queue.get()) is not None:
                fds, failed = job
                self._failed = self._failed or failed
                done = 0
                try:
                    for fd, what in fds:
                        if not self._failed:  # after a failure nothing counts: the rest are only closed
                            try:
                                os.fsync(fd)
                            except OSError as exc:
                                self._failed = f"{what} (fsync: {exc.strerror or exc})"
                        done += 1
                        _close(fd)
                        self._slots.release()
                finally:  # a job cut short: its descriptors are closed all the same
                    for fd, _ in fds[done:]:
                        _close(fd)
            self._done = True
        except BaseException as exc:  # recorded: finish() counts the batch for nothing
            self._failed = self._failed or f"the thread that fsyncs stopped: {exc!r}"


def raise_descriptor_limit() -> int:
    """Raise the soft limit of open files to the hard one (at most 2**20: a
    batch holds a descriptor a file or directory at times, and sshd often
    starts sessions at 1,024); return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 1 << 20:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft > hard:
        return 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def _default_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(soft if soft != resource.RLIM_INFINITY else 1 << 16, 1 << 16) // 4)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
