"""The sender task: delivers outbox rows as webhooks (docs/DELIVERY.md#outcomes-and-retries,
#action-events).

Theory of operation. One loop claims due rows through the store gateway (a claim is one
transaction that also releases expired leases), and starts one task per claimed row. A row
holds a slot until its attempt is over: at most `concurrency` in flight overall, an
endpoint's window per endpoint (scheme://host:port: `per_endpoint_concurrency`, widened
up to `max_per_endpoint` while it answers within `fast_answer`, halved when it slows down
or fails, `daemon/core/delivery.py: next_window`), handed out round-robin
across endpoints; an endpoint whose last attempt failed (network error, timeout, 408, 429,
5xx) gets one at a time until it answers, and failing endpoints together at most
`probe_concurrency`, fewer than `concurrency`; endpoints that have not answered since
start (new or failing) never take the last slot: a failing endpoint never blocks
deliveries to the others, however many fail (`daemon/core/delivery.py: Endpoints`). The
loop sleeps until the next row is due, a slot frees up, or `notify()` says the evaluator
committed new rows.

Deliveries give way to acks (docs/DELIVERY.md#giving-way-to-acks): every attempt in
flight costs the event loop a dozen steps of httpx's, and every step of the ack path
(reader, evaluator, store hand-off, ack writer) waits behind them. So while clients send
events (`IngestActivity`: the evaluator began a batch less than `ingest_quiet_after`
ago), no endpoint gets more than `concurrency_while_ingesting` attempts in flight, however
wide its window has grown (`daemon/core/delivery.py: GiveWay`); the total and the sharing
between endpoints stay as they are. Attempts in flight go on; a loop that held an
endpoint back also wakes when ingest goes quiet, and claims up to its window again.

Each attempt ends in one transaction: the attempt row, the move in the state table
(`daemon/core/delivery.py`), and — when the delivery is finished — its
`prefect.automation.action.executed` or `.failed` event pushed to the inbox, so the event
exists if and only if the status change does. `emit` is then told about those events.
Results are group-committed (`_Recorder`): those that finish while a COMMIT runs share the
next one, so a storm of fast deliveries costs one transaction per batch, not per row.
A request is rendered on the event loop when that is cheaper than a thread hand-off
(`daemon/core/delivery.py: renders_inline`), else in a worker thread.

Rows left `in_flight` by a previous process (crash, SIGKILL) are released when the sender
starts — the lock file guarantees no other sender owns them — and are sent again with the
same `webhook-id`: delivery is at least once. Endpoints with a row waiting for its retry
start out failing, so a restart does not trust a dead endpoint with every slot again.

Store trouble (docs/OPERATIONS.md#store-trouble; disk full, I/O error, the write lock held
elsewhere) never ends the sender: the release, each claim and each attempt's commit are
retried with the backoff of `daemon.runtime.store_trouble`, the cause logged once. A
delivery whose result cannot be committed keeps its lease while it retries (and the
claims, which need the store too, wait as well), and
commits only while the row is still in flight under that lease: if the lease ran out and the
row was released (and perhaps claimed and sent again) meanwhile, the stale result is
dropped, never written over the newer attempt's row. Any other exception is a bug and still
ends the daemon.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import math
import os
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from functools import partial
from random import Random as _StdRandom
from typing import Any, Final, Protocol, runtime_checkable

import apsw
import attrs
import httpx
import trio
from pydantic import ValidationError

from daemon import __version__
from daemon.core.action_models import CallWebhook, UnresolvedReferences
from daemon.core.automations import Automation
from daemon.core.clock import from_us, to_us, wall_clock
from daemon.core.config import LEASE_MARGIN, DeliveryConfig
from daemon.core.delivery import (
    AttemptOutcome,
    Dead,
    Decision,
    Delivered,
    Endpoints,
    GiveWay,
    Move,
    Random,
    RetryAt,
    Slots,
    WindowPolicy,
    action_triggered_event_id,
    decide,
    describe,
    endpoint_answered,
    is_success,
    renders_inline,
)
from daemon.core.events import ReceivedEvent, uuid7
from daemon.core.firings import TriggeredAction
from daemon.core.templates import RenderFailed, webhook_request
from daemon.core.triggered_documents import read_triggered
from daemon.engine.acting import action_event, refreshed
from daemon.runtime.gateway import StoreGateway
from daemon.runtime.store_trouble import STORE_TROUBLE, Backoff
from store import outbox
from store.connection import Connection
from store.db import write_transaction
from store.events import push_inbox

log = logging.getLogger(__name__)

USER_AGENT: Final = f"trigd/{__version__}"
RESPONSE_BODY_CHARS: Final = 1000  # of the response kept in the executed/failed event
RESPONSE_READ_BYTES: Final = 16_384  # read at most this much of a response body
MAX_IDLE: Final = timedelta(seconds=60)  # re-check the outbox at least this often
RESULTS_PER_COMMIT: Final = 256
"""Attempts' results recorded per transaction at most (rows): a batch's COMMIT holds the
store thread about 10 ms here, inbox events included."""
SECRET_PREFIX: Final = "whsec_"

REDACTED_HEADERS: Final = frozenset({"authorization", "traceparent", "via"})
REDACTED_PREFIXES: Final = ("x-forwarded", "x-b3", "x-cloud-trace", "x-envoy", "x-prefect")


def should_redact_header(name: str) -> bool:
    lowered = name.lower()
    return lowered in REDACTED_HEADERS or lowered.startswith(REDACTED_PREFIXES)


def signing_key(secret: str) -> bytes:
    """Standard Webhooks keys: `whsec_<base64>` decodes to the key; anything else is used
    as its UTF-8 bytes. ValueError for a `whsec_` secret that is not base64."""
    if secret.startswith(SECRET_PREFIX):
        try:
            key = base64.b64decode(secret[len(SECRET_PREFIX) :] + "==", validate=False)
        except binascii.Error:
            raise ValueError("secret: the part after whsec_ is not valid base64") from None
        if not key:
            raise ValueError("secret: the key after whsec_ is empty")
        return key
    return secret.encode()


def sign(key: bytes, msg_id: str, timestamp: int, body: str) -> str:
    """`v1,<base64 HMAC-SHA256 of id.timestamp.body>`."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


