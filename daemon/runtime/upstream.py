"""`[upstream]`: the two tasks that put trigd beside a Prefect server
(README.md#trigd-beside-your-prefect-server).

Forward (`Forwarder`). Committed events are read in commit order (the events' rowid,
store/upstream.py) past a cursor kept in `meta`, a page at a time, through a read-only
connection of its own in a worker thread: the writer connection and its gateway are only
used to move the cursor, so forwarding never waits behind, or holds up, a batch. Each page
is sent on one websocket to the upstream's `/events/in`, then confirmed with Prefect's own
checkpoint: a ping, whose pong says the server has read every frame sent before it. Prefect's
server validates the frames after answering, and drops the connection on one it refuses, so
the page counts once the connection has stayed open `settle` longer; only then does the
cursor move, and the stored cursor only once the page has been confirmed `resend_window`
ago (`ResendWindow`, daemon/core/upstream.py: a server that validated past `settle`). A
page the server keeps closing the connection on is sent one event at a time to find the
event it refuses, which is skipped and counted (`PoisonHunt`). A crash or an outage at any
point re-sends at most the pages of the window and the unconfirmed one (at least once;
Prefect keeps one event per id). While caught up, the task
waits for the next commit (`notify`) or `POLL_SECONDS`, whichever comes first.

Subscribe (`Subscriber`). A websocket to the upstream's `/events/out` with the configured
EventFilter, from the position kept in `meta` (the latest `occurred` taken, less a
margin). Each event becomes a `Submission` into the evaluator's channel, exactly as if a
client had sent it: ordering, duplicates by id and triggers apply. Once the evaluator has
committed it, its `occurred` may move the position; the position is written at most once
per `POSITION_SECONDS`. An event trigd forwarded comes back as a duplicate and is dropped,
so forwarding and subscribing together never loop.

Both reconnect with exponential backoff (1 s doubling to `retry_max`), logging the cause
once per episode and once more when connected again; their state is in `UpstreamStats`.
No credential is ever logged or kept in an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import partial
from typing import Any, Final

import trio
import trio_websocket

from daemon.core.config import UnusableSetting, UpstreamConfig
from daemon.core.events import EventRejected
from daemon.core.log_throttle import DEFAULT_LIMITS, LogLimits
from daemon.core.references import UnresolvedReference, resolve
from daemon.core.upstream import PoisonHunt, ResendWindow, UpstreamStats, next_position
from daemon.runtime.gateway import StoreGateway
from daemon.runtime.store_trouble import STORE_TROUBLE, Backoff
from daemon.wire.submission import Submission
from daemon.wire.upstream import (
    ENVELOPE_BYTES,
    PREFECT_SUBPROTOCOL,
    Credentials,
    OversizedEvent,
    UpstreamRefused,
    auth_message,
    check_auth_reply,
    event_from_message,
    filter_message,
    socket_url,
    upgrade_headers,
)
from store import upstream as upstream_store
from store.connection import Connection
from store.db import Store, write_transaction

log = logging.getLogger("trigd.upstream")

FIRST_RETRY: Final = 1.0  # seconds before the first reconnect of an episode
POLL_SECONDS: Final = 1.0  # caught up: look for new events at least this often
POSITION_SECONDS: Final = 1.0  # the subscribe position is written at most this often
BACKLOG_SECONDS: Final = 1.0  # the backlog is counted at most this often
REPLY_BYTES: Final = 65_536  # the largest message /events/in may send us (its auth reply)

NOT_REFUSAL_CODES: Final = frozenset({1001, 1012, 1013})
"""Closes that say the server is going away or restarting, not that it refused a message."""

TROUBLE: Final = (
    OSError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio_websocket.HandshakeError,
    trio_websocket.ConnectionClosed,
    UpstreamRefused,
)
"""What ends a connection to the upstream and is retried; anything else is a bug."""


def resolve_credentials(config: UpstreamConfig, environ: Mapping[str, str]) -> Credentials:
    """The references in `auth_string` and `api_key`, resolved; one that does not resolve
    is the setting at fault (the message names the reference, never a value)."""
    values = {}
    for key in ("auth_string", "api_key"):
        text = getattr(config, key)
        try:
            values[key] = resolve(text, environ) if text else ""
        except UnresolvedReference as exc:
            raise UnusableSetting("upstream", key, "(reference)", str(exc)) from None
    return Credentials(**values)


def describe_trouble(exc: BaseException) -> str:
    """A sentence for the log and `last_error`: the kind of failure and the upstream's
    reason. Never the request headers, so never a credential."""
    if isinstance(exc, trio_websocket.ConnectionRejected):
        return f"the upstream refused the websocket upgrade (HTTP {exc.status_code})"
    if isinstance(exc, trio_websocket.ConnectionClosed):
        reason = exc.reason
        text = f" {reason.reason}" if reason and reason.reason else ""
        code = reason.code if reason else "?"
        return f"the upstream closed the connection ({code}{text})"
    if isinstance(exc, trio_websocket.HandshakeError):
        return f"websocket handshake failed ({type(exc).__name__})"
    if isinstance(exc, trio.TooSlowError):
        return "the upstream did not answer in time"
    if isinstance(exc, OSError):
        return f"cannot reach the upstream: {exc.strerror or exc}"
    return str(exc) or type(exc).__name__


def closed_by_server(trouble: BaseException | None) -> bool:
    """Whether a failure may be the upstream refusing what was sent: it closed the
    connection (Prefect's server ends `/events/in` on a message it cannot validate, with
    no close frame: 1006), not for going away or restarting, not a timeout or a
    connect error."""
    if not isinstance(trouble, trio_websocket.ConnectionClosed):
        return False
    return trouble.reason is None or trouble.reason.code not in NOT_REFUSAL_CODES


def _trouble_in(exc: BaseException) -> BaseException | None:
    """`exc` itself when it is TROUBLE, or the first TROUBLE in a group made only of it."""
    if isinstance(exc, TROUBLE):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_trouble_in(inner) for inner in exc.exceptions]
        if leaves and all(leaf is not None for leaf in leaves):
            return leaves[0]
    return None


class _Link:
    """One direction's connection episodes: backoff, and a log line once per episode."""

    def __init__(self, name: str, config: UpstreamConfig, stats: UpstreamStats) -> None:
        self.name = name
        self.url = config.url
        self.retry_max = config.retry_max.total_seconds()
        self.stats = stats
        self.delay = FIRST_RETRY
        self.failures = 0
        self.logged_connected = False

    def connected(self) -> None:
        """Authenticated. The episode is not over yet: a server that takes the connection
        and then closes it at once (an invalid filter, say) keeps backing off, with one
        warning, until the connection is `proven`."""
        if self.failures == 0 and not self.logged_connected:
            log.info("upstream %s: connected to %s", self.name, self.url)
            self.logged_connected = True

    def proven(self) -> None:
        """The connection did its work (a checkpoint answered, an event or a quiet interval
        received): the outage, if any, is over."""
        if self.failures:
            log.info("upstream %s: connected to %s again", self.name, self.url)
        self.failures = 0
        self.delay = FIRST_RETRY
        self.stats.last_error = None

    async def failed(self, exc: BaseException) -> None:
        why = describe_trouble(exc)
        self.stats.last_error = f"{self.name}: {why}"
        if self.failures == 0:
            log.warning(
                "upstream %s: %s; retrying with backoff (at most %.3gs) until it is back",
                self.name,
                why,
                self.retry_max,
            )
        self.failures += 1
        await trio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.retry_max)

    async def run(self, session: Callable[[], Any], on_down: Callable[[], None]) -> None:
        """Run `session` forever, reconnecting after TROUBLE."""
        while True:
            try:
                await session()
            except BaseException as exc:  # TROUBLE is retried, the rest re-raised
                trouble = _trouble_in(exc)
                if trouble is None:
                    raise
                on_down()
                await self.failed(trouble)
            else:
                on_down()


