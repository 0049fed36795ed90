"""The writer connection and what trigd keeps in memory about it, in one explicit object.

Theory of operation. Some facts are cached beside the database rather than in it, and
they are only true of one connection: causal ordering's in-flight marks (a mark exists
only inside the transaction that sets it), how many times `store.events.push_inbox` ran
on it (so a batch can skip an inbox known to be empty), the events clock read from its
`meta`, whether a committed batch found the inbox empty, and the models of the events it
queued in the inbox (so the batch that drains them need not parse them). They live in one
`ConnectionState`, created with the connection (`Connection`, an `apsw.Connection` that
carries its `state`) and owned by whoever owns the connection (`store.db.Store`, used by
the daemon through its store gateway). Functions that need the state take a `Connection`
and read `conn.state`: there is no module-level table keyed by connection, and a new
connection (a reopened store) starts with fresh state by construction.

A transaction that does not commit calls `ConnectionState.rolled_back` (through
`daemon.runtime.evaluator.engine_transaction`), so what was cached from it is reread.
"""

from __future__ import annotations

from typing import Any

import apsw

from daemon.core.clock import EventsClock
from daemon.core.events import ReceivedEvent


class OrderingMarks:
    """What every `CausalOrdering` of one scope on one connection shares, in memory
    (`daemon.engine.ordering`: in-flight marks, known leaders, a batch's seen marks)."""

    __slots__ = ("in_flight", "kept_seen", "kept_seen_limit", "leaders", "pending_seen", "stale")

    def __init__(self) -> None:
        self.in_flight: set[str] = set()
        """Ids (text, as the engine has them already) of the events being processed."""
        self.leaders: set[str] = set()
        """Leaders that may have parked followers (a superset); valid unless `stale`."""
        self.stale = True
        self.pending_seen: dict[str, int] | None = None
        """Inside `batch()`: seen marks (id -> seen_us) not yet written; else None."""
        self.kept_seen: dict[str, int] | None = None
        """Seen marks of earlier batches held instead of written, up to `kept_seen_limit`
        (a backtest's scratch store: `CausalOrdering.keep_seen`); None: written."""
        self.kept_seen_limit = 0

    def forget(self) -> None:
        self.in_flight.clear()
        self.leaders.clear()
        if self.pending_seen is not None:
            self.pending_seen.clear()
        if self.kept_seen is not None:
            self.kept_seen.clear()


class ConnectionState:
    """Everything kept in memory about one connection (see the module docstring)."""

    __slots__ = ("events_clock", "inbox_empty_at", "inbox_made", "inbox_pushes", "ordering")

    def __init__(self) -> None:
        self.ordering: dict[str, OrderingMarks] = {}
        """Causal ordering's marks, per scope."""
        self.inbox_pushes = 0
        """How many times `push_inbox` ran on this connection, committed or not."""
        self.inbox_empty_at: int | None = None
        """`inbox_pushes` when a batch last found the inbox empty; while it is unchanged
        (and that batch committed) nothing can be in it. None: look."""
        self.events_clock: EventsClock | None = None
        """The events clock as read from `meta` and updated since; None: read it."""
        self.inbox_made: dict[str, ReceivedEvent] = {}
        """Events queued in the inbox on this connection, by their JSON, as the models
        they were made from: a batch that drains its own firings' events (the common
        case) takes them from here instead of parsing what it just wrote. Keyed by
        content, so an entry whose transaction rolled back is still right; a cache,
        bounded by `INBOX_MADE_LIMIT` (a miss parses)."""

    def marks(self, scope: str) -> OrderingMarks:
        marks = self.ordering.get(scope)
        if marks is None:
            marks = self.ordering[scope] = OrderingMarks()
        return marks

    def rolled_back(self) -> None:
        """A transaction did not commit (maybe its COMMIT failed): forget what was cached
        from it, so the next one rereads the events clock and looks into the inbox."""
        self.events_clock = None
        self.inbox_empty_at = None


class Connection(apsw.Connection):
    """An apsw connection that carries its `ConnectionState`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state: ConnectionState = ConnectionState()
