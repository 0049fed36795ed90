"""The state of `[upstream]` (forwarding to and subscribing from a Prefect server), as
`trigd status`, `/api/ready` and the metrics show it.

`UpstreamStats` is one of the counter groups the sweeper snapshots into `meta`
(daemon/core/counters.py); the forward and subscribe tasks write it, nothing reads it back
to decide anything. `last_error` is a sentence made by trigd (the kind of failure and the
upstream's reason), never a credential.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime
from typing import Final

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
    refused: int = 0  # events skipped because the upstream refused them (PoisonHunt)

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


STRIKES: Final = 3
"""Connections in a row the upstream closes on the same unconfirmed events before trigd
looks for the one it refuses, and then before it skips that one."""


@attrs.define
class PoisonHunt:
    """Finds the event the upstream refuses, without I/O.

    Prefect's server closes `/events/in` when one message fails its validation, after
    having answered the checkpoint of the frames it had read: so a page that keeps
    failing holds an event it refuses, somewhere. After `strikes` connections in a row
    closed by the server from the same cursor with events sent, the forwarder sends the
    events it had sent one at a time (`limit` 1) from that cursor up to the last of them;
    an event whose own connection is then closed `strikes` times in a row is the one
    refused (`ended` returns its seq, to skip). A failure that is not a close by the server
    after authentication (the upstream down, a connect error, a timeout), or with nothing
    sent, is no evidence. A connection may start before the cursor of the closes (pages
    held by the `ResendWindow`): those pages go in full, as before.
    """

    strikes: int = STRIKES
    failures: int = 0  # closes in a row from cursor `at`
    at: int = -1
    probe_from: int = 0  # one event at a time from this cursor ...
    probe_through: int = 0  # ... up to this seq

    def probing(self, cursor: int) -> bool:
        return self.probe_from <= cursor < self.probe_through

    def limit(self, cursor: int, page_events: int) -> int:
        """How many events to send from `cursor` before the next checkpoint."""
        return 1 if self.probing(cursor) else page_events

    def ended(self, cursor: int, sent_through: int, *, closed_by_server: bool) -> int | None:
        """A connection ended with the cursor at `cursor` and events up to `sent_through`
        sent and unconfirmed. Returns the seq of the event to skip as refused, or None."""
        if not closed_by_server or sent_through <= cursor:
            return None
        if cursor != self.at:
            self.at, self.failures = cursor, 0
        self.failures += 1
        if self.failures < self.strikes:
            return None
        self.failures = 0
        if self.probing(cursor):  # one event was sent: it is the one
            return sent_through
        self.probe_from, self.probe_through = cursor, sent_through
        return None


@attrs.define
class ResendWindow:
    """Pages the upstream confirmed, kept out of the stored cursor for `seconds`.

    Prefect's server answers a checkpoint before it validates the frames, so `settle` is a
    bet that it validates within that time. When it loses (a server stalled for a moment
    past `settle`), the server drops the connection on a refused event after the page that
    held it was counted, and the events after it in that page were never taken. So the
    cursor stored in `meta`, where every new connection starts, only moves to a page once
    it has been confirmed `seconds` ago: a connection that ends sooner, for whatever
    reason, sends those pages again (Prefect keeps one event per id). A page of one event
    sent while looking for a refused one (`alone`) is stored at once: the `PoisonHunt`
    must move past it, and nothing followed it in its page."""

    seconds: float
    _pending: deque[tuple[float, int]] = attrs.field(factory=deque)

    def clear(self) -> None:
        """A new connection starts from the stored cursor: nothing it sends is confirmed."""
        self._pending.clear()

    def counted(self, seq: int, now: float, *, alone: bool) -> int | None:
        """The page through `seq` was confirmed at `now` (seconds, monotonic). Returns the
        cursor to store now, if any."""
        if alone:
            self._pending.clear()
            return seq
        self._pending.append((now, seq))
        return self.due(now)

    def due(self, now: float) -> int | None:
        """The last seq confirmed at least `seconds` before `now`, to store; None if no
        page came of age since the last call."""
        through = None
        while self._pending and now - self._pending[0][0] >= self.seconds:
            through = self._pending.popleft()[1]
        return through


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
        f"    {values.get('forwarded', 0)} forwarded, {values.get('refused', 0)} refused upstream, "
        f"{values.get('taken', 0)} taken, {values.get('rejected', 0)} rejected, "
        f"{values.get('dropped', 0)} dropped past backlog",
    ]
    if values.get("last_error"):
        lines.append(f"    last error: {values['last_error']}")
    return lines
