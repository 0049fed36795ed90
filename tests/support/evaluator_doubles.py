"""Stand-ins around the evaluator, shared by the evaluator, ingest and connection-limit tests:
a frozen clock, the real engine behind a gate or refused by the store for a while, and the
event ids a database file holds."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import apsw
import attrs

from daemon.core.events import ReceivedEvent
from daemon.engine.engine import BatchOutcome, Engine
from store.connection import Connection
from store.db import Store

NOW = datetime(2026, 11, 23, 10, 0, 0, tzinfo=UTC)


def fixed_clock() -> datetime:
    return NOW


def stored_ids(path: Path) -> set[str]:
    reader = Store.open_readonly(path)
    try:
        return {str(row[0]) for row in reader.conn.execute("SELECT id FROM events")}
    finally:
        reader.conn.close()


@attrs.define
class GatedEngine:
    """The real engine, but each batch waits in the store thread until the gate opens."""

    inner: Engine
    gate: threading.Event = attrs.Factory(threading.Event)
    entered: threading.Event = attrs.Factory(threading.Event)
    batches: list[int] = attrs.Factory(list)

    def process_batch(
        self, conn: Connection, events: Sequence[ReceivedEvent], now: datetime
    ) -> BatchOutcome:
        self.batches.append(len(events))
        self.entered.set()
        self.gate.wait()
        return self.inner.process_batch(conn, events, now)

    def rolled_back(self) -> None:
        self.inner.rolled_back()


@attrs.define
class TroubledEngine:
    """Raises `trouble` (SQLite's "database is locked" unless told) for the first
    ``failures`` batches, whatever their size."""

    inner: Engine
    failures: int
    trouble: type[apsw.Error] = apsw.BusyError
    calls: int = 0

    def process_batch(
        self, conn: Connection, events: Sequence[ReceivedEvent], now: datetime
    ) -> BatchOutcome:
        self.calls += 1
        outcomes = self.inner.process_batch(conn, events, now)
        if self.calls <= self.failures:
            raise self.trouble("the store refuses this batch")
        return outcomes

    def rolled_back(self) -> None:
        self.inner.rolled_back()
