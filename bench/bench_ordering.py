"""What causal ordering costs per event, on a real database file.

Run: `.venv/bin/python bench/bench_ordering.py [--batches N] [--synchronous full|normal]`.
Each batch is 500 events in one transaction, as the evaluator commits them; the handler's
body is empty, so the numbers are the ordering's own cost (plus the commit, shown apart).
Cases: events without `follows`; the same with 100,000 followers parked (on leaders that
never come); events that follow an already-seen leader; and a full release (leaders whose
followers are all parked). Also counts the SQL statements per event.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final
from uuid import UUID, uuid4

import attrs

from daemon.core.events import ReceivedEvent, Resource
from daemon.engine.ordering import CausalOrdering, EventArrivedEarly
from store.db import Store

BATCH: Final = 500  # events per transaction
PARKED: Final = 100_000  # followers parked for the "crowded" case
NOW: Final = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
RESOURCE: Final = Resource({"prefect.resource.id": "prefect.flow-run.bench"})


def make(n: int, follows: Callable[[int], UUID | None] = lambda i: None) -> list[ReceivedEvent]:
    return [
        ReceivedEvent(
            event="prefect.flow-run.Running",
            resource=RESOURCE,
            occurred=NOW + timedelta(microseconds=i),
            received=NOW + timedelta(microseconds=i),
            id=uuid4(),
            follows=follows(i),
        )
        for i in range(n)
    ]


class Handler:
    def __init__(self, ordering: CausalOrdering) -> None:
        self.ordering = ordering
        self.processed = 0

    def __call__(self, event: ReceivedEvent, depth: int = 0) -> None:
        with self.ordering.preceding_event_confirmed(self, event, depth, now=NOW):
            self.processed += 1


def _statements(store: Store) -> int:
    """Statements run so far: apsw counts every one it prepares or takes from its cache."""
    stats = store.conn.cache_stats()
    return int(stats["hits"]) + int(stats["misses"]) + int(stats["no_cache"])


@attrs.frozen
class Result:
    inside: float  # µs per event inside the transactions
    total: float  # µs per event including the commits
    statements: float  # SQL statements per event (BEGIN and COMMIT not counted)


def run_batches(store: Store, handler: Handler, events: list[ReceivedEvent]) -> Result:
    inside = 0.0
    statements = 0
    start_all = time.perf_counter()
    for start in range(0, len(events), BATCH):
        with store.conn:
            before = _statements(store)
            t0 = time.perf_counter()
            for event in events[start : start + BATCH]:
                with contextlib.suppress(EventArrivedEarly):
                    handler(event)
            inside += time.perf_counter() - t0
            statements += _statements(store) - before
    total = time.perf_counter() - start_all
    n = len(events)
    return Result(inside / n * 1e6, total / n * 1e6, statements / n)


def park_followers(store: Store, ordering: CausalOrdering, n: int) -> None:
    """Followers of leaders that never come, received just now so none is lost."""
    leaders = [uuid4() for _ in range(n // 4)]
    parked = make(n, lambda i: leaders[i % len(leaders)])
    for start in range(0, n, 5_000):
        with store.conn:
            for event in parked[start : start + 5_000]:
                ordering.record_follower(event)


def no_follows(store: Store, n: int) -> Result:
    return run_batches(store, Handler(CausalOrdering("triggers", store.conn)), make(n))


def no_follows_crowded(store: Store, n: int) -> Result:
    ordering = CausalOrdering("triggers", store.conn)
    park_followers(store, ordering, PARKED)
    result = run_batches(store, Handler(ordering), make(n))
    assert ordering.parked_count() == PARKED
    return result


def follows_seen_leader(store: Store, n: int) -> Result:
    handler = Handler(CausalOrdering("triggers", store.conn))
    leaders = make(n)
    run_batches(store, handler, leaders)
    return run_batches(store, handler, make(n, lambda i: leaders[i].id))


def parked_then_released(store: Store, n: int) -> Result:
    """Per event, counting both the parking of the followers and the release."""
    ordering = CausalOrdering("triggers", store.conn)
    handler = Handler(ordering)
    leaders = make(n // 2)
    parking = run_batches(store, handler, make(n // 2, lambda i: leaders[i].id))
    release = run_batches(store, handler, leaders)
    assert handler.processed == 2 * (n // 2)
    assert ordering.parked_count() == 0
    return Result(
        (parking.inside + release.inside) / 2,
        (parking.total + release.total) / 2,
        (parking.statements + release.statements) / 2,
    )


CASES: Final[dict[str, Callable[[Store, int], Result]]] = {
    "no follows": no_follows,
    f"no follows, {PARKED:,} followers parked": no_follows_crowded,
    "follows a leader seen earlier": follows_seen_leader,
    "parked, then released by its leader": parked_then_released,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batches", type=int, default=40, help="batches of 500 per case")
    parser.add_argument("--synchronous", choices=["full", "normal"], default="full")
    args = parser.parse_args()
    n = args.batches * BATCH
    print(f"{n:,} events per case, {BATCH} per transaction, synchronous={args.synchronous}")
    print(f"{'case':<44} {'µs/event':>8} {'+commit':>8} {'SQL/event':>9}")
    with tempfile.TemporaryDirectory(prefix="bench-ordering-") as tmp:
        for i, (label, case) in enumerate(CASES.items()):
            store = Store.open(Path(tmp) / f"case{i}.db", synchronous=args.synchronous)
            try:
                result = case(store, n)
            finally:
                store.close()
            print(f"{label:<44} {result.inside:8.1f} {result.total:8.1f} {result.statements:9.1f}")


if __name__ == "__main__":
    main()
