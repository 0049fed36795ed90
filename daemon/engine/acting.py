"""Acting on a top-level firing (docs/DELIVERY.md#from-firing-to-outbox, #action-events,
#the-triggeredaction-document; docs/TRIGGERS.md#automation-state-change-events).

Everything a firing produces is written in the caller's transaction, so it commits or
vanishes together with the bucket change that caused it (docs/DELIVERY.md#from-firing-to-outbox,
docs/OPERATIONS.md#durability):

* the `prefect.automation.triggered` state-change event,
* one outbox row per action of `actions + actions_on_trigger + actions_on_resolve`
  (the row's document is the `TriggeredAction` JSON, its automation redacted: each row
  holds only its own action's secret and headers, as the file wrote them),
* one `prefect.automation.action.triggered` event per row.

The events go to the inbox, so the next batch evaluates them like any received event and
automations can react to automations without recursing inside this transaction.

The firing's INFO line (docs/OPERATIONS.md#logs) is not written here: `act` returns a
`FiringLine`, the engine hands it out with the call's outcome, and the caller writes it
with `log_firings` once its COMMIT has returned, outside the store thread. So a firing
whose transaction rolls back is never logged, one retried is logged once, and the store
thread does not format log lines while clients wait on the batch's acks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit
from uuid import UUID

import attrs

from daemon.core.automations import ActionTypes, Automation, CallWebhook, EventTrigger
from daemon.core.clock import to_us
from daemon.core.delivery import action_triggered_event_id
from daemon.core.events import ReceivedEvent, uuid7
from daemon.core.firings import Firing, TriggeredAction, TriggerState, ordered_states
from store.connection import Connection
from store.events import push_inbox
from store.outbox import NewOutboxRow, enqueue

log = logging.getLogger(__name__)

ACTION_FOLLOWS_WINDOW: Final = timedelta(minutes=5)
"""An action event `follows` its triggering event only when this close in time."""

_DEFAULT_PORTS: Final = MappingProxyType({"http": 80, "https": 443})


def automation_resource(automation: Automation) -> dict[str, str]:
    return {
        "prefect.resource.id": f"prefect.automation.{automation.id}",
        "prefect.resource.name": automation.name,
    }


def _event_reference(event: ReceivedEvent, role: str) -> dict[str, str]:
    return {"prefect.resource.id": f"prefect.event.{event.id}", "prefect.resource.role": role}


def state_change_event(
    automation: Automation, firing: Firing, state: TriggerState, now: datetime
) -> ReceivedEvent:
    """`prefect.automation.triggered` (or `.resolved`), shaped as
    docs/TRIGGERS.md#automation-state-change-events."""
    resource = automation_resource(automation)
    if isinstance(firing.trigger, EventTrigger):
        resource["prefect.posture"] = firing.trigger.posture.value
    triggering = firing.triggering_event
    return ReceivedEvent.model_validate(
        {
            "occurred": firing.triggered,
            "event": f"prefect.automation.{state.value.lower()}",
            "resource": resource,
            "related": []
            if triggering is None
            else [_event_reference(triggering, "triggering-event")],
            "payload": {
                "triggering_labels": firing.triggering_labels,
                "triggering_event": None
                if triggering is None
                else triggering.model_dump(mode="json"),
            },
            "id": uuid7(),
            "follows": None,
            "received": now,
        }
    )


def action_event(
    action: TriggeredAction,
    name: str,
    *,
    occurred: datetime,
    event_id: UUID,
    follows: UUID | None,
    details: Mapping[str, Any],
    now: datetime,
) -> ReceivedEvent:
    """`prefect.automation.action.<name>` about one outbox row (docs/DELIVERY.md#action-events): the
    `triggered` event written with the firing, and the sender's `executed`/`failed`."""
    automation = action.automation
    resource = automation_resource(automation)
    resource["prefect.trigger-type"] = automation.trigger.type
    if isinstance(automation.trigger, EventTrigger):
        resource["prefect.posture"] = automation.trigger.posture.value
    related: list[dict[str, str]] = []
    if action.automation_triggered_event_id is not None:
        related.append(
            {
                "prefect.resource.id": f"prefect.event.{action.automation_triggered_event_id}",
                "prefect.resource.role": "automation-triggered-event",
            }
        )
    if action.triggering_event is not None:
        related.append(_event_reference(action.triggering_event, "triggering-event"))
    payload: dict[str, Any] = {
        "action_index": action.action_index,
        "action_type": action.action.type,
        "invocation": str(action.id),
        **details,
    }
    return ReceivedEvent.model_validate(
        {
            "occurred": occurred,
            "event": f"prefect.automation.action.{name}",
            "resource": resource,
            "related": related,
            "payload": payload,
            "id": event_id,
            "follows": follows,
            "received": now,
        }
    )


def action_triggered_event(action: TriggeredAction, now: datetime) -> ReceivedEvent:
    """Its id is derived from the invocation id so the sender's executed/failed event can
    `follow` it without a lookup; it follows the triggering event only when close in time."""
    triggering = action.triggering_event
    follows = None
    if triggering is not None and abs(action.triggered - triggering.occurred) < (
        ACTION_FOLLOWS_WINDOW
    ):
        follows = triggering.id
    return action_event(
        action,
        "triggered",
        occurred=action.triggered,
        event_id=action_triggered_event_id(action.id),
        follows=follows,
        details={},
        now=now,
    )


