"""Causal ordering of events that declare `follows` (docs/ORDERING.md#the-algorithm, and where
trigd differs: docs/ORDERING.md#where-trigd-differs-from-prefect).

Theory of operation. An event that follows another is only evaluated after its leader has
been (the leader is "seen"). One that arrives first is *parked* (a row in
`ordering_followers` holding its JSON) and `EventArrivedEarly` is raised; when the leader
completes, it claims its parked followers in `occurred` order and hands each to the
handler one level deeper, so chains resolve recursively up to `max_depth`. A follower
whose leader never comes is handed out by `get_lost_followers` once it is older than the
lookback, and then proceeds without waiting (it is too old to keep bookkeeping for).

trigd has one writer and evaluates a whole batch in one thread inside one SQLite
transaction, so this is Prefect's memory algorithm made synchronous and durable: there is
no lock and no polling. A leader can only be "processing" higher up the same call stack;
a follower that finds it so parks, and the leader's completion claims it. Every method
whose outcome depends on time takes `now`; nothing here reads a clock.

Seen ids and parked followers are durable state and live in the database. "Processing"
is not: it says "a frame on this stack is running the event", it is only observable from
inside that frame, and a mark that outlived its frame (a crash after a commit) could only
ever be stale, refusing that event forever. So in-flight marks are kept in memory, in
the connection's state (`store.connection.ConnectionState.ordering`, per scope, shared by
every instance on that connection like Prefect's per-scope singleton), and cost no SQL:
an event without `follows` costs two statements, one write and one read.

Inside `batch()` (the engine wraps each transaction's events in one) an event without
`follows` costs no statement at all: seen marks wait in memory and are written together
when the batch ends (a later event of the same batch sees them), and the leaders that have
parked followers are known in memory, so completing any other event asks nothing. That
set only ever grows between reloads (parking adds, releasing does not remove), so a
rolled-back transaction can only leave it too large, never missing a leader; it is
reloaded at the start of the next batch after a release or a failure, when the
transaction has not changed anything yet.

An event it waits for may be a stored row not parsed yet (`EvaluatedEvent`): only its
id, `follows` and `received` are read, and it is parsed only to be parked.

A backtest's replay goes one step further (`keep_seen`): its seen marks stay in memory
across batches, up to a bound, and reach the table only past it. A mark is only ever
read back by an event that follows that one (`_is_seen`), which looks in memory first,
and by the sweeper's expiry, which the replay does not run; so the table's copy is
never needed on a store that is thrown away afterwards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, Final, Protocol
from uuid import UUID

from daemon.core.clock import span_us, to_us
from daemon.core.config import (
    MAX_DEPTH_OF_PRECEDING_EVENT,
    PRECEDING_EVENT_LOOKBACK,
    SEEN_EXPIRATION,
)
from daemon.core.events import EvaluatedEvent, Event, ReceivedEvent
from store import ordering as db
from store.connection import Connection

logger = logging.getLogger(__name__)


class EventHandler(Protocol):
    """What releases a follower: `handler(event, depth)`, re-entering the ordering."""

    def __call__(self, event: ReceivedEvent, depth: int, /) -> None: ...


class OrderingException(Exception):
    """Base of the ordering's signals; `event` is the event they concern."""

    def __init__(self, event: ReceivedEvent) -> None:
        super().__init__(f"{event.event!r} ({event.id}) for {event.resource.id!r}")
        self.event = event


class EventArrivedEarly(OrderingException):
    """The event is parked until its leader is processed (or it is lost): not an error."""


class MaxDepthExceeded(OrderingException):
    """Refused: a chain of followers this deep is either too long or a cycle."""


class EventBeingProcessed(OrderingException):
    """The event is already in flight (re-entered while its own processing runs)."""


def _event_id(event: UUID | Event) -> str:
    return str(event.id if isinstance(event, Event) else event)


def _load(rows: Sequence[db.FollowerRow]) -> list[ReceivedEvent]:
    return [ReceivedEvent.model_validate_json(row.event) for row in rows]


