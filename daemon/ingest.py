"""The ingest task: Prefect's ``/events/in`` websocket, feeding the evaluator (SPEC §4).

Theory of operation. Each connection runs two tasks over one ``ReplyQueue``:

* the reader takes frames in order, turns each into events (``decode_frame``), appends a
  ``Submission`` per event to the reply queue and sends it to the evaluator's channel; a
  bad frame becomes a ``Nack`` in the queue instead; a websocket ping becomes a
  ``PingMarker`` in the queue;
* the writer pops the queue from the head as items become final: a submission once the
  evaluator resolved it (its batch committed), a nack at once, a ping marker once all
  before it are popped. So replies (``trigd.v1`` acks and nacks) go out in frame order,
  and a pong is sent only after every event received before its ping is committed: the
  checkpoint Prefect's client relies on.

trio-websocket answers pings inside its own reader task. ``CheckpointConnection`` overrides
that one handler to put a ``PingMarker`` into the message queue instead, in order with the
messages; it also sends the close frame that trio-websocket omits when wsproto reports
invalid UTF-8 (1007), and writes a run of replies in one ``send_all``.

Bounds: at most ``max_connections`` sockets (more wait in the accept backlog), one frame
of at most ``2 * max_event_bytes`` characters buffered per connection (larger: close 1009),
``MAX_PENDING_REPLIES`` unresolved items per connection, and the evaluator's bounded
channel. When any of them is full the reader stops, so trio-websocket stops reading the
socket and TCP pushes back on the client.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import ssl
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Final, cast

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Ping, TextMessage

from daemon.clock import wall_clock
from daemon.config import ServerConfig
from daemon.evaluator import Submission
from daemon.handshake import (
    AUTH_SUCCESS,
    EXPECTED_AUTH,
    POLICY_VIOLATION,
    Accept,
    Nack,
    check_auth,
    decode_frame,
    encode_reply,
)
from daemon.handshake import decide as decide_handshake

log = logging.getLogger(__name__)

__all__ = ["IngestStats", "Submission", "run_ingest"]

MAX_PENDING_REPLIES: Final = 1_024  # items per connection between the socket and its replies
FRAME_BUFFER_FACTOR: Final = 2  # frames up to this many times max_event_bytes get a nack
MESSAGE_QUEUE_SIZE: Final = 1  # frames trio-websocket buffers per connection
RECEIVE_BYTES: Final = 65_536  # bytes per socket read
CLOSE_TIMEOUT: Final = 1.0  # seconds to finish a close handshake
ACCEPT_RETRY_DELAY: Final = 0.1  # seconds to wait when out of file descriptors
ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
LOG_BURST: Final = 10  # bad-frame log lines per window
LOG_WINDOW: Final = 60.0  # seconds
GOING_AWAY: Final = 1001  # close code when the daemon stops


@attrs.frozen(slots=True)
class PingMarker:
    """A ping from the client, in its place among the frames."""

    payload: bytes


class CheckpointConnection(WebSocketConnection):
    """A server connection whose pongs wait for the events received before the ping."""

    async def _handle_ping_event(self, event: Ping) -> None:
        channel = cast("trio.MemorySendChannel[object]", self._send_channel)
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await channel.send(PingMarker(bytes(event.payload)))

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        # A close event while still OPEN was made up by wsproto for a frame it could not
        # parse (1007 invalid UTF-8, 1002): tell the peer before dropping the stream.
        if self._wsproto.state == ConnectionState.OPEN:
            with contextlib.suppress(ConnectionClosed):
                await self._send(CloseConnection(code=event.code, reason=event.reason))
        await super()._handle_close_connection_event(event)

    async def next_frame(self) -> str | bytes | PingMarker:
        """Like ``get_message``, but pings arrive too, in order."""
        channel = cast("trio.MemoryReceiveChannel[str | bytes | PingMarker]", self._recv_channel)
        try:
            return await channel.receive()
        except (trio.ClosedResourceError, trio.EndOfChannel):
            raise ConnectionClosed(self._close_reason) from None

    async def send_texts(self, texts: list[str]) -> None:
        """Several text messages in one write (acks come in runs, one per batch)."""
        if self._close_reason:
            raise ConnectionClosed(self._close_reason)
        data = b"".join(self._wsproto.send(TextMessage(data=text)) for text in texts)
        async with self._stream_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self._abort_web_socket()
                raise ConnectionClosed(self._close_reason) from None


Reply = Submission | Nack | PingMarker


class ReplyQueue:
    """One connection's items in frame order; the evaluator resolves its submissions."""

    def __init__(self, acks: bool, limit: int = MAX_PENDING_REPLIES) -> None:
        self.acks = acks
        self._limit = limit
        self._items: deque[Reply] = deque()
        self._head_ready = trio.Event()
        self._room = trio.Event()

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: Reply) -> None:
        while len(self._items) >= self._limit:
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()
        self._items.append(item)
        if len(self._items) == 1 and not isinstance(item, Submission):
            self._head_ready.set()

    def resolved(self, submission: Submission, error: str | None) -> None:
        submission.error = error
        submission.done = True
        if self._items and self._items[0] is submission:
            self._head_ready.set()

    def _ready(self) -> bool:
        if not self._items:
            return False
        head = self._items[0]
        return head.done if isinstance(head, Submission) else True

    async def run_writer(self, conn: CheckpointConnection) -> None:
        """Send what is final, in order: replies (if ``acks``) and delayed pongs."""
        while True:
            while not self._ready():
                if self._head_ready.is_set():
                    self._head_ready = trio.Event()
                await self._head_ready.wait()
            texts: list[str] = []
            while self._ready():
                item = self._items.popleft()
                if isinstance(item, PingMarker):
                    if texts:
                        await conn.send_texts(texts)
                        texts = []
                    await conn.pong(item.payload)
                elif self.acks:
                    texts.append(encode_reply(item))
            if texts:
                await conn.send_texts(texts)
            self._room.set()