def endpoint_of(action: ActionTypes) -> str | None:
    """scheme://host:port of a webhook (the sender's fairness key); None otherwise."""
    if not isinstance(action, CallWebhook):
        return None
    parts = urlsplit(action.url)
    scheme = parts.scheme.lower()
    port = parts.port or _DEFAULT_PORTS.get(scheme)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def act(conn: Connection, automation: Automation, firing: Firing, now: datetime) -> FiringLine:
    """Record a firing of the automation's top trigger: events to the inbox, actions to
    the outbox, all in the caller's transaction. Returns its log line, for the caller to
    write once that transaction has committed (`log_firings`)."""
    events = {
        state: state_change_event(automation, firing, state, now)
        for state in ordered_states(firing.trigger_states)
    }
    primary = events.get(TriggerState.Triggered) or events[TriggerState.Resolved]

    sources: list[tuple[ReceivedEvent | None, ActionTypes, ReceivedEvent]] = [
        (firing.triggering_event, action, primary) for action in automation.actions
    ]
    if (triggered := events.get(TriggerState.Triggered)) is not None:
        sources += [(triggered, action, triggered) for action in automation.actions_on_trigger]
    if (resolved := events.get(TriggerState.Resolved)) is not None:
        sources += [(resolved, action, resolved) for action in automation.actions_on_resolve]

    shown = automation.redacted()
    actions = [
        TriggeredAction(
            automation=shown,
            firing=firing,
            triggered=firing.triggered,
            triggering_labels=firing.triggering_labels,
            triggering_event=triggering_event,
            action=action,
            action_index=index,
            automation_triggered_event_id=state_event.id,
        )
        for index, (triggering_event, action, state_event) in enumerate(sources)
    ]
    action_events = [action_triggered_event(a, now) for a in actions]

    created_us = to_us(now)
    enqueue(
        conn,
        [
            NewOutboxRow(
                id=str(a.id),
                automation_id=str(automation.id),
                action_index=a.action_index,
                action_type=a.action.type,
                endpoint=endpoint_of(a.action),
                document=a.model_dump_json(),
                created_us=created_us,
            )
            for a in actions
        ],
    )
    push_inbox(conn, [*events.values(), *action_events])
    return FiringLine.of(automation, firing, len(actions))


@attrs.frozen(slots=True)
class FiringLine:
    """What a firing's INFO line says, taken when it is recorded and written after its
    transaction commits: ids kept as they are (made text only if the line is written),
    nothing of the automation or the firing kept alive."""

    automation: str
    """The automation's name."""
    automation_id: UUID
    trigger_id: UUID
    trigger_type: str
    bucket: Mapping[str, str]
    """The firing's `for_each` label values (its `triggering_labels`)."""
    states: frozenset[TriggerState]
    triggering_event: UUID | None
    firing: UUID
    actions: int
    """Outbox rows queued."""

    @classmethod
    def of(cls, automation: Automation, firing: Firing, actions: int) -> FiringLine:
        trigger = firing.trigger
        event = firing.triggering_event
        return cls(
            automation.name,
            automation.id,
            trigger.id,
            trigger.type,
            firing.triggering_labels,
            firing.trigger_states,
            None if event is None else event.id,
            firing.id,
            actions,
        )


def log_firings(lines: Iterable[FiringLine]) -> None:
    """One INFO line per firing of an automation (docs/OPERATIONS.md#logs): its name, the
    trigger, the bucket key (the firing's `for_each` label values), the actions queued.
    Call it after the transaction that recorded the firings committed, never inside it."""
    if not log.isEnabledFor(logging.INFO):
        return
    for line in lines:
        bucket = line.bucket
        log.info(
            "automation %r fired: %s trigger %s, bucket %s, %d actions queued",
            line.automation,
            line.trigger_type,
            line.trigger_id,
            json.dumps(bucket, sort_keys=True) if bucket else "(all)",
            line.actions,
            extra={
                "automation": line.automation,
                "automation_id": str(line.automation_id),
                "trigger": str(line.trigger_id),
                "trigger_type": line.trigger_type,
                "bucket": bucket,
                "states": sorted(state.value for state in line.states),
                "triggering_event": None
                if line.triggering_event is None
                else str(line.triggering_event),
                "firing": str(line.firing),
                "actions": line.actions,
            },
        )


# --- a revived delivery, made again from the automation loaded now -------------------------


def action_place(triggered: TriggeredAction) -> tuple[str, int] | None:
    """Which action list of its automation, and where in it, `triggered.action_index` came
    from, as `act` laid them out: `actions`, then `actions_on_trigger` when the firing
    triggered, then `actions_on_resolve` when it resolved. None when out of range."""
    states = triggered.firing.trigger_states if triggered.firing else frozenset()
    fields = ["actions"]
    if TriggerState.Triggered in states:
        fields.append("actions_on_trigger")
    if TriggerState.Resolved in states:
        fields.append("actions_on_resolve")
    index = triggered.action_index
    for field in fields:
        actions: list[ActionTypes] = getattr(triggered.automation, field)
        if index < len(actions):
            return field, index
        index -= len(actions)
    return None


def refreshed(triggered: TriggeredAction, current: Automation | None) -> TriggeredAction:
    """`triggered` as `current` (its automation as loaded now, fixed since, perhaps) would
    make it: the action at the same place, of the same type, and the automation templates
    see; same id, firing and events. `triggered` itself when `current` is None (the
    automation is gone) or has no such action."""
    place = action_place(triggered)
    if current is None or place is None:
        return triggered
    field, position = place
    actions: list[ActionTypes] = getattr(current, field)
    if position >= len(actions) or actions[position].type != triggered.action.type:
        return triggered
    return triggered.model_copy(
        update={"automation": current.redacted(), "action": actions[position]}
    )
