"""Composite triggers (docs/TRIGGERS.md#composite-triggers, in event time): scenarios 60-82.

The unit tests drive `evaluate_composite_trigger` with real `Firing`s the way the engine
does: every leaf here is an immediate Reactive trigger (threshold 1, within 0), so it fires
once per event it covers; a composite's firing goes to its own parent until it reaches the
automation ("acted") or a composite does not fire. Each event's firings carry the event's
`occurred` as their event time. The wall clock (`now`) is deliberately close to the event
times or far from them to show it never matters.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from uuid import UUID, uuid4

import apsw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.core.automations import (
    Automation,
    CompositeTrigger,
    CompoundTrigger,
    EventTrigger,
    SequenceTrigger,
)
from daemon.core.events import ReceivedEvent
from daemon.core.firings import Firing, TriggerState
from daemon.engine.composite import evaluate_composite_trigger, forget_trigger_state, ready_rows
from store import composite as composite_store
from store.composite import ChildFiringRow
from store.db import Store
from tests.support.composite_scenarios import (
    ALARM,
    BUY,
    HEARTBEAT,
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

# --- the driver: what the engine does with a leaf's firing --------------------------------


class Harness:
    """Feeds firings through the composite logic like the engine, recording what acted."""

    def __init__(self, conn: apsw.Connection, auto: Automation) -> None:
        self.conn = conn
        self.automation = auto
        self.acted: list[Firing] = []

    def fire(self, firing: Firing, event_time: datetime, now: datetime) -> None:
        current: Firing | None = firing
        while current is not None:
            parent = self.automation.parent_of(current.trigger.id)
            if isinstance(parent, Automation):
                self.acted.append(current)
                return
            assert isinstance(parent, CompoundTrigger | SequenceTrigger)
            with self.conn:  # the caller's transaction
                current = evaluate_composite_trigger(
                    self.conn, current, parent, self.automation, event_time, now
                )

    def receive(self, ev: ReceivedEvent, now: datetime | None = None) -> None:
        wall = now if now is not None else ev.occurred + timedelta(milliseconds=5)
        for trigger in self.automation.event_triggers():
            if trigger.covers(ev) and trigger.expects(ev.event):
                self.fire(leaf_firing(trigger, ev, wall), ev.occurred, wall)

    def run(self, events: Sequence[ReceivedEvent], now: datetime | None = None) -> list[Firing]:
        """Returns the firings that acted during this run."""
        start = len(self.acted)
        for ev in events:
            self.receive(ev, now)
        return self.acted[start:]


def leaf_firing(trigger: EventTrigger, ev: ReceivedEvent | None, now: datetime) -> Firing:
    return Firing(
        trigger=trigger,
        trigger_states=frozenset({TriggerState.Triggered}),
        triggered=now,
        triggering_event=ev,
    )


# --- scenarios 60-69, compound -------------------------------------------------------------


def test_60_any_fires_once_with_the_compound(conn: apsw.Connection) -> None:
    auto = automation(compound("any", flow("Failed"), flow("NonExistent")))
    acted = Harness(conn, auto).run(flow_run_events())
    assert len(acted) == 1
    assert acted[0].trigger.id == auto.trigger.id
    assert acted[0].trigger_states == {TriggerState.Triggered}
    assert acted[0].triggering_labels == {}
    assert stored(conn) == 0  # num_expected == 1: nothing stored


def test_61_any_nested_in_any(conn: apsw.Connection) -> None:
    auto = automation(compound("any", compound("any", flow("Failed"), flow("NonExistent"))))
    events = flow_run_events()
    acted = Harness(conn, auto).run(events)
    assert len(acted) == 1
    assert acted[0].trigger.id == auto.trigger.id
    assert acted[0].triggering_event == events[-1]
    (inner,) = acted[0].triggering_firings
    assert inner.trigger.id != auto.trigger.id
    assert inner.triggering_firings[0].triggering_event == events[-1]


def test_62_any_of_two_nested_anys_fires_twice(conn: apsw.Connection) -> None:
    auto = automation(
        compound(
            "any",
            compound("any", flow("Failed"), flow("NonExistent")),
            compound("any", flow("Completed"), flow("NonExistent")),
        )
    )
    events = flow_run_events()
    acted = Harness(conn, auto).run(events)
    assert [f.triggering_event for f in acted] == [events[2], events[3]]
    assert all(f.trigger.id == auto.trigger.id for f in acted)


def test_63_all_with_a_child_that_never_fires(conn: apsw.Connection) -> None:
    auto = automation(compound("all", flow("Failed"), flow("NotExistent")))
    assert Harness(conn, auto).run(flow_run_events()) == []
    assert stored(conn) == 1  # Failed waits for its sibling


def test_64_all_of_two_matching_children(conn: apsw.Connection) -> None:
    auto = automation(compound("all", flow("Failed"), flow("Completed")))
    events = flow_run_events()
    acted = Harness(conn, auto).run(events)
    assert len(acted) == 1
    assert acted[0].trigger.id == auto.trigger.id
    assert acted[0].triggering_event == events[3]
    assert [f.triggering_event for f in acted[0].triggering_firings] == [events[2], events[3]]
    assert stored(conn) == 0  # consumed


def test_65_race_guard_superseded_firing_does_not_fire(
    conn: apsw.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    auto = automation(compound("all", flow("Failed"), flow("Completed")))
    assert isinstance(auto.trigger, CompositeTrigger)
    children = auto.trigger.triggers

    def others(
        conn: apsw.Connection, automation_id: str, parent_id: str, child_ids: Sequence[str]
    ) -> list[ChildFiringRow]:
        rows = []
        for child in children:
            other = Firing(
                id=uuid4(),
                trigger=child,
                trigger_states=frozenset({TriggerState.Triggered}),
                triggered=S,
            )
            rows.append(
                ChildFiringRow(
                    automation_id,
                    parent_id,
                    str(child.id),
                    str(other.id),
                    0,
                    other.model_dump_json(),
                )
            )
        return rows

    monkeypatch.setattr(composite_store, "read_child_firings", others)
    assert Harness(conn, auto).run(flow_run_events()) == []


def test_65b_rows_consumed_by_another_evaluation_do_not_fire(
    conn: apsw.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefect's step f (the rows used are consumed, docs/TRIGGERS.md#composite-triggers): when
    deleting the rows read does not delete all of them, another evaluation won; this one must not
    fire (and must not half-consume the rest)."""
    auto = automation(compound("all", flow("Failed"), flow("Completed")))
    real_take = composite_store.take_child_firings

    def lose_one(
        conn: apsw.Connection, automation_id: str, parent_id: str, ids: Iterable[str]
    ) -> set[str]:
        taken = real_take(conn, automation_id, parent_id, ids)
        return set(sorted(taken)[1:])

    monkeypatch.setattr(composite_store, "take_child_firings", lose_one)
    assert Harness(conn, auto).run(flow_run_events()) == []


