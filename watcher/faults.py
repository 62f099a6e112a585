"""Named fault points for the fault-injection tests, inert in production.

A test makes points misbehave through the environment, in the spirit of
FoundationDB's buggify and TiKV's fail-rs, to see the agent survive:

    WATCHER_FAULTS="copied=1*fail;hashed=delay(0.5);deleting=block"

Entries are separated by ``;``, each ``POINT=[COUNT*]ACTION``:

- ``block``: stop there for good, so a test can SIGKILL the agent at
  exactly that instant;
- ``fail``: raise what a real failure at that point raises (the call site
  says what; an OSError EIO unless it does);
- ``delay(SECONDS)``: sleep, then go on (a window for a race to happen in);
- ``COUNT*`` before it: only the first COUNT times, then the point is inert.

With WATCHER_FAULTS_FILE=<path>, each fault appends ``POINT ACTION`` there
as it fires (before blocking), so a test knows it fired and when.

The environment is read once, at import. A mistake (an unknown point or
action) leaves every point inert and makes the agent refuse to start with
one line and status 2 (environment_problem), since a test that asked for a
fault must not pass without it; importing watcher elsewhere is not stopped.
A checkpoint is one dict lookup; a name that is not a point raises
UnknownFaultPoint.
"""

from __future__ import annotations

import errno
import os
import re
import threading
import time
from typing import Callable

POINTS = {
    "hashed": "the registrar hashed a group of a batch's files (GROUP_BYTES), not yet written to the catalog",
    "copied": "rsync copied a batch, its far md5 not yet read",
    "verified": "a batch's far md5 read, not yet recorded in the catalog",
    "deleting": "retention claimed a file's removal in the catalog, not yet unlinked",
    "finalizing": "a finalization file written, not yet registered",
}

FAULTS_ENV = "WATCHER_FAULTS"
FILE_ENV = "WATCHER_FAULTS_FILE"
GONE_ENV = ("WATCHER_PAUSE_AT", "WATCHER_PAUSE_FILE")  # read before WATCHER_FAULTS; now refused

_ENTRY = re.compile(r"(?:(?P<count>\d+)\*)?(?P<action>block|fail|delay\((?P<seconds>[0-9.]+)\))")


class FaultSpecError(ValueError):
    """A fault specification that cannot be honoured: one line."""


class UnknownFaultPoint(LookupError):
    """checkpoint() called with a name that is not in POINTS."""


def _unknown(name: str) -> str:
    return f"unknown fault point {name!r} (known: {', '.join(POINTS)})"


class Fault:
    """One armed point: its action, and how many more times it fires (None: always)."""

    def __init__(self, text: str, action: str, seconds: float, count: int | None, record: str | None):
        self.text, self.action, self.seconds, self.left, self.record = text, action, seconds, count, record
        self._lock = threading.Lock()

    def fire(self, point: str, failure: Callable[[str], BaseException] | None) -> None:
        with self._lock:
            if self.left == 0:
                return
            if self.left is not None:
                self.left -= 1
        if self.record:
            fd = os.open(self.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, f"{point} {self.text}\n".encode())
            finally:
                os.close(fd)
        if self.action == "delay":
            time.sleep(self.seconds)
        elif self.action == "fail":
            message = f"fault injected at {point}"
            raise failure(message) if failure else OSError(errno.EIO, message)
        else:
            while True:  # blocked until killed
                time.sleep(3600)


def parse(spec: str, record: str | None = None) -> dict[str, Fault]:
    """``{point: Fault}`` for a WATCHER_FAULTS value; FaultSpecError names the first mistake."""
    faults: dict[str, Fault] = {}
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        point, sep, action = (part.strip() for part in entry.partition("="))
        if point not in POINTS:
            raise FaultSpecError(f"{FAULTS_ENV}: {_unknown(point)}")
        if point in faults:
            raise FaultSpecError(f"{FAULTS_ENV}: fault point {point!r} given twice")
        m = _ENTRY.fullmatch(action)
        seconds = float(m["seconds"]) if m and m["seconds"] else 0.0
        if not sep or not m or (m["count"] is not None and int(m["count"]) == 0) or seconds > 3600:
            raise FaultSpecError(f"{FAULTS_ENV}: {entry!r}: expected {point}=[COUNT*]ACTION, ACTION "
                                 "one of block, fail, delay(SECONDS) (COUNT at least 1, SECONDS at "
                                 "most 3600)")
        count = int(m["count"]) if m["count"] else None
        faults[point] = Fault(action, m["action"].split("(")[0], seconds, count, record)
    return faults


def from_environment(env) -> dict[str, Fault | None]:
    """Every point, armed or None, as the environment asks."""
    for name in GONE_ENV:
        if name in env:
            raise FaultSpecError(f"{name} is no longer read: set {FAULTS_ENV}='POINT=block' "
                                 f"and {FILE_ENV} instead")
    armed: dict[str, Fault | None] = dict.fromkeys(POINTS)
    armed.update(parse(env.get(FAULTS_ENV, ""), env.get(FILE_ENV) or None))
    return armed


def checkpoint(name: str, failure: Callable[[str], BaseException] | None = None) -> None:
    """A fault point; ``failure(message)`` makes what a real failure here raises."""
    try:
        fault = _ARMED[name]
    except KeyError:
        raise UnknownFaultPoint(_unknown(name)) from None
    if fault is not None:
        fault.fire(name, failure)


def environment_problem() -> str | None:
    """What is wrong with the environment's fault specification, or None.
    The agent refuses to start on it (a test that asked for a fault must
    not pass without it); a program that only imports watcher (a socs
    producer) is not stopped by it: its points stay inert."""
    return _PROBLEM


try:
    _ARMED, _PROBLEM = from_environment(os.environ), None
except FaultSpecError as exc:
    _ARMED, _PROBLEM = dict.fromkeys(POINTS), str(exc)
