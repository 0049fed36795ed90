"""Causal ordering (docs/ORDERING.md#the-algorithm, scenarios 100-109) on a real SQLite file with
fixed clocks.

Prefect's tests are async and run against a process-wide memory singleton with a real
clock; here the engine is synchronous, every call takes `now`, and the state is a database
file that survives reopening. Each test says which scenario it pins down and how it maps.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import apsw
import pytest

from daemon.core.clock import to_us
from daemon.core.config import (
    MAX_DEPTH_OF_PRECEDING_EVENT,
    PRECEDING_EVENT_LOOKBACK,
    SEEN_EXPIRATION,
)
from daemon.core.events import ReceivedEvent, RelatedResource, Resource
from daemon.engine.ordering import (
    CausalOrdering,
    EventArrivedEarly,
    EventBeingProcessed,
    MaxDepthExceeded,
)
from store.db import Store

S = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)  # "start of test"
RESOURCE = Resource({"prefect.resource.id": "any.thing"})


def received_event(
    name: str,
    occurred: datetime,
    received: datetime,
    follows: UUID | None = None,
    event_id: UUID | None = None,
) -> ReceivedEvent:
    return ReceivedEvent(
        event=name,
        resource=RESOURCE,
        occurred=occurred,
        received=received,
        id=event_id or uuid4(),
        follows=follows,
    )


@pytest.fixture
def ordering(store: Store) -> CausalOrdering:
    return CausalOrdering("unit-tests", store.conn)


# The fixtures of scenarios 100-109, with S fixed.
@pytest.fixture
def e1() -> ReceivedEvent:
    return received_event("event.one", S + timedelta(seconds=1), S + timedelta(seconds=1))


@pytest.fixture
def e2(e1: ReceivedEvent) -> ReceivedEvent:
    return received_event(
        "event.two",
        e1.occurred + timedelta(seconds=1),
        e1.received + timedelta(seconds=1, milliseconds=1),
        follows=e1.id,
    )


@pytest.fixture
def e3a(e2: ReceivedEvent) -> ReceivedEvent:
    return received_event(
        "event.three.a",
        e2.occurred + timedelta(seconds=1),
        e2.received + timedelta(seconds=1, milliseconds=1),
        follows=e2.id,
    )


@pytest.fixture
def e3b(e2: ReceivedEvent) -> ReceivedEvent:
    return received_event(
        "event.three.b",
        e2.occurred + timedelta(seconds=2),
        e2.received + timedelta(seconds=2, milliseconds=1),
        follows=e2.id,
    )


NOW = S + timedelta(seconds=10)  # every fixture event is received and < 15 min old


class Recorder:
    """The handler under test: enters the ordering and records the event in the body,
    re-entering for released followers exactly as the reactive evaluation does."""

    def __init__(self, ordering: CausalOrdering, now: datetime = NOW) -> None:
        self.ordering = ordering
        self.now = now
        self.processed: list[ReceivedEvent] = []
        self.depths: list[int] = []

    def __call__(self, event: ReceivedEvent, depth: int = 0) -> None:
        with self.ordering.preceding_event_confirmed(self, event, depth, now=self.now):
            self.processed.append(event)
            self.depths.append(depth)

    def deliver(self, *events: ReceivedEvent) -> list[ReceivedEvent]:
        """The driver of scenarios 100-109: one by one, swallowing EA; returns the ones that
        parked."""
        parked: list[ReceivedEvent] = []
        for event in events:
            try:
                self(event)
            except EventArrivedEarly as early:
                parked.append(early.event)
        return parked


# --- 100: leader wait rules --------------------------------------------------------------


def test_100_no_follows_proceeds(ordering: CausalOrdering, e1: ReceivedEvent) -> None:
    ordering.wait_for_leader(e1, now=NOW)
    assert ordering.parked_count() == 0


def test_100_follows_itself_proceeds(ordering: CausalOrdering, e1: ReceivedEvent) -> None:
    itself = e1.model_copy(update={"follows": e1.id})
    ordering.wait_for_leader(itself, now=NOW)
    recorder = Recorder(ordering)
    recorder.deliver(itself)
    assert recorder.processed == [itself]
    assert ordering.parked_count() == 0  # not even parked on itself (step 7 skipped too)


def test_100_old_follower_proceeds_without_leader(
    ordering: CausalOrdering, e2: ReceivedEvent
) -> None:
    ordering.wait_for_leader(e2, now=e2.received + PRECEDING_EVENT_LOOKBACK + timedelta(seconds=1))
    ordering.wait_for_leader(e2, now=e2.received + PRECEDING_EVENT_LOOKBACK)  # exactly: `>=`
    assert ordering.parked_count() == 0
    with pytest.raises(EventArrivedEarly):
        ordering.wait_for_leader(
            e2, now=e2.received + PRECEDING_EVENT_LOOKBACK - timedelta(microseconds=1)
        )


def test_100_seen_leader_proceeds(
    ordering: CausalOrdering, e1: ReceivedEvent, e2: ReceivedEvent
) -> None:
    ordering.record_event_as_seen(e1, now=NOW)
    ordering.wait_for_leader(e2, now=NOW)
    assert ordering.parked_count() == 0


def test_100_leader_in_flight_parks_and_is_claimed_by_the_leader(
    ordering: CausalOrdering, e1: ReceivedEvent, e2: ReceivedEvent
) -> None:
    # Prefect polls 8 s for a processing leader that another task marks seen 0.1 s later.
    # trigd's leader can only be processing higher up the same stack: E2 parks, no wait,
    # and E1's completion claims it, so E2 is processed with no EA reaching E1's caller.
    recorder = Recorder(ordering)
    with ordering.preceding_event_confirmed(recorder, e1, now=NOW):
        assert ordering.event_has_started_processing(e1)
        with pytest.raises(EventArrivedEarly):
            recorder(e2)
        recorder.processed.append(e1)
    assert recorder.processed == [e1, e2]
    assert recorder.depths == [1]
    assert ordering.parked_count() == 0
    assert ordering.event_has_been_seen(e2, now=NOW)


def test_100_unknown_leader_raises_early_carrying_the_follower(
    ordering: CausalOrdering, e2: ReceivedEvent
) -> None:
    with pytest.raises(EventArrivedEarly) as raised:
        ordering.wait_for_leader(e2, now=NOW)
    assert raised.value.event == e2
    assert ordering.followers_by_id([e2.id]) == [e2]


# --- 101: processing guard ---------------------------------------------------------------


def test_101_record_and_forget_processing(ordering: CausalOrdering, e1: ReceivedEvent) -> None:
    assert not ordering.event_has_started_processing(e1)
    assert ordering.record_event_as_processing(e1)
    assert ordering.event_has_started_processing(e1)
    assert ordering.event_has_started_processing(e1.id)
    assert not ordering.record_event_as_processing(e1)
    ordering.forget_event_is_processing(e1)
    assert not ordering.event_has_started_processing(e1)
    assert ordering.record_event_as_processing(e1)


def test_101_processing_context_marks_seen_and_clears(
    ordering: CausalOrdering, e1: ReceivedEvent
) -> None:
    assert not ordering.event_has_been_seen(e1, now=NOW)
    with ordering.event_is_processing(e1, now=NOW):
        assert ordering.event_has_started_processing(e1)
        assert not ordering.event_has_been_seen(e1, now=NOW)
    assert ordering.event_has_been_seen(e1, now=NOW)
    assert not ordering.event_has_started_processing(e1)


def test_101_entering_an_event_already_processing_raises(
    ordering: CausalOrdering, e1: ReceivedEvent
) -> None:
    ordering.record_event_as_processing(e1)
    with pytest.raises(EventBeingProcessed) as raised, ordering.event_is_processing(e1, now=NOW):
        pass
    assert raised.value.event == e1
    recorder = Recorder(ordering)
    with pytest.raises(EventBeingProcessed):
        recorder(e1)
    assert recorder.processed == []
    assert ordering.event_has_started_processing(e1)  # the other owner keeps its mark


def test_101_reentering_the_same_event_in_its_body_raises(
    ordering: CausalOrdering, e1: ReceivedEvent
) -> None:
    recorder = Recorder(ordering)
    with (
        ordering.preceding_event_confirmed(recorder, e1, now=NOW),
        pytest.raises(EventBeingProcessed),
    ):
        recorder(e1)
    assert recorder.processed == []
    assert ordering.event_has_been_seen(e1, now=NOW)


def test_101_body_error_leaves_event_unseen_and_not_processing(
    ordering: CausalOrdering, e1: ReceivedEvent, e2: ReceivedEvent
) -> None:
    recorder = Recorder(ordering)
    recorder.deliver(e2)  # parked on E1
    with (
        pytest.raises(RuntimeError, match="boom"),
        ordering.preceding_event_confirmed(recorder, e1, now=NOW),
    ):
        raise RuntimeError("boom")
    assert not ordering.event_has_been_seen(e1, now=NOW)
    assert not ordering.event_has_started_processing(e1)
    assert recorder.processed == []
    assert ordering.get_followers(e1) == [e2]  # nobody claimed it
    recorder.deliver(e1)  # a retry succeeds and releases E2
    assert recorder.processed == [e1, e2]


def test_101_follower_error_propagates_and_follower_stays_parked(
    ordering: CausalOrdering, e1: ReceivedEvent, e2: ReceivedEvent
) -> None:
    def failing(event: ReceivedEvent, depth: int) -> None:
        with ordering.preceding_event_confirmed(failing, event, depth, now=NOW):
            if event.id == e2.id:
                raise RuntimeError("follower failed")

    with pytest.raises(EventArrivedEarly):
        failing(e2, 0)
    with pytest.raises(RuntimeError, match="follower failed"):
        failing(e1, 0)
    assert ordering.event_has_been_seen(e1, now=NOW)
    assert not ordering.event_has_been_seen(e2, now=NOW)
    assert not ordering.event_has_started_processing(e2)
    assert ordering.get_followers(e1) == [e2]


def test_101_in_flight_marks_are_shared_per_connection_and_never_stored(
    tmp_path: Path, e1: ReceivedEvent
) -> None:
    # trigd keeps "processing" in memory (see daemon/engine/ordering.py): instances of one scope on
    # one connection share it, like Prefect's per-scope singleton, and a restart forgets it,
    # so a crash can never leave an event refused as "being processed" forever.
    path = tmp_path / "in-flight.db"
    store = Store.open(path)
    first = CausalOrdering("triggers", store.conn)
    with store.conn:
        assert first.record_event_as_processing(e1)
    assert CausalOrdering("triggers", store.conn).event_has_started_processing(e1)
    store.close()
    store = Store.open(path)
    try:
        assert not CausalOrdering("triggers", store.conn).event_has_started_processing(e1)
        tables = {row[0] for row in store.conn.execute("SELECT name FROM sqlite_schema")}
        assert "ordering_processing" not in tables
    finally:
        store.close()


def test_101_event_without_follows_costs_two_statements(
    store: Store, ordering: CausalOrdering, e1: ReceivedEvent
) -> None:
    statements: list[str] = []

    def trace(cursor: object, sql: str, bindings: object) -> bool:
        statements.append(" ".join(sql.split()[:3]).upper())
        return True

    recorder = Recorder(ordering)
    with store.conn:
        store.conn.exec_trace = trace
        try:
            recorder(e1)
        finally:
            store.conn.exec_trace = None
    assert statements == ["INSERT INTO ORDERING_SEEN", "SELECT FOLLOWER_ID, LEADER_ID,"]
    assert recorder.processed == [e1]


# --- 102: seen expiry, by time only ------------------------------------------------------


def test_102_seen_by_object_and_by_id(ordering: CausalOrdering, e1: ReceivedEvent) -> None:
    assert not ordering.event_has_been_seen(e1, now=NOW)
    assert not ordering.event_has_been_seen(e1.id, now=NOW)
    ordering.record_event_as_seen(e1, now=NOW)
    assert ordering.event_has_been_seen(e1, now=NOW)
    assert ordering.event_has_been_seen(e1.id, now=NOW)


def test_102_seen_expires_after_seen_expiration(
    ordering: CausalOrdering, e1: ReceivedEvent, e2: ReceivedEvent
) -> None:
    assert timedelta(hours=1) == SEEN_EXPIRATION
    ordering.record_event_as_seen(e1, now=NOW)
    ordering.record_event_as_seen(e2, now=NOW + timedelta(minutes=30))
    just_before = NOW + SEEN_EXPIRATION - timedelta(microseconds=1)
    assert ordering.event_has_been_seen(e1, now=just_before)
    # Expired at read time even before the sweeper ran ...
    assert not ordering.event_has_been_seen(e1, now=NOW + SEEN_EXPIRATION)
    # ... and the sweeper removes exactly the expired rows.
    assert ordering.expire_seen(just_before) == 0
    assert ordering.expire_seen(NOW + SEEN_EXPIRATION) == 1
    assert ordering.event_has_been_seen(e2, now=NOW + SEEN_EXPIRATION)
    assert not ordering.event_has_been_seen(e1, now=NOW)  # the row is gone


def test_102_seen_again_refreshes_the_stamp(ordering: CausalOrdering, e1: ReceivedEvent) -> None:
    ordering.record_event_as_seen(e1, now=NOW)
    ordering.record_event_as_seen(e1, now=NOW + timedelta(minutes=45))
    assert ordering.expire_seen(NOW + SEEN_EXPIRATION) == 0
    assert ordering.event_has_been_seen(e1, now=NOW + SEEN_EXPIRATION)


def test_102_seen_is_never_evicted_by_count(store: Store, ordering: CausalOrdering) -> None:
    # Prefect caps its cache at 10,000 ids (LRU); trigd keeps every id until it expires.
    events = [received_event(f"e.{i}", S, S) for i in range(10_001)]
    with store.conn:
        for event in events:
            ordering.record_event_as_seen(event, now=NOW)
    assert all(ordering.event_has_been_seen(e, now=NOW) for e in (events[0], events[-1]))
    count = store.conn.execute("SELECT count(*) FROM ordering_seen").fetchone()
    assert count == (10_001,)


def test_102_custom_expiration(store: Store, e1: ReceivedEvent) -> None:
    short = CausalOrdering("short", store.conn, seen_expiration=timedelta(milliseconds=100))
    short.record_event_as_seen(e1, now=NOW)
    assert short.event_has_been_seen(e1, now=NOW + timedelta(milliseconds=99))
    assert not short.event_has_been_seen(e1, now=NOW + timedelta(milliseconds=150))


# --- 103: follower bookkeeping, JSON round trip ------------------------------------------


def test_103_record_and_forget_follower(
    ordering: CausalOrdering, e1: ReceivedEvent, e2: ReceivedEvent
) -> None:
    assert ordering.get_followers(e1) == []
    ordering.record_follower(e2)
    assert ordering.get_followers(e1) == [e2]
    assert ordering.get_followers(e1.id) == [e2]
    ordering.forget_follower(e2)
    assert ordering.get_followers(e1) == []


def test_103_followers_in_occurred_order(
    ordering: CausalOrdering, e2: ReceivedEvent, e3a: ReceivedEvent, e3b: ReceivedEvent
) -> None:
    ordering.record_follower(e3b)
    ordering.record_follower(e3a)
    assert ordering.get_followers(e2) == [e3a, e3b]


def test_103_followers_by_id(
    ordering: CausalOrdering, e2: ReceivedEvent, e3a: ReceivedEvent, e3b: ReceivedEvent
) -> None:
    for event in (e2, e3a, e3b):
        ordering.record_follower(event)
    assert ordering.followers_by_id([e3b.id, e2.id]) == [e2, e3b]
    assert ordering.followers_by_id([uuid4()]) == []
    many = [uuid4() for _ in range(1_200)] + [e3a.id]  # more ids than one IN (...) holds
    assert ordering.followers_by_id(many) == [e3a]


def test_103_parked_event_round_trips_through_json(ordering: CausalOrdering) -> None:
    leader = uuid4()
    rich = ReceivedEvent(
        event="prefect.flow-run.Completed",
        resource=Resource({"prefect.resource.id": "prefect.flow-run.1", "a": "ü"}),
        related=[RelatedResource({"prefect.resource.id": "x", "prefect.resource.role": "tag"})],
        payload={"nested": {"list": [1, 2.5, None, "s"]}},
        occurred=datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC),
        received=datetime(2026, 3, 1, 12, 0, 1, 654321, tzinfo=UTC),
        id=uuid4(),
        follows=leader,
    )
    ordering.record_follower(rich)
    (loaded,) = ordering.get_followers(leader)
    assert loaded == rich
    assert loaded.model_dump_json() == rich.model_dump_json()


def test_103_parking_the_same_follower_twice_replaces_it(
    ordering: CausalOrdering, e2: ReceivedEvent
) -> None:
    ordering.record_follower(e2)
    again = e2.model_copy(update={"received": e2.received + timedelta(minutes=1)})
    ordering.record_follower(again)
    assert ordering.followers_by_id([e2.id]) == [again]
    assert ordering.parked_count() == 1


def test_103_an_event_without_follows_cannot_be_parked(
    ordering: CausalOrdering, e1: ReceivedEvent
) -> None:
    with pytest.raises(ValueError, match="follows"):
        ordering.record_follower(e1)


# --- 104 (held back; the ordering of the three arrival orders of OM) ---------------------


@pytest.mark.parametrize("arrival", ["proper", "jumbled", "backwards"])
def test_ordering_is_correct_for_any_arrival(
    ordering: CausalOrdering,
    e1: ReceivedEvent,
    e2: ReceivedEvent,
    e3a: ReceivedEvent,
    e3b: ReceivedEvent,
    arrival: str,
) -> None:
    orders = {
        "proper": [e1, e2, e3a, e3b],
        "jumbled": [e2, e3a, e1, e3b],
        "backwards": [e3b, e3a, e2, e1],
    }
    recorder = Recorder(ordering)
    recorder.deliver(*orders[arrival])
    assert recorder.processed == [e1, e2, e3a, e3b]
    assert ordering.parked_count() == 0
    assert all(ordering.event_has_been_seen(e, now=NOW) for e in (e1, e2, e3a, e3b))
    assert not any(ordering.event_has_started_processing(e) for e in (e1, e2, e3a, e3b))


# --- 105: lost followers ----------------------------------------------------------------


def test_105_lost_followers_come_out_in_occurred_order(
    ordering: CausalOrdering, e2: ReceivedEvent, e3a: ReceivedEvent, e3b: ReceivedEvent
) -> None:
    # Prefect forces the lookback to -1 min; with an explicit clock we move `now` instead.
    recorder = Recorder(ordering)
    assert recorder.deliver(e3a, e3b, e2) == [e3a, e3b, e2]
    assert recorder.processed == []
    assert ordering.get_lost_followers(now=NOW) == []
    assert ordering.get_lost_followers(now=NOW + timedelta(hours=1)) == [e2, e3a, e3b]
    assert ordering.parked_count() == 0
    assert ordering.get_lost_followers(now=NOW + timedelta(hours=2)) == []


def test_105_only_followers_older_than_the_lookback_are_lost(
    ordering: CausalOrdering, e2: ReceivedEvent, e3a: ReceivedEvent, e3b: ReceivedEvent
) -> None:
    # OM: at E2.received + lookback + 1 s only E2 is lost; E3a/E3b stay (by received only).
    for event in (e2, e3a, e3b):
        ordering.record_follower(event)
    now = e2.received + PRECEDING_EVENT_LOOKBACK + timedelta(seconds=1)
    assert ordering.get_lost_followers(now=now) == [e2]
    assert ordering.get_followers(e2) == [e3a, e3b]
    # The cutoff is inclusive (`received <= now - lookback`, as the memory variant).
    assert ordering.get_lost_followers(now=e3a.received + PRECEDING_EVENT_LOOKBACK) == [e3a]


def test_105_lost_follower_reevaluated_proceeds_and_releases_its_followers(
    ordering: CausalOrdering, e2: ReceivedEvent, e3a: ReceivedEvent
) -> None:
    recorder = Recorder(ordering)
    recorder.deliver(e3a, e2)
    later = e2.received + PRECEDING_EVENT_LOOKBACK
    lost = ordering.get_lost_followers(now=later)
    assert lost == [e2]
    periodic = Recorder(ordering, now=later)
    for event in lost:
        periodic(event)  # depth 0, its wait is skipped: it is old now
    assert periodic.processed == [e2, e3a]
    assert ordering.parked_count() == 0


# --- 106: horizon ------------------------------------------------------------------------


def test_106_only_looks_to_a_certain_horizon(
    ordering: CausalOrdering, e1: ReceivedEvent, e2: ReceivedEvent
) -> None:
    day = timedelta(days=1)
    old_e1 = e1.model_copy(update={"received": e1.received - day})
    old_e2 = e2.model_copy(update={"received": e2.received - day})
    recorder = Recorder(ordering)
    assert recorder.deliver(old_e2, old_e1) == []
    assert recorder.processed == [old_e2, old_e1]


# --- 107 (held back; the depth limit) ----------------------------------------------------


def chain(length: int, start: datetime = S) -> list[ReceivedEvent]:
    events: list[ReceivedEvent] = []
    follows: UUID | None = None
    for i in range(length):
        at = start + timedelta(milliseconds=i)
        events.append(received_event(f"event.{i}", at, at, follows=follows))
        follows = events[-1].id
    return events


def test_depth_limit_chain_of_22_delivered_in_reverse(
    ordering: CausalOrdering, caplog: pytest.LogCaptureFixture
) -> None:
    events = chain(MAX_DEPTH_OF_PRECEDING_EVENT + 2)  # depths 0..21 from the first
    recorder = Recorder(ordering)
    assert recorder.deliver(*reversed(events[1:])) == list(reversed(events[1:]))
    with caplog.at_level(logging.INFO, logger="daemon.engine.ordering"):
        recorder.deliver(events[0])  # does not raise at the root
    assert recorder.processed == events[:21]
    assert recorder.depths == list(range(21))
    assert ordering.get_followers(events[20]) == [events[21]]  # refused: stays parked
    assert ordering.parked_count() == 1
    assert not ordering.event_has_been_seen(events[21], now=NOW)
    assert any(
        "reached its max depth of 20 followers processed." in r.getMessage()
        and str(events[20].id) in r.getMessage()
        for r in caplog.records
    )
    # Lost later, by received time, and then processed on its own.
    last = events[21]
    assert ordering.get_lost_followers(now=last.received + timedelta(minutes=14)) == []
    lost = ordering.get_lost_followers(now=last.received + PRECEDING_EVENT_LOOKBACK)
    assert lost == [last]
    Recorder(ordering, now=last.received + PRECEDING_EVENT_LOOKBACK)(last)
    assert ordering.event_has_been_seen(last, now=NOW)
    assert ordering.parked_count() == 0


def test_depth_limit_stops_the_remaining_siblings(store: Store) -> None:
    ordering = CausalOrdering("shallow", store.conn, max_depth=1)
    root, child = chain(2)
    grandchildren = [
        received_event(f"gc.{i}", child.occurred + timedelta(seconds=i + 1), NOW, child.id)
        for i in range(3)
    ]
    recorder = Recorder(ordering)
    recorder.deliver(*grandchildren, child, root)
    assert recorder.processed == [root, child]
    assert ordering.get_followers(child) == grandchildren  # all refused, all still parked


def test_too_deep_is_refused_before_anything_is_recorded(
    ordering: CausalOrdering, e2: ReceivedEvent
) -> None:
    recorder = Recorder(ordering)
    with pytest.raises(MaxDepthExceeded) as raised:
        recorder(e2, MAX_DEPTH_OF_PRECEDING_EVENT + 1)
    assert raised.value.event == e2
    assert not ordering.event_has_started_processing(e2)
    assert ordering.parked_count() == 0
    recorder(e2.model_copy(update={"follows": None}), MAX_DEPTH_OF_PRECEDING_EVENT)  # allowed


# --- 108: scopes -------------------------------------------------------------------------


def test_108_scopes_do_not_interfere(store: Store, e1: ReceivedEvent, e2: ReceivedEvent) -> None:
    one = CausalOrdering("one", store.conn)
    two = CausalOrdering("two", store.conn)
    one.record_event_as_seen(e1, now=NOW)
    assert one.event_has_been_seen(e1, now=NOW)
    assert not two.event_has_been_seen(e1, now=NOW)
    one.record_follower(e2)
    assert two.get_followers(e1) == []
    two.record_follower(e2)
    one.forget_follower(e2)
    assert one.get_followers(e1) == []
    assert two.get_followers(e1) == [e2]
    assert one.record_event_as_processing(e1)
    assert not two.event_has_started_processing(e1)
    assert two.record_event_as_processing(e1)
    one.forget_event_is_processing(e1)
    assert two.event_has_started_processing(e1)
    assert one.get_lost_followers(now=NOW + timedelta(days=1)) == []
    assert two.parked_count() == 1


def test_108_same_scope_shares_state_like_the_singleton(store: Store, e1: ReceivedEvent) -> None:
    first = CausalOrdering("test-scope", store.conn)
    first.record_event_as_seen(e1, now=NOW)
    assert CausalOrdering("test-scope", store.conn).event_has_been_seen(e1, now=NOW)


def test_clear_and_clear_all_scopes(store: Store, e1: ReceivedEvent, e2: ReceivedEvent) -> None:
    one = CausalOrdering("one", store.conn)
    two = CausalOrdering("two", store.conn)
    for ordering in (one, two):
        ordering.record_event_as_seen(e1, now=NOW)
        ordering.record_follower(e2)
        ordering.record_event_as_processing(e1)
    one.clear()
    assert not one.event_has_been_seen(e1, now=NOW)
    assert one.parked_count() == 0
    assert not one.event_has_started_processing(e1)
    assert two.event_has_been_seen(e1, now=NOW)
    assert two.parked_count() == 1
    one.clear_all_scopes()
    assert not two.event_has_been_seen(e1, now=NOW)
    assert two.parked_count() == 0
    assert not two.event_has_started_processing(e1)


# --- 109: atomic completion (the Redis race cannot happen) --------------------------------


def test_109_completion_marks_seen_claims_followers_and_clears_processing(
    ordering: CausalOrdering, e1: ReceivedEvent, e2: ReceivedEvent, e3a: ReceivedEvent
) -> None:
    ordering.record_follower(e2)
    assert ordering.record_event_as_processing(e1)
    assert ordering.complete_event_and_get_followers(e1, now=NOW) == [e2]
    assert ordering.event_has_been_seen(e1, now=NOW)
    assert not ordering.event_has_started_processing(e1)
    # trigd keeps the claimed follower's row until its own run completes (memory step 7),
    # so a follower refused at the depth limit is still there to be lost later.
    assert ordering.followers_by_id([e2.id]) == [e2]

    ordering.clear()
    recorder = Recorder(ordering)
    assert recorder.deliver(e2, e3a, e1) == [e2, e3a]
    assert recorder.processed == [e1, e2, e3a]
    assert ordering.event_has_been_seen(e1, now=NOW)
    assert ordering.event_has_been_seen(e2, now=NOW)
    assert ordering.parked_count() == 0


def test_109_completion_is_one_transaction_outside_a_batch(
    store: Store, ordering: CausalOrdering, e1: ReceivedEvent, e2: ReceivedEvent
) -> None:
    ordering.record_follower(e2)
    ordering.record_event_as_processing(e1)
    statements: list[str] = []

    def trace(cursor: object, sql: str, bindings: object) -> bool:
        statements.append(sql.split()[0].upper())
        return True

    store.conn.exec_trace = trace
    try:
        ordering.complete_event_and_get_followers(e1, now=NOW)
    finally:
        store.conn.exec_trace = None
    assert statements[0] == "BEGIN"
    assert statements[-1] == "COMMIT"


# --- durability --------------------------------------------------------------------------


def test_parked_followers_and_seen_ids_survive_a_restart(
    tmp_path: Path, e1: ReceivedEvent, e2: ReceivedEvent, e3a: ReceivedEvent
) -> None:
    path = tmp_path / "restart.db"
    store = Store.open(path)
    with store.conn:
        Recorder(CausalOrdering("triggers", store.conn)).deliver(e3a, e1)
    store.close()

    store = Store.open(path)
    try:
        ordering = CausalOrdering("triggers", store.conn)
        assert ordering.event_has_been_seen(e1, now=NOW)
        assert ordering.get_followers(e2) == [e3a]
        recorder = Recorder(ordering)
        with store.conn:
            recorder.deliver(e2)
        assert recorder.processed == [e2, e3a]
    finally:
        store.close()


def test_a_rolled_back_batch_leaves_no_trace(
    store: Store, ordering: CausalOrdering, e1: ReceivedEvent, e2: ReceivedEvent
) -> None:
    recorder = Recorder(ordering)

    def failing_batch() -> None:
        with store.conn:
            recorder.deliver(e2, e1)
            raise KeyError("the batch failed later")

    with pytest.raises(KeyError):
        failing_batch()
    assert recorder.processed == [e1, e2]
    assert ordering.parked_count() == 0
    assert not ordering.event_has_been_seen(e1, now=NOW)


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scope": ""}, "scope"),
        ({"preceding_event_lookback": timedelta(seconds=-1)}, "preceding_event_lookback"),
        ({"seen_expiration": timedelta(0)}, "seen_expiration"),
        ({"max_depth": -1}, "max_depth"),
    ],
)
def test_bad_parameters_name_the_field(store: Store, kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"scope": "s", **kwargs}
    with pytest.raises(ValueError, match=field):
        CausalOrdering(conn=store.conn, **args)  # type: ignore[arg-type]


def test_times_are_exact_microseconds() -> None:
    assert to_us(datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC)) == 1
    assert to_us(datetime(2026, 3, 1, 12, 0, 0, 123456)) == to_us(
        datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    )


# --- plans: no statistics are ever gathered, so the hot statements must be unambiguous -----


def test_query_plans_use_keys_not_scans(store: Store, ordering: CausalOrdering) -> None:
    def plan(sql: str, *args: object) -> str:
        rows = store.conn.execute("EXPLAIN QUERY PLAN " + sql, args).fetchall()
        return " | ".join(str(row[3]) for row in rows)

    followers = plan(
        "SELECT event FROM ordering_followers WHERE scope = ? AND leader_id = ?", "s", "l"
    )
    assert "PRIMARY KEY (scope=? AND leader_id=?)" in followers
    unpark = plan("DELETE FROM ordering_followers WHERE scope = ? AND follower_id = ?", "s", "f")
    assert "(scope=? AND follower_id=?)" in unpark
    lost = plan("DELETE FROM ordering_followers WHERE scope = ? AND received_us <= ?", "s", 1)
    assert "ordering_followers_received" in lost
    expire = plan("DELETE FROM ordering_seen WHERE scope = ? AND seen_us <= ?", "s", 1)
    assert "ordering_seen_expiry" in expire


def test_a_leader_among_many_parked_followers_finds_only_its_own(
    store: Store, ordering: CausalOrdering
) -> None:
    leaders = [uuid4() for _ in range(50)]
    with store.conn:
        for i in range(2_000):
            at = S + timedelta(milliseconds=i)
            ordering.record_follower(received_event(f"f.{i}", at, at, follows=leaders[i % 50]))
    followers = ordering.get_followers(leaders[7])
    assert len(followers) == 40
    assert all(f.follows == leaders[7] for f in followers)
    assert [f.occurred for f in followers] == sorted(f.occurred for f in followers)


def test_a_store_failure_at_completion_leaves_nothing_in_flight(
    tmp_path: Path, e1: ReceivedEvent
) -> None:
    store = Store.open(tmp_path / "ro.db")
    try:
        ordering = CausalOrdering("triggers", store.conn)
        store.conn.execute("PRAGMA query_only = ON")  # every write now fails
        recorder = Recorder(ordering)
        with pytest.raises(apsw.ReadOnlyError):
            recorder(e1)
        assert not ordering.event_has_started_processing(e1)
        store.conn.execute("PRAGMA query_only = OFF")
        recorder(e1)  # the retry is not refused as "being processed"
        assert recorder.processed == [e1, e1]
    finally:
        store.close()


# --- seen marks held in memory (a backtest's scratch store) ---------------------------------


def seen_rows(store: Store) -> list[tuple[object, ...]]:
    return store.conn.execute("SELECT id, seen_us FROM ordering_seen ORDER BY id").fetchall()


def run_batch(store: Store, ordering: CausalOrdering, *events: ReceivedEvent) -> list[str]:
    """One transaction, one batch, as the engine runs them: what proceeded."""
    done: list[str] = []

    def handler(event: ReceivedEvent, depth: int) -> None:
        with ordering.preceding_event_confirmed(handler, event, depth, now=S):
            done.append(event.event)

    with store.conn, ordering.batch():
        for event in events:
            try:
                handler(event, 0)
            except EventArrivedEarly:
                done.append(f"parked {event.event}")
    return done


def test_kept_seen_marks_are_not_written_and_are_read_back_by_later_batches(
    store: Store, ordering: CausalOrdering
) -> None:
    leader = received_event("leader", S, S)
    follower = received_event("follower", S, S, follows=leader.id)
    ordering.keep_seen(10)
    assert run_batch(store, ordering, leader) == ["leader"]
    assert seen_rows(store) == []
    assert ordering.event_has_been_seen(leader, now=S)
    assert not ordering.event_has_been_seen(leader, now=S + SEEN_EXPIRATION)
    assert run_batch(store, ordering, follower) == ["follower"]  # not parked
    ordering.keep_seen(0)  # dropped unwritten
    assert seen_rows(store) == []
    assert not ordering.event_has_been_seen(leader, now=S)


def test_kept_seen_marks_past_the_limit_are_written_and_forgotten(
    store: Store, ordering: CausalOrdering
) -> None:
    ordering.keep_seen(3)
    first = [received_event(f"e{i}", S, S) for i in range(2)]
    run_batch(store, ordering, *first)
    assert seen_rows(store) == []
    second = [received_event(f"e{i}", S, S) for i in range(2, 4)]
    run_batch(store, ordering, *second)  # 4 > 3: all four written
    assert seen_rows(store) == sorted((str(e.id), to_us(S)) for e in first + second)
    assert state_of(ordering).kept_seen == {}
    follower = received_event("follower", S, S, follows=first[0].id)
    assert run_batch(store, ordering, follower) == ["follower"]


def state_of(ordering: CausalOrdering) -> Any:
    return ordering.conn.state.marks(ordering.scope)


def test_a_mark_made_outside_a_batch_replaces_the_one_held(
    store: Store, ordering: CausalOrdering, e1: ReceivedEvent
) -> None:
    """The statement path writes the newer stamp to the table: the older one held must
    not hide it; expiry and clear reach what is held too."""
    ordering.keep_seen(10)
    run_batch(store, ordering, e1)
    later = S + SEEN_EXPIRATION
    with store.conn:
        ordering.record_event_as_seen(e1, now=later)
    assert ordering.event_has_been_seen(e1, now=later + timedelta(seconds=1))
    other = received_event("other", S, S)
    run_batch(store, ordering, other)
    with store.conn:
        assert ordering.expire_seen(S + SEEN_EXPIRATION) == 1  # `other`, held
    assert not ordering.event_has_been_seen(other, now=S)
    run_batch(store, ordering, other)
    ordering.clear()
    assert not ordering.event_has_been_seen(other, now=S)
    with pytest.raises(ValueError, match="limit"):
        ordering.keep_seen(-1)