def test_66_all_of_two_anys_fires_once_on_completed(conn: apsw.Connection) -> None:
    auto = automation(
        compound(
            "all",
            compound("any", flow("Failed"), flow("Completed")),
            compound("any", flow("Completed"), flow("NonExistent")),
        )
    )
    events = flow_run_events()
    acted = Harness(conn, auto).run(events)
    assert len(acted) == 1
    assert acted[0].triggering_event == events[2]  # Completed; Failed later does not refire


def test_67_all_of_all_and_any_fires_on_failed(conn: apsw.Connection) -> None:
    auto = automation(
        compound(
            "all",
            compound("all", flow("Failed"), flow("Completed")),
            compound("any", flow("Completed"), flow("NonExistent")),
        )
    )
    events = flow_run_events()
    acted = Harness(conn, auto).run(events)
    assert len(acted) == 1
    assert acted[0].trigger.id == auto.trigger.id
    assert acted[0].triggering_event == events[3]


def test_68_all_of_two_alls_one_unsatisfiable(conn: apsw.Connection) -> None:
    auto = automation(
        compound(
            "all",
            compound("all", flow("Failed"), flow("Completed")),
            compound("all", flow("Completed"), flow("NonExistent")),
        )
    )
    assert Harness(conn, auto).run(flow_run_events()) == []


def test_69_all_of_two_satisfiable_alls(conn: apsw.Connection) -> None:
    auto = automation(
        compound(
            "all",
            compound("all", flow("Failed"), flow("Completed")),
            compound("all", flow("Completed"), flow("Pending")),
        )
    )
    events = flow_run_events()
    acted = Harness(conn, auto).run(events)
    assert len(acted) == 1
    assert acted[0].trigger.id == auto.trigger.id
    assert acted[0].triggering_event == events[3]
    assert len(acted[0].all_firings()) == 7  # outer, 2 inner, 4 leaves
    assert stored(conn) == 0


