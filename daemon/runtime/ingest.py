"""The ingest task: Prefect's ``/events/in`` websocket, feeding the evaluator
(docs/PROTOCOL.md#endpoint-and-paths).

Theory of operation. Every socket's first request head is read with h11
(``daemon.runtime.http_server.read_head``, within ``handshake_timeout``): one that is not a
websocket upgrade is served as plain HTTP on the same slot (``serve_http``, the routes of
``daemon.runtime.http_routes``); an upgrade is handed, with the bytes already read, to
trio-websocket, which does the upgrade and the close handshake; what comes in between is
handled chunk by chunk. Each connection runs two tasks over one
``ReplyQueue``:

* the reader (``daemon.runtime.connection.CheckpointConnection``'s reader task) reads the socket
  up to ``RECEIVE_BYTES`` at a time. Once the connection is open, a ``FrameSplitter``
  (``daemon.wire.wsframes``) decodes the whole text frames of the chunk and hands every other
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

Bounds: every accepted socket takes a slot (``daemon.core.slots``): at most
``max_pending_handshakes`` in their handshake and ``max_connections`` past it, at most
``max_connections_per_peer`` from one address, each pool apart, so that sockets that never
finish a handshake cannot lock out those that did; one sending nothing for ``idle_timeout``
is closed (1001). Then one frame of at most ``2 * max_event_bytes`` characters buffered per
connection (larger: close 1009), ``MAX_PENDING_REPLIES`` unresolved items per connection,
and the evaluator's bounded channel. When any of these is full the reader stops, so the
socket is not read and TCP pushes back on the client.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Final

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest

from daemon.core.clock import wall_clock
from daemon.core.config import ServerConfig, UnusableSetting
from daemon.core.durations import format_duration
from daemon.core.log_throttle import DEFAULT_LIMITS, LogLimits, LogThrottle
from daemon.core.slots import ConnectionSlots, Refused, Slot, Why, idle_deadline, peer_of
from daemon.runtime.connection import CheckpointConnection, Frame, PingMarker
from daemon.runtime.events_out import EventsOut
from daemon.runtime.http_server import (
    BadHead,
    HttpLimits,
    HttpStats,
    RequestHead,
    answer_bad_head,
    read_head,
    serve_http,
)
from daemon.runtime.read_pacing import ReadPacing
from daemon.wire.events_out import EXPECTED_FILTER
from daemon.wire.handshake import (
    AUTH_SUCCESS,
    EXPECTED_AUTH,
    POLICY_VIOLATION,
    Accept,
    Close,
    Nack,
    Reject,
    check_auth,
    decode_frame,
    reply_frame,
)
from daemon.wire.handshake import decide as decide_handshake
from daemon.wire.http import Route, is_websocket_upgrade
from daemon.wire.submission import Submission
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
GOING_AWAY: Final = 1001  # close code when the daemon stops, or closes an idle websocket
TRY_AGAIN_LATER: Final = 1013  # close code: the handshake found no established slot


Reply = Submission | Nack | PingMarker


class ReplyQueue:
    """One connection's items in frame order; the evaluator resolves its submissions."""

    def __init__(self, acks: bool, limit: int = MAX_PENDING_REPLIES) -> None:
        self.acks = acks
        self._limit = limit
        self._items: deque[Reply] = deque()
        self._head_ready = trio.Event()
        self._room = trio.Event()
        self.unresolved = 0  # submissions the evaluator has not resolved yet

    def owes_acks(self) -> int:
        """How many of its events the client waits for (the reader's pacing)."""
        return self.unresolved

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
        self.unresolved += 1

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
        self.unresolved -= 1
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

    connections: int = 0  # established websockets now
    connections_total: int = 0  # sockets accepted in all
    events: int = 0
    rejected: int = 0
    pings: int = 0
    handshakes_refused: int = 0  # every refusal, those below included
    handshakes: int = 0  # sockets in their handshake now
    refused_per_peer: int = 0  # closed unread: the address held max_connections_per_peer
    refused_busy: int = 0  # no pending slot, or no established one within handshake_timeout
    idle_closed: int = 0  # websockets closed after idle_timeout without a frame
    rejected_by: dict[str, int] = attrs.Factory(dict)  # ``rejected`` per Nack.reason

    def reject(self, reason: str) -> None:
        self.rejected += 1
        self.rejected_by[reason] = self.rejected_by.get(reason, 0) + 1