@runtime_checkable
class SleepingClock(Protocol):
    """A wall clock that also knows how to wait for itself (tests jump it)."""

    def __call__(self) -> datetime: ...

    async def sleep_until(self, when: datetime) -> None: ...


class IngestActivity(Protocol):
    """When the evaluator last began a batch, in trio time (None: not yet): clients are
    sending events while that is recent (`daemon.runtime.evaluator.BatchProgress`)."""

    @property
    def last_begun_at(self) -> float | None: ...


def _no_automation(automation_id: str) -> None:
    return None


def _no_emit(events: Sequence[ReceivedEvent]) -> None:
    pass


def _no_attempt(decision: Decision, latency_us: int | None) -> None:
    pass


@attrs.frozen
class _Result:
    """What one attempt produced, ready to be committed."""

    attempted: datetime
    outcome: AttemptOutcome
    decision: Decision
    latency_us: int | None
    details: dict[str, Any] = attrs.field(factory=dict)
    reached: bool = False  # the request went out: the outcome tells of the endpoint


def _finished_event(
    triggered: TriggeredAction, decision: Delivered | Dead, details: dict[str, Any], now: datetime
) -> ReceivedEvent:
    """`prefect.automation.action.executed` / `.failed`, following the action's
    `triggered` event (docs/DELIVERY.md#action-events)."""
    if isinstance(decision, Dead):
        details = {"reason": decision.reason, **details}
    return action_event(
        triggered,
        "executed" if isinstance(decision, Delivered) else "failed",
        occurred=now,
        event_id=uuid7(),
        follows=action_triggered_event_id(triggered.id),
        details=details,
        now=now,
    )


@attrs.define(eq=False)
class _Slot:
    """The slot one attempt holds, freed once."""

    endpoint: str | None
    freed: bool = False


@attrs.define(eq=False)
class _Finished:
    """One attempt's result waiting for the commit of its batch (`_Recorder`)."""

    row: outbox.OutboxRow
    result: _Result
    event: ReceivedEvent | None
    now_us: int
    ours: bool | None = None  # set by the commit: False when the row was no longer ours
    done: trio.Event = attrs.field(factory=trio.Event)