def _open_socket(
    config: UpstreamConfig,
    credentials: Credentials,
    path: str,
    max_message_size: int,
) -> Any:
    return trio_websocket.open_websocket_url(
        socket_url(config.url, path),
        subprotocols=[PREFECT_SUBPROTOCOL],
        extra_headers=upgrade_headers(credentials),
        max_message_size=max_message_size,
        connect_timeout=config.timeout.total_seconds(),
        disconnect_timeout=config.timeout.total_seconds(),
    )


async def _authenticate(
    ws: trio_websocket.WebSocketConnection,
    credentials: Credentials,
    *,
    events_out: bool,
) -> None:
    message = auth_message(credentials, events_out=events_out)
    if message is not None:
        await ws.send_message(message)
        check_auth_reply(await ws.get_message())


async def _or_closed(ws: trio_websocket.WebSocketConnection, wait: Callable[[], Any]) -> None:
    """`await wait()`, or ConnectionClosed as soon as the connection closes. trio-websocket
    notices a close only in a read, and its `ping` waits for the pong even after one; a
    server that refuses an event closes without answering (uvicorn reads a ping only once
    the app has taken the frames before it), or while the forwarder waits for new events.
    Unnoticed, the close would look like a timeout (no evidence of a refused event) or
    pass for good news while the resend window runs out. `/events/in` sends no messages,
    so a read ends only with the close."""

    async def closed() -> None:
        while True:
            await ws.get_message()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(closed)
        await wait()
        nursery.cancel_scope.cancel()


