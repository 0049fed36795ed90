"""The pure bucket arithmetic (docs/TRIGGERS.md#bucket-lifecycle, #worked-edge-cases), including a
hypothesis property."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.core.automations import EventTrigger
from daemon.core.buckets import Bucket, EventRef, ensure, evaluate
from tests.support.engine_harness import T, event

LOOKBACK = timedelta(minutes=15)


def _trigger(**fields: Any) -> EventTrigger:
    return EventTrigger.model_validate({"posture": "Reactive", "expect": ["e"], **fields})


def _feed(trigger: EventTrigger, offsets_ms: list[int]) -> list[int]:
    """Reactive path for one key without `after`; returns the event indexes that fired."""
    stored: Bucket | None = None
    fired_at: list[int] = []
    for i, offset in enumerate(offsets_ms):
        e = event("e", T + timedelta(milliseconds=offset), "r")
        ref = EventRef.of(e)
        bucket = ensure(stored, (), e.occurred - LOOKBACK, e.occurred + trigger.within, ref)
        result = evaluate(trigger, bucket, e.occurred, e, ref)
        stored = result.stored
        fired_at += [i] * len(result.fires)
    return fired_at


@settings(max_examples=150, deadline=None)
@given(
    threshold=st.integers(min_value=1, max_value=5),
    within_s=st.integers(min_value=0, max_value=30),
    offsets=st.lists(st.integers(min_value=0, max_value=120_000), max_size=40),
)
def test_reactive_never_fires_more_often_than_the_events_allow(
    threshold: int, within_s: int, offsets: list[int]
) -> None:
    trigger = _trigger(threshold=threshold, within=within_s)
    fired_at = _feed(trigger, offsets)  # any arrival order
    assert len(fired_at) * threshold <= len(offsets)
    assert len(set(fired_at)) == len(fired_at)  # one event fires at most once


@settings(max_examples=150, deadline=None)
@given(
    threshold=st.integers(min_value=1, max_value=5),
    within_s=st.integers(min_value=1, max_value=30),
    offsets=st.lists(st.integers(min_value=0, max_value=60_000), min_size=1, max_size=30),
)
def test_reactive_fires_when_threshold_events_fall_in_the_first_window(
    threshold: int, within_s: int, offsets: list[int]
) -> None:
    offsets = sorted(offsets)
    trigger = _trigger(threshold=threshold, within=within_s)
    fired_at = _feed(trigger, offsets)
    if len(offsets) >= threshold and offsets[threshold - 1] - offsets[0] < within_s * 1000:
        assert fired_at[:1] == [threshold - 1]
    elif len(offsets) < threshold:
        assert fired_at == []


def test_within_zero_leaves_the_row_for_the_sweep() -> None:
    trigger = _trigger(threshold=2, within=0)
    e = event("e", T, "r")
    bucket = ensure(None, (), T - LOOKBACK, T, EventRef.of(e))
    result = evaluate(trigger, bucket, T, e)
    assert result.fires == []
    assert result.returned is None
    assert result.stored is not None
    assert result.stored.count == 1


def test_late_event_is_ignored_entirely() -> None:
    trigger = _trigger(threshold=1, within=10)
    bucket = Bucket((), T, T + timedelta(seconds=10), 0)
    result = evaluate(trigger, bucket, T - timedelta(seconds=1), event("e", T, "r"))
    assert result.stored is bucket
    assert result.fires == []


def test_proactive_late_event_fires_from_the_reactive_path() -> None:
    trigger = EventTrigger.model_validate(
        {"posture": "Proactive", "expect": ["e"], "threshold": 1, "within": 10}
    )
    bucket = Bucket((), T, T + timedelta(seconds=10), 0)
    late = event("e", T + timedelta(seconds=11), "r")
    result = evaluate(trigger, bucket, late.occurred, late)
    [fire] = result.fires
    assert fire.triggering_event == late
    assert fire.event_time == late.occurred


def test_proactive_repeat_arming_event_restarts_the_window() -> None:
    trigger = EventTrigger.model_validate(
        {"posture": "Proactive", "after": ["e"], "expect": ["e"], "threshold": 1, "within": 10}
    )
    first = event("e", T, "r")
    bucket = ensure(None, (), T, T + timedelta(seconds=10), EventRef.of(first), -1)
    armed = evaluate(trigger, bucket, T, first).stored
    assert armed is not None
    assert (armed.start, armed.count) == (T, 0)
    again = event("e", T + timedelta(seconds=4), "r")
    bucket = ensure(armed, (), again.occurred, again.occurred + trigger.within, EventRef.of(again))
    result = evaluate(trigger, bucket, again.occurred, again)
    assert result.fires == []
    assert result.stored is not None
    assert (result.stored.start, result.stored.count) == (again.occurred, 0)
    assert result.stored.last_event is not None
    assert result.stored.last_event.model() == again


def test_proactive_fire_without_events_counts_at_as_of() -> None:
    trigger = EventTrigger.model_validate(
        {"posture": "Proactive", "expect": ["e"], "threshold": 1, "within": 10}
    )
    bucket = Bucket((), T, T + timedelta(seconds=10), 0)
    as_of = T + timedelta(seconds=12)
    result = evaluate(trigger, bucket, as_of, None)
    [fire] = result.fires
    assert (fire.triggering_event, fire.event_time) == (None, as_of)
    assert result.stored is not None
    assert result.stored.start == as_of  # max(end, now)
