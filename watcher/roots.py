"""Which local files each archive may act on: a catalog row is a request.

Whoever can write the catalog (socs producers, the catalog group) can
write every column of every row, so a row's ``local_path`` is only a
request. The agent reads, ships, hashes or deletes a row's file only when
its path lies below one of its archive's roots: the ``watch`` directory of
every rule of that archive, the archive's ``api_roots`` (where producers
register files through the API) and ``file_root`` (finalization files).
Anything else (``/etc/shadow``, a path with ``..``) is refused unopened.

Paths are compared as written, as the agent walks them (safefs): a root
may itself be a symlink, nothing below it is followed.
"""

from __future__ import annotations

import os

from watcher.config import Config


def plain_absolute(path: str) -> bool:
    """Whether a path is absolute and normalised: no ``.``, ``..`` or empty
    component, no trailing slash, no NUL (a lexical test of a root is only
    sound on such paths)."""
    return (isinstance(path, str) and path.startswith("/") and not path.startswith("//")
            and "\0" not in path and os.path.normpath(path) == path)


class Roots:
    """Each archive's roots, from a configuration."""

    def __init__(self, config: Config):
        by_archive: dict[str, list[str]] = {name: [] for name in config.archives}
        for rule in config.rules:
            by_archive.setdefault(rule.archive, []).append(str(rule.watch))
        for name, archive in config.archives.items():
            by_archive[name] += list(getattr(archive, "api_roots", ()) or ())
        for roots in by_archive.values():
            roots.append(str(config.file_root))
        self._roots = {name: tuple(dict.fromkeys(os.path.normpath(r) for r in roots))
                       for name, roots in by_archive.items()}

    def of(self, archive: str) -> tuple[str, ...]:
        """The roots of an archive (none for an archive not configured)."""
        return self._roots.get(archive, ())

    def problem(self, archive: str, local_path) -> str | None:
        """Why a row of ``archive`` naming ``local_path`` is refused; None when admitted."""
        if not plain_absolute(local_path):
            return "is not an absolute, normalised path (no '.', '..' or '//')"
        roots = self.of(archive)
        for root in roots:
            if root == "/" or local_path.startswith(root + "/"):
                return None
        if not roots:
            return f"belongs to archive {archive!r}, which is not configured"
        return (f"is outside archive {archive}'s roots ({', '.join(roots)}): "
                "add its directory to the archive's api_roots if producers put files there")

    def admits(self, archive: str, local_path) -> bool:
        return self.problem(archive, local_path) is None

    def refusal(self, archive: str, row_id: int, local_path) -> str | None:
        """The WARNING line for a refused row, or None when it is admitted."""
        why = self.problem(archive, local_path)
        if why is None:
            return None
        return (f"refusing catalog row {row_id} of archive {archive}: local path {local_path!r} "
                f"{why}; it is never read, shipped or deleted")
