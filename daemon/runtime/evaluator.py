"""The evaluator task: received events go into the store in batches, one transaction each.

Theory of operation. Ingest sends one ``Submission`` per parsed event into a bounded
channel. This task waits for the first one, then takes whatever else is already queued, up
to ``batch_max`` (group commit: a flood is committed a few hundred at a time, and the fsync
cost is shared), and lingers a few milliseconds for more when the batch is small
(``daemon.core.commit_linger``), so that events arriving one at a time share it too.
The engine runs over the batch in the store thread inside one ``BEGIN IMMEDIATE``
transaction, as an urgent call (``StoreGateway.run_urgent``: ahead of the background store
work waiting, the sender's and the inbox pump's, since clients wait on these acks); only
after ``COMMIT`` returns is each submission resolved, so an ack (or a pong) always means
"on disk". Then, only while events out has subscribers, what the batch
committed (its new events and trigd's own events it drained from the inbox) goes to the
hub (``daemon.runtime.events_hub``), and, once its submissions are resolved, the INFO line
of each firing the batch committed is written (``daemon.engine.acting.log_firings``), here
on the trio thread rather than in the store thread inside the transaction: the acks do not
wait on the formatting, and a firing whose transaction rolled back is never logged.

Failures:

* a store that cannot write (I/O error, busy): nothing is resolved, the cause is logged,
  and the same batch is retried with exponential backoff until it goes through
  (``daemon.runtime.store_trouble``); meanwhile the channel fills and ingest stops reading sockets
  (docs/PROTOCOL.md#backpressure,
  docs/OPERATIONS.md#store-trouble);
* a full disk: the batch may be too big for the space left, while a part of it fits. A
  batch the store refused as full is split in halves at once, each half committed (and
  resolved) on its own, splitting again down to single events, in order; so after a
  partial free whatever fits is committed and acknowledged. A single event that does not
  fit is valid, so it is never refused: it is retried with backoff, unacknowledged, and
  the events behind it wait too, until space is freed (its client may also resend it
  after reconnecting; a duplicate is harmless). The cause is logged once per batch that
  waited, and again when all of it is committed;
* any other exception is a bug in some event's processing. The transaction rolled back, so
  the batch is retried one event per transaction: the others go through and only the
  poisonous one is refused, with ``internal error: ...``. These lines, one per bad event,
  are rate limited (``daemon.core.log_throttle``, the ``[log]`` settings).

Shutdown: each commit attempt is shielded from cancellation, so a batch taken from the
channel is committed (or fails) as a whole; the worker thread cannot be abandoned anyway
(``daemon.runtime.gateway``), and SQLite's busy timeout bounds how long it can take. Cancellation
is delivered while waiting for events or between retries, where nothing is half-done.
When every sender clone of the channel is closed, the task drains what is queued and
returns, which is how the service stops it gracefully.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Protocol

import apsw
import attrs
import trio

from daemon.core.commit_linger import CommitLinger
from daemon.core.config import COMMIT_LINGER_EVENTS
from daemon.core.events import ReceivedEvent
from daemon.core.firings import count_firings
from daemon.core.log_throttle import DEFAULT_LIMITS, LogLimits, LogThrottle
from daemon.engine.acting import log_firings
from daemon.engine.engine import BatchOutcome, Outcome
from daemon.runtime.events_hub import EventsHub
from daemon.runtime.gateway import StoreGateway
from daemon.runtime.read_pacing import ROUNDS, ReadPacing
from daemon.runtime.store_trouble import STORE_TROUBLE, Backoff
from daemon.wire.submission import Submission
from store.connection import Connection
from store.db import write_transaction

log = logging.getLogger(__name__)


class ForgetsOnRollback(Protocol):
    """An engine that caches what it read in a transaction (``daemon.engine.Engine``)."""

    def rolled_back(self) -> None: ...


class BatchEngine(ForgetsOnRollback, Protocol):
    """What the evaluator needs of ``daemon.engine.Engine``."""

    def process_batch(
        self, conn: Connection, events: Sequence[ReceivedEvent], now: datetime
    ) -> BatchOutcome: ...


@contextlib.contextmanager
def engine_transaction(conn: Connection, engine: ForgetsOnRollback) -> Iterator[None]:
    """A transaction of ``conn``; if it does not commit, the connection's state and
    ``engine`` forget what they cached from it (the evaluator, the inbox pump and the
    sweeper)."""
    try:
        with write_transaction(conn):
            yield
    except BaseException:
        # the COMMIT itself may be what failed
        conn.state.rolled_back()
        engine.rolled_back()
        raise


def process_in_transaction(
    conn: Connection,
    engine: BatchEngine,
    events: Sequence[ReceivedEvent],
    now: datetime,
) -> BatchOutcome:
    """`engine.process_batch` in an `engine_transaction` of its own (the evaluator, and
    the inbox pump with no events)."""
    with engine_transaction(conn, engine):
        return engine.process_batch(conn, events, now)


def publish_committed(hub: EventsHub, events: Sequence[ReceivedEvent], done: BatchOutcome) -> None:
    """Hand what a batch committed to events out: its events that were not duplicates,
    then trigd's own events it drained from the inbox."""
    outcomes = done.outcomes
    hub.publish(e for e, o in zip(events, outcomes, strict=True) if o is not Outcome.duplicate)
    hub.publish(done.own_events)


