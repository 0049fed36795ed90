"""The events clock (docs/TRIGGERS.md#the-events-clock): how far behind the wall clock evaluation
runs.

Proactive evaluation and the bucket sweep run in event time (`now + offset()`), so a
backlog replayed after an outage does not make proactive triggers fire early (Prefect
regression #3803). The clock is the newest `occurred` processed (never in the future,
never moving back); `updated` is the wall time of the last update, which moves with every
event. The offset `clock - updated` therefore does not drift while the daemon is idle.

Unlike Prefect (process memory), trigd keeps the clock in the `meta` table: `to_json` and
`from_json` are the stored form, so a restart resumes with the offset it had.
All values are integer microseconds since the epoch so they store and compare exactly.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Final

import attrs

META_KEY: Final = "events_clock"
"""The `meta` row holding the clock."""

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)


def to_us(value: datetime) -> int:
    """Microseconds since the epoch; naive datetimes are UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH  # exact, and cheaper than `// _US` (several per event)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def span_us(span: timedelta) -> int:
    """A duration in whole microseconds (floored, as `to_us` floors)."""
    return span // _US


def wall_clock() -> datetime:
    """The real time, for the trio shell to pass in as `now`; the engines never call it."""
    return datetime.now(UTC)


def from_us(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


@attrs.define
class EventsClock:
    clock_us: int | None = None
    """Newest event time processed (µs); None until the first event."""
    updated_us: int | None = None
    """Wall time (µs) of the last update."""

    def update(self, occurred: datetime, now: datetime) -> None:
        """Account for one event about to be evaluated, at wall time `now`."""
        self.update_us(to_us(occurred), to_us(now))

    def update_us(self, occurred_us: int, now_us: int) -> None:
        """`update` with both times already in microseconds (the engine's per-event path)."""
        ts = min(occurred_us, now_us)  # never in the future
        # Prefect also treats a clock of exactly 0 (the epoch) as unset
        if not self.clock_us or ts >= self.clock_us:
            self.clock_us = ts
        self.updated_us = now_us

    @property
    def clock(self) -> datetime | None:
        return None if self.clock_us is None else from_us(self.clock_us)

    def offset(self) -> timedelta:
        """How far event time lags the wall clock; zero before the first event."""
        if self.clock_us is None or self.updated_us is None:
            return timedelta(0)
        return timedelta(microseconds=self.clock_us - self.updated_us)

    def as_of(self, now: datetime) -> datetime:
        """The wall clock `now` in event time."""
        return now + self.offset()

    def reset(self) -> None:
        self.clock_us = None
        self.updated_us = None

    def copy(self) -> EventsClock:
        return EventsClock(self.clock_us, self.updated_us)

    def to_json(self) -> str:
        """`json.dumps` of the two fields, formatted directly (written by every batch)."""
        clock_us, updated_us = self.clock_us, self.updated_us
        return (
            f'{{"clock_us": {"null" if clock_us is None else int(clock_us)}, '
            f'"updated_us": {"null" if updated_us is None else int(updated_us)}}}'
        )

    @classmethod
    def from_json(cls, text: str | None) -> EventsClock:
        """The stored form; a missing or unreadable row is a clock never set."""
        if not text:
            return cls()
        try:
            data = json.loads(text)
            clock_us, updated_us = data["clock_us"], data["updated_us"]
        except (ValueError, KeyError, TypeError):
            return cls()
        if not (isinstance(clock_us, int) and isinstance(updated_us, int)):
            return cls()
        return cls(clock_us, updated_us)