def _record(
    conn: Connection,
    row: outbox.OutboxRow,
    result: _Result,
    event: ReceivedEvent | None,
    now_us: int,
) -> bool:
    """Record the attempt and move the row, inside the caller's transaction. False when
    the row is no longer ours: its lease expired and it was released (and perhaps claimed
    again) meanwhile, which a commit retried through store trouble can find."""
    decision = result.decision
    if isinstance(decision, Delivered):
        move, at_us, reason = Move.SUCCEED, now_us, None
    elif isinstance(decision, RetryAt):
        move, at_us, reason = Move.RETRY, to_us(decision.at), decision.reason
    else:
        move, at_us, reason = Move.DIE, now_us, decision.reason
    ours = outbox.finish(
        conn,
        row.id,
        row.lease_until_us,
        move,
        at_us=at_us,
        reason=reason,
        attempted_us=to_us(result.attempted),
        latency_us=result.latency_us,
        status_code=result.outcome.status_code,
        error=None if isinstance(decision, Delivered) else _error(result),
    )
    if ours and event is not None:
        push_inbox(conn, [event])
    return ours


def _commit(
    conn: Connection,
    batch: Sequence[_Finished],
    now_us: int,
    lease_until_us: int,
    slots: Slots,
) -> tuple[list[bool], list[outbox.OutboxRow]]:
    """Record a batch of attempts and claim rows for the free `slots`, in one transaction
    (one COMMIT, one fsync, for all): whether each row was still ours, and the rows
    claimed."""
    with write_transaction(conn):
        outbox.release_leases(conn, now_us)  # as every claim does: a stale result finds out
        ours = [_record(conn, f.row, f.result, f.event, f.now_us) for f in batch]
        claimed = outbox.claim_slots(conn, now_us, lease_until_us, slots) if slots.free else []
    return ours, claimed


class _Recorder:
    """Group commit of attempts' results: the results that finish while a commit runs
    wait for the next one, which takes them all (at most `limit`). A delivery keeps its
    lease until its result is committed (its slot went back when the attempt ended);
    store trouble is waited out with a backoff, the batch kept whole."""

    def __init__(
        self, limit: int, record: Callable[[Sequence[_Finished]], Awaitable[list[bool]]]
    ) -> None:
        self._limit = limit
        self._record = record  # commits a batch (`Sender._record_batch`)
        self._waiting: list[_Finished] = []
        self._wake = trio.Event()
        self._committing = False

    @property
    def busy(self) -> bool:
        """Results wait or are being committed: that commit will claim for the free slots."""
        return self._committing or bool(self._waiting)

    async def commit(self, finished: _Finished) -> bool:
        self._waiting.append(finished)
        self._wake.set()
        await finished.done.wait()
        assert finished.ours is not None
        return finished.ours

    async def run(self) -> None:
        trouble = Backoff(log, "recording the results of deliveries")
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._waiting:
                batch = self._waiting[: self._limit]
                del self._waiting[: self._limit]
                self._committing = True
                try:
                    # the requests were made: their results are worth waiting for the store
                    # (holding their leases), rather than a send again after the leases run out
                    outcome = await trouble.call(partial(self._record, batch))
                finally:
                    self._committing = False
                for finished, ours in zip(batch, outcome, strict=True):
                    finished.ours = ours
                    finished.done.set()


def _error(result: _Result) -> str:
    if isinstance(result.decision, Dead):
        return result.decision.reason
    return describe(result.outcome)


def _log_outcome(row: outbox.OutboxRow, triggered: TriggeredAction | None, result: _Result) -> None:
    """One line per attempt's outcome (docs/OPERATIONS.md#logs): delivered and retry at
    INFO, dead at WARNING, each with the automation's name, the endpoint as
    scheme://host:port (never the path, the query or a header) and the status code."""
    decision = result.decision
    name = triggered.automation.name if triggered is not None else None
    status = result.outcome.status_code
    fields: dict[str, Any] = {
        "delivery": row.id,
        "automation": name,
        "automation_id": row.automation_id,
        "action_index": row.action_index,
        "action_type": row.action_type,
        "endpoint": row.endpoint,
        "attempt": row.attempts + 1,
        "status_code": status,
    }
    to = f" to {row.endpoint}" if row.endpoint else ""
    answer = f" (HTTP {status})" if status is not None else ""
    if isinstance(decision, Delivered):
        fields["outcome"] = "delivered"
        log.info(
            "delivery %s of automation %r%s: delivered%s",
            row.id,
            name,
            to,
            answer,
            extra=fields,
        )
    elif isinstance(decision, RetryAt):
        fields.update(outcome="retry", reason=decision.reason, next_attempt=decision.at)
        log.info(
            "delivery %s of automation %r%s: %s; next attempt at %s",
            row.id,
            name,
            to,
            decision.reason,
            decision.at.isoformat(),
            extra=fields,
        )
    else:
        fields.update(outcome="dead", reason=decision.reason)
        log.warning(
            "delivery %s of automation %r%s is dead: %s",
            row.id,
            name,
            to,
            decision.reason,
            extra=fields,
        )