@attrs.define
class EvaluatorStats:
    """Counters for ``trigd status`` and the tests."""

    batches: int = 0
    events: int = 0
    duplicates: int = 0
    parked: int = 0
    internal_errors: int = 0
    store_retries: int = 0
    largest_batch: int = 0
    firings: dict[str, int] = attrs.Factory(dict)  # by automation name, as committed


@attrs.define(eq=False)
class BatchProgress:
    """Numbers the evaluator's transactions as they go to the store thread and tells who
    waits when one of them commits. Every batch also drains the inbox (a bounded part of
    it, waking the pump for the rest), so the inbox pump waits for a batch begun after
    its wake-up instead of committing a transaction (and an fsync) of its own between
    the batches that clients wait on. When the last one began tells the sender whether
    clients are sending events (it gives way to their acks meanwhile)."""

    begun: int = 0  # transactions handed to the store thread so far
    committed: int = 0  # the number of the last one that committed
    _changed: trio.Event = attrs.Factory(trio.Event)
    # trio time the last one began: the sender gives way to ingest after it (IngestActivity)
    last_begun_at: float | None = None

    def begin(self) -> int:
        self.begun += 1
        self.last_begun_at = trio.current_time()
        return self.begun

    def commit(self, number: int) -> None:
        self.committed = max(self.committed, number)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_committed_after(self, mark: int) -> None:
        """Return once a transaction begun after ``begun`` was ``mark`` has committed."""
        while self.committed <= mark:
            await self._changed.wait()


class _Full(enum.Enum):
    """The store refused a batch of more than one event as full: split it."""

    TOO_BIG = enum.auto()


def _throttles(limits: LogLimits) -> dict[str, LogThrottle]:
    return {
        what: limits.throttle(log, what)
        for what in ("events refused as internal errors", "failed batches", "split batches")
    }


@attrs.define
class _Evaluator:
    gateway: StoreGateway
    engine: BatchEngine
    clock: Callable[[], datetime]
    stats: EvaluatorStats
    on_commit: Callable[[], None]
    throttles: dict[str, LogThrottle]
    on_batch: Callable[[Sequence[Submission], float], None] | None  # committed, in seconds
    hub: EventsHub | None = None  # events out: committed events go to its subscribers
    pacing: ReadPacing | None = None  # readers hold off while a batch is committed
    progress: BatchProgress | None = None  # the inbox pump waits on it
    linger: CommitLinger | None = None  # whether the next batch lingers (pacing's close)
    # one episode of store trouble per batch: logged when it starts, and as over once
    # every event of the batch is committed
    last_commit: float = 0.0  # seconds the last transaction took in the store thread
    backoff: Backoff = attrs.field(
        factory=lambda: Backoff(log, "committing received events (not acknowledged meanwhile)")
    )

    def _log(self, what: str, level: int, msg: str, *args: object, exc_info: object = None) -> None:
        self.throttles[what].log(trio.current_time(), level, msg, *args, exc_info=exc_info)

    async def _attempt(self, events: Sequence[ReceivedEvent]) -> BatchOutcome | Exception | _Full:
        """Commit ``events`` in one transaction, waiting out store trouble, except a full
        disk refusing more than one event (``_Full.TOO_BIG``); what the batch did if it
        committed, else the bug."""
        while True:
            now = self.clock()
            try:
                with trio.CancelScope(shield=True):
                    number = self.progress.begin() if self.progress is not None else 0
                    pacing = self.pacing
                    if pacing is not None:
                        pacing.open()
                    started = trio.current_time()
                    try:
                        done = await self.gateway.run_urgent(
                            process_in_transaction, self.engine, events, now
                        )
                    finally:
                        self.last_commit = trio.current_time() - started
                        if pacing is not None:
                            # a window follows: the woken readers' frames join it,
                            # no need to wait for them here
                            lingers = self.linger is not None and self.linger.lingers_after(
                                len(events), self.last_commit
                            )
                            await pacing.close(0 if lingers else ROUNDS)
            except STORE_TROUBLE as exc:
                self.stats.store_retries += 1
                if isinstance(exc, apsw.FullError) and len(events) > 1:
                    return _Full.TOO_BIG
                await self.backoff.wait(exc)
                continue
            except Exception as exc:
                return exc
            if self.progress is not None:
                self.progress.commit(number)
            # Waking the sender and the inbox pump costs each a trip to the store thread:
            # only when the batch left them work.
            if done.handed_off:
                self.on_commit()
            if self.hub:  # only while events out has subscribers
                publish_committed(self.hub, events, done)
            if done.own_events:
                count_firings(self.stats.firings, done.own_events)
            for outcome in done.outcomes:
                if outcome is Outcome.duplicate:
                    self.stats.duplicates += 1
                elif outcome is Outcome.parked:
                    self.stats.parked += 1
            return done

    async def settle(self, batch: Sequence[Submission]) -> None:
        started = trio.current_time()
        await self._commit(batch)
        self.backoff.cleared()
        if self.on_batch is not None:
            self.on_batch(batch, trio.current_time() - started)
        self.stats.batches += 1
        self.stats.events += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))

    async def _commit(self, batch: Sequence[Submission]) -> None:
        """Commit and resolve `batch`, in halves while the disk is too full for it."""
        result = await self._attempt([submission.event for submission in batch])
        if isinstance(result, BatchOutcome):
            for submission in batch:
                submission.sink.resolved(submission, None)
            log_firings(result.firings)  # committed, and the acks are out
            return
        if result is _Full.TOO_BIG:
            self._log(
                "split batches",
                logging.WARNING,
                "a batch of %d events does not fit on the disk; committing it in halves",
                len(batch),
            )
            half = len(batch) // 2
            await self._commit(batch[:half])
            await self._commit(batch[half:])
            return
        self._log(
            "failed batches",
            logging.WARNING,
            "a batch of %d events failed (%r); retrying them one by one",
            len(batch),
            result,
        )
        for submission in batch:
            alone = await self._attempt([submission.event])
            assert alone is not _Full.TOO_BIG  # a single event waits for space instead
            if isinstance(alone, BatchOutcome):
                submission.sink.resolved(submission, None)
                log_firings(alone.firings)
            else:
                self.stats.internal_errors += 1
                self._log(
                    "events refused as internal errors",
                    logging.ERROR,
                    "event %s could not be processed and is refused",
                    submission.event.id,
                    exc_info=alone,
                )
                submission.sink.resolved(submission, f"internal error: {alone!r}")