# --- scenarios 70-82, sequence -------------------------------------------------------------


def test_70_single_child_sequence_fires(conn: apsw.Connection) -> None:
    auto = automation(
        sequence(leaf("cake.buy", {"prefect.resource.id": "prefect.cake.*"}), within=5)
    )
    acted = Harness(conn, auto).run([at(4, "cake.buy", "prefect.cake.12345")])
    assert [f.trigger.id for f in acted] == [auto.trigger.id]


def test_71_single_child_sequence_other_event(conn: apsw.Connection) -> None:
    auto = automation(
        sequence(leaf("cake.buy", {"prefect.resource.id": "prefect.cake.*"}), within=5)
    )
    assert Harness(conn, auto).run([at(1, "ingredients.buy", "prefect.ingredients.12345")]) == []


def test_72_baker_out_of_order(conn: apsw.Connection) -> None:
    events = [
        at(1, "ingredients.buy", "prefect.ingredients.12345"),
        at(2, "cake.bake", "prefect.cake.23456"),
        at(3, "ingredients.mix", "prefect.ingredients.12345"),
    ]
    assert Harness(conn, baker()).run(events) == []


def test_73_baker_in_order(conn: apsw.Connection) -> None:
    auto = baker()
    events = baking_right()
    acted = Harness(conn, auto).run(events)
    assert len(acted) == 1
    assert acted[0].trigger.id == auto.trigger.id
    assert acted[0].triggering_event == events[2]
    assert [f.triggering_event for f in acted[0].triggering_firings] == events


def test_74_baker_expired_in_event_time_does_not_fire(conn: apsw.Connection) -> None:
    """Prefect (xfail) fires: processing is fast. trigd judges `occurred`: bake is 14 min
    after buy, outside `within` 5 s, even though all arrive within one wall-clock second."""
    events = [*baking_right()[:2], at(14 * 60, "cake.bake", "prefect.cake.23456")]
    assert Harness(conn, baker()).run(events, now=S + timedelta(seconds=1)) == []
    assert stored(conn) == 1  # buy and mix expired; bake waits


def test_75_baker_without_within_fires_despite_the_gap(conn: apsw.Connection) -> None:
    events = [*baking_right()[:2], at(14 * 60, "cake.bake", "prefect.cake.23456")]
    assert len(Harness(conn, baker(within=None)).run(events)) == 1


def test_76_baker_with_a_duplicate_mix(conn: apsw.Connection) -> None:
    events = [
        at(1, "ingredients.buy", "prefect.ingredients.12345"),
        at(2, "ingredients.mix", "prefect.ingredients.12345"),
        at(3, "ingredients.mix", "prefect.ingredients.12345"),
        at(4, "cake.bake", "prefect.cake.23456"),
    ]
    acted = Harness(conn, baker()).run(events)
    assert len(acted) == 1
    # the second mix replaced the first
    assert acted[0].triggering_firings[1].triggering_event == events[2]


def test_77_duplicate_buy_out_of_order(conn: apsw.Connection) -> None:
    events = [
        at(1, "ingredients.buy", "prefect.ingredients.23456"),
        at(2, "ingredients.mix", "prefect.ingredients.12345"),
        at(3, "ingredients.buy", "prefect.ingredients.12345"),
        at(4, "cake.bake", "prefect.cake.23456"),
    ]
    assert Harness(conn, baker()).run(events) == []


def test_78_duplicates_expired_in_event_time_does_not_fire(conn: apsw.Connection) -> None:
    events = [
        at(1, "ingredients.buy", "prefect.ingredients.12345"),
        at(2, "ingredients.mix", "prefect.ingredients.12345"),
        at(3, "ingredients.mix", "prefect.ingredients.12345"),
        at(14 * 60, "cake.bake", "prefect.cake.23456"),
    ]
    assert Harness(conn, baker()).run(events, now=S + timedelta(seconds=1)) == []


def test_79_host_sequence_with_nested_compound_in_order(conn: apsw.Connection) -> None:
    auto = host()
    duties = host_duties()
    acted = Harness(conn, auto).run([*baking_right(), *duties])
    assert len(acted) == 1
    assert acted[0].trigger.id == auto.trigger.id
    assert acted[0].triggering_event == duties[-1]
    firings = acted[0].triggering_firings
    assert [f.triggering_event for f in firings[:3]] == duties[:3]  # the later round
    assert firings[3].trigger.type == "compound"


