"""Plain HTTP on the listen port, through h11: one connection's requests, one at a time.

Theory of operation. Ingest (``daemon.runtime.ingest``) reads the head of every accepted
socket's first request with ``read_head`` (h11, at most ``max_request_head_bytes``, within
``handshake_timeout``). A websocket upgrade goes on to the websocket server with the bytes
already read; anything else is served here (``serve_http``): the body is read (at most
``max_request_bytes``: 413 past it, from ``Content-Length`` before a byte of it is read),
the route table (``daemon.wire.http.resolve``) picks the handler, and its reply is written.
Then, with keep-alive, the next request's head must arrive within ``keepalive_timeout``.
Reading a body, answering and writing the reply are each bounded by ``request_timeout``.

The socket keeps the pending slot it was admitted with (``daemon.core.slots``) until it
closes: plain HTTP clients share ``max_pending_handshakes`` and the per-peer bound with
websocket handshakes, and never take an established websocket's slot.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Final

import attrs
import h11
import trio

from daemon.core.config import ServerConfig
from daemon.core.log_throttle import DEFAULT_LIMITS, LogThrottle
from daemon.wire.http import HttpReply, HttpRequest, Route, error_reply, resolve, too_large

log = logging.getLogger(__name__)

RECEIVE_BYTES: Final = 65_536  # bytes per socket read


@attrs.frozen
class HttpLimits:
    """The bounds of one HTTP connection (the ``[server]`` keys of the same names)."""

    max_head_bytes: int
    max_body_bytes: int
    request_timeout: float  # seconds
    keepalive_timeout: float  # seconds
    auth_token: str = attrs.field(default="", repr=False)

    @classmethod
    def of(cls, settings: ServerConfig) -> HttpLimits:
        return cls(
            settings.max_request_head_bytes,
            settings.max_request_bytes,
            settings.request_timeout.total_seconds(),
            settings.keepalive_timeout.total_seconds(),
            settings.auth_token,
        )


@attrs.define
class HttpStats:
    """Requests answered, per status code (``/metrics``); the lines a handler's bug logs,
    rate limited (a client could repeat the request that causes it)."""

    by_status: dict[int, int] = attrs.Factory(dict)
    bugs: LogThrottle = attrs.Factory(lambda: DEFAULT_LIMITS.throttle(log, "HTTP handler errors"))

    def count(self, status: int) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1


@attrs.frozen
class RequestHead:
    """A request head h11 has parsed, and every byte read from the socket so far (the
    websocket server is handed them all when it is an upgrade)."""

    conn: h11.Connection
    request: h11.Request
    raw: bytes


@attrs.frozen
class BadHead:
    """The head was not HTTP h11 accepts, or too large: answered, then closed."""

    conn: h11.Connection
    reply: HttpReply


async def read_head(stream: trio.abc.Stream, max_head_bytes: int) -> RequestHead | BadHead | None:
    """The first request's head; None when the client went away first."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)
    raw = bytearray()
    head = await _next_head(stream, conn, max_head_bytes, raw)
    if isinstance(head, HttpReply):
        return BadHead(conn, head)
    return None if head is None else RequestHead(conn, head, bytes(raw))


def head_size(event: h11.Request) -> int:
    """The request line and headers in bytes, as h11 parsed them (h11 bounds only a head
    still incomplete in its buffer; one that arrives whole in a read is measured here)."""
    line = len(event.method) + len(event.target) + len(b"  HTTP/1.1\r\n")
    return line + sum(len(name) + len(value) + 4 for name, value in event.headers) + 2


def _head_too_large(max_head_bytes: int) -> HttpReply:
    reply = error_reply(431, f"request head larger than {max_head_bytes} bytes")
    return attrs.evolve(reply, close=True)


def _protocol_error(exc: h11.RemoteProtocolError, max_head_bytes: int) -> HttpReply:
    if exc.error_status_hint == 431:
        return _head_too_large(max_head_bytes)
    return attrs.evolve(error_reply(400, f"malformed HTTP request: {exc}"), close=True)


async def _receive(stream: trio.abc.Stream) -> bytes:
    """The next bytes, or b"" when the client is gone (closed, reset, a TLS failure)."""
    try:
        return bytes(await stream.receive_some(RECEIVE_BYTES))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return b""


async def answer_bad_head(stream: trio.abc.Stream, bad: BadHead, limits: HttpLimits) -> None:
    with trio.move_on_after(limits.request_timeout):
        await _send_reply(stream, bad.conn, bad.reply, head_only=False)


async def serve_http(
    stream: trio.abc.Stream,
    head: RequestHead,
    routes: Sequence[Route],
    limits: HttpLimits,
    stats: HttpStats,
) -> None:
    """Answer requests on this connection until it closes, idles or errs."""
    conn, event = head.conn, head.request
    while True:
        reply = await _answer(stream, conn, event, routes, limits, stats)
        if reply is None:
            return
        stats.count(reply.status)
        with trio.move_on_after(limits.request_timeout) as sending:
            sent = await _send_reply(stream, conn, reply, head_only=event.method == b"HEAD")
        if sending.cancelled_caught or not sent or reply.close:
            return
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return  # the client asked to close, or the body was not read to the end
        conn.start_next_cycle()
        following: h11.Request | HttpReply | None = None
        with trio.move_on_after(limits.keepalive_timeout):  # idle past it: closed
            following = await _next_head(stream, conn, limits.max_head_bytes)
        if isinstance(following, HttpReply):
            stats.count(following.status)
            with trio.move_on_after(limits.request_timeout):
                await _send_reply(stream, conn, following, head_only=False)
        if not isinstance(following, h11.Request):
            return
        event = following