class CausalOrdering:
    """Prefect's `CausalOrdering` API, synchronous; seen ids and parked followers in the
    database, in-flight marks in memory (see the module docstring).

    Instances are cheap views: two instances of one scope on one connection share
    everything. Calls run inside the caller's transaction when there is one; multi-step
    methods that are called outside any transaction open their own.
    """

    def __init__(
        self,
        scope: str,
        conn: Connection,
        *,
        preceding_event_lookback: timedelta = PRECEDING_EVENT_LOOKBACK,
        seen_expiration: timedelta = SEEN_EXPIRATION,
        max_depth: int = MAX_DEPTH_OF_PRECEDING_EVENT,
    ) -> None:
        if not isinstance(scope, str) or not scope:
            raise ValueError("scope: must be a non-empty string")
        if preceding_event_lookback < timedelta(0):
            raise ValueError("preceding_event_lookback: must not be negative")
        if seen_expiration <= timedelta(0):
            raise ValueError("seen_expiration: must be positive")
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0:
            raise ValueError("max_depth: must be a non-negative integer")
        self.scope: Final = scope
        self.conn: Final = conn
        self.preceding_event_lookback: Final = preceding_event_lookback
        self.seen_expiration: Final = seen_expiration
        self.max_depth: Final = max_depth
        self._lookback_us = span_us(preceding_event_lookback)
        self._expiration_us = span_us(seen_expiration)
        self._state = conn.state.marks(scope)
        self._in_flight = self._state.in_flight

    def __repr__(self) -> str:
        return f"CausalOrdering(scope={self.scope!r})"

    def _atomic(self) -> contextlib.AbstractContextManager[Any]:
        """Inside the caller's transaction the single writer already makes us atomic."""
        return contextlib.nullcontext() if self.conn.in_transaction else self.conn

    # --- clearing ----------------------------------------------------------------------

    def clear(self) -> None:
        """Forget everything of this scope."""
        with self._atomic():
            db.clear_scope(self.conn, self.scope)
        self._state.forget()

    def clear_all_scopes(self) -> None:
        """Forget everything of every scope on this database (tests, `trigd` resets)."""
        with self._atomic():
            db.clear_all_scopes(self.conn)
        for marks in self.conn.state.ordering.values():
            marks.forget()

    # --- batches -----------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Process one transaction's events with the seen marks kept in memory until the
        end and the parked leaders known in memory (see the module docstring).

        Enter it at the start of a transaction and leave it before the commit: on the way
        out the marks are written; if the body raises they are dropped with the
        transaction. Not reentrant.
        """
        state = self._state
        if state.pending_seen is not None:
            raise RuntimeError(f"{self!r}: batch() is already active")
        if state.stale:
            state.leaders = db.leaders(self.conn, self.scope)
            state.stale = False
        pending: dict[str, int] = {}
        state.pending_seen = pending
        try:
            yield
            if pending:
                self._write_seen(pending)
        except BaseException:
            state.stale = True  # the transaction will roll back: trust only the database
            raise
        finally:
            state.pending_seen = None

    def keep_seen(self, limit: int) -> None:
        """Keep the seen marks of the batches (`batch()`) in memory, up to `limit` (past
        it, they are written to the table in the batch's transaction and forgotten),
        instead of writing each batch's; 0: stop, dropping what is held unwritten.

        Only for a store that is thrown away afterwards and on any failure (a
        backtest's scratch store): a batch whose COMMIT then fails leaves its marks in
        memory, and what is held is never written."""
        if limit < 0:
            raise ValueError("limit: must not be negative")
        state = self._state
        state.kept_seen = {} if limit else None
        state.kept_seen_limit = limit

    def _write_seen(self, marks: dict[str, int]) -> None:
        """A batch's seen marks, into the table or into what `keep_seen` holds."""
        state = self._state
        kept = state.kept_seen
        if kept is None:
            db.mark_seen_many(self.conn, self.scope, marks.items())
        elif len(kept) + len(marks) > state.kept_seen_limit:
            db.mark_seen_many(self.conn, self.scope, [*kept.items(), *marks.items()])
            kept.clear()
        else:
            kept.update(marks)

    # --- processing --------------------------------------------------------------------

    def record_event_as_processing(self, event: ReceivedEvent) -> bool:
        """Mark in flight; False if it already was."""
        event_id = str(event.id)
        if event_id in self._in_flight:
            return False
        self._in_flight.add(event_id)
        return True

    def event_has_started_processing(self, event: UUID | Event) -> bool:
        return _event_id(event) in self._in_flight

    def forget_event_is_processing(self, event: ReceivedEvent) -> None:
        self._in_flight.discard(str(event.id))

    @contextlib.contextmanager
    def event_is_processing(self, event: ReceivedEvent, *, now: datetime) -> Iterator[None]:
        """In flight for the body; seen after it succeeds; never left in flight."""
        if not self.record_event_as_processing(event):
            self._log(event, "is already being processed")
            raise EventBeingProcessed(event)
        try:
            yield
            self.record_event_as_seen(event, now=now)
        finally:
            self.forget_event_is_processing(event)

    # --- seen --------------------------------------------------------------------------

    def event_has_been_seen(self, event: UUID | Event, *, now: datetime) -> bool:
        """Processed within `seen_expiration` before `now`."""
        return self._is_seen(_event_id(event), to_us(now) - self._expiration_us)

    def _is_seen(self, event_id: str, cutoff_us: int) -> bool:
        state = self._state
        for held in (state.pending_seen, state.kept_seen):  # the newest marks first
            if held is not None:
                seen_us = held.get(event_id)
                if seen_us is not None:
                    return seen_us > cutoff_us
        return db.is_seen(self.conn, self.scope, event_id, cutoff_us)

    def record_event_as_seen(self, event: ReceivedEvent, *, now: datetime) -> None:
        self._mark_seen(str(event.id), to_us(now))

    def _mark_seen(self, event_id: str, now_us: int) -> None:
        pending = self._state.pending_seen
        if pending is not None:
            pending[event_id] = now_us
        else:
            self._mark_seen_now(event_id, now_us)

    def _mark_seen_now(self, event_id: str, now_us: int) -> None:
        """Outside a batch: into the table at once (an older mark held is dropped)."""
        kept = self._state.kept_seen
        if kept is not None:
            kept.pop(event_id, None)
        db.mark_seen(self.conn, self.scope, event_id, now_us)

    def expire_seen(self, now: datetime) -> int:
        """For the sweeper: drop ids older than `seen_expiration`; returns how many."""
        cutoff_us = to_us(now) - self._expiration_us
        expired = 0
        kept = self._state.kept_seen
        if kept:
            gone = [event_id for event_id, seen_us in kept.items() if seen_us <= cutoff_us]
            for event_id in gone:
                del kept[event_id]
            expired = len(gone)
        return expired + db.expire_seen(self.conn, self.scope, cutoff_us)

    # --- followers ---------------------------------------------------------------------

    def record_follower(self, event: ReceivedEvent) -> None:
        """Park `event` until its leader is processed or it is lost."""
        if event.follows is None:
            raise ValueError(f"follows: event {event.id} follows nothing, it cannot be parked")
        row = db.FollowerRow(
            follower_id=str(event.id),
            leader_id=str(event.follows),
            received_us=to_us(event.received),
            occurred_us=to_us(event.occurred),
            event=event.model_dump_json(),
        )
        db.park(self.conn, self.scope, row)
        self._state.leaders.add(row.leader_id)

    def forget_follower(self, follower: ReceivedEvent) -> None:
        """It no longer waits (processed, or handed out as lost)."""
        db.unpark(self.conn, self.scope, str(follower.id))

    def get_followers(self, leader: UUID | Event) -> list[ReceivedEvent]:
        """The events parked on this leader, in occurred order; they stay parked."""
        return _load(db.followers_of(self.conn, self.scope, _event_id(leader)))

    def followers_by_id(self, follower_ids: Sequence[UUID]) -> list[ReceivedEvent]:
        """The parked events among these ids, in occurred order."""
        ids = [str(follower_id) for follower_id in follower_ids]
        return _load(db.followers_by_id(self.conn, self.scope, ids))

    def get_lost_followers(self, *, now: datetime) -> list[ReceivedEvent]:
        """Unpark and return followers received at least the lookback ago, occurred order.

        Re-evaluated at depth 0 they proceed without waiting (step 2 of
        docs/ORDERING.md#the-algorithm).
        """
        cutoff = to_us(now) - self._lookback_us
        lost = db.take_lost(self.conn, self.scope, cutoff)
        if lost:
            self._state.stale = True  # their leaders may have none left: shrink the set
        return _load(lost)

    def parked_count(self) -> int:
        return db.parked_count(self.conn, self.scope)

    # --- the algorithm -----------------------------------------------------------------

    def wait_for_leader(self, event: ReceivedEvent, *, now: datetime) -> None:
        """Return if `event` may proceed now; else park it and raise `EventArrivedEarly`.

        There is nothing to wait for in a single writer: a leader that is processing is
        higher up this call stack, and its completion will claim the follower we park.
        """
        self._wait(event, to_us(now))

    def _wait(self, event: EvaluatedEvent, now_us: int) -> None:
        leader = event.follows
        if leader is None or leader == event.id:
            return
        if now_us - to_us(event.received) >= self._lookback_us:
            return
        leader_id = str(leader)
        if self._is_seen(leader_id, now_us - self._expiration_us):
            return
        if leader_id in self._in_flight:
            self._log(event, "arrived while its leader %s is processing", leader)
        else:
            self._log(event, "arrived before the event it follows %s", leader)
        parked = event.parsed()
        self.record_follower(parked)
        raise EventArrivedEarly(parked)

    def complete_event_and_get_followers(
        self, event: ReceivedEvent, *, now: datetime
    ) -> list[ReceivedEvent]:
        """Mark seen, claim the parked followers (occurred order), clear in flight.

        One step, so no follower can park between the leader becoming seen and the
        leader looking for its followers.
        """
        return self._complete(to_us(now), str(event.id))

    def _complete(self, now_us: int, event_id: str) -> list[ReceivedEvent]:
        state = self._state
        try:
            if state.pending_seen is not None:  # in a batch: no statement unless followed
                state.pending_seen[event_id] = now_us
                if event_id not in state.leaders:
                    return []
                rows = db.followers_of(self.conn, self.scope, event_id)
                state.stale = True  # released (or none left): shrink the set next batch
            else:
                with self._atomic():
                    self._mark_seen_now(event_id, now_us)
                    rows = db.followers_of(self.conn, self.scope, event_id)
        finally:
            self._in_flight.discard(event_id)  # even if the store failed: retry must work
        return _load(rows) if rows else []

    @contextlib.contextmanager
    def preceding_event_confirmed(
        self, handler: EventHandler, event: ReceivedEvent, depth: int = 0, *, now: datetime
    ) -> Iterator[None]:
        """Run the body for `event` only once its leader has been processed.

        Raises `MaxDepthExceeded` (nothing recorded) past `max_depth`,
        `EventBeingProcessed` if it is already in flight, and `EventArrivedEarly` after
        parking it. After the body succeeds, the followers that waited for it are handed to
        `handler` one level deeper; if the body fails the event is not seen.
        """
        now_us = to_us(now)
        event_id = str(event.id)
        self._start(event, depth, now_us, event_id)
        try:
            yield
        except BaseException:
            self._in_flight.discard(event_id)
            raise
        self._finish(handler, event, depth, now_us, event_id)

    def run_confirmed(
        self,
        handler: EventHandler,
        event: EvaluatedEvent,
        depth: int,
        body: Callable[[], object],
        *,
        now_us: int,
        event_id: str,
    ) -> None:
        """`preceding_event_confirmed` around `body()` as one plain call, for the engine's
        per-event path: no generator, the wall clock already in µs, the id already text."""
        self._start(event, depth, now_us, event_id)
        try:
            body()
        except BaseException:
            self._in_flight.discard(event_id)
            raise
        self._finish(handler, event, depth, now_us, event_id)

    def _start(self, event: EvaluatedEvent, depth: int, now_us: int, event_id: str) -> None:
        if depth > self.max_depth:
            self._log(event, "has exceeded the maximum recursion depth %s", self.max_depth)
            raise MaxDepthExceeded(event.parsed())
        in_flight = self._in_flight
        if event_id in in_flight:
            self._log(event, "is already being processed")
            raise EventBeingProcessed(event.parsed())
        in_flight.add(event_id)
        try:
            self._wait(event, now_us)
        except BaseException:
            in_flight.discard(event_id)
            raise

    def _finish(
        self, handler: EventHandler, event: EvaluatedEvent, depth: int, now_us: int, event_id: str
    ) -> None:
        followers = self._complete(now_us, event_id)

        for follower in followers:
            try:
                handler(follower, depth + 1)
            except MaxDepthExceeded:
                # The rest stay parked until they are lost (Prefect's memory variant).
                self._log(event, "reached its max depth of %s followers processed.", self.max_depth)
                break

        follows = event.follows
        if follows is not None and follows != event.id:
            db.unpark(self.conn, self.scope, event_id)  # `forget_follower`

    def _log(self, event: EvaluatedEvent, message: str, *args: object) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        logger.info(
            "Event %r (%s) for %r " + message,
            event.event,
            event.id,
            event.resource_id,
            *args,
            extra={
                "event_id": str(event.id),
                "follows": None if event.follows is None else str(event.follows),
                "resource_id": event.resource_id,
            },
        )