def test_80_host_out_of_order(conn: apsw.Connection) -> None:
    events = [
        at(4, "ingredients.buy", "prefect.ingredients.12345"),
        at(5, "cake.bake", "prefect.cake.12345"),
        at(6, "ingredients.mix", "prefect.ingredients.23456"),
        at(7, "cake.serve", "prefect.cake.23456"),
        at(8, "guests.greet", "prefect.guests.12345"),
    ]
    assert Harness(conn, host()).run(events) == []


@pytest.mark.parametrize("reverse", [False, True])
def test_81_twin_children_fire_once_from_one_event(conn: apsw.Connection, reverse: bool) -> None:
    """Documented trigd behaviour (Prefect: xfail, order unspecified). Both twins fire from
    the one event at the same event time; equal event times are ordered by declaration,
    so the sequence is complete and fires once, whichever twin is evaluated first."""
    auto = automation(sequence(BUY, BUY, within=5))
    harness = Harness(conn, auto)
    ev = at(1, "ingredients.buy", "prefect.ingredients.12345")
    triggers = auto.event_triggers()
    for trigger in reversed(triggers) if reverse else triggers:
        harness.fire(leaf_firing(trigger, ev, S), ev.occurred, S)
    assert len(harness.acted) == 1
    assert [f.trigger.id for f in harness.acted[0].triggering_firings] == [t.id for t in triggers]


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_82_concurrent_children_fire_exactly_once(
    conn: apsw.Connection, order: tuple[int, int]
) -> None:
    any_resource = {"prefect.resource.id": "*"}
    auto = automation(compound("all", leaf("event.A", any_resource), leaf("event.B", any_resource)))
    events = [
        event("event.A", S + timedelta(microseconds=1), "test.resource"),
        event("event.B", S + timedelta(microseconds=2), "test.resource"),
    ]
    acted = Harness(conn, auto).run([events[i] for i in order], now=S)
    assert len(acted) == 1
    assert acted[0].trigger.id == auto.trigger.id


# --- event time: decisions where the docs are silent -------------------------------------


def test_late_older_firing_does_not_displace_a_newer_one(conn: apsw.Connection) -> None:
    harness = Harness(conn, baker(within=60))
    harness.run([at(100, "ingredients.buy", "prefect.ingredients.1")])
    harness.run([at(10, "ingredients.buy", "prefect.ingredients.2")])  # late backlog
    acted = harness.run(
        [
            at(101, "ingredients.mix", "prefect.ingredients.1"),
            at(102, "cake.bake", "prefect.cake.1"),
        ]
    )
    assert len(acted) == 1
    assert acted[0].triggering_firings[0].triggering_event is not None
    assert acted[0].triggering_firings[0].triggering_event.occurred == S + timedelta(seconds=100)


def test_compound_does_not_join_firings_further_apart_than_within(conn: apsw.Connection) -> None:
    any_resource = {"prefect.resource.id": "*"}
    auto = automation(
        compound("all", leaf("event.A", any_resource), leaf("event.B", any_resource), within=5)
    )
    harness = Harness(conn, auto)
    assert harness.run([at(100, "event.A", "r"), at(1, "event.B", "r")]) == []
    assert stored(conn) == 2  # neither is expired for the other's future partners
    assert len(harness.run([at(102, "event.B", "r")])) == 1


def test_require_two_of_three_uses_the_window_holding_the_current_firing(
    conn: apsw.Connection,
) -> None:
    any_resource = {"prefect.resource.id": "*"}
    auto = automation(
        compound(
            2,
            leaf("event.A", any_resource),
            leaf("event.B", any_resource),
            leaf("event.C", any_resource),
            within=5,
        )
    )
    harness = Harness(conn, auto)
    acted = harness.run([at(100, "event.A", "r"), at(1, "event.B", "r"), at(3, "event.C", "r")])
    assert len(acted) == 1
    assert [
        f.triggering_event.event for f in acted[0].triggering_firings if f.triggering_event
    ] == [
        "event.B",
        "event.C",
    ]
    assert stored(conn) == 1  # A@100 is left for a later partner