def _claim(
    conn: apsw.Connection, now_us: int, lease_until_us: int, slots: Slots
) -> tuple[list[outbox.OutboxRow], int | None]:
    with write_transaction(conn):
        outbox.release_leases(conn, now_us)
        rows = outbox.claim_slots(conn, now_us, lease_until_us, slots)
        next_due = outbox.next_due_us(conn, after_us=now_us)
    return rows, next_due


def _extend_lease(conn: apsw.Connection, row_id: str, held_us: int, until_us: int) -> bool:
    with write_transaction(conn):
        extended = outbox.extend_lease(conn, row_id, held_us, until_us)
    return extended


def _release_all(conn: apsw.Connection, now_us: int) -> tuple[int, set[str]]:
    """Release what a previous process left in flight; also which endpoints were failing."""
    with write_transaction(conn):
        failing = outbox.failing_endpoints(conn)
        released = outbox.release_leases(conn, now_us, everything=True)
    return released, failing


class Sender:
    """The running sender; `notify()` after committing new outbox rows."""

    def __init__(
        self,
        gateway: StoreGateway,
        settings: DeliveryConfig,
        client: httpx.AsyncClient,
        transport: httpx.AsyncBaseTransport,
        *,
        clock: Callable[[], datetime],
        emit: Callable[[Sequence[ReceivedEvent]], None],
        random: Random,
        current: Callable[[str], Automation | None] = _no_automation,
        on_attempt: Callable[[Decision, int | None], None] = _no_attempt,
        ingest: IngestActivity | None = None,
    ) -> None:
        self._on_attempt = on_attempt  # each recorded attempt: its decision, its latency
        self._ingest = ingest  # None: never give way
        self._give_way = GiveWay(
            settings.concurrency_while_ingesting, settings.ingest_quiet_after.total_seconds()
        )
        self._gateway = gateway
        self._current = current
        self._settings = settings
        self._client = client  # builds requests (its default headers, the timeout)
        self._transport = transport  # the client's: sends them
        self._clock = clock
        self._emit = emit
        self._random = random
        self._wake = trio.Event()
        self._recorder = _Recorder(RESULTS_PER_COMMIT, self._record_batch)
        self._claiming = trio.Lock()  # a slots snapshot is good until its claim has started
        self._nursery: trio.Nursery | None = None
        self._endpoints = Endpoints(
            concurrency=settings.concurrency,
            per_endpoint=settings.per_endpoint_concurrency,
            probes=settings.probe_concurrency,
            window=WindowPolicy(
                settings.per_endpoint_concurrency,
                settings.max_per_endpoint,
                settings.fast_answer,
            ),
        )

    def notify(self) -> None:
        """New rows may be due (call from trio, after commit)."""
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return self._endpoints.in_flight

    @property
    def endpoints(self) -> Endpoints:
        """Slots in use, and the endpoints failing now (read-only use, e.g. tests)."""
        return self._endpoints

    async def _sleep_until(self, when: datetime) -> None:
        if isinstance(self._clock, SleepingClock):
            await self._clock.sleep_until(when)
        else:
            delay = (when - self._clock()).total_seconds()
            await trio.sleep(min(max(0.0, delay), MAX_IDLE.total_seconds()))

    def _cap(self) -> int | None:
        """Attempts in flight to one endpoint that a claim may bring now; None: its
        window."""
        if self._ingest is None:
            return None
        return self._give_way.cap(self._ingest.last_begun_at, trio.current_time())

    def _quiet_at(self, cap: int | None) -> float | None:
        """When to look again because ingest goes quiet (trio time), if `cap` keeps an
        endpoint below its window now; else None."""
        if self._ingest is None or not self._endpoints.held_back(cap):
            return None
        return self._give_way.quiet_at(self._ingest.last_begun_at)

    async def _wait(self, until: datetime | None, quiet_at: float | None = None) -> None:
        """Until the next row is due, a slot frees up, notify(), or (`quiet_at`, trio
        time) ingest goes quiet, whichever is first. With nothing scheduled, still look
        again after MAX_IDLE (of trio's clock). The loop waits once per attempt in a
        storm: with the wall clock, a deadline rather than a sleeper task to spawn and
        cancel each time."""
        quiet = math.inf if quiet_at is None else quiet_at
        if until is None or not isinstance(self._clock, SleepingClock):
            delay = MAX_IDLE.total_seconds()
            if until is not None:
                delay = min(max(0.0, (until - self._clock()).total_seconds()), delay)
            with trio.move_on_at(min(trio.current_time() + delay, quiet)):
                await self._wake.wait()
            return
        with trio.move_on_at(quiet):
            async with trio.open_nursery() as nursery:

                async def sleeper() -> None:
                    await self._sleep_until(until)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(sleeper)
                await self._wake.wait()
                nursery.cancel_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[Sender] = trio.TASK_STATUS_IGNORED) -> None:
        """Started at once (a store in trouble must not hold up the daemon's start); the
        release of rows left in flight comes first, then claims."""
        task_status.started(self)
        released, failing = await Backoff(log, "releasing the deliveries left in flight").call(
            lambda: self._gateway.run(_release_all, to_us(self._clock()))
        )
        if released:
            log.warning("%d deliveries were in flight when trigd stopped; sending again", released)
        for endpoint in failing:
            self._endpoints.mark_failing(endpoint)
        if failing:
            log.warning(
                "%d endpoints were failing when trigd stopped; one delivery at a time to each "
                "until it answers",
                len(failing),
            )
        settings = self._settings
        claiming = Backoff(log, "claiming due deliveries")
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._recorder.run)
            while True:
                self._wake = trio.Event()
                next_due_us: int | None = None
                quiet_at: float | None = None
                # results waiting for their commit: it claims for the slots they freed
                if not self._recorder.busy:
                    async with self._claiming:
                        now = self._clock()
                        cap = self._cap()
                        slots = self._endpoints.slots(cap)
                        if slots.free > 0:
                            try:
                                rows, next_due_us = await self._gateway.run(
                                    _claim, to_us(now), to_us(now + settings.lease), slots
                                )
                            except STORE_TROUBLE as exc:
                                await claiming.wait(exc)  # nothing claimed: try again afresh
                                continue
                            claiming.cleared()
                            self._start(rows)
                        quiet_at = self._quiet_at(cap)
                await self._wait(None if next_due_us is None else from_us(next_due_us), quiet_at)

    def _start(self, rows: Sequence[outbox.OutboxRow]) -> None:
        assert self._nursery is not None
        self._endpoints.started(row.endpoint for row in rows)
        for row in rows:
            self._nursery.start_soon(self._deliver, row)

    async def _record_batch(self, batch: Sequence[_Finished]) -> list[bool]:
        """Commit a batch of results, claiming in the same transaction for the free slots."""
        async with self._claiming:
            now = self._clock()
            ours, rows = await self._gateway.run(
                _commit,
                batch,
                to_us(now),
                to_us(now + self._settings.lease),
                self._endpoints.slots(self._cap()),
            )
            self._start(rows)
        self._wake.set()  # rows not due yet, or new ones: the loop looks again
        return ours

    async def _deliver(self, row: outbox.OutboxRow) -> None:
        slot = _Slot(row.endpoint)
        try:
            await self._deliver_row(row, slot)
        finally:
            self._free(slot, None, None)

    def _free(self, slot: _Slot, answered: bool | None, latency: timedelta | None) -> None:
        """The attempt is over: its slot goes back (once), the endpoint's window and
        failing state move as it showed, and the loop may claim again. The result may
        still be waiting for its commit: its row stays in flight under its lease."""
        if slot.freed:
            return
        slot.freed = True
        endpoint = slot.endpoint
        if self._endpoints.finished(endpoint, answered, latency=latency, now=self._clock()):
            if answered:
                log.warning("endpoint %s answers again", endpoint)
            else:
                log.warning(
                    "endpoint %s is failing; one delivery at a time until it answers", endpoint
                )
        self._wake.set()

    async def _deliver_row(self, row: outbox.OutboxRow, slot: _Slot) -> None:
        """Attempt the row, free its slot (`_free`) as soon as the attempt is over, then
        record the result."""
        try:
            triggered = read_triggered(row.document)
        except ValidationError as exc:
            reason = f"invalid outbox document: {exc.errors()[0]['msg']}"
            outcome = AttemptOutcome(error=reason)
            self._free(slot, None, None)
            await self._finish(row, None, _Result(self._clock(), outcome, Dead(reason), None))
            return
        if row.revived_us is not None:  # retried by an operator: as the automation is now
            triggered = refreshed(triggered, self._current(row.automation_id))
        action = triggered.action
        if isinstance(action, CallWebhook):
            held = await self._hold_for(row, self._timeout(action))
            if held is None:
                log.warning(
                    "delivery %s: lease lost before the attempt; it will be retried", row.id
                )
                return
            row = held
            result = await self._call(row, triggered, action)
        else:
            result = _Result(self._clock(), AttemptOutcome(status_code=200), Delivered(), 0)
        if result.reached:
            latency = (
                None if result.latency_us is None else timedelta(microseconds=result.latency_us)
            )
            self._free(slot, endpoint_answered(result.outcome), latency)
        else:
            self._free(slot, None, None)
        await self._finish(row, triggered, result)

    def _timeout(self, action: CallWebhook) -> float:
        """Seconds one attempt may take: the action's own `timeout`, else the config's."""
        if action.timeout is not None:
            return action.timeout
        return self._settings.timeout.total_seconds()

    async def _hold_for(self, row: outbox.OutboxRow, seconds: float) -> outbox.OutboxRow | None:
        """The row, its lease long enough for an attempt of `seconds` and the commit of its
        result: an action may allow more time than the configured lease, which would
        otherwise run out mid-request and have the row sent again beside it (and the
        result, even a 2xx, dropped). None when the row no longer holds its lease."""
        held = row.lease_until_us
        needed = to_us(self._clock() + timedelta(seconds=seconds) + LEASE_MARGIN)
        if held is None or needed <= held:
            return row
        extended = await Backoff(log, f"extending the lease of delivery {row.id}").call(
            lambda: self._gateway.run(_extend_lease, row.id, held, needed)
        )
        return attrs.evolve(row, lease_until_us=needed) if extended else None

    async def _finish(
        self, row: outbox.OutboxRow, triggered: TriggeredAction | None, result: _Result
    ) -> None:
        now = self._clock()
        decision = result.decision
        event = None
        if triggered is not None and isinstance(decision, Delivered | Dead):
            event = _finished_event(triggered, decision, result.details, now)
        ours = await self._recorder.commit(_Finished(row, result, event, to_us(now)))
        if not ours:
            log.warning("delivery %s: lease expired during the attempt; it will be retried", row.id)
            return
        _log_outcome(row, triggered, result)
        self._on_attempt(result.decision, result.latency_us)
        if event is not None:
            self._emit([event])

    def _decide(self, row: outbox.OutboxRow, outcome: AttemptOutcome) -> Decision:
        return decide(
            outcome,
            failures=row.attempts + 1,
            created=from_us(row.window_start_us),
            now=self._clock(),
            max_age=self._settings.max_age,
            random=self._random,
        )

    async def _call(
        self, row: outbox.OutboxRow, triggered: TriggeredAction, action: CallWebhook
    ) -> _Result:
        attempted = self._clock()
        try:  # the body has no secret; the headers and secret do, references resolved
            if renders_inline(action):
                body, own_headers, secret = webhook_request(triggered, os.environ)
            else:
                body, own_headers, secret = await trio.to_thread.run_sync(
                    webhook_request, triggered, os.environ
                )
        except RenderFailed as exc:
            failure = {"template_error": exc.template_error, "template_source": exc.template_source}
            return _Result(
                attempted, AttemptOutcome(error=exc.reason), Dead(exc.reason), None, failure
            )
        except UnresolvedReferences as exc:  # a file gone or unreadable may come back
            outcome = AttemptOutcome(error=f"Webhook call failed: {exc}")
            return _Result(attempted, outcome, self._decide(row, outcome), None)
        msg_id = str(triggered.id)
        timestamp = math.floor(self._clock().timestamp())
        headers = httpx.Headers({"Content-Type": "application/json", "User-Agent": USER_AGENT})
        headers.update(own_headers)  # case-insensitive: the action's own replace these
        headers["webhook-id"] = msg_id
        headers["webhook-timestamp"] = str(timestamp)
        if secret:
            try:
                key = signing_key(secret)
            except ValueError as exc:
                reason = f"Webhook call failed: {exc}"
                return _Result(attempted, AttemptOutcome(error=reason), Dead(reason), None)
            headers["webhook-signature"] = sign(key, msg_id, timestamp, body)
        timeout = self._timeout(action)
        started = trio.current_time()
        try:
            with trio.fail_after(timeout):
                status, response_headers, text, retry_after = await self._request(
                    action, headers, body, timeout
                )
        except (trio.TooSlowError, httpx.TimeoutException) as exc:
            error = f"Webhook call failed: timed out after {timeout:g}s ({type(exc).__name__})"
            outcome = AttemptOutcome(error=error)
            return _Result(
                attempted, outcome, self._decide(row, outcome), _elapsed_us(started), reached=True
            )
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, ValueError) as exc:
            reason = f"Webhook call failed: {exc!r}"
            return _Result(
                attempted, AttemptOutcome(error=reason), Dead(reason), _elapsed_us(started)
            )
        except httpx.HTTPError as exc:
            outcome = AttemptOutcome(error=f"Webhook call failed: {exc!r}")
            return _Result(
                attempted, outcome, self._decide(row, outcome), _elapsed_us(started), reached=True
            )
        latency = _elapsed_us(started)
        outcome = AttemptOutcome(status_code=status, retry_after=retry_after)
        details: dict[str, Any] = {
            "status_code": status,
            "response_body": text,
            "response_headers": {
                k: v for k, v in response_headers.items() if not should_redact_header(k)
            },
        }
        decision = Delivered() if is_success(status) else self._decide(row, outcome)
        return _Result(attempted, outcome, decision, latency, details, reached=True)

    async def _request(
        self, action: CallWebhook, headers: httpx.Headers, body: str, http_timeout: float
    ) -> tuple[int, dict[str, str], str, str | None]:
        """One HTTP exchange; reads at most RESPONSE_READ_BYTES of the answer. The request
        is built by the client (its headers: `Accept`, `Accept-Encoding`, `Connection`) and
        goes straight to its transport: no redirect to follow, no auth, no cookie jar, so
        the client's `send` would only add work to every delivery."""
        request = self._client.build_request(
            action.method, action.url, content=body.encode(), headers=headers, timeout=http_timeout
        )
        response = await self._transport.handle_async_request(request)
        try:
            data = bytearray()
            async for chunk in response.aiter_raw():
                data += chunk
                if len(data) >= RESPONSE_READ_BYTES:
                    break
        finally:
            await response.aclose()
        text = bytes(data).decode(response.encoding or "utf-8", errors="replace")
        return (
            response.status_code,
            dict(response.headers.items()),
            text[:RESPONSE_BODY_CHARS],
            response.headers.get("retry-after"),
        )


