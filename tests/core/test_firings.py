"""Firing and TriggeredAction: docs/TRIGGERS.md#firings and the JSON of
docs/DELIVERY.md#the-triggeredaction-document."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from daemon.core.automations import Automation, CompoundTrigger, DoNothing, EventTrigger
from daemon.core.events import ReceivedEvent
from daemon.core.firings import Firing, TriggeredAction, TriggerState, count_firings

T = datetime(2026, 8, 21, 16, 27, 33, 123456, tzinfo=UTC)

AUTOMATION = Automation.model_validate(
    {
        "name": "flow failures",
        "trigger": {
            "type": "event",
            "match": {"prefect.resource.id": "prefect.flow-run.*"},
            "expect": ["prefect.flow-run.Failed"],
            "for_each": ["prefect.resource.id"],
            "posture": "Reactive",
            "threshold": 1,
            "within": 10,
        },
        "actions": [{"type": "do-nothing"}],
        "created": "2026-01-01T00:00:00Z",
        "updated": "2026-01-02T00:00:00Z",
    }
)

COMPOSITE = Automation.model_validate(
    {
        "name": "both",
        "trigger": {
            "type": "compound",
            "require": "all",
            "within": 60,
            "triggers": [
                {"posture": "Reactive", "expect": ["a"]},
                {"posture": "Reactive", "expect": ["b"]},
            ],
        },
        "actions": [{"type": "do-nothing"}],
    }
)


def received(name: str = "prefect.flow-run.Failed") -> ReceivedEvent:
    return ReceivedEvent.model_validate(
        {
            "occurred": T,
            "event": name,
            "resource": {"prefect.resource.id": "prefect.flow-run.abc"},
            "id": uuid4(),
            "received": T,
        }
    )


def firing(**fields: Any) -> Firing:
    defaults: dict[str, Any] = {
        "trigger": AUTOMATION.trigger,
        "trigger_states": {TriggerState.Triggered},
        "triggered": T,
        "triggering_labels": {"prefect.resource.id": "prefect.flow-run.abc"},
        "triggering_event": received(),
    }
    return Firing.model_validate(defaults | fields)


def test_firing_needs_a_trigger_state() -> None:
    with pytest.raises(ValidationError, match="At least one trigger state must be provided"):
        firing(trigger_states=set())


def test_firing_defaults() -> None:
    bare = Firing(trigger=AUTOMATION.trigger, trigger_states={TriggerState.Triggered}, triggered=T)
    assert bare.id.version == 7
    assert bare.triggering_labels == {}
    assert bare.triggering_firings == []
    assert bare.triggering_event is None
    assert bare.triggering_value is None
    assert bare.trigger is AUTOMATION.trigger  # built models are not copied


def test_trigger_states_serialize_triggered_first() -> None:
    both = firing(trigger_states={"Resolved", "Triggered"})
    assert json.loads(both.model_dump_json())["trigger_states"] == ["Triggered", "Resolved"]
    assert firing(trigger_states=["Resolved"]).trigger_states == {TriggerState.Resolved}


def test_firing_json_shape_and_round_trip() -> None:
    one = firing()
    dumped = json.loads(one.model_dump_json())
    assert list(dumped) == [
        "id", "trigger", "trigger_states", "triggered", "triggering_labels",
        "triggering_firings", "triggering_event", "triggering_value",
    ]  # fmt: skip
    assert dumped["trigger"]["id"] == str(AUTOMATION.trigger.id)
    assert dumped["triggered"] == "2026-08-21T16:27:33.123456Z"
    assert dumped["trigger_states"] == ["Triggered"]
    assert dumped["triggering_event"]["received"] == "2026-08-21T16:27:33.123456Z"
    again = Firing.model_validate_json(one.model_dump_json())
    assert again == one
    assert isinstance(again.trigger, EventTrigger)
    assert again.trigger.fingerprint() == AUTOMATION.trigger.fingerprint()


def test_composite_firing_nests_children() -> None:
    assert isinstance(COMPOSITE.trigger, CompoundTrigger)
    first, second = COMPOSITE.trigger.triggers
    a = firing(trigger=first, triggering_event=received("a"), triggering_labels={})
    b = firing(trigger=second, triggering_event=received("b"), triggering_labels={})
    parent = Firing(
        trigger=COMPOSITE.trigger,
        trigger_states={TriggerState.Triggered},
        triggered=T,
        triggering_firings=[a, b],
        triggering_event=b.triggering_event,
    )
    assert parent.all_firings() == [parent, a, b]
    assert [e.event for e in parent.all_events()] == ["b", "a", "b"]
    again = Firing.model_validate_json(parent.model_dump_json())
    assert again == parent
    assert isinstance(again.trigger, CompoundTrigger)
    assert [f.trigger.id for f in again.triggering_firings] == [first.id, second.id]


def test_triggered_action_json_matches_semantics_2_4() -> None:
    one = firing()
    automation_event_id = uuid4()
    action = TriggeredAction(
        automation=AUTOMATION,
        firing=one,
        triggered=one.triggered,
        triggering_labels=one.triggering_labels,
        triggering_event=one.triggering_event,
        action=DoNothing(),
        automation_triggered_event_id=automation_event_id,
    )
    dumped = json.loads(action.model_dump_json())
    assert list(dumped) == [
        "automation", "id", "firing", "triggered", "triggering_labels", "triggering_event",
        "action", "action_index", "automation_triggered_event_id",
    ]  # fmt: skip
    assert dumped["automation"] == {
        "name": "flow failures",
        "description": "",
        "enabled": True,
        "tags": [],
        "trigger": {
            "type": "event",
            "id": str(AUTOMATION.trigger.id),
            "match": {"prefect.resource.id": "prefect.flow-run.*"},
            "match_related": {},
            "after": [],
            "expect": ["prefect.flow-run.Failed"],
            "for_each": ["prefect.resource.id"],
            "posture": "Reactive",
            "threshold": 1,
            "within": 10.0,
        },
        "actions": [{"type": "do-nothing"}],
        "actions_on_trigger": [],
        "actions_on_resolve": [],
        "id": str(AUTOMATION.id),
        "created": "2026-01-01T00:00:00Z",
        "updated": "2026-01-02T00:00:00Z",
    }
    assert UUID(dumped["id"]).version == 7
    assert dumped["firing"]["trigger"] == dumped["automation"]["trigger"]
    assert dumped["triggered"] == "2026-08-21T16:27:33.123456Z"
    assert dumped["triggering_labels"] == {"prefect.resource.id": "prefect.flow-run.abc"}
    assert dumped["triggering_event"] == json.loads(one.triggering_event.model_dump_json())  # type: ignore[union-attr]
    assert dumped["action"] == {"type": "do-nothing"}
    assert dumped["action_index"] == 0
    assert dumped["automation_triggered_event_id"] == str(automation_event_id)
    assert TriggeredAction.model_validate_json(action.model_dump_json()) == action
    assert action.all_firings() == [one]
    assert action.idempotency_key() == (
        f"automation {AUTOMATION.id}, action 0, invocation {action.id}"
    )


def test_triggered_action_requires_the_triggering_event_key() -> None:
    with pytest.raises(ValidationError) as exc:
        TriggeredAction.model_validate(
            {
                "automation": AUTOMATION,
                "triggered": T,
                "triggering_labels": {},
                "action": {"type": "do-nothing"},
            }
        )
    assert [e["loc"] for e in exc.value.errors()] == [("triggering_event",)]
    ok = TriggeredAction.model_validate(
        {
            "automation": AUTOMATION,
            "triggered": T,
            "triggering_labels": {},
            "triggering_event": None,
            "action": {"type": "call-webhook", "url": "http://h/"},
            "action_index": 2,
        }
    )
    assert ok.firing is None
    assert ok.all_events() == []
    assert json.loads(ok.model_dump_json())["action"]["method"] == "POST"


@settings(deadline=None)  # timing varies under a loaded CI machine
@given(
    labels=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    states=st.sets(st.sampled_from(list(TriggerState)), min_size=1),
    triggered=st.datetimes(timezones=st.just(UTC)),
    value=st.none() | st.integers() | st.text(max_size=5),
)
def test_firing_round_trip(
    labels: dict[str, str], states: set[TriggerState], triggered: datetime, value: Any
) -> None:
    one = firing(
        triggering_labels=labels,
        trigger_states=states,
        triggered=triggered,
        triggering_value=value,
    )
    assert Firing.model_validate_json(one.model_dump_json()) == one


def test_firings_are_counted_by_automation_name_from_the_triggered_events() -> None:
    def own(event: str, **resource: str) -> ReceivedEvent:
        return ReceivedEvent.model_validate(
            {
                "id": str(uuid4()),
                "occurred": "2026-12-04T12:00:00Z",
                "received": "2026-12-04T12:00:00Z",
                "event": event,
                "resource": {"prefect.resource.id": f"prefect.automation.{uuid4()}", **resource},
            }
        )

    counts = {"pumps": 1}
    nameless = own("prefect.automation.triggered")
    count_firings(
        counts,
        [
            own("prefect.automation.triggered", **{"prefect.resource.name": "pumps"}),
            own("prefect.automation.resolved", **{"prefect.resource.name": "pumps"}),
            own("prefect.automation.triggered", **{"prefect.resource.name": "valves"}),
            nameless,
        ],
    )
    assert counts == {"pumps": 2, "valves": 1, nameless.resource.id: 1}