def test_expiry_uses_event_time_not_the_wall_clock(conn: apsw.Connection) -> None:
    auto = automation(compound("all", flow("Failed"), flow("Completed"), within=60))
    harness = Harness(conn, auto)
    far_future = S + timedelta(days=3)  # a daemon catching up on a 3-day-old backlog
    harness.run([at(0, "prefect.flow-run.Completed", "prefect.flow-run.1")], now=far_future)
    acted = harness.run([at(59, "prefect.flow-run.Failed", "prefect.flow-run.2")], now=far_future)
    assert len(acted) == 1
    assert acted[0].triggered == far_future  # `triggered` stays the wall clock
    harness.run([at(100, "prefect.flow-run.Completed", "prefect.flow-run.3")], now=S)
    assert harness.run([at(161, "prefect.flow-run.Failed", "prefect.flow-run.4")], now=S) == []
    assert stored(conn) == 1  # Completed@100 expired (older than 161 - 60); Failed waits


def test_a_firing_of_a_non_child_is_a_clear_error(conn: apsw.Connection) -> None:
    auto = automation(compound("all", flow("Failed"), flow("Completed")))
    stranger = EventTrigger.model_validate(flow("Failed"))
    assert isinstance(auto.trigger, CompoundTrigger)
    with pytest.raises(ValueError, match="not a direct child"):
        evaluate_composite_trigger(conn, leaf_firing(stranger, None, S), auto.trigger, auto, S, S)


def test_forget_trigger_state_drops_rows_of_parent_or_child(conn: apsw.Connection) -> None:
    auto = automation(compound("all", flow("Failed"), flow("NonExistent")))
    other = automation(compound("all", flow("Failed"), flow("NonExistent")), name="other")
    Harness(conn, auto).run(flow_run_events())
    Harness(conn, other).run(flow_run_events())
    assert stored(conn) == 2
    with conn:
        assert forget_trigger_state(conn, [auto.trigger.id]) == 1
    assert composite_store.count_child_firings(conn, str(other.id)) == 1
    with conn:
        assert forget_trigger_state(conn, [t.id for t in other.event_triggers()]) == 1
    assert stored(conn) == 0


# --- proactive children ---------------------------------------------------------------------


def proactive_firing(auto: Automation, as_of: datetime, now: datetime) -> tuple[Firing, datetime]:
    (trigger,) = [t for t in auto.event_triggers() if t.posture == "Proactive"]
    return leaf_firing(trigger, None, now), as_of


def test_nested_composite_with_a_proactive_child_counts_at_as_of(conn: apsw.Connection) -> None:
    """sequence(any(no heartbeat for 30 s, never), alarm): the proactive child fires with no
    event at `as_of`; the inner `any` passes it up at once; the alarm after it completes the
    sequence, and the parent's `triggering_event` is the alarm."""
    auto = missed_heartbeat_then_alarm()
    harness = Harness(conn, auto)
    firing, as_of = proactive_firing(auto, S + timedelta(seconds=30), now=S + timedelta(hours=1))
    harness.fire(firing, as_of, S + timedelta(hours=1))
    assert harness.acted == []
    alarm = at(40, "device.alarm", "device.7")
    acted = harness.run([alarm], now=S + timedelta(hours=1))
    assert len(acted) == 1
    assert acted[0].triggering_event == alarm
    inner = acted[0].triggering_firings[0]
    assert inner.triggering_event is None
    assert inner.triggering_firings[0].trigger.id == auto.event_triggers()[0].id


def test_proactive_child_after_the_alarm_is_out_of_order(conn: apsw.Connection) -> None:
    auto = missed_heartbeat_then_alarm()
    harness = Harness(conn, auto)
    harness.run([at(20, "device.alarm", "device.7")])
    firing, as_of = proactive_firing(auto, S + timedelta(seconds=30), now=S + timedelta(seconds=35))
    harness.fire(firing, as_of, S + timedelta(seconds=35))
    assert harness.acted == []


def test_proactive_child_completing_an_all_has_no_triggering_event(conn: apsw.Connection) -> None:
    auto = automation(compound("all", HEARTBEAT, ALARM, within=60))
    harness = Harness(conn, auto)
    harness.run([at(10, "device.alarm", "device.7")])
    firing, as_of = proactive_firing(auto, S + timedelta(seconds=40), now=S + timedelta(seconds=45))
    harness.fire(firing, as_of, S + timedelta(seconds=45))
    assert len(harness.acted) == 1
    assert harness.acted[0].triggering_event is None
    assert harness.acted[0].triggered == S + timedelta(seconds=45)


# --- the store ------------------------------------------------------------------------------


def row(child: str, firing_id: str, fired_us: int, parent: str = "p") -> ChildFiringRow:
    return ChildFiringRow("a", parent, child, firing_id, fired_us, "{}")


