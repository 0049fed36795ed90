"""act(): scenario i96 and docs/DELIVERY.md#from-firing-to-outbox, #action-events,
docs/TRIGGERS.md#automation-state-change-events, observed in the outbox and inbox."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from daemon.core.automations import Automation, CallWebhook, DoNothing
from daemon.core.delivery import action_triggered_event_id
from daemon.core.firings import Firing, TriggeredAction, TriggerState
from daemon.engine.acting import act, action_place, endpoint_of, log_firings, refreshed
from store.db import Store
from tests.support.engine_harness import ARACHNOPHOBIA, CHONK_SADNESS, T, spider_walked


def _act(tmp_path: Path, automation: Automation, firing: Firing) -> tuple[list[Any], list[Any]]:
    store = Store.open(tmp_path / "trigd.db")
    try:
        with store.conn:
            act(store.conn, automation, firing, T)
        outbox = store.conn.execute(
            "SELECT id, automation_id, action_index, action_type, endpoint, status, document "
            "FROM outbox ORDER BY action_index"
        ).fetchall()
        inbox = [
            json.loads(str(r[0]))
            for r in store.conn.execute("SELECT event FROM inbox ORDER BY seq").fetchall()
        ]
    finally:
        store.close()
    return outbox, inbox


def _firing(automation: Automation, event: Any) -> Firing:
    return Firing(
        trigger=automation.trigger,
        trigger_states=frozenset({TriggerState.Triggered}),
        triggered=T,
        triggering_labels={"hello": "world"},
        triggering_event=event,
    )


def test_i96_act_writes_one_triggered_action_for_a_reactive_firing(tmp_path: Path) -> None:
    walked = spider_walked()
    firing = _firing(ARACHNOPHOBIA, walked)
    outbox, inbox = _act(tmp_path, ARACHNOPHOBIA, firing)
    [(row_id, automation_id, index, action_type, endpoint, status, document)] = outbox
    action = TriggeredAction.model_validate_json(document)
    state_change, action_event = inbox
    assert (row_id, automation_id, index) == (str(action.id), str(ARACHNOPHOBIA.id), 0)
    assert (action_type, endpoint, status) == ("do-nothing", None, "pending")
    assert action.automation == ARACHNOPHOBIA
    assert action.firing == firing
    assert action.triggered == T
    assert action.triggering_labels == {"hello": "world"}
    assert action.triggering_event == walked
    assert action.action == DoNothing()
    assert action.action_index == 0
    assert str(action.automation_triggered_event_id) == state_change["id"]

    assert state_change["event"] == "prefect.automation.triggered"
    assert state_change["resource"] == {
        "prefect.resource.id": f"prefect.automation.{ARACHNOPHOBIA.id}",
        "prefect.resource.name": ARACHNOPHOBIA.name,
        "prefect.posture": "Reactive",
    }
    assert state_change["related"] == [
        {
            "prefect.resource.id": f"prefect.event.{walked.id}",
            "prefect.resource.role": "triggering-event",
        }
    ]
    assert state_change["payload"]["triggering_labels"] == {"hello": "world"}
    assert state_change["payload"]["triggering_event"] == json.loads(walked.model_dump_json())
    assert state_change["follows"] is None
    assert state_change["occurred"] == state_change["received"] == "2026-08-21T16:00:00Z"

    assert action_event["event"] == "prefect.automation.action.triggered"
    assert action_event["resource"]["prefect.trigger-type"] == "event"
    assert action_event["resource"]["prefect.posture"] == "Reactive"
    assert action_event["payload"] == {
        "action_index": 0,
        "action_type": "do-nothing",
        "invocation": str(action.id),
    }
    assert [r["prefect.resource.role"] for r in action_event["related"]] == [
        "automation-triggered-event",
        "triggering-event",
    ]
    assert action_event["follows"] == str(walked.id)  # within 5 minutes of the firing
    # the sender's executed/failed events follow this id without looking it up
    assert action_event["id"] == str(action_triggered_event_id(action.id))


def test_i96_proactive_firing_without_an_event(tmp_path: Path) -> None:
    firing = _firing(CHONK_SADNESS, None)
    outbox, inbox = _act(tmp_path, CHONK_SADNESS, firing)
    [row] = outbox
    action = TriggeredAction.model_validate_json(row[6])
    assert action.triggering_event is None
    assert json.loads(row[6])["triggering_event"] is None
    state_change, action_event = inbox
    assert state_change["related"] == []
    assert state_change["payload"]["triggering_event"] is None
    assert state_change["resource"]["prefect.posture"] == "Proactive"
    assert action_event["follows"] is None


def test_actions_on_trigger_get_the_state_change_event(tmp_path: Path) -> None:
    hook = {"type": "call-webhook", "url": "https://hooks.example.com/x"}
    automation = Automation.model_validate(
        {
            **ARACHNOPHOBIA.model_dump(mode="json"),
            "actions": [{"type": "do-nothing"}, hook],
            "actions_on_trigger": [{**hook, "url": "http://127.0.0.1:9000/y"}],
            "actions_on_resolve": [{"type": "do-nothing"}],
        }
    )
    walked = spider_walked()
    outbox, inbox = _act(tmp_path, automation, _firing(automation, walked))
    actions = [TriggeredAction.model_validate_json(r[6]) for r in outbox]
    assert [a.action_index for a in actions] == [0, 1, 2]  # no Resolved state in OSS
    assert [r[4] for r in outbox] == [
        None,
        "https://hooks.example.com:443",
        "http://127.0.0.1:9000",
    ]
    state_change = inbox[0]
    assert actions[0].triggering_event == walked
    assert actions[2].triggering_event is not None
    assert str(actions[2].triggering_event.id) == state_change["id"]
    assert {str(a.automation_triggered_event_id) for a in actions} == {state_change["id"]}
    assert len(inbox) == 1 + 3
    # the action on trigger follows its own (state-change) event
    assert inbox[3]["follows"] == state_change["id"]


def test_action_event_does_not_follow_an_old_triggering_event(tmp_path: Path) -> None:
    old = spider_walked().model_copy(update={"occurred": T - timedelta(minutes=5)})
    _, inbox = _act(tmp_path, ARACHNOPHOBIA, _firing(ARACHNOPHOBIA, old))
    assert inbox[1]["follows"] is None


def test_endpoint_of() -> None:
    assert endpoint_of(DoNothing()) is None
    assert endpoint_of(CallWebhook(url="HTTP://Example.COM/a?b")) == "http://example.com:80"
    assert endpoint_of(CallWebhook(url="http://[::1]:81/")) == "http://[::1]:81"


def test_composite_state_change_event_has_no_posture(tmp_path: Path) -> None:
    """docs/TRIGGERS.md#automation-state-change-events: a compound/sequence firing's resource has no
    `prefect.posture`, its labels are `{}` and its triggering event is the child's."""
    automation = Automation.model_validate(
        {
            "name": "any spider",
            "trigger": {
                "type": "compound",
                "require": "any",
                "within": None,
                "triggers": [ARACHNOPHOBIA.trigger.model_dump(mode="json", exclude={"id"})],
            },
            "actions": [{"type": "do-nothing"}],
        }
    )
    walked = spider_walked()
    child = Firing(
        trigger=automation.event_triggers()[0],
        trigger_states=frozenset({TriggerState.Triggered}),
        triggered=T,
        triggering_event=walked,
    )
    firing = Firing(
        trigger=automation.trigger,
        trigger_states=frozenset({TriggerState.Triggered}),
        triggered=T,
        triggering_firings=[child],
        triggering_event=walked,
    )
    outbox, inbox = _act(tmp_path, automation, firing)
    state_change, action_event = inbox
    assert state_change["resource"] == {
        "prefect.resource.id": f"prefect.automation.{automation.id}",
        "prefect.resource.name": "any spider",
    }
    assert state_change["payload"]["triggering_labels"] == {}
    assert state_change["related"][0]["prefect.resource.id"] == f"prefect.event.{walked.id}"
    assert action_event["resource"]["prefect.trigger-type"] == "compound"
    assert "prefect.posture" not in action_event["resource"]
    [row] = outbox
    assert TriggeredAction.model_validate_json(row[6]).firing == firing


