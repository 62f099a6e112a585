"""What tests read of a running agent: its warnings, what it shipped, and a
command prefix that runs it with few inotify watches."""

from __future__ import annotations

from pathlib import Path

from tests.catalog_rows import row_of, verified

# Runs a command in a user namespace whose inotify watches are limited to $0.
LIMITED_WATCHES = ["unshare", "--user", "--map-root-user", "sh", "-c",
                   'echo "$0" > /proc/sys/user/max_inotify_watches && exec "$@"']


def shipped(database: Path, far: Path, path: Path, remote: str) -> bool:
    row = row_of(database, path)
    return bool(row and verified(row)) and (far / remote).exists() \
        and (far / remote).read_bytes() == path.read_bytes()


def warnings_about(log: str, subject: str) -> list[str]:
    return [line for line in log.splitlines() if " WARNING " in line and subject in line]
