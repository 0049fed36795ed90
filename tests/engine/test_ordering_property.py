"""Property: any forest of `follows` links, delivered in any order and any batching, with the
database closed and reopened between batches, is processed exactly once, each event after
its leader, siblings in occurred order; only events whose leader never came stay parked,
and those come out as lost followers once the lookback has passed (fixed clock).

The expected order comes from a ten-line reference model of docs/ORDERING.md#the-algorithm without
time or depth (the forests stay within the depth limit and every delivery is within the lookback).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.core.config import MAX_DEPTH_OF_PRECEDING_EVENT, PRECEDING_EVENT_LOOKBACK
from daemon.core.events import ReceivedEvent, Resource
from daemon.engine.ordering import (
    CausalOrdering,
    EventArrivedEarly,
)
from store.db import Store

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
RESOURCE = Resource({"prefect.resource.id": "forest"})


@dataclass(frozen=True)
class Forest:
    events: list[ReceivedEvent]  # delivered, in delivery order, `received` stamped
    missing: frozenset[UUID]  # leaders that never arrive
    batches: list[int]  # sizes, summing to len(events)
    reopen_after: frozenset[int]  # batch indexes after which the store is reopened


CHAINS = ["previous"] * 12 + ["root", "missing", "any"]
BUSHES = ["root", "missing", "previous", "any", "any"]


@st.composite
def forests(draw: st.DrawFn) -> Forest:
    size = draw(st.integers(min_value=1, max_value=24))
    # parents[i]: None (a root), -k-1 (the k-th missing leader), or an earlier index.
    parents: list[int | None] = []
    depth: list[int] = []
    # "chains" makes long chains likely (up to the depth limit), "bushes" many siblings.
    kinds = draw(st.sampled_from([CHAINS, BUSHES]))
    for i in range(size):
        kind = draw(st.sampled_from(kinds))
        parent: int | None = None
        if kind == "missing":
            parent = -draw(st.integers(min_value=1, max_value=3))
        elif i and kind in ("previous", "any"):
            parent = i - 1 if kind == "previous" else draw(st.integers(0, i - 1))
            if depth[parent] >= MAX_DEPTH_OF_PRECEDING_EVENT:
                parent = None
        parents.append(parent)
        depth.append(0 if parent is None else 1 if parent < 0 else depth[parent] + 1)

    ids = [UUID(int=draw(st.integers(0, 2**62)) << 64 | i) for i in range(size)]
    missing_ids = [UUID(int=(2**63 + k) << 64) for k in range(4)]
    # Occurred after the leader (ties allowed between siblings), in whole milliseconds.
    occurred: list[datetime] = []
    follows: list[UUID | None] = []
    for parent in parents:
        offset = timedelta(milliseconds=draw(st.integers(0, 5)))
        if parent is None:
            occurred.append(T0 + offset)
            follows.append(None)
        elif parent < 0:
            occurred.append(T0 + offset)
            follows.append(missing_ids[-parent - 1])
        else:
            occurred.append(occurred[parent] + offset + timedelta(milliseconds=1))
            follows.append(ids[parent])
    order = draw(st.permutations(range(size)))
    events = [
        ReceivedEvent(
            event=f"e.{i}",
            resource=RESOURCE,
            occurred=occurred[i],
            received=T0 + timedelta(seconds=1 + position),
            id=ids[i],
            follows=follows[i],
        )
        for position, i in enumerate(order)
    ]
    batches: list[int] = []
    left = size
    while left:
        batches.append(draw(st.integers(1, left)))
        left -= batches[-1]
    reopen = draw(st.frozensets(st.integers(0, len(batches) - 1)))
    return Forest(events, frozenset(missing_ids), batches, reopen)


def reference(events: Sequence[ReceivedEvent]) -> tuple[list[UUID], set[UUID]]:
    """docs/ORDERING.md#the-algorithm without time or depth: (processed ids in order, ids left
    parked)."""
    seen: set[UUID] = set()
    parked: dict[UUID, list[ReceivedEvent]] = {}
    out: list[UUID] = []

    def process(event: ReceivedEvent) -> None:
        out.append(event.id)
        seen.add(event.id)
        for follower in sorted(parked.pop(event.id, []), key=lambda f: (f.occurred, str(f.id))):
            process(follower)

    for event in events:
        if event.follows is None or event.follows in seen:
            process(event)
        else:
            parked.setdefault(event.follows, []).append(event)
    return out, {f.id for followers in parked.values() for f in followers}


class Handler:
    def __init__(self, ordering: CausalOrdering, now: datetime) -> None:
        self.ordering = ordering
        self.now = now
        self.processed: list[tuple[UUID, int]] = []

    def __call__(self, event: ReceivedEvent, depth: int = 0) -> None:
        with self.ordering.preceding_event_confirmed(self, event, depth, now=self.now):
            self.processed.append((event.id, depth))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ordering-property")


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(forest=forests())
def test_any_forest_any_order_any_batching(workdir: Path, forest: Forest) -> None:
    path = workdir / f"{forest.events[0].id}.db"
    store = Store.open(path, synchronous="normal")
    processed: list[tuple[UUID, int]] = []
    try:
        delivered = iter(forest.events)
        for index, size in enumerate(forest.batches):
            batch = [next(delivered) for _ in range(size)]
            ordering = CausalOrdering("triggers", store.conn)
            handler = Handler(ordering, now=batch[-1].received)
            with store.conn:
                for event in batch:
                    if ordering.event_has_been_seen(event, now=handler.now):
                        continue
                    with contextlib.suppress(EventArrivedEarly):
                        handler(event)
            processed += handler.processed
            if index in forest.reopen_after:
                store.close()
                store = Store.open(path, synchronous="normal")

        expected, stuck = reference(forest.events)
        assert [event_id for event_id, _ in processed] == expected
        assert all(depth <= MAX_DEPTH_OF_PRECEDING_EVENT for _, depth in processed)
        by_id = {event.id: event for event in forest.events}
        position = {event_id: i for i, (event_id, _) in enumerate(processed)}
        for event_id in position:
            leader = by_id[event_id].follows
            assert leader is None or position[leader] < position[event_id]
        # Stuck exactly when the chain above reaches a leader that never came.
        for event in forest.events:
            chain_leader = event.follows
            while chain_leader is not None and chain_leader in by_id:
                chain_leader = by_id[chain_leader].follows
            assert (event.id in stuck) == (chain_leader in forest.missing)

        ordering = CausalOrdering("triggers", store.conn)
        assert {f.id for f in ordering.followers_by_id(list(by_id))} == stuck
        last_received = forest.events[-1].received
        assert ordering.get_lost_followers(now=last_received) == []

        # After the lookback every stuck event is lost at once, in occurred order, and the
        # periodic task's depth-0 re-evaluation processes each exactly once.
        later = last_received + PRECEDING_EVENT_LOOKBACK
        with store.conn:
            lost = ordering.get_lost_followers(now=later)
            assert [e.id for e in lost] == sorted(stuck, key=lambda i: (by_id[i].occurred, str(i)))
            periodic = Handler(ordering, now=later)
            for event in lost:
                periodic(event)
        assert sorted(i for i, _ in periodic.processed) == sorted(stuck)
        assert ordering.parked_count() == 0
    finally:
        store.close()
        for suffix in ("", "-wal", "-shm", ".lock"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