class Forwarder:
    """Sends every committed event to the upstream's `/events/in` (the module docstring)."""

    def __init__(
        self,
        config: UpstreamConfig,
        credentials: Credentials,
        gateway: StoreGateway,
        stats: UpstreamStats,
        *,
        clock: Callable[[], datetime],
    ) -> None:
        self._config = config
        self._credentials = credentials
        self._gateway = gateway
        self._stats = stats
        self._clock = clock
        self._link = _Link("forward", config, stats)
        self._wake = trio.Event()
        self._reader: Store | None = None
        self._backlog_counted = -BACKLOG_SECONDS
        self._store_backoff = Backoff(log, "moving the upstream forward cursor")
        self._hunt = PoisonHunt()
        self._window = ResendWindow(config.resend_window.total_seconds())
        self._at = 0  # the cursor of the current connection
        self._sent: dict[int, str] = {}  # seq -> id of the events sent and not confirmed
        self._authenticated = False

    def notify(self) -> None:
        """Events were committed: look for them now rather than at the next poll."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await self._move_cursor(0)  # forwarding has started: `trigd status` counts it
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._count_while_down)
                await self._link.run(self._attempt, self._down)
        finally:
            if self._reader is not None:
                self._reader.close()

    def _down(self) -> None:
        self._stats.forward_connected = False

    async def _count_while_down(self) -> None:
        """Keep the backlog figures (status, metrics) current through an outage too, when
        they matter most, not only when a reconnect is tried."""
        while True:
            await trio.sleep(BACKLOG_SECONDS)
            if not self._stats.forward_connected:
                await self._count_backlog(await self._cursor())

    def _reading(self) -> Connection:
        """The read-only connection of this task (each read is one statement: a snapshot)."""
        if self._reader is None:
            self._reader = Store.open_readonly(self._gateway.store.path)
        return self._reader.conn

    def _read(self, after: int, limit: int) -> list[upstream_store.ForwardRow]:
        return upstream_store.unforwarded_page(self._reading(), after, limit)

    def _count(self, after: int) -> upstream_store.Backlog:
        return upstream_store.backlog(self._reading(), after)

    async def _cursor(self) -> int:
        return await self._store_backoff.call(lambda: self._gateway.run(_read_cursor))

    async def _move_cursor(self, seq: int) -> None:
        await self._store_backoff.call(lambda: self._gateway.run(_write_cursor, seq))

    async def _store_due(self) -> None:
        due = self._window.due(trio.current_time())
        if due is not None:
            await self._move_cursor(due)

    async def _count_backlog(self, cursor: int) -> None:
        now = trio.current_time()
        if now - self._backlog_counted < BACKLOG_SECONDS:
            return
        self._backlog_counted = now
        counted = await trio.to_thread.run_sync(self._count, cursor)
        self._stats.backlog_seen(counted.count, counted.oldest_received_us, self._clock())

    async def _attempt(self) -> None:
        """One connection; when the server ends it after events were sent, what the
        `PoisonHunt` makes of it (an event it refuses is skipped here, before the backoff)."""
        self._authenticated = False
        self._sent = {}
        try:
            await self._session()
        except BaseException as exc:
            trouble = _trouble_in(exc)
            if trouble is not None and self._sent:
                closed = self._authenticated and closed_by_server(trouble)
                refused = self._hunt.ended(self._at, max(self._sent), closed_by_server=closed)
                if refused is not None:
                    await self._skip(refused, self._sent[refused], describe_trouble(trouble))
            raise

    async def _skip(self, seq: int, event_id: str, why: str) -> None:
        log.warning(
            "upstream forward: the upstream refused event %s (%s, %d times with it sent "
            "alone); skipped, it will not be forwarded",
            event_id,
            why,
            self._hunt.strikes,
        )
        await self._move_cursor(seq)
        self._stats.refused += 1

    async def _settled(self, ws: trio_websocket.WebSocketConnection) -> None:
        """The checkpoint's pong only says the server has read the frames: it validates them
        after. A page counts as taken once the connection has stayed open `settle` longer;
        a close meanwhile raises ConnectionClosed. (`/events/in` sends no messages.)"""
        with trio.move_on_after(self._config.settle.total_seconds()):
            while True:
                await ws.get_message()

    async def _session(self) -> None:
        cursor = await self._cursor()
        self._at = cursor
        self._window.clear()
        await self._count_backlog(cursor)
        timeout = self._config.timeout.total_seconds()
        async with _open_socket(self._config, self._credentials, "/events/in", REPLY_BYTES) as ws:
            with trio.fail_after(timeout):
                await _authenticate(ws, self._credentials, events_out=False)
            self._authenticated = True
            self._stats.forward_connected = True
            self._link.connected()
            checkpoint = 0
            while True:
                self._wake = trio.Event()
                limit = self._hunt.limit(cursor, self._config.page_events)
                page = await trio.to_thread.run_sync(self._read, cursor, limit)
                if not page:
                    await self._store_due()
                    self._link.proven()
                    self._backlog_counted = -BACKLOG_SECONDS
                    await self._count_backlog(cursor)
                    with trio.move_on_after(POLL_SECONDS):
                        await _or_closed(ws, self._wake.wait)
                    continue
                self._sent = {row.seq: row.id for row in page}
                for row in page:
                    await ws.send_message(row.data)
                checkpoint += 1
                with trio.fail_after(timeout):
                    await _or_closed(ws, partial(ws.ping, checkpoint.to_bytes(8, "big")))
                await self._settled(ws)
                self._link.proven()
                alone = limit == 1 and self._hunt.probing(cursor)
                due = self._window.counted(page[-1].seq, trio.current_time(), alone=alone)
                if due is not None:
                    await self._move_cursor(due)
                cursor = self._at = page[-1].seq
                self._sent = {}
                self._stats.forwarded += len(page)
                await self._count_backlog(cursor)


def _read_cursor(conn: Connection) -> int:
    return upstream_store.forward_cursor(conn)


def _write_cursor(conn: Connection, seq: int) -> None:
    with write_transaction(conn):
        upstream_store.set_forward_cursor(conn, seq)


def _write_position(conn: Connection, occurred: datetime) -> None:
    with write_transaction(conn):
        upstream_store.set_subscribe_position(conn, occurred)


class Subscriber:
    """Takes the upstream's matching events into local evaluation (the module docstring)."""

    def __init__(
        self,
        config: UpstreamConfig,
        credentials: Credentials,
        gateway: StoreGateway,
        send: trio.MemorySendChannel[Submission],
        stats: UpstreamStats,
        *,
        clock: Callable[[], datetime],
        max_event_bytes: int,
        max_json_depth: int,
        log_limits: LogLimits = DEFAULT_LIMITS,
    ) -> None:
        self._config = config
        self._credentials = credentials
        self._gateway = gateway
        self._send = send
        self._stats = stats
        self._clock = clock
        self._max_event_bytes = max_event_bytes
        # read past max_event_bytes, so that a larger event is refused and passed over: a
        # message past the socket's limit would close it (1009), and each reconnect would
        # backfill the same event again
        self._max_bytes = max(config.max_message_bytes, max_event_bytes + ENVELOPE_BYTES)
        self._max_depth = max_json_depth
        self._link = _Link("subscribe", config, stats)
        self._rejected = log_limits.throttle(log, "events from the upstream refused")
        self._committed: datetime | None = None  # latest occurred the evaluator committed
        self._written: datetime | None = None  # the position last written
        self._written_at = -POSITION_SECONDS
        self._store_backoff = Backoff(log, "keeping the upstream subscribe position")

    def resolved(self, submission: Submission, error: str | None) -> None:
        """The evaluator settled one of our events (called from its task: no blocking)."""
        if error is None:
            event = submission.event
            self._committed = next_position(self._committed, event.occurred, event.received)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._send:
            self._written = await self._store_backoff.call(
                lambda: self._gateway.run(upstream_store.subscribe_position)
            )
            task_status.started()
            try:
                await self._link.run(self._session, self._down)
            finally:
                with trio.CancelScope(shield=True):
                    await self._keep_position(force=True)

    def _down(self) -> None:
        self._stats.subscribe_connected = False

    async def _keep_position(self, *, force: bool = False) -> None:
        committed = self._committed
        if committed is None or (self._written is not None and committed <= self._written):
            return
        if not force and trio.current_time() - self._written_at < POSITION_SECONDS:
            return
        try:
            await self._gateway.run(_write_position, committed)
        except STORE_TROUBLE:
            return  # the next event tries again; a lost position only backfills more
        self._written = committed
        self._written_at = trio.current_time()

    async def _session(self) -> None:
        timeout = self._config.timeout.total_seconds()
        async with _open_socket(
            self._config, self._credentials, "/events/out", self._max_bytes
        ) as ws:
            with trio.fail_after(timeout):
                await _authenticate(ws, self._credentials, events_out=True)
            position = max(
                (p for p in (self._written, self._committed) if p is not None), default=None
            )
            await ws.send_message(filter_message(self._config.subscribe, position, self._clock()))
            self._stats.subscribe_connected = True
            self._link.connected()
            while True:
                message: str | bytes | None = None
                with trio.move_on_after(POSITION_SECONDS):  # get_message is safe to cancel
                    message = await ws.get_message()
                self._link.proven()  # an event, or a quiet interval with the socket open
                if message is not None:
                    submission = self._take(message)
                    if submission is not None:
                        await self._send.send(submission)
                await self._keep_position()

    def _take(self, message: str | bytes) -> Submission | None:
        now = self._clock()
        try:
            event = event_from_message(message, now, self._max_depth, self._max_event_bytes)
        except EventRejected as exc:
            if isinstance(exc, OversizedEvent) and exc.occurred is not None:
                self._committed = next_position(self._committed, exc.occurred, now)
            self._stats.rejected += 1
            self._rejected.log(
                trio.current_time(), logging.WARNING, "upstream event refused: %s", exc
            )
            return None
        self._stats.taken_at(event.occurred, now)
        return Submission(event, self)
