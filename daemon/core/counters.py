"""The running daemon's counters, as `trigd status` shows them.

Ingest and the evaluator count in memory (connections, events, rejected frames, refused
handshakes, batches, duplicates, ...). docs/PROTOCOL.md#bad-input-and-limits says bad frames are
counted; an operator sees those counts through `trigd status`, which only reads the database. So
every sweeper pass writes a snapshot to the `meta` table, and it outlives the process: after a
crash, status still shows what the daemon had counted by its last pass.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final

import attrs

META_KEY: Final = "daemon_counters"
"""The `meta` row holding the latest snapshot (JSON)."""


def _stamp(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


@attrs.define
class CounterSource:
    """Where a snapshot comes from: the process, and its counter groups (attrs classes,
    such as ``IngestStats`` and ``EvaluatorStats``), read when a snapshot is taken."""

    pid: int
    started: datetime
    groups: Mapping[str, Any]
    _stored: dict[str, Any] | None = None
    _taken: dict[str, Any] | None = None

    def snapshot(self, now: datetime) -> str | None:
        """The counters as JSON, or None when none changed since the last snapshot that
        was `stored`: an idle daemon does not write (and fsync) the same row every pass."""
        counts = {name: attrs.asdict(group) for name, group in self.groups.items()}
        if counts == self._stored:
            return None
        self._taken = counts
        return json.dumps(
            {"pid": self.pid, "started": _stamp(self.started), "as_of": _stamp(now), **counts}
        )

    def stored(self) -> None:
        """The last snapshot was committed."""
        self._stored = self._taken


_SHOWN: Final = MappingProxyType(
    {
        "ingest": (
            ("connections", "connections open"),
            ("connections_total", "connections in all"),
            ("events", "events"),
            ("rejected", "rejected frames"),
            ("handshakes_refused", "refused handshakes"),
            ("pings", "pings"),
            ("handshakes", "handshakes in progress"),
            ("refused_per_peer", "refused over max_connections_per_peer"),
            ("refused_busy", "refused for want of a slot"),
            ("idle_closed", "closed idle"),
        ),
        "evaluator": (
            ("batches", "batches"),
            ("largest_batch", "events in the largest"),
            ("events", "events"),
            ("duplicates", "duplicates"),
            ("parked", "parked"),
            ("internal_errors", "internal errors"),
            ("store_retries", "store retries"),
        ),
        "events_out": (
            ("subscribers", "subscribers"),
            ("subscribers_total", "subscribers in all"),
            ("sent", "events sent"),
            ("slow_closed", "closed too slow"),
            ("stalled", "dropped stalled"),
        ),
    }
)
"""The counters `trigd status` prints, per group, in order, with their nouns."""


def describe(snapshot: Mapping[str, Any]) -> list[str]:
    """Status lines for a stored snapshot (see `CounterSource.snapshot`)."""
    lines = [
        f"daemon: pid {snapshot.get('pid')}, started {snapshot.get('started')}, "
        f"counters as of {snapshot.get('as_of')}"
    ]
    for group, shown in _SHOWN.items():
        values = snapshot.get(group)
        if isinstance(values, dict):
            counts = ", ".join(f"{values.get(key, 0)} {noun}" for key, noun in shown)
            lines.append(f"  {group}: {counts}")
    return lines
