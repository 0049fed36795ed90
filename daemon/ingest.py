"""The ingest task: Prefect's ``/events/in`` websocket, feeding the evaluator (SPEC §4).

Theory of operation. trio-websocket does the HTTP upgrade and the close handshake; what
comes in between is handled chunk by chunk. Each connection runs two tasks over one
``ReplyQueue``:

* the reader (``daemon.connection.CheckpointConnection``'s reader task) reads the socket
  up to ``RECEIVE_BYTES`` at a time. Once the connection is open, a ``FrameSplitter``
  (``daemon.wsframes``) decodes the whole text frames of the chunk and hands every other
  frame to wsproto, whose messages and pings join them in stream order. All of a chunk's
  frames go to the connection's ``_Session`` in one call. The session checks the auth
  message a subprotocol client owes (answering pings at once until then), then turns each
  message into events (``decode_frame``, with one clock read per chunk), appends a
  ``Submission`` per event to the reply queue and sends it to the evaluator's channel; a
  bad frame becomes a ``Nack`` in the queue instead, and a ping a ``PingMarker``. It only
  waits when a bound is full, so a chunk costs one pass through trio's scheduler, not
  several per frame;
* the writer pops the queue from the head as items become final: a submission once the
  evaluator resolved it (its batch committed), a nack at once, a ping marker once all
  before it are popped. So replies (``trigd.v1`` acks and nacks) go out in frame order, a
  run of them in one ``send_all``, and a pong is sent only after every event received
  before its ping is committed: the checkpoint Prefect's client relies on.

Bounds: at most ``max_connections`` sockets (more wait in the accept backlog), one frame
of at most ``2 * max_event_bytes`` characters buffered per connection (larger: close 1009),
``MAX_PENDING_REPLIES`` unresolved items per connection, and the evaluator's bounded
channel. When any of them is full the reader stops, so the socket is not read and TCP
pushes back on the client.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Final

import attrs
import trio
from trio_websocket import ConnectionClosed

from daemon.clock import wall_clock
from daemon.config import ServerConfig, UnusableSetting
from daemon.connection import CheckpointConnection, Frame, PingMarker
from daemon.evaluator import Submission
from daemon.handshake import (
    AUTH_SUCCESS,
    EXPECTED_AUTH,
    POLICY_VIOLATION,
    Accept,
    Close,
    Nack,
    check_auth,
    decode_frame,
    reply_frame,
)
from daemon.handshake import decide as decide_handshake
from store.db import os_reason

log = logging.getLogger(__name__)

__all__ = ["IngestStats", "Submission", "listen_problem", "run_ingest", "tls_context"]

MAX_PENDING_REPLIES: Final = 1_024  # items per connection between the socket and its replies
FRAME_BUFFER_FACTOR: Final = 2  # frames up to this many times max_event_bytes get a nack
RECEIVE_BYTES: Final = 65_536  # bytes per socket read
CLOSE_TIMEOUT: Final = 1.0  # seconds to finish a close handshake
DRAIN_TIMEOUT: Final = 5.0  # seconds to answer earlier frames before closing for a bad one
ACCEPT_RETRY_DELAY: Final = 0.1  # seconds to wait when out of file descriptors
ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
LOG_BURST: Final = 10  # bad-frame log lines per window
LOG_WINDOW: Final = 60.0  # seconds
GOING_AWAY: Final = 1001  # close code when the daemon stops


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

    def full(self) -> bool:
        return len(self._items) >= self._limit

    async def wait_for_room(self) -> None:
        while len(self._items) >= self._limit:
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()

    def append(self, item: Reply) -> None:
        """Add ``item`` at the tail; the caller has seen that the queue is not full."""
        self._items.append(item)
        if len(self._items) == 1 and not isinstance(item, Submission):
            self._head_ready.set()

    def append_submission(self, submission: Submission) -> None:
        """``append`` for the common case: an unresolved submission never makes the head
        ready."""
        self._items.append(submission)

    async def wait_empty(self) -> None:
        """Until every item queued so far has been answered (the writer makes room)."""
        while self._items:
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()

    async def put(self, item: Reply) -> None:
        """Append ``item``, first waiting while the queue is full."""
        await self.wait_for_room()
        self.append(item)

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
        items = self._items
        while True:
            while not self._ready():
                if self._head_ready.is_set():
                    self._head_ready = trio.Event()
                await self._head_ready.wait()
            frames: list[bytes] = []
            while items:
                item = items[0]
                if type(item) is Submission:
                    if not item.done:
                        break
                elif isinstance(item, PingMarker):
                    items.popleft()
                    if frames:
                        await conn.send_frames(frames)
                        frames = []
                    await conn.pong(item.payload)
                    continue
                items.popleft()
                if self.acks:
                    frames.append(reply_frame(item))
            if frames:
                await conn.send_frames(frames)
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
            session = _Session(self, peer_name(stream))
            conn = CheckpointConnection(
                stream,
                session,
                max_message_size=FRAME_BUFFER_FACTOR * self.settings.max_event_bytes,
                receive_buffer_size=RECEIVE_BYTES,
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.read, conn)
                if await self.handshake(conn, session):
                    await self.serve(conn, session)
                with trio.CancelScope(shield=True) as closing:
                    closing.deadline = trio.current_time() + CLOSE_TIMEOUT
                    await conn.aclose()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            self.stats.connections -= 1
            self.slots.release()

    async def handshake(self, conn: CheckpointConnection, session: _Session) -> bool:
        """Upgrade and authenticate; False when the client was refused (and told why) or
        went away."""
        token = self.settings.auth_token
        accepted = False
        deadline = trio.current_time() + self.settings.handshake_timeout.total_seconds()
        with trio.move_on_at(deadline) as session.handshake_scope:
            if session.reader_done.is_set():
                return False
            request = await conn._get_request()
            decision = decide_handshake(
                request.path, request.proposed_subprotocols, request.headers, token
            )
            if not isinstance(decision, Accept):
                self.stats.handshakes_refused += 1
                log.info("refused websocket from %s: %s", session.peer, decision.why)
                await request.reject(decision.status, body=decision.why.encode())
                return False
            session.open(decision)  # before the upgrade: no frame can come earlier
            await request.accept(subprotocol=decision.subprotocol)
            accepted = True
            await session.settled.wait()  # the auth message judged, or the client gone
        gone = session.reader_done.is_set()
        if not accepted or (gone and session.refusal is None):
            return False
        if session.awaiting_auth:  # out of time
            session.refusal = Close(POLICY_VIOLATION, EXPECTED_AUTH)
        refusal = session.refusal
        if refusal is not None:
            self.stats.handshakes_refused += 1
            with trio.CancelScope(shield=True) as closing:
                closing.deadline = trio.current_time() + CLOSE_TIMEOUT
                await conn.aclose(refusal.code, refusal.reason)
            return False
        return True

    async def serve(self, conn: CheckpointConnection, session: _Session) -> None:
        replies = session.replies
        assert replies is not None
        async with trio.open_nursery() as nursery:

            async def write() -> None:
                with contextlib.suppress(ConnectionClosed):
                    await replies.run_writer(conn)
                nursery.cancel_scope.cancel()

            nursery.start_soon(write)
            try:
                await session.reader_done.wait()
            except trio.Cancelled:
                with trio.CancelScope(shield=True) as closing:
                    closing.deadline = trio.current_time() + CLOSE_TIMEOUT
                    await conn.aclose(GOING_AWAY, "trigd is shutting down")
                raise
            nursery.cancel_scope.cancel()


def peer_name(stream: trio.abc.Stream) -> str:
    """``host:port`` of the client, read once when it connects: a socket whose peer has
    reset has no peer address any more, and a log line must not fail for that."""
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if not isinstance(inner, trio.SocketStream):
        return repr(stream)
    try:
        host, port, *_ = inner.socket.getpeername()
    except OSError:
        return "a client already gone"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@attrs.define(eq=False)
class _Session:
    """One connection's frames: the auth message if one is owed, then events.

    Runs in the connection's reader task (``FrameConsumer``); ``_Ingest`` watches it from
    the connection's own task through ``settled`` and ``reader_done``.
    """

    ingest: _Ingest
    peer: str  # the client's address, for log lines
    replies: ReplyQueue | None = None  # set when the upgrade is accepted
    awaiting_auth: bool = False
    authenticated: bool = False  # by the upgrade request already (or no token configured)
    refusal: Close | None = None  # set when the client is refused: later frames are dropped
    settled: trio.Event = attrs.Factory(trio.Event)  # auth judged, or the reader done
    reader_done: trio.Event = attrs.Factory(trio.Event)
    # the handshake's wait, cut short when the reader ends: a client that is gone (or
    # spoke plain TCP to a TLS port) does not hold a connection slot until the timeout
    handshake_scope: trio.CancelScope | None = None

    def open(self, decision: Accept) -> None:
        self.replies = ReplyQueue(decision.acks)
        self.awaiting_auth = decision.expects_auth_message
        self.authenticated = decision.authenticated
        if not self.awaiting_auth:
            self.settled.set()

    async def read(self, conn: CheckpointConnection) -> None:
        """The connection's reader task; says when it is over."""
        try:
            await conn._reader_task()
        finally:
            self.reader_done.set()
            self.settled.set()
            if self.handshake_scope is not None:
                self.handshake_scope.cancel()

    async def drain(self) -> None:
        if self.replies is not None:
            with trio.move_on_after(DRAIN_TIMEOUT):
                await self.replies.wait_empty()

    async def take(self, conn: CheckpointConnection, frames: list[Frame]) -> None:
        replies = self.replies
        if replies is None or self.refusal is not None:
            return
        start = await self._authenticate(conn, frames) if self.awaiting_auth else 0
        if self.awaiting_auth or self.refusal is not None:
            return
        ingest = self.ingest
        stats, submit = ingest.stats, ingest.submit
        max_bytes, max_depth = ingest.settings.max_event_bytes, ingest.settings.max_json_depth
        received = ingest.clock()
        for index in range(start, len(frames)):
            frame = frames[index]
            if isinstance(frame, PingMarker):
                stats.pings += 1
                await replies.put(frame)
                continue
            for item in decode_frame(frame, received, max_bytes, max_depth):
                if isinstance(item, Nack):
                    stats.rejected += 1
                    if replies.acks:
                        await replies.put(item)
                    else:
                        ingest.bad_frames.warning(
                            trio.current_time(), "bad frame from %s: %s", self.peer, item.error
                        )
                    continue
                submission = Submission(item, replies)
                if replies.full():
                    await replies.wait_for_room()
                replies.append_submission(submission)
                stats.events += 1
                try:
                    submit.send_nowait(submission)
                except trio.WouldBlock:
                    await submit.send(submission)

    async def _authenticate(self, conn: CheckpointConnection, frames: list[Frame]) -> int:
        """Answer pings until the auth message and judge it; the index after it."""
        for index, frame in enumerate(frames):
            if isinstance(frame, PingMarker):
                await conn.pong(frame.payload)  # nothing can be pending before auth
                continue
            token = self.ingest.settings.auth_token
            self.refusal = check_auth(frame, token, self.authenticated)
            self.awaiting_auth = False
            self.settled.set()
            if self.refusal is None:
                await conn.send_message(AUTH_SUCCESS)
            return index + 1
        return len(frames)