@attrs.define
class IngestStats:
    """Counters for ``trigd status`` and the tests."""

    connections: int = 0
    connections_total: int = 0
    events: int = 0
    rejected: int = 0
    pings: int = 0
    handshakes_refused: int = 0


@attrs.define
class _RateLimitedLog:
    """At most LOG_BURST warnings per LOG_WINDOW; the rest are counted and summarised."""

    window_start: float = float("-inf")
    logged: int = 0
    suppressed: int = 0

    def warning(self, now: float, message: str, *args: object) -> None:
        if now - self.window_start >= LOG_WINDOW:
            if self.suppressed:
                log.warning("%d more bad frames were not logged", self.suppressed)
            self.window_start, self.logged, self.suppressed = now, 0, 0
        if self.logged < LOG_BURST:
            self.logged += 1
            log.warning(message, *args)
        else:
            self.suppressed += 1


@attrs.define
class _Ingest:
    settings: ServerConfig
    submit: trio.MemorySendChannel[Submission]
    clock: Callable[[], datetime]
    stats: IngestStats
    slots: trio.Semaphore
    bad_frames: _RateLimitedLog = attrs.Factory(_RateLimitedLog)

    async def accept_loop(self, listener: trio.abc.Listener[trio.abc.Stream]) -> None:
        async with listener, trio.open_nursery() as nursery:
            while True:
                await self.slots.acquire()
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    self.slots.release()
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    log.error("accept() failed: %s; retrying shortly", exc)
                    await trio.sleep(ACCEPT_RETRY_DELAY)
                    continue
                except BaseException:
                    self.slots.release()
                    raise
                nursery.start_soon(self.handle_stream, stream)

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        self.stats.connections += 1
        self.stats.connections_total += 1
        try:
            conn = CheckpointConnection(
                stream,
                WSConnection(ConnectionType.SERVER),
                message_queue_size=MESSAGE_QUEUE_SIZE,
                max_message_size=FRAME_BUFFER_FACTOR * self.settings.max_event_bytes,
                receive_buffer_size=RECEIVE_BYTES,
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn._reader_task)
                accepted: Accept | None = None
                deadline = trio.current_time() + self.settings.handshake_timeout.total_seconds()
                with trio.move_on_at(deadline):
                    request = await conn._get_request()
                    accepted = await self.handshake(request, conn)
                if accepted is not None:
                    await self.serve(conn, ReplyQueue(accepted.acks))
                with trio.CancelScope(shield=True) as closing:
                    closing.deadline = trio.current_time() + CLOSE_TIMEOUT
                    await conn.aclose()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            self.stats.connections -= 1
            self.slots.release()

    async def handshake(
        self, request: WebSocketRequest, conn: CheckpointConnection
    ) -> Accept | None:
        """Upgrade and authenticate; None when the client was refused (and told why)."""
        token = self.settings.auth_token
        decision = decide_handshake(
            request.path, request.proposed_subprotocols, request.headers, token
        )
        if not isinstance(decision, Accept):
            self.stats.handshakes_refused += 1
            log.info("refused websocket from %s: %s", request.remote, decision.why)
            await request.reject(decision.status, body=decision.why.encode())
            return None
        await request.accept(subprotocol=decision.subprotocol)
        if not decision.expects_auth_message:
            return decision
        try:
            while True:
                frame = await conn.next_frame()
                if not isinstance(frame, PingMarker):
                    break
                await conn.pong(frame.payload)  # nothing can be pending before auth
            refusal = check_auth(frame, token, decision.authenticated)
            if refusal is not None:
                self.stats.handshakes_refused += 1
                await conn.aclose(refusal.code, refusal.reason)
                return None
            await conn.send_message(AUTH_SUCCESS)
        except trio.Cancelled:
            self.stats.handshakes_refused += 1
            with trio.CancelScope(shield=True) as closing:
                closing.deadline = trio.current_time() + CLOSE_TIMEOUT
                await conn.aclose(POLICY_VIOLATION, EXPECTED_AUTH)
            raise
        except ConnectionClosed:
            return None
        return decision

    async def serve(self, conn: CheckpointConnection, replies: ReplyQueue) -> None:
        async with trio.open_nursery() as nursery:

            async def write() -> None:
                with contextlib.suppress(ConnectionClosed):
                    await replies.run_writer(conn)
                nursery.cancel_scope.cancel()

            nursery.start_soon(write)
            try:
                await self.read(conn, replies)
            except ConnectionClosed:
                pass
            except trio.Cancelled:
                with trio.CancelScope(shield=True) as closing:
                    closing.deadline = trio.current_time() + CLOSE_TIMEOUT
                    await conn.aclose(GOING_AWAY, "trigd is shutting down")
                raise
            nursery.cancel_scope.cancel()

    async def read(self, conn: CheckpointConnection, replies: ReplyQueue) -> None:
        max_bytes = self.settings.max_event_bytes
        submit = self.submit
        while True:
            frame = await conn.next_frame()
            if isinstance(frame, PingMarker):
                self.stats.pings += 1
                await replies.put(frame)
                continue
            for item in decode_frame(frame, self.clock(), max_bytes):
                if isinstance(item, Nack):
                    self.stats.rejected += 1
                    if replies.acks:
                        await replies.put(item)
                    else:
                        self.bad_frames.warning(
                            trio.current_time(), "bad frame from %s: %s", conn.remote, item.error
                        )
                    continue
                submission = Submission(item, replies)
                await replies.put(submission)
                self.stats.events += 1
                try:
                    submit.send_nowait(submission)
                except trio.WouldBlock:
                    await submit.send(submission)