def _elapsed_us(started: float) -> int:
    return round((trio.current_time() - started) * 1_000_000)


async def run_sender(
    gateway: StoreGateway,
    settings: DeliveryConfig,
    *,
    clock: Callable[[], datetime] = wall_clock,
    emit: Callable[[Sequence[ReceivedEvent]], None] = _no_emit,
    random: Random | None = None,
    current: Callable[[str], Automation | None] = _no_automation,
    on_attempt: Callable[[Decision, int | None], None] = _no_attempt,
    ingest: IngestActivity | None = None,
    task_status: trio.TaskStatus[Sender] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Deliver outbox rows until cancelled. `nursery.start` returns the `Sender`, whose
    `notify()` the evaluator calls after committing new rows. `emit` receives each
    executed/failed event after its transaction commits (to wake the evaluator).
    `current` gives an automation as loaded now, by id (a revived row is sent as it would
    make it: `acting.refreshed`). `clock` is the wall clock; one that is a `SleepingClock`
    also decides how to wait. `on_attempt` hears of each attempt once it is recorded
    (``/metrics``). `ingest` says when clients last sent events: while they do, the
    sender gives way to their acks (None: never)."""
    limits = httpx.Limits(
        max_connections=settings.concurrency,
        max_keepalive_connections=settings.concurrency,
    )
    # TLS verified against certifi's CAs, no proxy from the environment: httpx's defaults
    transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    async with httpx.AsyncClient(
        transport=transport, follow_redirects=False, trust_env=False, timeout=None
    ) as client:
        sender = Sender(
            gateway,
            settings,
            client,
            transport,
            clock=clock,
            emit=emit,
            random=random if random is not None else _StdRandom().random,
            current=current,
            on_attempt=on_attempt,
            ingest=ingest,
        )
        await sender.run(task_status=task_status)