def tls_context(settings: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context when ``tls_cert`` and ``tls_key`` are set. `trigd serve`
    loads it before any task starts, so that a file that is not what it should be is
    reported as that setting (UnusableSetting) rather than from deep inside the nursery."""
    cert, key = settings.tls_cert, settings.tls_key
    if cert is None or key is None:
        return None
    try:  # the certificate alone first, so that a problem is blamed on the right file
        ssl.create_default_context().load_verify_locations(cafile=cert)
    except OSError as exc:  # ssl.SSLError included
        why = "not a PEM certificate" if isinstance(exc, ssl.SSLError) else os_reason(exc)
        raise UnusableSetting("server", "tls_cert", cert, why) from exc
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key, password=_refuse_passphrase)
    except _EncryptedKey:
        why = "encrypted with a passphrase; trigd needs the key unencrypted"
        raise UnusableSetting("server", "tls_key", key, why) from None
    except ssl.SSLError as exc:
        if exc.reason in _WEAK_CERTIFICATE:  # OpenSSL's security level refused the chain
            why = f"refused by OpenSSL as too weak ({exc.reason}); use a stronger key or hash"
            raise UnusableSetting("server", "tls_cert", cert, why) from exc
        mismatch = exc.reason == "KEY_VALUES_MISMATCH"
        why = f"not the private key of {cert}" if mismatch else "not a PEM private key"
        raise UnusableSetting("server", "tls_key", key, why) from exc
    except OSError as exc:
        raise UnusableSetting("server", "tls_key", key, os_reason(exc)) from exc
    return context


_WEAK_CERTIFICATE: Final = frozenset(
    {"EE_KEY_TOO_SMALL", "CA_KEY_TOO_SMALL", "CA_MD_TOO_WEAK", "EE_MD_TOO_WEAK"}
)
"""OpenSSL's reasons for refusing a certificate (not its key) in `load_cert_chain`."""


class _EncryptedKey(Exception):
    pass


def _refuse_passphrase() -> str:
    """OpenSSL would otherwise prompt for it on the terminal, and a daemon has none."""
    raise _EncryptedKey


def listen_problem(settings: ServerConfig, exc: OSError) -> UnusableSetting:
    """Why the listening socket could not be opened, as the ``listen`` setting. The port
    taken by another process and a name the resolver cannot look up for now are not
    lasting: the same configuration may work on a retry."""
    if isinstance(exc, socket.gaierror):
        temporary = exc.errno == socket.EAI_AGAIN
        why = f"cannot resolve host {settings.host!r} ({exc.strerror})"
        return UnusableSetting("server", "listen", settings.listen, why, lasting=not temporary)
    if exc.errno == errno.EADDRINUSE:
        why = "address already in use"
        return UnusableSetting("server", "listen", settings.listen, why, lasting=False)
    if exc.errno == errno.EADDRNOTAVAIL:
        why = f"{settings.host} is not an address of this host"
    elif exc.errno == errno.EACCES and settings.port < 1024:
        why = f"permission denied: port {settings.port} needs privileges (CAP_NET_BIND_SERVICE)"
    else:
        why = os_reason(exc)
    return UnusableSetting("server", "listen", settings.listen, why)


async def _open_listeners(
    settings: ServerConfig, context: ssl.SSLContext | None
) -> list[trio.abc.Listener[trio.abc.Stream]]:
    try:
        if context is None:
            return list(await trio.open_tcp_listeners(settings.port, host=settings.host))
        return list(
            await trio.open_ssl_over_tcp_listeners(
                settings.port, context, host=settings.host, https_compatible=True
            )
        )
    except OSError as exc:  # resolving the host, binding its address
        raise listen_problem(settings, exc) from exc


async def run_ingest(
    settings: ServerConfig,
    submit: trio.MemorySendChannel[Submission],
    *,
    clock: Callable[[], datetime] = wall_clock,
    stats: IngestStats | None = None,
    tls: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/events/in`` until cancelled; ``task_status`` gets the bound port.

    ``tls`` is ``tls_context(settings)`` loaded beforehand; without it, it is loaded here.
    A listen address that cannot be used raises UnusableSetting (``listen_problem``)."""
    context = tls if tls is not None else tls_context(settings)
    listeners = await _open_listeners(settings, context)
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
