"""What the running agents say about themselves, for `watcher status`.

A small JSON file per archive beside the catalog (not in it: a locked
catalog is one of the things it must be able to report), written by the
agent serving that archive: two agents may share a catalog, one per
archive. Written atomically, only on change.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from watcher import state_files

log = logging.getLogger(__name__)
T = TypeVar("T")


def health_path(database: str | os.PathLike, archive: str) -> Path:
    """Beside the catalog, in a directory the catalog group may write: written
    only through state_files (never through a link planted at the name)."""
    return Path(f"{os.fspath(database)}-watcher-{archive}.json")


class Health:
    def __init__(self, database: str | os.PathLike, archives: Iterable[str] = ()):
        """``archives``: those the agent serves, each with its file from the
        start; an archive named later (a worker's) gets its file then."""
        self.catalog_path = Path(database)
        self._archives = list(dict.fromkeys(archives))
        self._dir: int | None = None  # the state directory, opened once: names are looked up in it
        self._lock = threading.Lock()
        self._state: dict = {"pid": os.getpid(), "started": time.time(),
                             "archives": {}, "database": {"locked": False}, "problems": {}}
        self._subjects: dict[tuple[str, str], set[str]] = {}  # (archive, kind) -> subjects
        self._write()

    def _serve(self, archives) -> None:
        for archive in archives:
            if archive not in self._archives:
                self._archives.append(archive)

    def _write(self) -> None:
        """Each archive's file: a new file with an unpredictable name, renamed
        over it in the directory first opened: a link, FIFO or hard link
        planted at either name is replaced, never written through."""
        for archive in self._archives:
            path = health_path(self.catalog_path, archive)
            mine = {"pid": self._state["pid"], "started": self._state["started"], "archive": archive,
                    "archives": {k: v for k, v in self._state["archives"].items() if k == archive},
                    "database": self._state["database"],
                    "problems": {k: v for k, v in self._state["problems"].items() if k == archive}}
            try:
                if self._dir is None:
                    self._dir = state_files.open_dir(self.catalog_path.parent)
                state_files.write_atomic(self._dir, path.name, json.dumps(mine, indent=1).encode())
            except OSError as exc:  # a full disk must not stop the agent
                log.debug("cannot write %s: %s", path, exc)

    def _set(self, section: dict, key: str, value: dict) -> None:
        with self._lock:
            self._serve([key])
            if section.get(key, {}) | {"since": None} == value | {"since": None}:
                return
            section[key] = value
            self._write()

    def degraded(self, archive: str, error: str) -> None:
        with self._lock:
            old = self._state["archives"].get(archive, {})
        since = old.get("since") if old.get("degraded") else time.time()
        self._set(self._state["archives"], archive, {"degraded": True, "last_error": error, "since": since})

    def recovered(self, archive: str) -> None:
        self._set(self._state["archives"], archive, {"degraded": False, "last_error": None, "since": None})

    def database(self, locked: bool, error: str | None = None) -> None:
        with self._lock:
            old = self._state["database"]
        since = (old.get("since") or time.time()) if locked else None
        with self._lock:
            if old.get("locked") == locked and old.get("last_error") == error:
                return
            self._state["database"] = {"locked": locked, "last_error": error, "since": since}
            self._write()

    def problem(self, archives, kind: str, subject: str, message: str,
                level: int = logging.WARNING) -> None:
        """A condition that degrades service without stopping it (a symlink not
        shipped, an unreadable directory, a lost watch): one WARNING the first
        time a subject shows it, and a count per archive for `watcher status`.

        ``kind`` is a short plural noun (``symlinks``); ``message`` says what
        is wrong and what to do. ``archives`` is one name or several; ``level``
        is the log line's (ERROR for one that stops deletions).
        """
        archives = [archives] if isinstance(archives, str) else list(archives)
        new = False
        with self._lock:
            self._serve(archives)
            for archive in archives:
                subjects = self._subjects.setdefault((archive, kind), set())
                if subject in subjects:
                    continue
                new = True
                subjects.add(subject)
                entry = self._state["problems"].setdefault(archive, {}).setdefault(
                    kind, {"count": 0, "example": None, "message": None})
                entry.update(count=len(subjects), example=subject, message=message)
            if new:
                self._write()
        if new:
            log.log(level, "%s", message)

    def solved(self, archives, kind: str, subject: str) -> None:
        """A subject no longer shows the problem (the watch came back, the link went)."""
        archives = [archives] if isinstance(archives, str) else list(archives)
        with self._lock:
            changed = False
            for archive in archives:
                subjects = self._subjects.get((archive, kind))
                if not subjects or subject not in subjects:
                    continue
                subjects.discard(subject)
                changed = True
                section = self._state["problems"][archive]
                if subjects:
                    section[kind]["count"] = len(subjects)
                else:
                    del section[kind]
            if changed:
                self._write()

    def close(self) -> None:
        """Remove the files, unless one is no longer ours (the state directory was
        removed and another agent started there, or something was put in its
        place: read only if it is a regular file of the agent's own)."""
        at, self._dir = self._dir, None
        if at is None:
            return
        try:
            for archive in self._archives:
                name = health_path(self.catalog_path, archive).name
                try:
                    data = state_files.read_own(at, name)
                    if data is not None and json.loads(data).get("pid") == os.getpid():
                        os.unlink(name, dir_fd=at)
                except (OSError, ValueError, AttributeError):
                    pass
        finally:
            os.close(at)


def _read_one(path: Path) -> dict | None:
    """One health file of a running agent, or None. Read without following a
    link or waiting on a FIFO that a writer of the state directory planted;
    only a regular file counts."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            with os.fdopen(os.dup(fd), "rb") as f:
                state = json.loads(f.read(1 << 20))
        finally:
            os.close(fd)
        try:
            os.kill(int(state["pid"]), 0)
        except PermissionError:
            pass  # alive, as another account (the agent's own, asked by a producer)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return state if isinstance(state, dict) else None


def served_archives(database: str | os.PathLike) -> list[str]:
    """The archives that have a health file beside the catalog (running or not)."""
    database = Path(database)
    prefix = f"{database.name}-watcher-"
    try:
        names = os.listdir(database.parent)
    except OSError:
        return []
    return sorted(n[len(prefix):-len(".json")] for n in names
                  if n.startswith(prefix) and n.endswith(".json") and len(n) > len(prefix) + 5)


def read_health(database: str | os.PathLike, archives: Iterable[str] | None = None) -> dict | None:
    """What the running agents on a catalog say, merged (one per archive at
    most): ``pids`` of the agents, each archive's state and problems, the
    catalog's state (locked if any agent finds it locked). None when no agent
    of these archives (default: any) is running."""
    names = served_archives(database) if archives is None else archives
    states = [s for s in (_read_one(health_path(database, a)) for a in names
                          # a file left by a killed agent whose pid is reused: nobody holds the lock
                          if state_files.locked(state_files.lock_path(database, a)) is not False)
              if s is not None]
    if not states:
        return None
    merged: dict = {"pid": states[0].get("pid"), "pids": sorted({s.get("pid") for s in states}),
                    "started": min(s.get("started") or 0 for s in states),
                    "archives": {}, "problems": {}, "database": {"locked": False}}
    for s in states:
        for section in ("archives", "problems"):
            if isinstance(s.get(section), dict):
                merged[section].update(s[section])
        db = s.get("database")
        worse = isinstance(db, dict) and (db.get("locked") or db.get("last_error"))
        if worse and not merged["database"].get("locked"):
            merged["database"] = db
    return merged


def catalog_error(exc: BaseException) -> str:
    """What went wrong with the catalog, in words: the error a failed commit
    raised, not the "cannot rollback - no transaction is active" that peewee's
    rollback raises over it (SQLite already rolled back)."""
    while "no transaction is active" in str(exc) and exc.__context__ is not None:
        exc = exc.__context__
    return str(exc)


def with_database_retry(work: Callable[[], T], health: Health | None, stop: threading.Event,
                        sleep: Callable[[float], object] | None = None) -> T:
    """Run catalog work, waiting out a lock held longer than the busy timeout."""
    from watcher.retry import catalog_retrying  # tenacity: not for `watcher status`, which only reads


    def before_sleep(state) -> None:
        # A lock is waited out; so is any other catalog error (a full disk, an
        # I/O error), named for what it is: the agent must outlive both.
        error = catalog_error(state.outcome.exception())
        locked = "locked" in error or "busy" in error
        log.warning("catalog %s (%s); retrying in %.0f s", "busy" if locked else "unavailable",
                    error, state.upcoming_sleep)
        if health:
            health.database(locked, error)

    result = catalog_retrying(stop, before_sleep, sleep)(work)
    if health:
        health.database(False)
    return result