async def run_evaluator(
    gateway: StoreGateway,
    engine: BatchEngine,
    receive: trio.MemoryReceiveChannel[Submission],
    *,
    clock: Callable[[], datetime],
    batch_max: int,
    stats: EvaluatorStats | None = None,
    on_commit: Callable[[], None] = lambda: None,
    log_limits: LogLimits = DEFAULT_LIMITS,
    on_batch: Callable[[Sequence[Submission], float], None] | None = None,
    hub: EventsHub | None = None,
    linger: timedelta = timedelta(0),
    linger_events: int = COMMIT_LINGER_EVENTS,
    pacing: ReadPacing | None = None,
    progress: BatchProgress | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Commit submissions in batches until every sender has closed the channel;
    ``on_commit`` runs after each commit (it wakes the sender and the inbox pump); a line
    one event can cause is logged within ``log_limits``; after a batch's first event, more
    are awaited as ``daemon.core.commit_linger`` says (``linger`` at most, until
    ``linger_events``), with ``pacing`` telling connection readers while it lingers;
    ``on_batch`` gets each batch once it is settled, with the seconds that took
    (``/metrics``); ``progress`` counts the transactions begun and committed."""
    if batch_max < 1:
        raise ValueError(f"batch_max must be at least 1, got {batch_max}")
    policy = CommitLinger(linger.total_seconds(), linger_events, batch_max)
    evaluator = _Evaluator(
        gateway,
        engine,
        clock,
        stats if stats is not None else EvaluatorStats(),
        on_commit,
        _throttles(log_limits),
        on_batch,
        hub,
        pacing,
        progress,
        policy,
    )
    last_batch = 0
    async with receive:
        task_status.started()
        async for first in receive:
            batch = await _gather(receive, first, policy, last_batch, pacing, evaluator.last_commit)
            await evaluator.settle(batch)
            last_batch = len(batch)


def _take_queued(
    receive: trio.MemoryReceiveChannel[Submission], batch: list[Submission], batch_max: int
) -> None:
    while len(batch) < batch_max:
        try:
            batch.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return


async def _gather(
    receive: trio.MemoryReceiveChannel[Submission],
    first: Submission,
    policy: CommitLinger,
    last_batch: int,
    pacing: ReadPacing | None,
    last_commit: float = 0.0,
) -> list[Submission]:
    """A batch: ``first``, what is queued behind it, and what arrived while ``policy``
    said to linger (``last_batch``: the size of the batch before; ``last_commit``: the
    seconds its commit took), ``pacing`` open the while. The linger is shielded from
    cancellation, so the events already taken are committed; it is bounded anyway."""
    first_at = trio.current_time()
    batch = [first]
    _take_queued(receive, batch, policy.batch_max)
    while len(batch) < policy.batch_max:
        wait = policy.wait(
            batch=len(batch),
            queued=receive.statistics().current_buffer_used,
            last_batch=last_batch,
            first_at=first_at,
            now=trio.current_time(),
            last_commit=last_commit,
        )
        if wait <= 0:
            break
        # one wake-up at the end of the window, not one per event arriving in it
        with trio.CancelScope(shield=True):
            if pacing is None:
                await trio.sleep(wait)
            else:
                pacing.open()
                try:
                    await trio.sleep(wait)
                finally:
                    await pacing.close()  # the readers held off read now, before the take
        _take_queued(receive, batch, policy.batch_max)
    return batch