def test_a_firing_is_logged_at_info_with_automation_trigger_and_bucket(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="daemon.engine.acting")
    walked = spider_walked()
    firing = _firing(ARACHNOPHOBIA, walked)
    store = Store.open(tmp_path / "trigd.db")
    try:
        with store.conn:
            line = act(store.conn, ARACHNOPHOBIA, firing, T)
            assert not caplog.records  # the caller logs it once the transaction commits
        log_firings([line])
    finally:
        store.close()
    [record] = [r for r in caplog.records if r.name == "daemon.engine.acting"]
    trigger = ARACHNOPHOBIA.trigger
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        f"automation {ARACHNOPHOBIA.name!r} fired: event trigger {trigger.id}, "
        'bucket {"hello": "world"}, 1 actions queued'
    )
    fields = {
        k: getattr(record, k)
        for k in (
            "automation",
            "automation_id",
            "trigger",
            "trigger_type",
            "bucket",
            "states",
            "triggering_event",
            "firing",
            "actions",
        )
    }
    assert fields == {
        "automation": ARACHNOPHOBIA.name,
        "automation_id": str(ARACHNOPHOBIA.id),
        "trigger": str(trigger.id),
        "trigger_type": "event",
        "bucket": {"hello": "world"},
        "states": ["Triggered"],
        "triggering_event": str(walked.id),
        "firing": str(firing.id),
        "actions": 1,
    }