@attrs.define
class _Ingest:
    settings: ServerConfig
    submit: trio.MemorySendChannel[Submission]
    clock: Callable[[], datetime]
    stats: IngestStats
    slots: ConnectionSlots
    bad_frames: LogThrottle
    refusals: LogThrottle  # sockets refused for want of a slot
    refused_handshakes: LogThrottle  # upgrades refused (path, auth)
    routes: Sequence[Route] = ()  # plain HTTP (daemon.runtime.http_routes)
    http_limits: HttpLimits = attrs.field(kw_only=True)
    http_stats: HttpStats = attrs.Factory(HttpStats)
    room: trio.Event = attrs.Factory(trio.Event)  # set (and replaced) when one is freed
    scopes: dict[Slot, trio.CancelScope] = attrs.Factory(dict)  # to drop an evicted one
    events_out: EventsOut | None = None  # serves /api/events/out subscribers when set
    pacing: ReadPacing | None = None  # readers of events hold off while theirs wait to commit

    async def accept_loop(self, listener: trio.abc.Listener[trio.abc.Stream]) -> None:
        """Accept without waiting for a slot, so that every socket is either admitted or
        closed unread at once: the listen backlog is never left for an attacker to fill."""
        async with listener, trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    log.error("accept() failed: %s; retrying shortly", exc)
                    await trio.sleep(ACCEPT_RETRY_DELAY)
                    continue
                self.stats.connections_total += 1
                peer = Peer.of(stream)
                admission = self.slots.admit(peer_of(peer.host))
                if isinstance(admission, Refused):
                    self.refused(admission.peer, admission.why, admission.describe())
                    await trio.aclose_forcefully(stream)
                    continue
                evicted = admission.evicted
                if evicted is not None:  # released already; its task drops the socket
                    self.scopes.pop(evicted, trio.CancelScope()).cancel()
                    why = f"its handshake was dropped for one from {admission.slot.peer}"
                    self.refused(evicted.peer, Why.PENDING_FULL, why)
                scope = self.scopes[admission.slot] = trio.CancelScope()
                self._gauges()
                nursery.start_soon(self.handle_stream, stream, admission.slot, scope, peer.name)

    def refused(self, peer: str, why: Why, text: str) -> None:
        """Count and log (rate-limited) a socket refused for want of a slot."""
        self.stats.handshakes_refused += 1
        if why is Why.PER_PEER:
            self.stats.refused_per_peer += 1
        else:
            self.stats.refused_busy += 1
        self.refusals.log(
            trio.current_time(), logging.WARNING, "refused a connection from %s: %s", peer, text
        )

    def _refused_handshake(self, session: _Session, why: str) -> None:
        """Count and log (rate-limited) an upgrade or auth message refused by the rules."""
        self.stats.handshakes_refused += 1
        self.refused_handshakes.log(
            trio.current_time(), logging.INFO, "refused websocket from %s: %s", session.peer, why
        )

    def _gauges(self) -> None:
        self.stats.connections = self.slots.established
        self.stats.handshakes = self.slots.pending

    async def wait_for_room(self) -> None:
        """Until an established slot is free (returns at once when one is)."""
        while not self.slots.has_room():
            await self.room.wait()

    async def handle_stream(
        self, stream: trio.abc.Stream, slot: Slot, scope: trio.CancelScope, name: str
    ) -> None:
        try:
            with scope:  # cancelled when the slot is taken for another peer's handshake
                deadline = trio.current_time() + self.settings.handshake_timeout.total_seconds()
                head = None
                with trio.move_on_at(deadline):
                    head = await read_head(stream, self.settings.max_request_head_bytes)
                if isinstance(head, BadHead):
                    self.http_stats.count(head.reply.status)
                    await answer_bad_head(stream, head, self.http_limits)
                if not isinstance(head, RequestHead):
                    return
                if not is_websocket_upgrade(head.request.headers):
                    await serve_http(stream, head, self.routes, self.http_limits, self.http_stats)
                    return
                session = _Session(self, name)
                conn = CheckpointConnection(
                    stream,
                    session,
                    max_message_size=FRAME_BUFFER_FACTOR * self.settings.max_event_bytes,
                    receive_buffer_size=RECEIVE_BYTES,
                )
                conn._wsproto.receive_data(head.raw)  # the reader's first pass takes the upgrade
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(session.read, conn)
                    if await self.handshake(conn, session, slot, deadline):
                        await self.serve(conn, session)
                    with trio.CancelScope(shield=True) as closing:
                        closing.deadline = trio.current_time() + CLOSE_TIMEOUT
                        await conn.aclose()
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            self.scopes.pop(slot, None)
            if self.slots.release(slot):
                self.room.set()
                self.room = trio.Event()
            self._gauges()

    async def handshake(
        self, conn: CheckpointConnection, session: _Session, slot: Slot, deadline: float
    ) -> bool:
        """Upgrade, authenticate and move ``slot`` to the established pool by ``deadline``
        (``handshake_timeout`` after accept); False when the client was refused (and told
        why) or went away."""
        token = self.settings.auth_token
        accepted = False
        waiting: WebSocketRequest | None = None  # an upgrade waiting for an established slot
        try:
            with trio.move_on_at(deadline) as session.handshake_scope:
                if session.reader_done.is_set():
                    return False
                request = await conn._get_request()
                decision = decide_handshake(
                    request.path, request.proposed_subprotocols, request.headers, token
                )
                if isinstance(decision, Accept) and decision.out and self.events_out is None:
                    decision = Reject(404, "events out is not served here")
                if not isinstance(decision, Accept):
                    self._refused_handshake(session, decision.why)
                    await request.reject(decision.status, body=decision.why.encode())
                    return False
                waiting = request  # not upgraded while there would be no slot after it
                await self.wait_for_room()
                waiting = None
                session.open(decision)  # before the upgrade: no frame can come earlier
                await request.accept(subprotocol=decision.subprotocol)
                accepted = True
                await session.settled.wait()  # the auth message judged, or the client gone
                if session.refusal is None and not session.reader_done.is_set():
                    while not self.slots.establish(slot):  # taken since the upgrade
                        await self.wait_for_room()
                    session.established = True
                    self._gauges()
                    if decision.expects_auth_message:
                        with contextlib.suppress(ConnectionClosed):  # gone: seen below
                            await conn.send_message(AUTH_SUCCESS)
        finally:
            session.decided.set()
        gone = session.reader_done.is_set()
        full = f"max_connections ({self.settings.max_connections}) are all taken"
        if not accepted:
            if waiting is not None and not gone:  # out of time before the upgrade
                self.refused(slot.peer, Why.PENDING_FULL, full)
                with trio.CancelScope(shield=True) as closing:
                    closing.deadline = trio.current_time() + CLOSE_TIMEOUT
                    await waiting.reject(503, body=f"{full}; try again later".encode())
            return False
        if gone and session.refusal is None:
            return False
        if session.awaiting_auth:  # out of time
            session.refusal = Close(POLICY_VIOLATION, EXPECTED_AUTH)
        elif session.refusal is None and not session.established:  # out of time after it
            self.refused(slot.peer, Why.PENDING_FULL, full)
            await _close_within(conn, TRY_AGAIN_LATER, f"{full}; try again later")
            return False
        refusal = session.refusal
        if refusal is not None:
            self._refused_handshake(session, refusal.reason)
            await _close_within(conn, refusal.code, refusal.reason)
            return False
        return True

    async def serve(self, conn: CheckpointConnection, session: _Session) -> None:
        replies = session.replies
        assert replies is not None
        if not session.out and self.pacing is not None:
            conn.pace(self.pacing, replies.owes_acks)
        async with trio.open_nursery() as nursery:

            async def write() -> None:
                with contextlib.suppress(ConnectionClosed):
                    if session.out:
                        await self.serve_subscriber(conn, session)
                    else:
                        await replies.run_writer(conn)
                nursery.cancel_scope.cancel()

            nursery.start_soon(write)
            try:
                if await self.until_idle(conn, session):
                    self.stats.idle_closed += 1
                    idle = format_duration(self.settings.idle_timeout)
                    await _close_within(conn, GOING_AWAY, f"no frame for {idle} (idle_timeout)")
            except trio.Cancelled:
                await _close_within(conn, GOING_AWAY, "trigd is shutting down")
                raise
            nursery.cancel_scope.cancel()

    async def serve_subscriber(self, conn: CheckpointConnection, session: _Session) -> None:
        """An events-out subscriber: its first message (within ``handshake_timeout``),
        then ``EventsOut`` until it is done."""
        events_out = self.events_out
        assert events_out is not None
        with trio.move_on_after(self.settings.handshake_timeout.total_seconds()):
            await session.subscribed.wait()
        message = session.first_message
        if message is None:
            if not session.reader_done.is_set():
                await _close_within(conn, POLICY_VIOLATION, EXPECTED_FILTER)
            return
        await events_out.serve(conn, message, session.peer)

    async def until_idle(self, conn: CheckpointConnection, session: _Session) -> bool:
        """Until the reader is done (False), or the client has sent nothing for
        ``idle_timeout`` while owed nothing (True). A connection whose reader is stopped by
        backpressure, or that waits for replies, is busy, not idle."""
        timeout = self.settings.idle_timeout.total_seconds()
        replies = session.replies
        while not session.reader_done.is_set():
            now = trio.current_time()
            since = conn.waiting_since if not replies else None
            deadline = idle_deadline(since, now, timeout)
            if deadline <= now:
                return True
            with trio.move_on_at(deadline):
                await session.reader_done.wait()
        return False


