"""The state of `[upstream]` (forwarding to and subscribing from a Prefect server), as
`trigd status`, `/api/ready` and the metrics show it.

`UpstreamStats` is one of the counter groups the sweeper snapshots into `meta`
(daemon/core/counters.py); the forward and subscribe tasks write it, nothing reads it back
to decide anything. `last_error` is a sentence made by trigd (the kind of failure and the
upstream's reason), never a credential.
"""

from __future__ import annotations

from datetime import datetime

import attrs

from daemon.core.clock import to_us


@attrs.define
class UpstreamStats:
    forward_connected: bool = False
    subscribe_connected: bool = False
    backlog: int = 0  # events committed and not yet confirmed by the upstream
    backlog_age_seconds: float = 0.0  # how long the oldest of them has waited
    lag_seconds: float = 0.0  # taken from the upstream: now - occurred of the latest
    last_error: str | None = None
    forwarded: int = 0  # events the upstream confirmed (checkpoint) since start
    taken: int = 0  # events received from the upstream's /events/out since start
    rejected: int = 0  # of those, events trigd could not accept
    dropped: int = 0  # unforwarded events deleted past `backlog` since start

    def backlog_seen(self, count: int, oldest_received_us: int | None, now: datetime) -> None:
        self.backlog = count
        age = 0 if oldest_received_us is None else max(0, to_us(now) - oldest_received_us)
        self.backlog_age_seconds = round(age / 1e6, 3)

    def taken_at(self, occurred: datetime, now: datetime) -> None:
        self.taken += 1
        self.lag_seconds = round(max(0.0, (now - occurred).total_seconds()), 3)

    def ready_reasons(self, *, forwarding: bool, subscribing: bool) -> list[str]:
        """What `/api/ready` reports (reasons, not failure) while a configured direction
        is not connected."""
        why = f": {self.last_error}" if self.last_error else ""
        reasons = []
        if forwarding and not self.forward_connected:
            reasons.append(f"upstream forward not connected{why}")
        if subscribing and not self.subscribe_connected:
            reasons.append(f"upstream subscribe not connected{why}")
        return reasons


def next_position(current: datetime | None, occurred: datetime, received: datetime) -> datetime:
    """The subscribe position after an event was committed: the latest `occurred` taken,
    but never past when it was received, so that one event stamped in the future cannot
    make every reconnect ask for events from then on."""
    taken = min(occurred, received)
    return taken if current is None or taken > current else current


def describe(values: dict[str, object]) -> list[str]:
    """`trigd status` lines for the `upstream` group of a counters snapshot."""

    def state(key: str) -> str:
        return "connected" if values.get(key) else "not connected"

    lines = [
        f"  upstream: forward {state('forward_connected')}, "
        f"subscribe {state('subscribe_connected')}",
        f"    backlog {values.get('backlog', 0)} events, oldest "
        f"{values.get('backlog_age_seconds', 0)}s; lag {values.get('lag_seconds', 0)}s",
        f"    {values.get('forwarded', 0)} forwarded, {values.get('taken', 0)} taken, "
        f"{values.get('rejected', 0)} refused, {values.get('dropped', 0)} dropped past backlog",
    ]
    if values.get("last_error"):
        lines.append(f"    last error: {values['last_error']}")
    return lines
