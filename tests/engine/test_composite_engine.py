"""Composite triggers end to end through the engine: automations loaded, events processed,
firings read from the outbox (docs/TRIGGERS.md#composite-triggers, in event time)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest

from daemon.core.automations import (
    Automation,
)
from daemon.core.events import ReceivedEvent
from daemon.core.firings import TriggeredAction, TriggerState
from daemon.engine.acting import FiringLine
from daemon.engine.engine import Engine
from store.connection import Connection
from tests.support.composite_scenarios import (
    BAKE,
    BUY,
    GREET,
    MIX,
    SERVE,
    S,
    at,
    automation,
    baker,
    baking_right,
    compound,
    event,
    flow,
    flow_run_events,
    host,
    host_duties,
    leaf,
    missed_heartbeat_then_alarm,
    sequence,
    stored,
)

# --- end to end through the engine: automations loaded, events processed, outbox read ------


class EngineHarness:
    """The real Engine on a real store; a firing is observed as its outbox row."""

    def __init__(self, conn: Connection, auto: Automation) -> None:
        self.conn = conn
        self.engine = Engine()
        self.engine.load_automations(conn, [auto], S)
        self.seen: set[str] = set()
        self.lines: list[FiringLine] = []
        """The log lines the batches handed out (`BatchOutcome.firings`)."""

    def send(
        self, events: Sequence[ReceivedEvent], now: datetime | None = None, *, batch: bool = False
    ) -> list[TriggeredAction]:
        """Process events (one batch each, or all in one batch); return new outbox rows."""
        groups = [list(events)] if batch else [[e] for e in events]
        for group in groups:
            wall = now if now is not None else group[-1].occurred + timedelta(milliseconds=5)
            with self.conn:
                self.lines += self.engine.process_batch(self.conn, group, wall).firings
        return self.new_actions()

    def proactive(self, now: datetime) -> list[TriggeredAction]:
        with self.conn:
            self.engine.proactive(self.conn, now)
        return self.new_actions()

    def new_actions(self) -> list[TriggeredAction]:
        fresh = []
        for row_id, document in self.conn.execute(
            "SELECT id, document FROM outbox ORDER BY created_us, action_index"
        ):
            if row_id not in self.seen:
                self.seen.add(row_id)
                fresh.append(TriggeredAction.model_validate_json(document))
        return fresh


ANY = {"prefect.resource.id": "*"}
CAKE_BUY = leaf("cake.buy", {"prefect.resource.id": "prefect.cake.*"})
ENGINE_SCENARIOS: list[tuple[int, Any, Any, int]] = [
    # (scenario, trigger, events, firings expected); the last firing is checked below
    (60, lambda: compound("any", flow("Failed"), flow("NonExistent")), flow_run_events, 1),
    (
        61,
        lambda: compound("any", compound("any", flow("Failed"), flow("NonExistent"))),
        flow_run_events,
        1,
    ),
    (
        62,
        lambda: compound(
            "any",
            compound("any", flow("Failed"), flow("NonExistent")),
            compound("any", flow("Completed"), flow("NonExistent")),
        ),
        flow_run_events,
        2,
    ),
    (63, lambda: compound("all", flow("Failed"), flow("NotExistent")), flow_run_events, 0),
    (64, lambda: compound("all", flow("Failed"), flow("Completed")), flow_run_events, 1),
    (
        66,
        lambda: compound(
            "all",
            compound("any", flow("Failed"), flow("Completed")),
            compound("any", flow("Completed"), flow("NonExistent")),
        ),
        flow_run_events,
        1,
    ),
    (
        67,
        lambda: compound(
            "all",
            compound("all", flow("Failed"), flow("Completed")),
            compound("any", flow("Completed"), flow("NonExistent")),
        ),
        flow_run_events,
        1,
    ),
    (
        68,
        lambda: compound(
            "all",
            compound("all", flow("Failed"), flow("Completed")),
            compound("all", flow("Completed"), flow("NonExistent")),
        ),
        flow_run_events,
        0,
    ),
    (
        69,
        lambda: compound(
            "all",
            compound("all", flow("Failed"), flow("Completed")),
            compound("all", flow("Completed"), flow("Pending")),
        ),
        flow_run_events,
        1,
    ),
    (
        70,
        lambda: sequence(CAKE_BUY, within=5),
        lambda: [at(4, "cake.buy", "prefect.cake.12345")],
        1,
    ),
    (
        71,
        lambda: sequence(CAKE_BUY, within=5),
        lambda: [at(1, "ingredients.buy", "prefect.ingredients.12345")],
        0,
    ),
    (
        72,
        lambda: sequence(BUY, MIX, BAKE, within=5),
        lambda: [
            at(1, "ingredients.buy", "prefect.ingredients.12345"),
            at(2, "cake.bake", "prefect.cake.23456"),
            at(3, "ingredients.mix", "prefect.ingredients.12345"),
        ],
        0,
    ),
    (73, lambda: sequence(BUY, MIX, BAKE, within=5), baking_right, 1),
    (
        75,
        lambda: sequence(BUY, MIX, BAKE, within=None),
        lambda: [*baking_right()[:2], at(840, "cake.bake", "prefect.cake.23456")],
        1,
    ),
    (
        76,
        lambda: sequence(BUY, MIX, BAKE, within=5),
        lambda: [
            at(1, "ingredients.buy", "prefect.ingredients.12345"),
            at(2, "ingredients.mix", "prefect.ingredients.12345"),
            at(3, "ingredients.mix", "prefect.ingredients.12345"),
            at(4, "cake.bake", "prefect.cake.23456"),
        ],
        1,
    ),
    (
        77,
        lambda: sequence(BUY, MIX, BAKE, within=5),
        lambda: [
            at(1, "ingredients.buy", "prefect.ingredients.23456"),
            at(2, "ingredients.mix", "prefect.ingredients.12345"),
            at(3, "ingredients.buy", "prefect.ingredients.12345"),
            at(4, "cake.bake", "prefect.cake.23456"),
        ],
        0,
    ),
    (
        79,
        lambda: sequence(BUY, MIX, BAKE, compound("all", GREET, SERVE), within=5),
        lambda: [*baking_right(), *host_duties()],
        1,
    ),
    (
        80,
        lambda: sequence(BUY, MIX, BAKE, compound("all", GREET, SERVE), within=5),
        lambda: [
            at(4, "ingredients.buy", "prefect.ingredients.12345"),
            at(5, "cake.bake", "prefect.cake.12345"),
            at(6, "ingredients.mix", "prefect.ingredients.23456"),
            at(7, "cake.serve", "prefect.cake.23456"),
            at(8, "guests.greet", "prefect.guests.12345"),
        ],
        0,
    ),
    (
        81,
        lambda: sequence(BUY, BUY, within=5),
        lambda: [at(1, "ingredients.buy", "prefect.ingredients.12345")],
        1,
    ),
]


@pytest.mark.parametrize(
    ("number", "trigger", "make_events", "expected"),
    ENGINE_SCENARIOS,
    ids=[f"scenario_{s[0]}" for s in ENGINE_SCENARIOS],
)
def test_engine_scenarios(
    conn: Connection, number: int, trigger: Any, make_events: Any, expected: int
) -> None:
    auto = automation(trigger())
    events: list[ReceivedEvent] = make_events()
    harness = EngineHarness(conn, auto)
    actions = harness.send(events)
    assert len(actions) == expected, f"scenario {number}"
    # each composite firing comes out with its log line, for the caller to write
    assert [(str(line.firing), line.trigger_type) for line in harness.lines] == [
        (str(action.firing and action.firing.id), auto.trigger.type) for action in actions
    ]
    for action in actions:
        assert action.firing is not None
        assert action.firing.trigger.id == auto.trigger.id
        assert action.firing.trigger_states == {TriggerState.Triggered}
        assert action.triggering_labels == {}
    if actions:
        last = actions[-1].firing
        assert last is not None
        # the composite's triggering event is the event that completed it
        completing = {61: 3, 62: 3, 64: 3, 66: 2, 67: 3, 69: 3, 70: 0, 73: 2, 79: -1, 81: 0}
        if number in completing:
            assert last.triggering_event == events[completing[number]]


@pytest.mark.parametrize("number", [74, 78])
def test_engine_backlog_judged_in_event_time(conn: Connection, number: int) -> None:
    """74 and 78 fire in Prefect (processing is quick); trigd judges `occurred`: bake is
    14 minutes after buy, outside `within` 5 s, however fast the backlog is replayed."""
    mixes = (
        baking_right()[1:2]
        if number == 74
        else [
            at(2, "ingredients.mix", "prefect.ingredients.12345"),
            at(3, "ingredients.mix", "prefect.ingredients.12345"),
        ]
    )
    events = [baking_right()[0], *mixes, at(840, "cake.bake", "prefect.cake.23456")]
    harness = EngineHarness(conn, baker())
    assert harness.send(events, now=S + timedelta(minutes=20)) == []
    assert harness.send(events, now=S + timedelta(minutes=20), batch=True) == []  # duplicates


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_engine_82_concurrent_children_fire_exactly_once(
    conn: Connection, batch: bool, order: tuple[int, int]
) -> None:
    """Prefect races two workers; trigd's single writer serialises them, in one batch or
    two, in either order: exactly one firing."""
    auto = automation(compound("all", leaf("event.A", ANY), leaf("event.B", ANY)))
    events = [
        event("event.A", S + timedelta(microseconds=1), "test.resource"),
        event("event.B", S + timedelta(microseconds=2), "test.resource"),
    ]
    actions = EngineHarness(conn, auto).send([events[i] for i in order], now=S, batch=batch)
    assert len(actions) == 1
    assert actions[0].firing is not None
    assert actions[0].firing.trigger.id == auto.trigger.id
    assert stored(conn) == 0


def test_engine_backlog_replay_matches_live_processing(conn: Connection) -> None:
    """The same in-order events give the same firings live or replayed days later."""
    auto = host()
    harness = EngineHarness(conn, auto)
    actions = harness.send([*baking_right(), *host_duties()], now=S + timedelta(days=2))
    assert len(actions) == 1


def test_engine_nested_composite_with_proactive_child(conn: Connection) -> None:
    """sequence(any(no heartbeat for 30 s, never), alarm) through the engine: the proactive
    child fires in event time (the events clock's `as_of`), the inner `any` passes it up,
    and an alarm after it completes the sequence."""
    auto = missed_heartbeat_then_alarm()
    harness = EngineHarness(conn, auto)
    # an unrelated event starts the events clock at S (wall clock S + 1 s)
    assert harness.send([at(0, "device.boot", "device.7")], now=S + timedelta(seconds=1)) == []
    assert harness.proactive(S + timedelta(seconds=1)) == []  # opens the 30 s window
    assert harness.proactive(S + timedelta(seconds=32)) == []  # fires: no heartbeat
    assert stored(conn) == 1  # the inner any's firing waits for the alarm
    alarm = at(40, "device.alarm", "device.7")
    actions = harness.send([alarm], now=S + timedelta(seconds=41))
    assert len(actions) == 1
    firing = actions[0].firing
    assert firing is not None
    assert firing.trigger.id == auto.trigger.id
    assert firing.triggering_event == alarm
    inner, alarm_firing = firing.triggering_firings
    assert inner.triggering_firings[0].trigger.id == auto.event_triggers()[0].id
    assert inner.triggering_firings[0].triggering_event is None
    assert alarm_firing.triggering_event == alarm


def test_engine_reload_of_changed_composite_forgets_child_firings(conn: Connection) -> None:
    auto = automation(compound("all", flow("Failed"), flow("NotExistent")))
    harness = EngineHarness(conn, auto)
    harness.send(flow_run_events())
    assert stored(conn) == 1
    harness.engine.load_automations(conn, [auto], S)  # unchanged: state kept
    assert stored(conn) == 1
    changed = automation(compound("all", flow("Failed"), flow("NotExistent"), within=60))
    harness.engine.load_automations(conn, [changed], S)
    assert stored(conn) == 0
