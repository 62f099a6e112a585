"""md5 of files (watcher/hashing.py): the sum of what was read, and a sign
of life while a huge file is read (the agent's watchdog waits for it)."""

from __future__ import annotations

import hashlib
import os

from watcher.hashing import PROGRESS_EVERY, md5_of_fd


def test_a_huge_file_is_hashed_with_a_sign_of_life_every_64_mib(tmp_path):
    path = tmp_path / "big.dat"
    with open(path, "wb") as f:  # sparse: 200 MiB of zeros but for a few bytes
        f.truncate(200 << 20)
        f.seek(150 << 20)
        f.write(b"not all zeros")
    calls = []
    fd = os.open(path, os.O_RDONLY)
    try:
        md5, st = md5_of_fd(fd, lambda: calls.append(1))
    finally:
        os.close(fd)
    expected = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            expected.update(chunk)
    assert md5 == expected.hexdigest() and st.st_size == 200 << 20
    assert len(calls) == (200 << 20) // PROGRESS_EVERY == 3
