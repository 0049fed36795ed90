"""`explain`: the document that says why an automation did or did not fire, built from a
real database that the real engine wrote (tests/support/engine_harness.py), at fixed
clocks."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import uuid4

import pytest

from daemon.core.automations import Automation
from daemon.engine.explain import Limits, UnknownAutomation, explain
from tests.support.engine_harness import HarnessMaker, T, automation, event, trigger

PUMP_7 = {"prefect.resource.id": "pump-7", "site": "north"}
PUMP_9 = {"prefect.resource.id": "pump-9", "site": "south"}

PRESSURE = automation(
    "pressure",
    trigger(
        expect=["pump.pressure.high"],
        match={"site": "north"},
        for_each=["prefect.resource.id"],
        threshold=3,
        within=60,
    ),
)
AFTER_START = automation(
    "after start",
    trigger(
        after=["pump.started"],
        expect=["pump.pressure.high"],
        for_each=["prefect.resource.id"],
        threshold=1,
        within=60,
    ),
)
HALF_DONE = Automation.model_validate(
    {
        "name": "half done",
        "trigger": {
            "type": "compound",
            "require": "all",
            "within": 300,
            "triggers": [
                trigger(expect=["door.opened"], threshold=1, within=0),
                trigger(expect=["alarm.armed"], threshold=1, within=0),
            ],
        },
        "actions": [{"type": "do-nothing"}],
    }
)
SILENCE = automation(
    "silence",
    trigger(
        expect=["pump.heartbeat"],
        for_each=["prefect.resource.id"],
        posture="Proactive",
        threshold=1,
        within=30,
    ),
)


def high(at: timedelta, resource: dict[str, str] = PUMP_7, name: str = "pump.pressure.high") -> Any:
    return event(name, T + at, resource)


def test_a_bucket_below_threshold_says_how_many_more_and_until_when(harness: HarnessMaker) -> None:
    h = harness([PRESSURE])
    h.batch([high(timedelta(seconds=1)), high(timedelta(seconds=2))])
    doc = explain(h.conn, "pressure", T + timedelta(seconds=3))
    node = doc["trigger"]
    assert node["settings"] == (
        "fires when 3 or more pump.pressure.high arrive within 1m, per prefect.resource.id; "
        'only events with match {"site": "north"}'
    )
    assert node["can_fire"] is True  # one more fires it
    [bucket] = node["buckets"]
    assert bucket["key"] == ["pump-7"]
    assert bucket["labels"] == {"prefect.resource.id": "pump-7"}
    assert (bucket["count"], bucket["threshold"], bucket["state"]) == (2, 3, "open")
    assert bucket["end"] == "2026-08-21T16:01:01Z"
    assert bucket["why"] == (
        "2 of 3 counted: 1 more matching event before 2026-08-21T16:01:01Z fires it"
    )
    assert bucket["last_event"]["event"] == "pump.pressure.high"
    assert [m["why"] for m in node["matched"]] == ["an expected event"] * 2
    assert doc["firings"] == []


def test_an_after_never_seen(harness: HarnessMaker) -> None:
    h = harness([AFTER_START])
    h.batch([high(timedelta(seconds=1))])
    doc = explain(h.conn, str(AFTER_START.id), T + timedelta(seconds=2))
    node = doc["trigger"]
    assert node["can_fire"] is False
    assert node["buckets"] == []
    assert node["why"] == [
        "no `after` event (pump.started) seen yet: counting starts only after one"
    ]
    assert node["settings"].endswith("counting from each pump.started, per prefect.resource.id")
    # once seen, the bucket says so
    h.batch([high(timedelta(seconds=3), name="pump.started")])
    node = explain(h.conn, "after start", T + timedelta(seconds=4))["trigger"]
    [bucket] = node["buckets"]
    assert bucket["after_seen"] is True
    assert node["can_fire"] is True


def test_an_expired_window(harness: HarnessMaker) -> None:
    h = harness([PRESSURE])
    h.batch([high(timedelta(seconds=1))])
    later = T + timedelta(minutes=5)
    node = explain(h.conn, "pressure", later)["trigger"]
    [bucket] = node["buckets"]
    assert bucket["state"] == "ended"
    assert node["can_fire"] is False
    assert bucket["why"] == (
        "its window ended at 2026-08-21T16:01:01Z with 1 of 3; "
        "the next matching event starts a new window"
    )


def test_near_misses_name_resource_and_late(harness: HarnessMaker) -> None:
    h = harness([PRESSURE])
    h.batch(
        [
            high(timedelta(seconds=10)),
            high(timedelta(seconds=11), resource=PUMP_9),  # the wrong site
            high(timedelta(seconds=12), name="pump.pressure.low"),  # the wrong name
            high(timedelta(minutes=-30)),  # occurred before the open window began
        ]
    )
    node = explain(h.conn, "pressure", T + timedelta(seconds=20))["trigger"]
    start = node["buckets"][0]["start"]  # the first event's time less the lookback
    misses = {m["event"] + " " + m["resource"]: m["why"] for m in node["near_misses"]}
    assert misses == {
        "pump.pressure.high pump-9": "its name is expected but its resource did not match",
        "pump.pressure.low pump-7": "its resource matched but its name is not pump.pressure.high",
        "pump.pressure.high pump-7": (
            "arrived after its window: it occurred at 2026-08-21T15:30:00Z, before the window "
            f"open for its key began ({start}), so it was not counted"
        ),
    }
    assert len(node["matched"]) == 1
    assert node["buckets"][0]["count"] == 1


def test_a_composite_half_done(harness: HarnessMaker) -> None:
    h = harness([HALF_DONE])
    h.batch([event("door.opened", T + timedelta(seconds=1), "door-1")])
    doc = explain(h.conn, "half done", T + timedelta(seconds=2))
    node = doc["trigger"]
    assert node["settings"] == "fires when 2 of its 2 triggers have fired within 5m"
    assert [f["path"] for f in node["fired_children"]] == ["trigger.triggers[0]"]
    assert node["fired_children"][0]["triggering_event"]["event"] == "door.opened"
    assert node["why"] == [
        "1 of 2 child firings needed are stored",
        "not fired yet: trigger.triggers[1]",
    ]
    assert node["can_fire"] is True  # the one child left fires on its next event
    assert [c["settings"] for c in node["children"]] == [
        "fires on every door.opened",
        "fires on every alarm.armed",
    ]
    assert node["children"][1]["why"] == ["every matching event fires it"]
    assert doc["firings"] == []


def test_last_firings_with_their_triggering_events(harness: HarnessMaker) -> None:
    h = harness([PRESSURE])
    events = [high(timedelta(seconds=s)) for s in (1, 2, 3)]
    h.batch(events)
    doc = explain(h.conn, "pressure", T + timedelta(seconds=4))
    [firing] = doc["firings"]
    assert firing["labels"] == {"prefect.resource.id": "pump-7"}
    assert firing["triggering_event"]["id"] == str(events[2].id)
    [bucket] = doc["trigger"]["buckets"]  # the next window, after the one that fired
    assert (bucket["count"], bucket["state"]) == (0, "future")
    h.batch([])  # the firing's events leave the inbox for the events table
    assert explain(h.conn, "pressure", T + timedelta(seconds=4))["firings"] == [firing]


def test_key_restricts_to_one_bucket(harness: HarnessMaker) -> None:
    h = harness([PRESSURE])
    other = {"prefect.resource.id": "pump-8", "site": "north"}
    h.batch([high(timedelta(seconds=1)), high(timedelta(seconds=2), resource=other)])
    node = explain(h.conn, "pressure", T + timedelta(seconds=3), key=("pump-8",))["trigger"]
    assert [b["key"] for b in node["buckets"]] == [["pump-8"]]
    assert [m["resource"] for m in node["matched"]] == ["pump-8"]


def test_a_parked_follower_is_shown_with_the_event_it_waits_for(harness: HarnessMaker) -> None:
    h = harness([PRESSURE])
    leader = uuid4()
    follower = event("pump.pressure.high", T + timedelta(seconds=1), PUMP_7, follows=leader)
    h.batch([follower])
    node = explain(h.conn, "pressure", T + timedelta(seconds=2))["trigger"]
    assert [(p["id"], p["waits_for"]) for p in node["parked"]] == [(str(follower.id), str(leader))]
    assert "held by causal ordering" in node["why"][-1]


def test_proactive_words_and_a_window_that_will_fire(harness: HarnessMaker) -> None:
    h = harness([SILENCE])
    h.batch([high(timedelta(seconds=1), name="pump.heartbeat")])
    h.batch([high(timedelta(seconds=2), name="pump.heartbeat")])
    node = explain(h.conn, "silence", T + timedelta(seconds=3))["trigger"]
    assert node["settings"] == (
        "fires when fewer than 1 pump.heartbeat arrive within 30s, per prefect.resource.id"
    )
    assert node["posture"] == "Proactive"


def test_limits_bound_the_lists(harness: HarnessMaker) -> None:
    h = harness([PRESSURE])
    h.batch([high(timedelta(seconds=1), resource=PUMP_9) for _ in range(5)])
    node = explain(h.conn, "pressure", T, limits=Limits(recent_events=3, listed=2))["trigger"]
    assert len(node["near_misses"]) == 2


def test_an_unknown_automation_is_named(harness: HarnessMaker) -> None:
    h = harness([PRESSURE])
    with pytest.raises(UnknownAutomation, match="'nope'"):
        explain(h.conn, "nope", T)


def test_a_stored_definition_that_does_not_parse_is_named(harness: HarnessMaker) -> None:
    h = harness([PRESSURE])
    with h.conn:
        h.conn.execute('UPDATE automations SET definition = \'{"trigger": {"type": 1}}\'')
    with pytest.raises(UnknownAutomation, match="'pressure': its stored definition does not parse"):
        explain(h.conn, "pressure", T)