def test_store_upsert_keeps_the_newest_in_event_time(conn: apsw.Connection) -> None:
    with conn:
        assert composite_store.upsert_child_firing(conn, row("c", "f1", 100))
        assert not composite_store.upsert_child_firing(conn, row("c", "f0", 50))
        assert composite_store.upsert_child_firing(conn, row("c", "f2", 100))  # tie: replaces
        rows = composite_store.read_child_firings(conn, "a", "p", ["c", "d"])
    assert [(r.child_firing_id, r.child_fired_us) for r in rows] == [("f2", 100)]


def test_store_expire_and_take(conn: apsw.Connection) -> None:
    with conn:
        for i, child in enumerate("abcd"):
            composite_store.upsert_child_firing(conn, row(child, f"f{i}", i * 10))
        composite_store.upsert_child_firing(conn, row("a", "other", 0, parent="q"))
        assert composite_store.expire_child_firings(conn, "a", "p", 10) == 1  # only f0 (< 10)
        assert composite_store.take_child_firings(conn, "a", "p", ["f1", "f2", "gone"]) == {
            "f1",
            "f2",
        }
        remaining = composite_store.read_child_firings(conn, "a", "p", list("abcd"))
    assert [r.child_firing_id for r in remaining] == ["f3"]
    assert composite_store.count_child_firings(conn) == 2


def test_stored_firing_json_round_trips(conn: apsw.Connection) -> None:
    auto = automation(compound("all", flow("Failed"), flow("NotExistent")))
    events = flow_run_events()
    Harness(conn, auto).run(events)
    (stored_row,) = composite_store.read_child_firings(
        conn, str(auto.id), str(auto.trigger.id), [str(t.id) for t in auto.event_triggers()]
    )
    firing = Firing.model_validate_json(stored_row.child_firing)
    assert firing.triggering_event == events[3]
    assert stored_row.child_fired_us == 1_787_328_000_000_004  # S + 4 µs, event time


# --- properties: judged as it happened, whatever the arrival order ------------------------


def offsets() -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(min_value=0, max_value=20), min_size=3, max_size=3)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seconds=offsets(), arrival=st.permutations(range(3)), is_sequence=st.booleans())
def test_each_child_once_fires_iff_as_it_happened(
    tmp_path_factory: pytest.TempPathFactory,
    seconds: list[int],
    arrival: list[int],
    is_sequence: bool,
) -> None:
    """Each of three children fires once, at the given event times, arriving in any order:
    all(...) fires once iff the span is within 10 s; sequence(...) also needs the event
    times in declaration order (ties count as in order)."""
    any_resource = {"prefect.resource.id": "*"}
    children = [leaf(f"event.{n}", any_resource) for n in "ABC"]
    trigger = (
        sequence(*children, within=10) if is_sequence else compound("all", *children, within=10)
    )
    auto = automation(trigger)
    store = Store.open(tmp_path_factory.mktemp("prop") / "trigd.db")
    try:
        harness = Harness(store.conn, auto)
        events = [at(seconds[i], f"event.{'ABC'[i]}", "r") for i in range(3)]
        acted = harness.run([events[i] for i in arrival], now=S)
    finally:
        store.close()
    in_window = max(seconds) - min(seconds) <= 10
    in_order = seconds == sorted(seconds)
    expected = in_window and (in_order or not is_sequence)
    assert len(acted) == (1 if expected else 0)


def test_ready_rows_orders_ties_by_declaration() -> None:
    auto = automation(sequence(flow("A"), flow("B"), flow("C"), within=None))
    assert isinstance(auto.trigger, SequenceTrigger)
    ids = [str(t) for t in auto.trigger.child_trigger_ids]
    rows = [row(ids[2], "c", 5), row(ids[1], "b", 5), row(ids[0], "a", 5)]
    ready = ready_rows(auto.trigger, rows, 5, None)
    assert ready is not None
    assert [r.child_firing_id for r in ready] == ["a", "b", "c"]
    assert ready_rows(auto.trigger, [row(ids[0], "a", 6), *rows[:2]], 6, None) is None


def test_uuid_strings_are_lowercase_hyphenated(conn: apsw.Connection) -> None:
    auto = automation(compound("all", flow("Failed"), flow("NotExistent")))
    Harness(conn, auto).run(flow_run_events())
    (values,) = list(
        conn.execute(
            "SELECT automation_id, parent_trigger_id, child_trigger_id, child_firing_id "
            "FROM composite_child_firings"
        )
    )
    for value in values:
        assert str(UUID(value)) == value