def _ssl_context(settings: ServerConfig) -> ssl.SSLContext | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


async def run_ingest(
    settings: ServerConfig,
    submit: trio.MemorySendChannel[Submission],
    *,
    clock: Callable[[], datetime] = wall_clock,
    stats: IngestStats | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/events/in`` until cancelled; ``task_status`` gets the bound port."""
    context = _ssl_context(settings)
    listeners: list[trio.abc.Listener[trio.abc.Stream]]
    if context is None:
        listeners = list(await trio.open_tcp_listeners(settings.port, host=settings.host))
    else:
        listeners = list(
            await trio.open_ssl_over_tcp_listeners(
                settings.port, context, host=settings.host, https_compatible=True
            )
        )
    ingest = _Ingest(
        settings,
        submit,
        clock,
        stats if stats is not None else IngestStats(),
        trio.Semaphore(settings.max_connections),
    )
    port = _port_of(listeners[0])
    async with submit, trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(ingest.accept_loop, listener)
        scheme = "ws" if context is None else "wss"
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        log.info("trigd listening on %s://%s:%d", scheme, host, port)
        task_status.started(port)


def _port_of(listener: trio.abc.Listener[trio.abc.Stream]) -> int:
    if isinstance(listener, trio.SSLListener):
        listener = listener.transport_listener
    assert isinstance(listener, trio.SocketListener)
    return int(listener.socket.getsockname()[1])