def test_a_firing_without_labels_or_triggering_event_logs_all_and_null(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="daemon.engine.acting")
    firing = Firing(
        trigger=ARACHNOPHOBIA.trigger,
        trigger_states=frozenset({TriggerState.Triggered, TriggerState.Resolved}),
        triggered=T,
    )
    store = Store.open(tmp_path / "trigd.db")
    try:
        with store.conn:
            line = act(store.conn, ARACHNOPHOBIA, firing, T)
        log_firings([line])
    finally:
        store.close()
    [record] = caplog.records
    assert record.getMessage().endswith(", bucket (all), 1 actions queued")
    assert (record.bucket, record.triggering_event, record.states) == (  # type: ignore[attr-defined]
        {},
        None,
        ["Resolved", "Triggered"],
    )


def test_a_revived_delivery_is_refreshed_from_the_same_place_of_the_automation_now(
    tmp_path: Path,
) -> None:
    hook = {"type": "call-webhook", "url": "https://hooks.example.com/x", "payload": "old"}
    old = {
        **ARACHNOPHOBIA.model_dump(mode="json"),
        "actions": [{"type": "do-nothing"}, hook],
        "actions_on_trigger": [{**hook, "url": "http://127.0.0.1:9000/y"}],
    }
    automation = Automation.model_validate(old)
    outbox, _ = _act(tmp_path, automation, _firing(automation, spider_walked()))
    on_trigger = TriggeredAction.model_validate_json(outbox[2][6])
    assert action_place(on_trigger) == ("actions_on_trigger", 0)
    assert action_place(on_trigger.model_copy(update={"action_index": 3})) is None

    fixed = Automation.model_validate(
        {
            **old,
            "name": "spiders, fixed",
            "actions": [{"type": "do-nothing"}],  # the list before it shrank
            "actions_on_trigger": [{**hook, "url": "http://127.0.0.1:9000/z", "payload": "new"}],
        }
    )
    again = refreshed(on_trigger, fixed)
    assert isinstance(again.action, CallWebhook)
    assert (again.action.url, again.action.payload) == ("http://127.0.0.1:9000/z", "new")
    assert again.automation.name == "spiders, fixed"
    assert (again.id, again.firing) == (on_trigger.id, on_trigger.firing)
    assert refreshed(on_trigger, None) is on_trigger  # the automation is gone
    other_type = Automation.model_validate({**old, "actions_on_trigger": [{"type": "do-nothing"}]})
    assert refreshed(on_trigger, other_type) is on_trigger
    assert refreshed(on_trigger, Automation.model_validate({**old, "actions_on_trigger": []})) is (
        on_trigger
    )
