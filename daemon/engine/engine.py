"""The trigger engine (docs/TRIGGERS.md#reactive-evaluation to #scheduling-and-the-sweeper,
#automations-and-ids): reactive, proactive and periodic evaluation.

Theory of operation. The daemon calls the engine from the store thread, inside one
transaction, with the wall clock as an argument (the engine never reads a clock):

* `process_batch` stores each new event, updates the events clock, passes the event
  through causal ordering (scope "triggers") and evaluates every interested trigger.
  Then it drains the inbox (events trigd made itself) through the same path, a bounded
  number per batch so automations reacting to each other cannot hang one batch; a batch
  skips the inbox when an earlier one found it empty and nothing was queued since
  (`store.events.inbox_pushes`), which is every batch of a quiet daemon. It returns a
  `BatchOutcome`: each event's outcome, and whether the batch left work for the sender or
  the inbox pump (the evaluator wakes them only then). A
  failure propagates and the caller's transaction rolls back the whole batch (the daemon
  retries it, then its events one by one), so no per-trigger SAVEPOINT is needed.
* Which triggers an event interests, and under which bucketing key, depends only on the
  event and the loaded set: a batch works it out for all of its events first and reads
  their buckets in one statement. Bucket changes wait in `PendingBuckets` (each bucket read
  and written at most once) and are written back with one `executemany` per kind of
  statement when the unit of work ends (a batch, one `reactive_evaluation`,
  the lost followers of `periodic`), or dropped when it fails. Between calls nothing is
  kept: the database stays the only state (a backtest's engine, alone on its scratch
  store, keeps the buckets it wrote, and writes them only when the table is read:
  `keep_buckets`). What is
  cached about a connection (its events clock, whether its inbox is known empty, the
  ordering's marks) is in the connection's
  `store.connection.ConnectionState`, never on the engine. The proactive pass reads the
  table page by page and so writes each change at once.
* `replay_batch` is `process_batch` for rows of another events table (a backtest's
  replay): they are stored as read (or not at all: `store=False`, the backtest's, whose
  scratch store nobody reads them back from) and evaluated as `StoredEvent`s, from their columns,
  each parsed into its model only when a trigger needs other labels, or it fires or is
  parked. The per-event code reads events through `EvaluatedEvent` (daemon/core/events.py)
  so that both kinds go the same way.
* `proactive` runs docs/TRIGGERS.md#proactive-evaluation for each due Proactive EventTrigger.
  It reads only the buckets a pass can change: those that counted an event (deleted) and
  those whose window is over (evaluated); an open window cannot fire, so the earliest
  open end is all the schedule needs of the rest. The same pass can run in steps of at
  most N buckets (`begin_proactive`, `proactive_step`), one transaction each, so a pass
  over many due buckets never holds the store for long.
* `periodic` re-evaluates lost followers and sweeps closed buckets.
* `load_automations` swaps the loaded set; triggers whose fingerprint changed, that
  vanished, or whose automation is disabled lose their buckets and child firings.

Firings of a top trigger go to `acting.act`; firings of a composite's child go to
`composite.evaluate_composite_trigger` with their event time, recursively. The engine
logs no firing: each entry point hands out the `acting.FiringLine`s of what it recorded
(`BatchOutcome.firings`, `ProactivePass.firings`, `PeriodicOutcome.firings`), for the
caller to log once its transaction has committed; a firing rolled back with a
proactive trigger's savepoint is dropped from them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final
from uuid import UUID

import attrs
from pydantic import ValidationError

from daemon.core.automations import (
    Automation,
    CompoundTrigger,
    EventTrigger,
    Posture,
    SequenceTrigger,
)
from daemon.core.buckets import (
    Bucket,
    EventRef,
    Fire,
    ensure,
    evaluate,
)
from daemon.core.clock import META_KEY, EventsClock, from_us, to_us
from daemon.core.config import (
    MAX_DEPTH_OF_PRECEDING_EVENT,
    PRECEDING_EVENT_LOOKBACK,
    SEEN_EXPIRATION,
    Config,
)
from daemon.core.events import EvaluatedEvent, EventColumns, ReceivedEvent, StoredEvent
from daemon.core.firings import Firing, TriggerState
from daemon.core.index import Candidate, TriggerIndex
from daemon.engine import acting
from daemon.engine.acting import FiringLine
from daemon.engine.composite import evaluate_composite_trigger, forget_trigger_state
from daemon.engine.ordering import (
    CausalOrdering,
    EventArrivedEarly,
    EventHandler,
)
from store import automations as automations_store
from store import buckets as buckets_store
from store import events as events_store
from store.connection import Connection

logger = logging.getLogger(__name__)

ORDERING_SCOPE: Final = "triggers"
LOG_WRITE_EVENT: Final = "prefect.log.write"
"""Stored but never evaluated (docs/TRIGGERS.md#which-triggers-see-an-event)."""
INBOX_DRAIN_LIMIT: Final = 1_000
"""Events trigd made itself evaluated per batch at most (events)."""
EXPIRED_BUCKET_BUFFER: Final = timedelta(seconds=60)
MAXIMUM_EVENT_BYTES: Final = 1_500_000
"""Events trigd made that are larger than this are dropped, as Prefect's publisher does."""
MAX_AUTOMATION_CHAIN: Final = 8
"""State-change events nested deeper than this are stored but not evaluated (levels)."""
_NESTED_EVENT: Final = '"triggering_event":{'
PROACTIVE_IDLE: Final = timedelta(seconds=60)
"""How long `proactive` says it can sleep when no proactive trigger is loaded."""

_TRIGGERED: Final = frozenset({TriggerState.Triggered})
_UNBOUNDED: Final = 2**62
"""The step of a pass run whole (`proactive`, `proactive_evaluation`): no limit."""


def _inbox_event(data: str, made: ReceivedEvent | None) -> tuple[ReceivedEvent, bool] | None:
    """An event trigd made (``made``: its model, when this connection queued it and kept
    it; else parsed from ``data``) and whether to evaluate it; None if it cannot be an
    event.

    An automation that reacts to automation events nests each state-change event in the
    next one; past `MAX_AUTOMATION_CHAIN` levels the event is stored but not evaluated,
    so such a loop ends instead of growing until the JSON is too deep to read back.
    """
    if len(data) > MAXIMUM_EVENT_BYTES:
        logger.error("Dropping an event trigd made: %d bytes is over the limit", len(data))
        return None
    if made is not None:
        event = made
    else:
        try:
            event = ReceivedEvent.model_validate_json(data)
        except ValidationError as exc:
            logger.error("Dropping an event trigd made that does not parse: %s", exc)
            return None
    chain = data.count(_NESTED_EVENT)
    if chain > MAX_AUTOMATION_CHAIN:
        logger.warning(
            "Not evaluating %s (%s): automations reacting to automations %d levels deep",
            event.event,
            event.id,
            chain,
        )
        return event, False
    return event, True


def _event_rows(
    events: Sequence[ReceivedEvent], jsons: Sequence[str] | None = None
) -> tuple[list[events_store.EventRow], list[tuple[EventRef, int]]]:
    """The events as rows of the events table, and each with its `EventRef` and
    `occurred` in µs (what evaluating it needs again); ``jsons``: their JSON, when known
    already (events trigd made, as queued in the inbox)."""
    rows: list[events_store.EventRow] = []
    refs: list[tuple[EventRef, int]] = []
    received: datetime | None = None
    received_us = 0
    for i, event in enumerate(events):
        ref = EventRef.of(event, None if jsons is None else jsons[i])
        occurred_us = to_us(event.occurred)
        if event.received is not received:  # a batch often shares one stamp
            received = event.received
            received_us = to_us(received)
        follows = event.follows
        rows.append(
            (
                str(event.id),
                event.event,
                event.resource.id,
                occurred_us,
                received_us,
                None if follows is None else str(follows),
                ref.json(),
            )
        )
        refs.append((ref, occurred_us))
    return rows, refs


class Outcome(StrEnum):
    processed = "processed"
    parked = "parked"
    """Held by causal ordering until its leader arrives (or it is lost)."""
    duplicate = "duplicate"
    """Its id was stored already; nothing was done."""


@attrs.frozen(slots=True)
class _Loaded:
    """One EventTrigger with what evaluating it needs, computed once per load."""

    trigger: EventTrigger
    automation: Automation
    trigger_id: str
    automation_id: str
    proactive: bool
    """Whether the trigger is Proactive: its buckets are then in the start-ordered index."""


_Interest = tuple[Candidate, tuple[str, ...]]
"""A trigger that covers an event, and the event's bucketing key for it."""


class _Call:
    """What every event of one engine call shares: the connection, the wall clock (also
    in µs), the ordering and the handler that re-enters the engine for followers; and
    what the call found out for its caller (`handed_off`)."""

    __slots__ = (
        "conn",
        "firings",
        "handed_off",
        "handler",
        "now",
        "now_us",
        "ordering",
        "own_events",
    )

    def __init__(
        self, conn: Connection, now: datetime, now_us: int, ordering: CausalOrdering
    ) -> None:
        self.conn = conn
        self.now = now
        self.now_us = now_us
        self.ordering = ordering
        self.handler: EventHandler = _no_handler
        self.handed_off = False
        """Whether the call left work for the sender or the inbox pump."""
        self.own_events: list[ReceivedEvent] = []
        """Events trigd made itself that the call stored (drained from the inbox)."""
        self.firings: list[FiringLine] = []
        """The log lines of the firings the call recorded, in order."""


def _no_handler(event: ReceivedEvent, depth: int, /) -> None:
    raise AssertionError("set by Engine._call")


@attrs.frozen
class BatchOutcome:
    """What `process_batch` did, for its caller to act on."""

    outcomes: list[Outcome]
    """One per input event, in order."""
    handed_off: bool
    """Whether the batch left work for the sender or the inbox pump (outbox rows, or
    events still in the inbox): the evaluator wakes them only then."""
    own_events: Sequence[ReceivedEvent] = ()
    """Events trigd made itself that the batch stored, from the inbox, in order: with
    the input events not `duplicate`, what the batch committed (for events out)."""
    firings: Sequence[FiringLine] = ()
    """The log lines of the firings the batch recorded, in order: the caller writes them
    (`acting.log_firings`) once the batch's transaction has committed."""


@attrs.frozen
class PeriodicOutcome:
    """What `periodic` did."""

    swept: int
    """Buckets swept."""
    firings: Sequence[FiringLine] = ()
    """The log lines of the firings of lost followers, as `BatchOutcome.firings`."""


_NO_IDS: Final[frozenset[UUID]] = frozenset()


@attrs.frozen
class LoadReport:
    automations: int
    """Enabled automations with at least one EventTrigger."""
    event_triggers: int
    reset_triggers: frozenset[UUID]
    """Triggers whose buckets and child firings were dropped."""


@attrs.define(eq=False)
class _TriggerCursor:
    """Where the proactive evaluation of one trigger stands between steps."""

    loaded: _Loaded
    as_of: datetime
    run_again_at: datetime
    phase: str = "ensure"  # then "remove" (step 3), "note" and "due" (step 4)
    noted: tuple[int, int] | None = None  # (end_us, rowid) of the last due bucket noted
    after: tuple[int, str, int] | None = None  # (start_us, key, rowid) of the last evaluated


@attrs.define(eq=False)
class ProactivePass:
    """A proactive pass under way (`Engine.begin_proactive`), run by `proactive_step`:
    the due triggers left, the one being evaluated, and, when over, when to run again."""

    now: datetime
    todo: list[_Loaded]
    cursor: _TriggerCursor | None = None
    next_run: datetime | None = None
    firings: list[FiringLine] = attrs.Factory(list)
    """The log lines of the firings the last `proactive_step` recorded (those of a trigger
    whose part was rolled back dropped): the caller writes them once it commits."""

    @property
    def done(self) -> bool:
        return self.next_run is not None


class Engine:
    """The loaded automations plus the events clock; state lives in the database."""

    def __init__(
        self,
        *,
        expired_bucket_buffer: timedelta = EXPIRED_BUCKET_BUFFER,
        inbox_drain_limit: int = INBOX_DRAIN_LIMIT,
        preceding_event_lookback: timedelta = PRECEDING_EVENT_LOOKBACK,
        seen_expiration: timedelta = SEEN_EXPIRATION,
        max_depth: int = MAX_DEPTH_OF_PRECEDING_EVENT,
        pending_bucket_limit: int = buckets_store.PENDING_LIMIT,
    ) -> None:
        if inbox_drain_limit < 1:
            raise ValueError("inbox_drain_limit: must be at least 1")
        if expired_bucket_buffer < timedelta(0):
            raise ValueError("expired_bucket_buffer: must not be negative")
        self.expired_bucket_buffer = expired_bucket_buffer
        self.preceding_event_lookback = preceding_event_lookback
        self.seen_expiration = seen_expiration
        self.max_depth = max_depth
        self.inbox_drain_limit = inbox_drain_limit
        self.automations: dict[UUID, Automation] = {}
        self._loaded: dict[UUID, _Loaded] = {}
        self._proactive: list[_Loaded] = []
        self._by_position: tuple[_Loaded, ...] = ()
        """`_loaded` in the order `index` was built from (its `Candidate.position`)."""
        self.index = TriggerIndex(())
        self.next_proactive_runs: dict[UUID, datetime] = {}
        self.clock = EventsClock()
        """The events clock of the connection last called with (its `state.events_clock`)."""
        self._pending = buckets_store.PendingBuckets(pending_bucket_limit)
        """Bucket changes of the running unit (`_bucket_unit`), empty between calls
        (unless `keep_buckets`)."""
        self._keep_buckets = 0
        self._defer_buckets = False

    @classmethod
    def configured(cls, config: Config) -> Engine:
        """An engine with the `[triggers]` and `[ordering]` settings of `config`: the
        daemon's, and a backtest's, so a replay judges as the daemon would."""
        return cls(
            expired_bucket_buffer=config.triggers.expired_bucket_buffer,
            preceding_event_lookback=config.ordering.preceding_event_lookback,
            seen_expiration=config.ordering.seen_expiration,
            max_depth=config.ordering.max_depth,
        )

    # --- loading ---------------------------------------------------------------------

    def load_automations(
        self, conn: Connection, automations: Sequence[Automation], now: datetime
    ) -> LoadReport:
        """Swap in this set of automations (the whole set, as after SIGHUP)."""
        self._ensure_clock(conn)
        active = [a for a in automations if a.enabled and a.event_triggers()]
        wanted: dict[str, automations_store.TriggerRow] = {}
        rows: list[automations_store.TriggerRow] = []
        for automation in automations:
            for trigger in automation.all_triggers():
                row = automations_store.TriggerRow(
                    str(trigger.id), str(automation.id), trigger.fingerprint()
                )
                rows.append(row)
                if automation.enabled:
                    wanted[row.id] = row
        previous = automations_store.stored_triggers(conn)
        reset = {tid for tid, row in previous.items() if wanted.get(tid) != row}
        with conn:
            self._pending.write_back(conn)  # what a replay's engine holds back (`keep_buckets`)
            buckets_store.delete_trigger_buckets(conn, reset)
            forget_trigger_state(conn, (UUID(t) for t in reset))
            loaded_us = to_us(now)
            automations_store.replace_loaded(
                conn,
                (
                    automations_store.AutomationRow(
                        str(a.id), a.name, a.enabled, a.redacted().model_dump_json(), loaded_us
                    )
                    for a in automations
                ),
                rows,
            )
        self.automations = {a.id: a for a in active}
        self._loaded = {
            t.id: _Loaded(t, a, str(t.id), str(a.id), t.posture == Posture.Proactive)
            for a in active
            for t in a.event_triggers()
        }
        self._proactive = [lt for lt in self._loaded.values() if lt.proactive]
        self._by_position = tuple(self._loaded.values())
        self.index = TriggerIndex(lt.trigger for lt in self._by_position)
        self.next_proactive_runs.clear()
        self._keep_reactive_buckets(conn)
        report = LoadReport(len(active), len(self._loaded), frozenset(UUID(t) for t in reset))
        logger.info(
            "Loaded %d automations with %d event triggers; %d triggers start fresh",
            report.automations,
            report.event_triggers,
            len(reset),
        )
        return report

    def keep_buckets(self, conn: Connection, limit: int, *, deferred: bool = False) -> None:
        """Keep up to `limit` buckets of Reactive triggers in memory between calls, as
        the table holds them after each unit, so a batch reads from the table only those
        no earlier call read or wrote (0: keep none, the default; what was held back is
        written first).

        `deferred`: their changes are written to the table only when it is read (the
        sweep, a reload, `keep_buckets` again), not after each unit, so a bucket that
        counts many events is written once; a failed unit then leaves the engine unusable
        until `keep_buckets(conn, 0)` (`store/buckets.py: PendingBuckets`).

        Only for a store that this engine alone writes, on one connection: the backtest's
        scratch store. A Proactive trigger's buckets are never kept (its pass reads and
        writes the table directly); the sweep and a reload go through `_pending`."""
        self._keep_buckets = limit
        self._defer_buckets = deferred
        self._keep_reactive_buckets(conn)

    def keep_seen_marks(self, conn: Connection, limit: int) -> None:
        """Hold up to `limit` seen marks of causal ordering in memory instead of writing
        each batch's (0: stop, dropping them unwritten): only for a store thrown away
        afterwards and on any failure, the backtest's (`CausalOrdering.keep_seen`)."""
        self.ordering(conn).keep_seen(limit)

    def drop_kept_buckets(self) -> None:
        """Stop keeping buckets, without writing what `deferred` held back: the store is
        about to be thrown away (the end of a replay)."""
        self._keep_buckets = 0
        self._defer_buckets = False
        self._pending.drop()

    def _keep_reactive_buckets(self, conn: Connection) -> None:
        reactive = [lt.trigger_id for lt in self._by_position if not lt.proactive]
        self._pending.keep(conn, reactive, self._keep_buckets, deferred=self._defer_buckets)

    # --- reactive --------------------------------------------------------------------

    def process_batch(
        self, conn: Connection, events: Sequence[ReceivedEvent], now: datetime
    ) -> BatchOutcome:
        """Store and evaluate a batch inside the caller's transaction; one outcome per
        input event. Then drain (a bounded part of) the inbox."""
        return self._run_batch(conn, events, now, *_event_rows(events))

    def replay_batch(
        self,
        conn: Connection,
        rows: Sequence[events_store.EventRow],
        now: datetime,
        *,
        store: bool = True,
    ) -> BatchOutcome:
        """`process_batch` for rows of another events table (a backtest replays the live
        database's): stored as they are, and evaluated from their columns, each parsed
        into its model only when a trigger needs more (`StoredEvent`).

        `store=False`: the rows are not stored, and none is a duplicate (the rows of one
        events table, each replayed once, have distinct ids): only for a store from which
        nothing reads them back, the backtest's (it reads only the events trigd made)."""
        events = [StoredEvent(*row) for row in rows]
        return self._run_batch(conn, events, now, rows, None, store=store)

    def _run_batch(
        self,
        conn: Connection,
        events: Sequence[EvaluatedEvent],
        now: datetime,
        rows: Sequence[events_store.EventRow],
        refs: Sequence[tuple[EventRef, int]] | None,
        *,
        store: bool = True,
    ) -> BatchOutcome:
        self._ensure_clock(conn)
        before = self.clock.copy()
        call = self._call(conn, now)
        try:
            with call.ordering.batch(), self._bucket_unit(conn):
                outcomes = self._process(call, events, _NO_IDS, rows, refs, store=store)
                self._drain_inbox(call)
            self._save_clock(conn, before)
        except BaseException:
            # the transaction will roll back: so do the clock and the draining of the inbox
            self._restore_clock(conn, before)
            conn.state.inbox_empty_at = None
            raise
        return BatchOutcome(outcomes, call.handed_off, call.own_events, call.firings)

    def _process(
        self,
        call: _Call,
        events: Sequence[EvaluatedEvent],
        store_only: frozenset[UUID],
        rows: Sequence[events_store.EventRow],
        refs: Sequence[tuple[EventRef, int]] | None,
        *,
        store: bool = True,
    ) -> list[Outcome]:
        """Store `events` as `rows` (unless not `store`: `replay_batch`) and evaluate
        them, with their `EventRef` and `occurred` in µs from `refs` (else from the rows);
        those in `store_only` (events trigd made nested too deep, from the inbox) are
        stored but not evaluated."""
        # the duplicate check is the insert: a stored id (or one met earlier) is skipped
        if store:
            inserted = events_store.insert_new_events(call.conn, rows)
        else:
            inserted = {row[0] for row in rows}
        outcomes: list[Outcome] = []
        fresh: list[tuple[int, EvaluatedEvent, EventRef, str, int, list[_Interest]]] = []
        wanted: list[tuple[str, tuple[str, ...]]] = []
        by_position = self._by_position
        for i, (event, row) in enumerate(zip(events, rows, strict=True)):
            event_id = row[0]
            if event_id not in inserted:
                outcomes.append(Outcome.duplicate)
                continue
            inserted.discard(event_id)  # a second copy later in the batch is a duplicate
            outcomes.append(Outcome.processed)
            if event.event == LOG_WRITE_EVENT or (store_only and event.id in store_only):
                continue  # stored, not evaluated
            # a stored row's event is referred to by its JSON alone (a bucket that keeps it
            # needs no more; the model is parsed again only if a proactive firing asks)
            ref, occurred_us = (EventRef.from_json(row[6]), row[3]) if refs is None else refs[i]
            plan = self._interests(event)
            for candidate, key in plan:
                wanted.append((by_position[candidate.position].trigger_id, key))
            fresh.append((i, event, ref, event_id, occurred_us, plan))
        # what evaluating them will read, in one statement
        self._pending.prefetch(call.conn, wanted)
        for i, event, ref, event_id, occurred_us, plan in fresh:
            try:
                self._reactive(call, event, 0, ref, event_id, occurred_us, plan)
            except EventArrivedEarly:
                outcomes[i] = Outcome.parked
        return outcomes

    def _interests(self, event: EventColumns) -> list[_Interest]:
        """The triggers that cover the event, each with the event's bucketing key: what
        evaluating it will read, known before anything is evaluated (it depends on the
        event and the loaded triggers only), so a batch reads its buckets in one go."""
        return [
            (candidate, candidate.trigger.bucketing_key(event))
            for candidate in self.index.for_name(event.event)
            if candidate.trigger.covers_resources(event)
        ]

    def _drain_inbox(self, call: _Call) -> None:
        """Evaluate (a bounded part of) the inbox; skipped when it is known to be empty:
        nothing was queued since a batch that committed found it so."""
        conn = call.conn
        state = conn.state
        empty_at = state.inbox_empty_at
        if empty_at is not None and empty_at == events_store.inbox_pushes(conn):
            return
        state.inbox_empty_at = None
        budget = self.inbox_drain_limit
        while True:
            queued = events_store.peek_inbox(conn, max(budget, 1))
            if not queued:
                state.inbox_empty_at = events_store.inbox_pushes(conn)
                return
            if budget == 0:
                call.handed_off = True  # more than one batch's worth: the pump goes on
                return
            budget -= len(queued)
            events_store.drop_inbox(conn, queued[-1][0])
            parsed = [
                (p, data)
                for _, data in queued
                if (p := _inbox_event(data, events_store.take_made(conn, data))) is not None
            ]
            store_only = frozenset(e.id for (e, evaluate), _ in parsed if not evaluate)
            drained = [e for (e, _), _ in parsed]
            rows, refs = _event_rows(drained, [data for _, data in parsed])
            outcomes = self._process(call, drained, store_only, rows, refs)
            call.own_events += [
                e for e, o in zip(drained, outcomes, strict=True) if o is not Outcome.duplicate
            ]

    def reactive_evaluation(
        self, conn: Connection, event: ReceivedEvent, depth: int, now: datetime
    ) -> Sequence[FiringLine]:
        """docs/TRIGGERS.md#reactive-evaluation for one (already stored) event; raises
        EventArrivedEarly when the event is parked. Returns the firings' log lines."""
        call = self._call(conn, now)
        with self._bucket_unit(conn):
            self._react(call, event, depth)
        return call.firings

    def _react(self, call: _Call, event: ReceivedEvent, depth: int) -> None:
        """`_reactive` for an event that comes without its precomputed forms."""
        ref = EventRef.of(event)
        self._reactive(call, event, depth, ref, str(event.id), to_us(event.occurred), None)

    def _reactive(
        self,
        call: _Call,
        event: EvaluatedEvent,
        depth: int,
        ref: EventRef,
        event_id: str,
        occurred_us: int,
        plan: list[_Interest] | None,
    ) -> None:
        self.clock.update_us(occurred_us, call.now_us)

        def evaluate_triggers() -> None:
            for candidate, key in self._interests(event) if plan is None else plan:
                self._evaluate_event(call, candidate, key, event, ref)

        call.ordering.run_confirmed(
            call.handler, event, depth, evaluate_triggers, now_us=call.now_us, event_id=event_id
        )

    def _evaluate_event(
        self,
        call: _Call,
        candidate: Candidate,
        key: tuple[str, ...],
        event: EvaluatedEvent,
        ref: EventRef,
    ) -> None:
        loaded = self._by_position[candidate.position]
        trigger = loaded.trigger
        existing = self._pending.read(call.conn, loaded.trigger_id, key)
        occurred = event.occurred
        expects = candidate.expects
        bucket: Bucket | None = None
        if trigger.after and candidate.starts_after:
            initial = -1 if expects else 0
            bucket = ensure(existing, key, occurred, occurred + trigger.within, ref, initial)
        if bucket is None and not trigger.after and expects:
            start = occurred - self.preceding_event_lookback
            bucket = ensure(existing, key, start, occurred + trigger.within, ref)
        if not expects:
            if bucket is not None:
                self._pending_write(loaded, key, existing, bucket)
            return
        if bucket is None:
            if existing is None:
                return
            bucket = existing
        result = evaluate(trigger, bucket, occurred, event, ref)
        self._pending_write(loaded, key, existing, result.stored)
        for fire in result.fires:
            line = self._fire(call.conn, loaded, fire, call.now)
            if line is not None:
                call.handed_off = True
                call.firings.append(line)

    def _pending_write(
        self, loaded: _Loaded, key: tuple[str, ...], existing: Bucket | None, stored: Bucket | None
    ) -> None:
        """Note the bucket's new state for the end of the unit; nothing if unchanged."""
        if stored is not existing:
            self._pending.write(
                loaded.trigger_id, loaded.automation_id, loaded.proactive, key, existing, stored
            )

    @contextlib.contextmanager
    def _bucket_unit(self, conn: Connection) -> Iterator[None]:
        """Reactive bucket changes are written back when the unit ends (and before
        anything reads the table directly); a failed unit's changes are dropped with its
        transaction. A parked event is not a failure."""
        try:
            yield
        except EventArrivedEarly:
            self._pending.flush(conn)
            raise
        except BaseException:
            self._pending.discard()
            raise
        self._pending.flush(conn)

    @staticmethod
    def _persist(
        conn: Connection, loaded: _Loaded, existing: Bucket, stored: Bucket | None
    ) -> None:
        """Write the bucket's new state at once (the proactive path, which reads the table
        page by page)."""
        buckets_store.save_bucket(
            conn,
            loaded.trigger_id,
            loaded.automation_id,
            existing.key,
            existing,
            stored,
            proactive=loaded.proactive,
        )

    # --- firing ----------------------------------------------------------------------

    def _fire(
        self, conn: Connection, loaded: _Loaded, fire: Fire, now: datetime
    ) -> FiringLine | None:
        """Dispatch a firing; its log line if it acted (wrote outbox rows and events)."""
        firing = Firing(
            trigger=loaded.trigger,
            trigger_states=_TRIGGERED,
            triggered=now,
            triggering_labels=fire.triggering_labels,
            triggering_event=fire.triggering_event,
        )
        return self.dispatch(conn, loaded.automation, firing, fire.event_time, now)

    def dispatch(
        self,
        conn: Connection,
        automation: Automation,
        firing: Firing,
        event_time: datetime,
        now: datetime,
    ) -> FiringLine | None:
        """docs/TRIGGERS.md#firings: act for a top trigger, else let the composite parent
        decide. Returns the firing's log line if it acted (queued outbox rows and events),
        for the caller to write once the transaction commits."""
        parent = automation.parent_of(firing.trigger.id)
        if isinstance(parent, Automation):
            return acting.act(conn, automation, firing, now)
        assert isinstance(parent, CompoundTrigger | SequenceTrigger)
        parent_firing = evaluate_composite_trigger(
            conn, firing, parent, automation, event_time, now
        )
        if parent_firing is not None:
            return self.dispatch(conn, automation, parent_firing, event_time, now)
        return None

    # --- proactive and periodic ------------------------------------------------------

    def proactive(self, conn: Connection, now: datetime) -> datetime:
        """Evaluate every due Proactive EventTrigger; return when to run again (wall
        clock as Prefect compares it: the earliest `next_proactive_runs` entry). The
        firings' log lines are dropped (a backtest's replay logs none): the daemon runs
        its passes with `proactive_step`."""
        pass_ = self.begin_proactive(now)
        self.proactive_step(conn, pass_, _UNBOUNDED)
        assert pass_.next_run is not None
        return pass_.next_run

    def begin_proactive(self, now: datetime) -> ProactivePass:
        """A pass at wall time `now` over the Proactive triggers due then; run it with
        `proactive_step` until `done`."""
        due = [
            lt for lt in self._proactive if self.next_proactive_runs.get(lt.trigger.id, now) <= now
        ]
        return ProactivePass(now, due)

    def proactive_step(self, conn: Connection, pass_: ProactivePass, limit: int) -> bool:
        """Go on with `pass_` in the caller's transaction, reading or deleting about
        `limit` buckets at most (each trigger counts at least one); True when the pass is
        over (`pass_.next_run` set). A trigger that raises is logged and skipped (its
        part of this step rolled back, its firings' lines dropped); one that was reloaded
        since the pass began is skipped (a reload makes every trigger due again). The
        step's firings' log lines are `pass_.firings` afterwards."""
        if limit < 1:
            raise ValueError("limit: must be at least 1")
        pass_.firings = []
        self._ensure_clock(conn)
        before = self.clock.copy()
        budget = limit
        while budget > 0 and (pass_.cursor is not None or pass_.todo):
            cursor = pass_.cursor
            if cursor is None:
                cursor = pass_.cursor = self._cursor(pass_.todo.pop(0), pass_.now)
            if self._loaded.get(cursor.loaded.trigger.id) is not cursor.loaded:
                pass_.cursor = None  # reloaded since the pass began
                continue
            lines: list[FiringLine] = []
            try:
                with conn:
                    used, finished = self._advance(conn, cursor, pass_.now, budget, lines)
            except Exception:
                logger.exception(
                    "Error evaluating automation %s trigger %s proactively",
                    cursor.loaded.automation_id,
                    cursor.loaded.trigger_id,
                )
                pass_.cursor = None
                budget -= 1
                continue
            pass_.firings += lines
            budget -= max(1, used)
            if finished:
                self.next_proactive_runs[cursor.loaded.trigger.id] = cursor.run_again_at
                pass_.cursor = None
        self._save_clock(conn, before)
        if pass_.cursor is not None or pass_.todo:
            return False
        now = pass_.now
        if not self._proactive:
            pass_.next_run = now + PROACTIVE_IDLE
        else:
            pass_.next_run = min(
                self.next_proactive_runs.get(lt.trigger.id, now) for lt in self._proactive
            )
        return True

    def proactive_evaluation(self, conn: Connection, trigger_id: UUID, now: datetime) -> datetime:
        """docs/TRIGGERS.md#proactive-evaluation for one loaded trigger at wall time `now` (the
        `P(t)` of the scenarios); returns `run_again_at`, in event time (the firings' log
        lines are dropped)."""
        cursor = self._cursor(self._loaded[trigger_id], now)
        while not self._advance(conn, cursor, now, _UNBOUNDED, [])[1]:
            pass
        return cursor.run_again_at

    def _cursor(self, loaded: _Loaded, now: datetime) -> _TriggerCursor:
        as_of = self.clock.as_of(now)
        return _TriggerCursor(loaded, as_of, as_of + loaded.trigger.within)

    def _advance(
        self,
        conn: Connection,
        cursor: _TriggerCursor,
        now: datetime,
        budget: int,
        firings: list[FiringLine],
    ) -> tuple[int, bool]:
        """docs/TRIGGERS.md#proactive-evaluation steps 2-4 for one trigger, from where
        `cursor` stands, over at most about `budget` buckets: (buckets used, finished);
        the firings' log lines go to `firings`.

        Only due buckets (window ended at `as_of`) are evaluated, in start order: a
        bucket whose window is still open (or not begun) is left as it is by the
        evaluation, and only its end can move `run_again_at`, so the earliest such end
        stands for all of them. The due buckets are found by end (`buckets_due`) and
        noted in start order first, a page at a time (`snapshot_due`); between steps a
        noted bucket may stop being due (a heartbeat came): it is skipped."""
        loaded, trigger = cursor.loaded, cursor.loaded.trigger
        as_of = cursor.as_of
        as_of_us = to_us(as_of)
        used = 0
        if cursor.phase == "ensure":
            if not trigger.for_each:
                existing = buckets_store.read_bucket(conn, loaded.trigger_id, ())
                if existing is None:
                    fresh = ensure(None, (), as_of, as_of + trigger.within, None)
                    buckets_store.write_bucket(
                        conn,
                        loaded.trigger_id,
                        loaded.automation_id,
                        fresh,
                        proactive=loaded.proactive,
                    )
            cursor.phase = "remove"
        if cursor.phase == "remove":
            removed = buckets_store.remove_met_buckets(
                conn, loaded.trigger_id, trigger.threshold, proactive=loaded.proactive, limit=budget
            )
            used += removed
            if removed >= budget:
                return used, False
            cursor.phase = "note"
        while cursor.phase == "note":
            if used >= budget:
                return used, False
            wanted = min(buckets_store.PAGE_SIZE, budget - used)
            noted, cursor.noted = buckets_store.snapshot_due(
                conn,
                loaded.trigger_id,
                as_of_us,
                proactive=loaded.proactive,
                after=cursor.noted,
                limit=wanted,
            )
            used += noted
            if noted < wanted:
                cursor.phase = "due"
        while used < budget:
            wanted = min(buckets_store.PAGE_SIZE, budget - used)
            page, cursor.after, looked = buckets_store.read_due(
                conn, loaded.trigger_id, as_of_us, after=cursor.after, limit=wanted
            )
            for bucket in page:
                result = evaluate(trigger, bucket, as_of, None)
                self._persist(conn, loaded, bucket, result.stored)
                for fire in result.fires:
                    line = self._fire(conn, loaded, fire, now)
                    if line is not None:
                        firings.append(line)
                following = result.returned
                if following is not None and as_of < following.end < cursor.run_again_at:
                    cursor.run_again_at = following.end
            used += looked
            if looked < wanted:
                open_end = buckets_store.next_end_us(
                    conn, loaded.trigger_id, as_of_us, proactive=loaded.proactive
                )
                if open_end is not None and open_end < to_us(cursor.run_again_at):
                    cursor.run_again_at = from_us(open_end)
                return used, True
        return used, False

    def periodic(self, conn: Connection, now: datetime) -> PeriodicOutcome:
        """periodic_evaluation (docs/TRIGGERS.md#scheduling-and-the-sweeper): re-evaluate lost
        followers (depth 0), then sweep buckets closed before `as_of - expired_bucket_buffer`.
        Returns how many buckets were swept, and the log lines of the firings."""
        self._ensure_clock(conn)
        before = self.clock.copy()
        try:
            as_of = self.clock.as_of(now)
            call = self._call(conn, now)
            with self._bucket_unit(conn):
                for event in call.ordering.get_lost_followers(now=now):
                    # a lost follower proceeds without waiting (its wait is over)
                    with contextlib.suppress(EventArrivedEarly):
                        self._react(call, event, 0)
            swept = self._pending.sweep(conn, to_us(as_of - self.expired_bucket_buffer))
            self._save_clock(conn, before)
        except BaseException:
            self._restore_clock(conn, before)
            raise
        return PeriodicOutcome(swept, call.firings)

    # --- plumbing --------------------------------------------------------------------

    def _call(self, conn: Connection, now: datetime) -> _Call:
        call = _Call(conn, now, to_us(now), self.ordering(conn))
        call.handler = lambda follower, depth: self._react(call, follower, depth)
        return call

    def ordering(self, conn: Connection) -> CausalOrdering:
        """The engine's causal ordering (scope "triggers", the engine's settings) on
        `conn`: the one factory, also the sweeper's (seen-id expiry)."""
        return CausalOrdering(
            ORDERING_SCOPE,
            conn,
            preceding_event_lookback=self.preceding_event_lookback,
            seen_expiration=self.seen_expiration,
            max_depth=self.max_depth,
        )

    def rolled_back(self) -> None:
        """The caller's transaction did not commit (its COMMIT may have failed after this
        engine returned): rerun every proactive trigger next time. What was cached about
        the connection (events clock, empty inbox) is its state's to forget
        (`ConnectionState.rolled_back`, which `engine_transaction` calls too)."""
        self.next_proactive_runs.clear()
        self._pending.discard()  # empty already, unless a unit was left half-way

    def _ensure_clock(self, conn: Connection) -> None:
        """The connection's events clock, read from `meta` once per connection (i.e. at
        startup) and after a rollback."""
        state = conn.state
        clock = state.events_clock
        if clock is None:
            clock = EventsClock.from_json(events_store.read_meta(conn, META_KEY))
            state.events_clock = clock
        self.clock = clock

    def _restore_clock(self, conn: Connection, before: EventsClock) -> None:
        """The transaction will roll back: so does the clock."""
        self.clock = conn.state.events_clock = before

    def _save_clock(self, conn: Connection, before: EventsClock) -> None:
        if self.clock != before:
            events_store.write_meta(conn, META_KEY, self.clock.to_json())

    def reset_events_clock(self, conn: Connection) -> None:
        """Forget the events clock (tests, and operators replaying history)."""
        self._ensure_clock(conn)
        self.clock.reset()
        events_store.write_meta(conn, META_KEY, self.clock.to_json())
