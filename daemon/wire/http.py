"""Plain HTTP on the listen port, without I/O: requests, replies, the route table's rules.

``daemon.runtime.http_server`` reads requests with h11 and writes the replies; what a
request gets is decided here, as functions of values, so the rules of docs/PROTOCOL.md#http
can be read (and tested) in one place:

* ``resolve``: which route answers a request, or the error reply: 404 for an unknown
  path, 405 (with ``Allow``) for a known path and a wrong method, 401 for a route that is
  not public when ``auth_token`` is set and the request does not carry it;
* ``error_reply`` / ``json_reply``: every error is JSON ``{"detail": "..."}``;
* ``parse_events_body``: the body of ``POST /api/events``, a JSON array of events, all
  valid or none taken (422 naming the first bad event's index and field);
* ``is_websocket_upgrade``: the request is handed to the websocket server instead.

A route is one line of a table (``Route``): method, path, handler, whether it is public.
A handler is an async function of the parsed ``HttpRequest`` returning an ``HttpReply``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

import attrs

from daemon.core.events import ReceivedEvent
from daemon.wire.handshake import (
    EMPTY_ARRAY,
    Nack,
    decode_frame,
    header_token,
    request_path,
    token_matches,
)

Headers = tuple[tuple[bytes, bytes], ...]

JSON: Final = b"application/json"


@attrs.frozen
class HttpRequest:
    """One complete request: its head as h11 parsed it, and its whole body."""

    method: str
    target: str
    headers: Headers
    body: bytes = b""

    @property
    def path(self) -> str:
        return request_path(self.target)

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case), if any."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


@attrs.frozen
class HttpReply:
    status: int
    body: bytes = b""
    content_type: bytes = JSON
    headers: Headers = ()
    close: bool = False  # close the connection after this reply (the body was not read)
    reason: str = ""  # a 422's kind of bad event (``Nack.reason``), for the metrics


Handler = Callable[[HttpRequest], Awaitable[HttpReply]]


@attrs.frozen
class Route:
    """One line of the route table; ``public`` routes need no token (health, ready,
    metrics: what load balancers and Prometheus call)."""

    method: str
    path: str
    handler: Handler
    public: bool = False


def json_reply(status: int, value: Any) -> HttpReply:
    return HttpReply(status, json.dumps(value, separators=(",", ":")).encode())


def error_reply(status: int, detail: str, **extra: Any) -> HttpReply:
    """An error as JSON ``{"detail": ...}`` (plus ``extra`` keys, e.g. ``reasons``)."""
    return json_reply(status, {"detail": detail, **extra})


def path_params(template: str, path: str) -> dict[str, str] | None:
    """The values of ``template``'s ``{name}`` segments in ``path`` (percent-decoded), or
    None when ``path`` does not have its shape; a template without them matches itself."""
    if "{" not in template:
        return {} if template == path else None
    wanted, given = template.split("/"), path.split("/")
    if len(wanted) != len(given):
        return None
    params: dict[str, str] = {}
    for pattern, segment in zip(wanted, given, strict=True):
        if pattern.startswith("{") and pattern.endswith("}"):
            if not segment:
                return None
            params[pattern[1:-1]] = unquote(segment)
        elif pattern != segment:
            return None
    return params


def query_params(target: str) -> dict[str, str]:
    """The query string's parameters, the first value of each."""
    return {name: values[0] for name, values in parse_qs(urlsplit(target).query).items()}


def resolve(routes: Sequence[Route], request: HttpRequest, auth_token: str) -> Route | HttpReply:
    """The route that answers ``request``, or why none does."""
    path = request.path
    methods = [route for route in routes if path_params(route.path, path) is not None]
    if not methods:
        return error_reply(404, f"no route {path!r}")
    for route in methods:
        if route.method == request.method or (route.method == "GET" and request.method == "HEAD"):
            if route.public or authorized(request.headers, auth_token):
                return route
            return HttpReply(
                401,
                json.dumps({"detail": "missing or invalid bearer token"}).encode(),
                headers=((b"www-authenticate", b"Bearer"),),
            )
    allow = ", ".join(sorted({route.method for route in methods}))
    return HttpReply(
        405,
        json.dumps({"detail": f"{request.method} is not allowed on {path}"}).encode(),
        headers=((b"allow", allow.encode()),),
    )


def authorized(headers: Iterable[tuple[bytes, bytes]], auth_token: str) -> bool:
    """No token configured, or ``Authorization`` carries it (Bearer, or Prefect's Basic)."""
    if not auth_token:
        return True
    offered = header_token(headers)
    return offered is not None and token_matches(offered, auth_token)


def is_websocket_upgrade(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """The request asks for a websocket (``Upgrade: websocket``): the websocket server's."""
    for name, value in headers:
        if name.lower() == b"upgrade":
            tokens = (token.strip().lower() for token in value.split(b","))
            if b"websocket" in tokens:
                return True
    return False


def too_large(what: str, limit: int, key: str) -> HttpReply:
    reply = error_reply(413, f"{what} is larger than {limit} bytes ({key})")
    return attrs.evolve(reply, close=True)


def parse_events_body(
    body: bytes, received: datetime, max_event_bytes: int, max_json_depth: int
) -> list[ReceivedEvent] | HttpReply:
    """``POST /api/events``: every event of the array, stamped ``received``, or a 422 that
    names the first invalid one (its index and field): then none of them is taken."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return error_reply(422, f"body: not UTF-8 (byte {exc.start})")
    if not text.lstrip().startswith("["):
        return error_reply(422, "body: expected a JSON array of events")
    events: list[ReceivedEvent] = []
    for item in decode_frame(text, received, max_event_bytes, max_json_depth):
        if isinstance(item, Nack):
            if item.error == EMPTY_ARRAY:
                return []  # nothing to do, as Prefect's route
            reply = error_reply(422, item.error.replace("frame: ", "body: ", 1))
            return attrs.evolve(reply, reason=item.reason)
        events.append(item)
    return events
