"""The running daemon's counters, as `trigd status` shows them.

Ingest and the evaluator count in memory (connections, events, rejected frames, refused
handshakes, batches, duplicates, ...). SPEC §4 says bad frames are counted; an operator
sees those counts through `trigd status`, which only reads the database. So every sweeper
pass writes a snapshot to the `meta` table, and it outlives the process: after a crash,
status still shows what the daemon had counted by its last pass.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

import attrs

META_KEY: Final = "daemon_counters"
"""The `meta` row holding the latest snapshot (JSON)."""


def _stamp(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


@attrs.frozen
class CounterSource:
    """Where a snapshot comes from: the process, and its counter groups (attrs classes,
    such as ``IngestStats`` and ``EvaluatorStats``), read when a snapshot is taken."""

    pid: int
    started: datetime
    groups: Mapping[str, Any]

    def snapshot(self, now: datetime) -> str:
        return json.dumps(
            {
                "pid": self.pid,
                "started": _stamp(self.started),
                "as_of": _stamp(now),
                **{name: attrs.asdict(group) for name, group in self.groups.items()},
            }
        )


def describe(snapshot: Mapping[str, Any]) -> list[str]:
    """Status lines for a stored snapshot (see `CounterSource.snapshot`)."""
    lines = [
        f"daemon: pid {snapshot.get('pid')}, started {snapshot.get('started')}, "
        f"counters as of {snapshot.get('as_of')}"
    ]
    ingest = snapshot.get("ingest")
    if isinstance(ingest, dict):
        lines.append(
            f"  ingest: {ingest.get('connections', 0)} connections open "
            f"({ingest.get('connections_total', 0)} in all), {ingest.get('events', 0)} events, "
            f"{ingest.get('rejected', 0)} rejected frames, "
            f"{ingest.get('handshakes_refused', 0)} refused handshakes, "
            f"{ingest.get('pings', 0)} pings"
        )
    evaluator = snapshot.get("evaluator")
    if isinstance(evaluator, dict):
        lines.append(
            f"  evaluator: {evaluator.get('batches', 0)} batches "
            f"(largest {evaluator.get('largest_batch', 0)}), {evaluator.get('events', 0)} events, "
            f"{evaluator.get('duplicates', 0)} duplicates, {evaluator.get('parked', 0)} parked, "
            f"{evaluator.get('internal_errors', 0)} internal errors, "
            f"{evaluator.get('store_retries', 0)} store retries"
        )
    return lines
