"""Polling helper used by the whole test suite instead of bare sleeps.

Tests wait for *conditions* (a file arrived, a port is open), never for a
fixed amount of time: that keeps them fast when things are quick and
reliable when the machine is slow.
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0,
               interval: float = 0.05, message: str = "") -> T:
    """Call `predicate` until it returns something truthy and return that.

    Raises AssertionError (so pytest reports it as a test failure) with
    `message` if the deadline passes first.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for "
                f"{message or getattr(predicate, '__name__', 'condition')}")
        time.sleep(interval)
