"""The scenario builders of the composite-trigger tests (docs/TRIGGERS.md#composite-triggers):
leaf, compound and sequence triggers, automations around them, and the events they see, in
event time from the scenarios' start `S`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import apsw

from daemon.core.automations import Automation
from daemon.core.events import ReceivedEvent
from store import composite as composite_store

S = datetime(2026, 8, 21, 16, 0, 0, tzinfo=UTC)
"""Start of every scenario (the tests' `start_of_test`)."""

FLOW_RUN = {"prefect.resource.id": "prefect.flow-run.*"}


def leaf(expect: str, match: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "type": "event",
        "expect": [expect],
        "match": FLOW_RUN if match is None else match,
        "posture": extra.pop("posture", "Reactive"),
        "threshold": 1,
        **extra,
    }


def flow(state: str) -> dict[str, Any]:
    return leaf(f"prefect.flow-run.{state}")


def compound(
    require: str | int, *triggers: dict[str, Any], within: float | None = 300
) -> dict[str, Any]:
    return {"type": "compound", "require": require, "within": within, "triggers": list(triggers)}


def sequence(*triggers: dict[str, Any], within: float | None = 300) -> dict[str, Any]:
    return {"type": "sequence", "within": within, "triggers": list(triggers)}


def automation(trigger: dict[str, Any], name: str = "composite") -> Automation:
    return Automation.model_validate(
        {"name": name, "trigger": trigger, "actions": [{"type": "do-nothing"}]}
    )


def event(name: str, occurred: datetime, resource_id: str, **extra: Any) -> ReceivedEvent:
    return ReceivedEvent.model_validate(
        {
            "occurred": occurred,
            "event": name,
            "resource": {"prefect.resource.id": resource_id},
            "id": uuid4(),
            "received": occurred,
            **extra,
        }
    )


def flow_run_events() -> list[ReceivedEvent]:
    """FE: Pending, Running, Completed, Failed at S+1..4 µs, related to a deployment."""
    deployment = {
        "prefect.resource.id": "my-deployment",
        "prefect.resource.role": "deployment",
        "prefect.resource.name": "My Sweet Deployment",
    }
    return [
        event(
            f"prefect.flow-run.{state}",
            S + timedelta(microseconds=i + 1),
            f"prefect.flow-run.{run}",
            related=[deployment],
        )
        for i, (state, run) in enumerate(
            [("Pending", 23456), ("Running", 34567), ("Completed", 45678), ("Failed", 56789)]
        )
    ]


def at(seconds: float, name: str, resource_id: str) -> ReceivedEvent:
    return event(name, S + timedelta(seconds=seconds), resource_id)


BUY = leaf("ingredients.buy", {"prefect.resource.id": "prefect.ingredients.*"})
MIX = leaf("ingredients.mix", {"prefect.resource.id": "prefect.ingredients.*"})
BAKE = leaf("cake.bake", {"prefect.resource.id": "prefect.cake.*"})
GREET = leaf("guests.greet", {"prefect.resource.id": "prefect.guests.*"})
SERVE = leaf("cake.serve", {"prefect.resource.id": "prefect.cake.*"})


def baker(within: float | None = 5) -> Automation:
    return automation(sequence(BUY, MIX, BAKE, within=within))


def host() -> Automation:
    return automation(sequence(BUY, MIX, BAKE, compound("all", GREET, SERVE), within=5))


def host_duties() -> list[ReceivedEvent]:
    """A full round for host(): buy, mix, bake, then greet and serve, at S+4..8 s."""
    return [
        at(4, "ingredients.buy", "prefect.ingredients.12345"),
        at(5, "ingredients.mix", "prefect.ingredients.12345"),
        at(6, "cake.bake", "prefect.cake.23456"),
        at(7, "guests.greet", "prefect.guests.12345"),
        at(8, "cake.serve", "prefect.cake.23456"),
    ]


def baking_right(offset: float = 0) -> list[ReceivedEvent]:
    return [
        at(offset + 1, "ingredients.buy", "prefect.ingredients.12345"),
        at(offset + 2, "ingredients.mix", "prefect.ingredients.12345"),
        at(offset + 3, "cake.bake", "prefect.cake.23456"),
    ]


def stored(conn: apsw.Connection) -> int:
    return composite_store.count_child_firings(conn)


HEARTBEAT = leaf(
    "device.heartbeat", {"prefect.resource.id": "device.*"}, posture="Proactive", within=30
)
ALARM = leaf("device.alarm", {"prefect.resource.id": "device.*"})


def missed_heartbeat_then_alarm() -> Automation:
    """sequence(any(no heartbeat for 30 s, never), alarm) within a minute."""
    return automation(
        sequence(
            compound("any", HEARTBEAT, leaf("never", {"prefect.resource.id": "x"})),
            ALARM,
            within=60,
        )
    )
