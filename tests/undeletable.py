"""A file or directory entry that cannot be deleted or created, even by root
(who ignores directory modes): for tests of what the agent does when
retention cannot delete a file or rsync cannot write into an archive."""

from __future__ import annotations

import os
import subprocess

import pytest


def refuse_deletion(path) -> None:
    """Make unlinking ``path`` (or creating it) fail, for root too (which ignores directory modes)."""
    path.parent.chmod(0o555)
    target = path if path.exists() else path.parent
    if os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(target)], capture_output=True).returncode:
        path.parent.chmod(0o755)
        pytest.skip("this file system cannot refuse root a deletion (no chattr +i)")


def allow_deletion(path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path if path.exists() else path.parent)], capture_output=True)
    path.parent.chmod(0o755)
