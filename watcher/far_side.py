"""What the agent and the archive host's forced command (watcher.serve) share,
kept light (the forced command starts once per request): the first word of
the requests, the far md5 answer's header (see watcher.rsync.parse_far_md5), rsync's
temporary names,
and the removal of replaced far copies identical to their new file, which
the far md5 of a local archive and serve's both run.
"""

from __future__ import annotations

import os
import re
import stat

from watcher.hashing import md5_of_fd
from watcher.safefs import Beneath, Identity, walk_fd

# The first word of the requests an archive with ``far_side: serve`` sends.
SERVE_REQUEST = "watcher-serve"
MD5_HEADER = b"watcher-md5 "
# A far md5 answer's record saying the batch could not be put on stable storage.
SYNC_FAILED = b"sync-failed"
# The oldest rsync watcher serve runs as the receiver: its confinement below the
# destination is rsync's own, and 3.5.0 makes the parents of a --relative name
# (--no-implied-dirs) without following a planted symlink (CVE-2026-53785).
SERVE_MIN_RSYNC = (3, 5, 0)
# The most names serve reads in one request (the md5 of a batch: files_per_batch).
MAX_NAMES = 250_000
# How watcher serve's refusals start (the agent tells them from a lost connection).
REFUSED = "watcher serve: refused: "
SERVE_REFUSED = re.compile(rb"(?m)^" + re.escape(REFUSED.encode()))
# rsync's temporary name for NAME: ".NAME." and mkstemp's six letters or digits
# (NAME cut short when too long to fit).
TEMP_NAME = re.compile(r"\.(.+)\.[A-Za-z0-9]{6}", re.S)


def drop_identical_copies(tree: Beneath, replaced_dir: str, found: dict[str, str]) -> None:
    """Unlink the copies below ``replaced_dir`` identical, byte for byte, to
    the file now under their name (an md5 match is only where to look),
    then the directories that left empty."""
    try:
        top = tree.dir_fd(replaced_dir)  # a symlink is not followed (it once was: os.walk by path)
    except (OSError, ValueError):
        return
    for path, md5 in found.items():
        copy = os.path.join(tree.root, replaced_dir, path)
        try:
            fd = tree.open(copy)
        except (OSError, ValueError):
            continue
        try:
            st = os.fstat(fd)
            if (stat.S_ISREG(st.st_mode) and md5_of_fd(fd)[0] == md5
                    and same_bytes(fd, tree, os.path.join(tree.root, path))):
                tree.unlink_if(copy, Identity.of(st))
        except (OSError, ValueError):
            pass
        finally:
            os.close(fd)
    for _, fd, dirs, _ in walk_fd(top):
        for name in dirs:
            try:
                os.rmdir(name, dir_fd=fd)
            except OSError:
                pass  # not empty: a copy of other content is kept
    parts = replaced_dir.split("/")
    for depth in range(len(parts), 0, -1):  # the batch's directory, then REPLACED_DIR, if empty
        try:
            os.rmdir(parts[depth - 1], dir_fd=tree.dir_fd("/".join(parts[:depth - 1])))
        except OSError:
            break


def same_bytes(fd: int, tree: Beneath, path: str) -> bool:
    """Whether the file of ``fd`` holds exactly what ``path`` below the tree holds."""
    other = tree.open(path)
    try:
        if os.fstat(other).st_size != os.fstat(fd).st_size:
            return False
        offset = 0
        while True:
            a, b = os.pread(fd, 1 << 20, offset), os.pread(other, 1 << 20, offset)
            if a != b:
                return False
            if not a:
                return True
            offset += len(a)
    finally:
        os.close(other)
