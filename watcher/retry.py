"""The one retry policy: what is waited out, how long between tries, when to stop.

Every worker that waits out trouble (a transfer worker's lost connection
or archive in trouble, a batch of which nothing arrived, a busy catalog)
builds its tenacity.Retrying here, from tenacity's own stops, waits and
predicates, so that every back-off doubles to its cap the same way and a
stop of the agent ends every one at once: the stop event is both a stop
condition and the sleep (``stop.wait``), unless a test injects ``sleep``.
"""

from __future__ import annotations

import copy
import threading
from typing import Callable

from peewee import OperationalError
from tenacity import (RetryCallState, Retrying, retry_base, retry_if_exception_type, retry_if_result,
                      stop_any, stop_when_event_set, wait_exponential)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

# A busy or failing catalog (a lock held past the busy timeout, a full disk):
# 0.5 s, doubling to 15 s, until it answers or the agent stops.
CATALOG_WAIT = wait_exponential(multiplier=0.5, min=0.5, max=15)
MAX_BACKOFF = 60.0  # an archive's longest wait between tries, in seconds


def archive_wait(max_backoff: float = MAX_BACKOFF) -> wait_exponential:
    """An archive in trouble (unreachable, or nothing of a batch arrived):
    1 s, doubling to ``max_backoff``."""
    return wait_exponential(multiplier=1, min=1, max=max_backoff)


class wait_over_streak(wait_base):
    """``wait`` counted over a run of failures that outlives one retried call
    (``streak()`` failures in a row so far), not over the call's own attempts:
    an archive of which nothing arrives stays in trouble from batch to batch,
    a file charged alone in between, until a file arrives."""

    def __init__(self, wait: wait_base, streak: Callable[[], int]):
        self.wait = wait
        self.streak = streak

    def __call__(self, retry_state: RetryCallState) -> float:
        counted = copy.copy(retry_state)
        counted.attempt_number = max(1, self.streak())
        return self.wait(counted)


class stop_after_attempt_if(stop_base):
    """Give up after ``attempts`` tries when the last one raised an error that
    ``failed_so(error)`` accepts; other failures go on as before."""

    def __init__(self, attempts: int, failed_so: Callable[[BaseException], bool]):
        self.attempts = attempts
        self.failed_so = failed_so

    def __call__(self, retry_state: RetryCallState) -> bool:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None and outcome.failed else None
        return error is not None and self.failed_so(error) and retry_state.attempt_number >= self.attempts


def _last_result(retry_state: RetryCallState):
    """Given up on a retried result (the agent stops): that result, not a RetryError.
    Given up on an error: that error, as raised."""
    return retry_state.outcome.result()


def policy(stop: threading.Event, *, retry: retry_base, wait: wait_base,
           sleep: Callable[[float], object] | None = None,
           before_sleep: Callable[[RetryCallState], None] | None = None,
           give_up: stop_base | None = None) -> Retrying:
    """A Retrying that waits on ``stop`` and ends once it is set (or ``give_up`` says so)."""
    return Retrying(
        retry=retry,
        wait=wait,
        stop=stop_when_event_set(stop) if give_up is None else stop_any(stop_when_event_set(stop), give_up),
        sleep=stop.wait if sleep is None else sleep,  # (a sleep may be falsy: an empty list that records)
        before_sleep=before_sleep,
        retry_error_callback=_last_result,
    )


def catalog_retrying(stop: threading.Event, before_sleep: Callable[[RetryCallState], None] | None = None,
                     sleep: Callable[[float], object] | None = None) -> Retrying:
    """Catalog work: any catalog error (peewee's OperationalError) is waited out."""
    return policy(stop, retry=retry_if_exception_type(OperationalError), wait=CATALOG_WAIT,
                  sleep=sleep, before_sleep=before_sleep)


def connection_retrying(stop: threading.Event, failure: type[BaseException], *,
                        max_backoff: float = MAX_BACKOFF, give_up: stop_base | None = None,
                        sleep: Callable[[float], object] | None = None,
                        before_sleep: Callable[[RetryCallState], None] | None = None) -> Retrying:
    """One batch moved or checked again after ``failure`` (a lost connection,
    the archive's trouble, a stall): nothing is charged meanwhile."""
    return policy(stop, retry=retry_if_exception_type(failure), wait=archive_wait(max_backoff),
                  give_up=give_up, sleep=sleep, before_sleep=before_sleep)


def result_retrying(stop: threading.Event, failed: Callable[[object], bool], streak: Callable[[], int], *,
                    max_backoff: float = MAX_BACKOFF, sleep: Callable[[float], object] | None = None,
                    before_sleep: Callable[[RetryCallState], None] | None = None) -> Retrying:
    """The next batch tried after a result ``failed`` accepts (nothing of a
    batch arrived): the archive's wait, counted over ``streak``, the
    failures in a row that the caller keeps across calls."""
    return policy(stop, retry=retry_if_result(failed),
                  wait=wait_over_streak(archive_wait(max_backoff), streak),
                  sleep=sleep, before_sleep=before_sleep)
