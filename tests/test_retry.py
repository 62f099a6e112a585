"""The one retry policy (watcher.retry), on its own: what it retries, how long
it waits, when it stops. Timing-free: the sleep is injected and records the
waits; the stop event is a real one, set from inside the sleep when a test
wants the agent to stop during a back-off."""

from __future__ import annotations

import threading
import time

import pytest
from peewee import OperationalError

from watcher.retry import (catalog_retrying, connection_retrying, result_retrying,
                           stop_after_attempt_if)


class Down(Exception):
    """A failure the policy under test waits out."""


class Broken(Exception):
    """A failure it does not."""


class Waits(list):
    """An injected sleep: records each wait, and sets ``stop`` at the ``stop_at``-th."""

    def __init__(self, stop: threading.Event, stop_at: int | None = None):
        super().__init__()
        self.stop, self.stop_at = stop, stop_at

    def __call__(self, seconds: float) -> None:
        self.append(seconds)
        if len(self) == self.stop_at:
            self.stop.set()


class NothingArrived:
    """A result the policy under test retries."""


def failing(times: int, error: BaseException, then="done"):
    """A callable that raises ``error`` ``times`` times, then returns ``then``; ``calls`` counts."""
    calls = []

    def work():
        calls.append(1)
        if len(calls) <= times:
            raise error
        return then
    work.calls = calls
    return work


def test_a_connection_failure_backs_off_doubling_from_one_second_to_the_cap_then_succeeds():
    stop = threading.Event()
    waits = Waits(stop)
    work = failing(6, Down("unreachable"))
    assert connection_retrying(stop, Down, max_backoff=8, sleep=waits)(work) == "done"
    assert waits == [1, 2, 4, 8, 8, 8]
    assert len(work.calls) == 7


def test_the_catalog_waits_from_half_a_second_doubling_to_fifteen():
    stop = threading.Event()
    waits = Waits(stop)
    work = failing(7, OperationalError("database is locked"))
    assert catalog_retrying(stop, sleep=waits)(work) == "done"
    assert waits == [0.5, 1, 2, 4, 8, 15, 15]


def test_before_sleep_is_told_the_error_and_the_coming_wait():
    stop = threading.Event()
    told = []
    retrying = connection_retrying(stop, Down, sleep=Waits(stop),
                                   before_sleep=lambda s: told.append((str(s.outcome.exception()),
                                                                       s.upcoming_sleep)))
    retrying(failing(2, Down("no route")))
    assert told == [("no route", 1), ("no route", 2)]


def test_an_error_the_policy_does_not_wait_out_is_raised_at_once():
    stop = threading.Event()
    waits = Waits(stop)
    work = failing(1, Broken("a bug"))
    with pytest.raises(Broken, match="a bug"):
        connection_retrying(stop, Down, sleep=waits)(work)
    assert waits == [] and len(work.calls) == 1


def test_setting_the_stop_event_during_a_wait_ends_the_retries_with_the_error_itself():
    """The agent stops while a connection is down: the wait ends (it is the
    event's wait), one more try fails, and that error is raised, not a RetryError."""
    stop = threading.Event()
    waits = Waits(stop, stop_at=3)
    work = failing(100, Down("unreachable"))
    with pytest.raises(Down, match="unreachable"):
        connection_retrying(stop, Down, sleep=waits)(work)
    assert waits == [1, 2, 4]
    assert len(work.calls) == 4


def test_a_stopped_agent_tries_once_and_never_waits():
    stop = threading.Event()
    stop.set()
    waits = Waits(stop)
    catalog_work = failing(100, OperationalError("database is locked"))
    with pytest.raises(OperationalError):
        catalog_retrying(stop, sleep=waits)(catalog_work)
    shipping = failing(100, Down("unreachable"))
    with pytest.raises(Down):
        connection_retrying(stop, Down, sleep=waits)(shipping)
    assert waits == [] and len(catalog_work.calls) == len(shipping.calls) == 1


def test_without_an_injected_sleep_the_wait_is_the_stop_event_s():
    """A stop set from another thread ends a 60 s back-off at once."""
    stop = threading.Event()
    calls = []

    def one_batch():
        calls.append(1)
        return NothingArrived()

    timer = threading.Timer(0.2, stop.set)
    started = time.monotonic()
    timer.start()
    try:
        outcome = result_retrying(stop, lambda r: isinstance(r, NothingArrived), lambda: 10,
                                  max_backoff=60)(one_batch)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 30
    assert isinstance(outcome, NothingArrived) and len(calls) == 2


def test_a_batch_error_is_given_up_after_its_tries_while_other_failures_go_on():
    stop = threading.Event()

    def give_up_on(error: BaseException) -> bool:
        return str(error) == "batch"

    waits = Waits(stop)
    work = failing(100, Down("batch"))
    with pytest.raises(Down, match="batch"):
        connection_retrying(stop, Down, give_up=stop_after_attempt_if(3, give_up_on), sleep=waits)(work)
    assert len(work.calls) == 3 and waits == [1, 2]

    waits = Waits(stop)
    work = failing(5, Down("connection"))
    assert connection_retrying(stop, Down, give_up=stop_after_attempt_if(3, give_up_on),
                               sleep=waits)(work) == "done"
    assert len(work.calls) == 6


def test_a_nothing_arrived_result_is_retried_with_the_archive_s_waits_counted_over_the_streak():
    """The streak (failures in a row) outlives one call: a second call in
    the same trouble waits longer, and a file arriving ends it."""
    stop = threading.Event()
    streak = [0]
    outcomes = iter([NothingArrived(), NothingArrived(), True,   # first call: two failures
                     NothingArrived(), True,                     # second call: a third in a row
                     NothingArrived(), True])                    # after a file arrived: from 1 again

    def one_batch():
        outcome = next(outcomes)
        if isinstance(outcome, NothingArrived):
            streak[0] += 1
        return outcome

    waits = Waits(stop)
    retrying = result_retrying(stop, lambda r: isinstance(r, NothingArrived), lambda: streak[0],
                               max_backoff=4, sleep=waits)
    assert retrying(one_batch) is True
    assert waits == [1, 2]
    assert retrying(one_batch) is True
    assert waits == [1, 2, 4]
    streak[0] = 0  # a file arrived
    assert retrying(one_batch) is True
    assert waits == [1, 2, 4, 1]


def test_a_nothing_arrived_result_waits_no_longer_than_the_cap():
    stop = threading.Event()
    streak = [0]

    def one_batch():
        streak[0] += 1
        return NothingArrived() if streak[0] <= 8 else "arrived"

    waits = Waits(stop)
    assert result_retrying(stop, lambda r: isinstance(r, NothingArrived), lambda: streak[0],
                           max_backoff=60, sleep=waits)(one_batch) == "arrived"
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60]


def test_a_stop_during_a_nothing_arrived_wait_returns_the_last_result():
    stop = threading.Event()
    streak = [0]
    calls = []

    def one_batch():
        calls.append(1)
        streak[0] += 1
        return NothingArrived()

    waits = Waits(stop, stop_at=2)
    outcome = result_retrying(stop, lambda r: isinstance(r, NothingArrived), lambda: streak[0],
                              sleep=waits)(one_batch)
    assert isinstance(outcome, NothingArrived)  # not a RetryError: the caller judges it
    assert waits == [1, 2] and len(calls) == 3
