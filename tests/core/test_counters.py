"""The counter snapshots the sweeper stores for `trigd status` (daemon/core/counters.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from daemon.core.counters import CounterSource, describe
from daemon.runtime.evaluator import EvaluatorStats
from daemon.runtime.events_out import EventsOutStats
from daemon.runtime.ingest import IngestStats

T0 = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)


def test_a_snapshot_is_taken_only_when_a_counter_changed_since_the_last_one_stored() -> None:
    ingest = IngestStats()
    source = CounterSource(7, T0, {"ingest": ingest})
    first = source.snapshot(T0)
    assert first is not None
    assert source.snapshot(T0 + timedelta(seconds=5)) is not None  # the first was not stored
    source.stored()
    assert source.snapshot(T0 + timedelta(seconds=10)) is None  # idle: nothing to write
    ingest.rejected += 1
    changed = source.snapshot(T0 + timedelta(seconds=15))
    assert changed is not None
    assert json.loads(changed) == {
        "pid": 7,
        "started": "2026-12-03T08:00:00Z",
        "as_of": "2026-12-03T08:00:15Z",
        "ingest": {
            "connections": 0,
            "connections_total": 0,
            "events": 0,
            "rejected": 1,
            "pings": 0,
            "handshakes_refused": 0,
            "handshakes": 0,
            "refused_per_peer": 0,
            "refused_busy": 0,
            "idle_closed": 0,
            "rejected_by": {},  # per reason, counted by IngestStats.reject (/metrics)
        },
    }


def test_status_lines_name_every_counter() -> None:
    source = CounterSource(
        7, T0, {"ingest": IngestStats(events=5, rejected=2), "evaluator": EvaluatorStats(batches=3)}
    )
    snapshot = source.snapshot(T0)
    assert snapshot is not None
    assert describe(json.loads(snapshot)) == [
        "daemon: pid 7, started 2026-12-03T08:00:00Z, counters as of 2026-12-03T08:00:00Z",
        "  ingest: 0 connections open, 0 connections in all, 5 events, 2 rejected frames, "
        "0 refused handshakes, 0 pings, 0 handshakes in progress, "
        "0 refused over max_connections_per_peer, 0 refused for want of a slot, 0 closed idle",
        "  evaluator: 3 batches, 0 events in the largest, 0 events, 0 duplicates, 0 parked, "
        "0 internal errors, 0 store retries",
    ]


def test_status_lines_show_events_out_subscribers() -> None:
    stats = EventsOutStats(subscribers=1, subscribers_total=4, sent=120, slow_closed=2)
    snapshot = CounterSource(7, T0, {"events_out": stats}).snapshot(T0)
    assert snapshot is not None
    assert describe(json.loads(snapshot))[1:] == [
        "  events_out: 1 subscribers, 4 subscribers in all, 120 events sent, "
        "2 closed too slow, 0 dropped stalled",
    ]