async def _next_head(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    max_head_bytes: int,
    raw: bytearray | None = None,
) -> h11.Request | HttpReply | None:
    """The next request's head, the error reply to a bad one, or None when the client went
    away first; every byte read is appended to ``raw`` when given."""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return _protocol_error(exc, max_head_bytes)
        if isinstance(event, h11.Request):
            if head_size(event) > max_head_bytes:
                return _head_too_large(max_head_bytes)
            return event
        if event is not h11.NEED_DATA:  # ConnectionClosed: nothing to answer
            return None
        data = await _receive(stream)
        if raw is not None:  # the first head: a client gone before it sent one gets nothing
            if not data:
                return None
            raw += data
        conn.receive_data(data)  # b"": h11 says ConnectionClosed (or a cut-off head) next


async def _answer(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    event: h11.Request,
    routes: Sequence[Route],
    limits: HttpLimits,
    stats: HttpStats,
) -> HttpReply | None:
    """The reply to ``event``: its body read, its route's handler run (each within
    ``request_timeout``); None when the client went away. A handler's bug is a 500 for
    this request only, logged with its traceback: it ends neither the connection's
    neighbours nor the daemon."""
    with trio.move_on_after(limits.request_timeout) as reading:
        body = await _read_body(stream, conn, event, limits)
    if reading.cancelled_caught:
        detail = f"the request was not received within {limits.request_timeout:g}s"
        return attrs.evolve(error_reply(408, detail + " (request_timeout)"), close=True)
    if body is None or isinstance(body, HttpReply):
        return body
    request = HttpRequest(
        event.method.decode("ascii", "replace"),
        event.target.decode("ascii", "replace"),
        tuple((bytes(name), bytes(value)) for name, value in event.headers),
        body,
    )
    route = resolve(routes, request, limits.auth_token)
    if isinstance(route, HttpReply):
        return route
    with trio.move_on_after(limits.request_timeout) as handling:
        try:
            return await route.handler(request)
        except Exception:
            stats.bugs.log(
                trio.current_time(),
                logging.ERROR,
                "%s %s failed",
                request.method,
                request.path,
                exc_info=True,
            )
            return attrs.evolve(error_reply(500, "internal error (logged)"), close=True)
    assert handling.cancelled_caught
    detail = f"no answer within {limits.request_timeout:g}s (request_timeout); try again"
    return error_reply(503, detail)


async def _read_body(
    stream: trio.abc.Stream, conn: h11.Connection, event: h11.Request, limits: HttpLimits
) -> bytes | HttpReply | None:
    """The whole body (None: the client went away), or 413 / 400."""
    limit = limits.max_body_bytes
    if _declared_length(event) > limit:
        return too_large("the request body", limit, "max_request_bytes")
    if conn.they_are_waiting_for_100_continue:
        await _send_all(stream, conn.send(h11.InformationalResponse(status_code=100, headers=[])))
    body = bytearray()
    while True:
        try:
            part = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return _protocol_error(exc, limits.max_head_bytes)
        if isinstance(part, h11.Data):
            body += part.data
            if len(body) > limit:
                return too_large("the request body", limit, "max_request_bytes")
        elif isinstance(part, h11.EndOfMessage):
            return bytes(body)
        elif part is h11.NEED_DATA:
            conn.receive_data(await _receive(stream))
        else:  # ConnectionClosed
            return None


def _declared_length(event: h11.Request) -> int:
    """The ``Content-Length`` h11 validated (0 without one: chunked is counted as read)."""
    for name, value in event.headers:
        if name == b"content-length":
            return int(value)
    return 0


async def _send_all(stream: trio.abc.Stream, data: bytes) -> bool:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


async def _send_reply(
    stream: trio.abc.Stream, conn: h11.Connection, reply: HttpReply, *, head_only: bool
) -> bool:
    """Write ``reply``; False when the client is gone."""
    headers: list[tuple[bytes, bytes]] = list(reply.headers)
    if reply.status not in (204, 304):
        headers.append((b"content-type", reply.content_type))
        headers.append((b"content-length", str(len(reply.body)).encode()))
    if reply.close:
        headers.append((b"connection", b"close"))
    phrase = HTTPStatus(reply.status).phrase.encode()
    try:
        data = conn.send(h11.Response(status_code=reply.status, headers=headers, reason=phrase))
        if reply.body and not head_only and reply.status not in (204, 304):
            data += conn.send(h11.Data(data=reply.body))
        data += conn.send(h11.EndOfMessage())
    except h11.LocalProtocolError:  # h11 will not answer in this state: just close
        return False
    return await _send_all(stream, data)