async def _close_within(conn: CheckpointConnection, code: int, reason: str) -> None:
    """Close the websocket, giving the client CLOSE_TIMEOUT to answer, even if cancelled."""
    with trio.CancelScope(shield=True) as closing:
        closing.deadline = trio.current_time() + CLOSE_TIMEOUT
        await conn.aclose(code, reason)


@attrs.frozen
class Peer:
    """The client's address, read once when it connects: a socket whose peer has reset has
    no address any more, and neither the slots nor a log line may fail for that."""

    host: str  # "" when it is already gone (or not a socket)
    name: str  # ``host:port`` for log lines

    @classmethod
    def of(cls, stream: trio.abc.Stream) -> Peer:
        inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        if not isinstance(inner, trio.SocketStream):
            return cls("", repr(stream))
        try:
            name = inner.socket.getpeername()
        except OSError:
            return cls("", "a client already gone")
        if not isinstance(name, tuple):  # a Unix socket's path
            return cls(str(name), str(name))
        host, port = str(name[0]), name[1]
        return cls(host, f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


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
    established: bool = False  # holds an established slot: its events may be taken
    decided: trio.Event = attrs.Factory(trio.Event)  # the handshake is over, either way
    reader_done: trio.Event = attrs.Factory(trio.Event)
    # the handshake's wait, cut short when the reader ends: a client that is gone (or
    # spoke plain TCP to a TLS port) does not hold a connection slot until the timeout
    handshake_scope: trio.CancelScope | None = None
    out: bool = False  # an events-out subscriber: one message (its filter), then pings
    first_message: str | bytes | None = None  # a subscriber's filter message
    subscribed: trio.Event = attrs.Factory(trio.Event)  # first_message has come

    def open(self, decision: Accept) -> None:
        self.out = decision.out
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
        if not self.established:  # events wait (unread) until the slot is established
            await self.decided.wait()
            if not self.established:
                return
        if self.out:
            await self._subscriber_frames(conn, frames, start)
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
                    stats.reject(item.reason)
                    if replies.acks:
                        await replies.put(item)
                    else:
                        ingest.bad_frames.log(
                            trio.current_time(),
                            logging.WARNING,
                            "bad frame from %s: %s",
                            self.peer,
                            item.error,
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

    async def _subscriber_frames(
        self, conn: CheckpointConnection, frames: list[Frame], start: int
    ) -> None:
        """A subscriber sends its filter, then nothing but pings (answered at once) and
        messages that are ignored, as Prefect's server ignores them."""
        for frame in frames[start:]:
            if isinstance(frame, PingMarker):
                await conn.pong(frame.payload)
            elif self.first_message is None:
                self.first_message = frame
                self.subscribed.set()

    async def _authenticate(self, conn: CheckpointConnection, frames: list[Frame]) -> int:
        """Answer pings until the auth message and judge it; the index after it."""
        for index, frame in enumerate(frames):
            if isinstance(frame, PingMarker):
                await conn.pong(frame.payload)  # nothing can be pending before auth
                continue
            token = self.ingest.settings.auth_token
            self.refusal = check_auth(frame, token, self.authenticated)
            self.awaiting_auth = False
            self.settled.set()  # auth_success is sent once the connection has its slot
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
    log_limits: LogLimits = DEFAULT_LIMITS,
    routes: Sequence[Route] = (),
    http_stats: HttpStats | None = None,
    events_out: EventsOut | None = None,
    pacing: ReadPacing | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/events/in`` (and ``/events/out`` with ``events_out``) and the plain HTTP
    ``routes`` until cancelled; ``task_status`` gets the bound port.

    ``tls`` is ``tls_context(settings)`` loaded beforehand; without it, it is loaded here.
    A listen address that cannot be used raises UnusableSetting (``listen_problem``).
    With ``pacing`` (the evaluator's), readers of events hold off between small reads while
    their events wait for the evaluator (``daemon.runtime.read_pacing``)."""
    context = tls if tls is not None else tls_context(settings)
    listeners = await _open_listeners(settings, context)
    slots = ConnectionSlots(
        max_pending=settings.max_pending_handshakes,
        max_established=settings.max_connections,
        max_per_peer=settings.max_connections_per_peer,
    )
    ingest = _Ingest(
        settings,
        submit,
        clock,
        stats if stats is not None else IngestStats(),
        slots,
        bad_frames=log_limits.throttle(log, "bad frames"),
        refusals=log_limits.throttle(log, "sockets refused for want of a slot"),
        refused_handshakes=log_limits.throttle(log, "refused websocket upgrades"),
        routes=routes,
        http_limits=HttpLimits.of(settings),
        http_stats=http_stats if http_stats is not None else HttpStats(),
        events_out=events_out,
        pacing=pacing,
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
