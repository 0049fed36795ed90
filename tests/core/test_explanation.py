"""The pure judgements of `trigd explain`: settings in words, a bucket at an event time,
a stored event against a trigger, and `--key`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from daemon.core.automations import CompoundTrigger, EventTrigger, SequenceTrigger, parse_trigger
from daemon.core.buckets import Bucket
from daemon.core.events import ReceivedEvent
from daemon.core.explanation import (
    Verdict,
    describe_composite,
    describe_event_trigger,
    judge_bucket,
    judge_event,
    parse_key,
)

T = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def event_trigger(**fields: Any) -> EventTrigger:
    trigger = parse_trigger({"type": "event", "posture": "Reactive", **fields})
    assert isinstance(trigger, EventTrigger)
    return trigger


def received(name: str, resource: dict[str, str], at: datetime = T) -> ReceivedEvent:
    return ReceivedEvent.model_validate(
        {
            "event": name,
            "resource": resource,
            "occurred": at,
            "received": at,
            "id": "0190f000-0000-7000-8000-000000000001",
        }
    )


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (
            {"expect": ["a"], "threshold": 3, "within": 60, "for_each": ["prefect.resource.id"]},
            "fires when 3 or more a arrive within 1m, per prefect.resource.id",
        ),
        ({"expect": ["a", "b"], "threshold": 1, "within": 0}, "fires on every a or b"),
        (
            {"threshold": 2, "within": 0},
            "fires when 2 or more events of any name have arrived (no time limit)",
        ),
        (
            {"expect": ["beat"], "posture": "Proactive", "threshold": 1, "within": 30},
            "fires when fewer than 1 beat arrive within 30s",
        ),
        (
            {"expect": ["a"], "after": ["go"], "match": {"site": "n*"}, "within": 10},
            "fires when 1 or more a arrive within 10s, counting from each go; "
            'only events with match {"site": "n*"}',
        ),
    ],
)
def test_settings_in_words(fields: dict[str, Any], words: str) -> None:
    assert describe_event_trigger(event_trigger(**fields)) == words


def test_composites_in_words() -> None:
    child = {"type": "event", "posture": "Reactive", "expect": ["a"]}
    compound = parse_trigger(
        {"type": "compound", "require": 2, "within": 300, "triggers": [child] * 3}
    )
    sequence = parse_trigger({"type": "sequence", "within": None, "triggers": [child] * 2})
    assert isinstance(compound, CompoundTrigger)
    assert isinstance(sequence, SequenceTrigger)
    assert describe_composite(compound) == "fires when 2 of its 3 triggers have fired within 5m"
    assert describe_composite(sequence) == "fires when its 2 triggers fire in the order written"


def test_a_bucket_judged_at_event_time() -> None:
    reactive = event_trigger(expect=["a"], threshold=3, within=60)
    bucket = Bucket((), T, T + timedelta(seconds=60), 1)
    assert judge_bucket(reactive, bucket, T - timedelta(seconds=1)).state == "future"
    view = judge_bucket(reactive, bucket, T + timedelta(seconds=10))
    assert (view.state, view.can_fire) == ("open", False)
    assert view.why.startswith("1 of 3 counted: 2 more matching events before")
    assert judge_bucket(reactive, bucket, T + timedelta(seconds=60)).state == "ended"
    proactive = event_trigger(expect=["a"], posture="Proactive", threshold=2, within=60)
    assert judge_bucket(proactive, bucket, T).can_fire is True
    full = Bucket((), T, T + timedelta(seconds=60), 2)
    assert judge_bucket(proactive, full, T).can_fire is False


def test_events_matched_and_near_misses() -> None:
    trigger = event_trigger(expect=["a"], match={"site": "north"}, within=60)
    north, south = {"prefect.resource.id": "p", "site": "north"}, {"prefect.resource.id": "p"}
    verdicts = [
        judged.verdict if (judged := judge_event(trigger, received(name, where), {})) else None
        for name, where in [("a", north), ("a", south), ("b", north), ("b", south)]
    ]
    assert verdicts == [Verdict.matched, Verdict.near_miss, Verdict.near_miss, None]
    key: tuple[str, ...] = ()
    late = {key: Bucket(key, T, T + timedelta(seconds=60), 1)}
    judged = judge_event(trigger, received("a", north, T - timedelta(seconds=1)), late)
    assert judged is not None
    assert judged.why.startswith("arrived after its window")
    unfiltered = event_trigger(expect=["a"], within=60)
    assert judge_event(unfiltered, received("b", north), {}) is None  # not a near miss of all


def test_parse_key() -> None:
    assert parse_key("pump-7") == ("pump-7",)
    assert parse_key('["north", "pump-7"]') == ("north", "pump-7")
    with pytest.raises(ValueError, match="--key: '\\[1\\]' is not a JSON array of strings"):
        parse_key("[1]")
