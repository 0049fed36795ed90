"""The events clock: scenarios i91-i95, and its stored form."""

from __future__ import annotations

import json
from datetime import timedelta

from daemon.core.clock import EventsClock
from tests.support.engine_harness import T


def test_i91_clock_never_updated() -> None:
    clock = EventsClock()
    assert clock.clock is None
    assert clock.offset() == timedelta(0)
    assert clock.as_of(T) == T


def test_i92_accurate_offset() -> None:
    clock = EventsClock()
    clock.update(T - timedelta(seconds=42), now=T)
    assert clock.offset().total_seconds() == -42.0


def test_i93_clock_only_moves_forward() -> None:
    clock = EventsClock()
    clock.update(T - timedelta(seconds=100), now=T)
    second = T - timedelta(seconds=90)
    clock.update(second, now=T)
    assert clock.clock == second
    clock.update(second - timedelta(seconds=5), now=T)
    assert clock.clock == second


def test_i94_clock_never_in_the_future() -> None:
    clock = EventsClock()
    clock.update(T - timedelta(seconds=100), now=T)
    first = clock.clock
    clock.update(T + timedelta(seconds=100), now=T)
    assert first is not None
    assert clock.clock is not None
    assert first < clock.clock <= T


def test_i95_offset_does_not_drift_while_idle() -> None:
    clock = EventsClock()
    clock.update(T - timedelta(seconds=42), now=T)
    assert clock.clock == T - timedelta(seconds=42)
    # ten seconds of wall time pass without an event: nothing changes
    assert clock.offset().total_seconds() == -42.0
    assert clock.as_of(T + timedelta(seconds=10)) == T - timedelta(seconds=32)


def test_late_old_event_makes_the_offset_more_negative() -> None:
    clock = EventsClock()
    clock.update(T - timedelta(seconds=10), now=T)
    clock.update(T - timedelta(seconds=60), now=T + timedelta(seconds=5))
    assert clock.clock == T - timedelta(seconds=10)
    assert clock.offset() == timedelta(seconds=-15)


def test_stored_form_round_trips_and_tolerates_garbage() -> None:
    clock = EventsClock()
    clock.update(T - timedelta(seconds=3), now=T)
    assert EventsClock.from_json(clock.to_json()) == clock
    assert EventsClock.from_json(EventsClock().to_json()) == EventsClock()
    for bad in (None, "", "{", "[]", '{"clock_us": "x", "updated_us": 1}'):
        assert EventsClock.from_json(bad) == EventsClock()


def test_stored_form_is_what_json_dumps_writes() -> None:
    for clock_us, updated_us in ((None, None), (0, 1), (-5, 10**17), (None, 7)):
        clock = EventsClock(clock_us, updated_us)
        expected = json.dumps({"clock_us": clock_us, "updated_us": updated_us})
        assert clock.to_json() == expected
