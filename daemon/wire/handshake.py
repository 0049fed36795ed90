"""The ``/events/in`` wire protocol without any I/O: handshake, auth, frames and replies.

Everything here is a pure function of what the client sent, so the rules of docs/PROTOCOL.md
(#subprotocols to #frames) can be read (and tested) in one place; ``daemon.runtime.ingest`` does the
sockets.

Theory of operation. Prefect's server (``accept_prefect_socket``, docs/PROTOCOL.md#authentication)
decides in two steps, and so do we:

1. On the HTTP upgrade request (``decide``): the path must be an events-in path (or an
   events-out one, ``Accept.out``: a subscriber, with the same rules); a client
   offering ``trigd.v1`` or ``prefect`` is accepted with it and owes us an auth message; a
   client offering neither is a legacy client, accepted straight into the event stream
   only when no token is configured (or when its ``Authorization`` header carries the
   token), else refused before the upgrade (HTTP 403, what Prefect's 1002 pre-accept close
   becomes on a real server).
2. On the first message of a subprotocol client (``check_auth``): it must be a text frame
   ``{"type": "auth", "token": ...}``; with a token configured the token must match, unless
   the upgrade request already proved it. Failures close with 1008 and Prefect's reasons.

3. Each later text frame (``decode_frame``) is one event, or a JSON array of events (an
   extension); every event that cannot be accepted becomes a ``Nack`` saying which field
   and why, without affecting its neighbours. ``encode_reply`` writes the ``trigd.v1``
   ack or nack for each, once its fate is known (``reply_frame``: as a websocket frame).

Tokens are compared with ``hmac.compare_digest`` on UTF-8 bytes, so timing does not leak
how much of a guess was right.

Everything a client sends is parsed by pydantic-core (``from_json``, or the event model's
``validate_json``), never by ``json.loads``: its parser refuses nesting past about 200
levels with an error instead of recursing in Python until the interpreter gives up, and
refuses lone surrogates, as the single-event path always has; events are further held to
``max_json_depth`` levels (``parse_incoming_event``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Final
from uuid import UUID

import attrs
from pydantic_core import from_json

from daemon.core.events import (
    DEFAULT_MAX_JSON_DEPTH,
    EventRejected,
    ReceivedEvent,
    parse_incoming_event,
)
from daemon.wire.submission import Submission
from daemon.wire.wsframes import text_frame, text_header

PREFECT_SUBPROTOCOL: Final = "prefect"
ACKS_SUBPROTOCOL: Final = "trigd.v1"
EVENTS_IN_PATHS: Final = frozenset({"/api/events/in", "/events/in"})
EVENTS_OUT_PATHS: Final = frozenset({"/api/events/out", "/events/out"})
"""Events out (``daemon.wire.events_out``): the same handshake, then a subscriber."""

POLICY_VIOLATION: Final = 1008  # websocket close code
EXPECTED_AUTH: Final = "Expected 'auth' message"
NO_TOKEN: Final = "Auth required but no token provided"
INVALID_TOKEN: Final = "Invalid token"
AUTH_SUCCESS: Final = '{"type":"auth_success"}'


@attrs.frozen
class Reject:
    """Refuse the upgrade with this HTTP status; ``why`` is for the log only."""

    status: int
    why: str


@attrs.frozen
class Accept:
    """Upgrade with ``subprotocol``; events flow after the auth message if one is owed."""

    subprotocol: str | None
    authenticated: bool
    """True when no token is configured or the Authorization header carried it."""
    out: bool = False
    """An events-out subscriber (``EVENTS_OUT_PATHS``), not a client sending events."""

    @property
    def expects_auth_message(self) -> bool:
        return self.subprotocol is not None

    @property
    def acks(self) -> bool:
        return self.subprotocol == ACKS_SUBPROTOCOL


@attrs.frozen
class Close:
    """Close the accepted websocket with this code and reason."""

    code: int
    reason: str


def token_matches(offered: str, expected: str) -> bool:
    """Constant-time comparison; an empty expected token never matches."""
    if not expected:
        return False
    return hmac.compare_digest(offered.encode("utf-8"), expected.encode("utf-8"))


def header_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The token in ``Authorization: Bearer <token>`` or Prefect's ``Basic base64(token)``."""
    for name, value in headers:
        if name.lower() != b"authorization":
            continue
        scheme, _, credentials = value.strip().partition(b" ")
        credentials = credentials.strip()
        scheme = scheme.lower()
        try:
            if scheme == b"bearer":
                return credentials.decode("utf-8")
            if scheme == b"basic":
                return base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return None
    return None


def request_path(target: str) -> str:
    """The path of the request target, without a query string."""
    return target.partition("?")[0]


def decide(
    target: str,
    subprotocols: Sequence[str],
    headers: Iterable[tuple[bytes, bytes]],
    auth_token: str,
) -> Accept | Reject:
    """Step 1: accept or refuse the upgrade request."""
    path = request_path(target)
    out = path in EVENTS_OUT_PATHS
    if path not in EVENTS_IN_PATHS and not out:
        return Reject(404, f"no websocket at {path!r}; use /api/events/in or /api/events/out")
    if not auth_token:
        authenticated = True
    else:
        offered = header_token(headers)
        authenticated = offered is not None and token_matches(offered, auth_token)
    if ACKS_SUBPROTOCOL in subprotocols and not out:
        return Accept(ACKS_SUBPROTOCOL, authenticated)
    if PREFECT_SUBPROTOCOL in subprotocols:
        return Accept(PREFECT_SUBPROTOCOL, authenticated, out)
    if not authenticated:
        return Reject(403, "auth is configured and the client offered no 'prefect' subprotocol")
    return Accept(None, authenticated, out)


def check_auth(message: str | bytes, auth_token: str, authenticated: bool) -> Close | None:
    """Step 2: judge the first message of a subprotocol client; None means auth succeeded.
    A binary frame is not an auth message: Prefect reads it with ``receive_json``, which
    takes text frames only."""
    if not isinstance(message, str):
        return Close(POLICY_VIOLATION, EXPECTED_AUTH)
    try:
        parsed = from_json(message)
    except ValueError:  # not JSON, or nested too deep
        return Close(POLICY_VIOLATION, EXPECTED_AUTH)
    if not isinstance(parsed, dict) or parsed.get("type") != "auth":
        return Close(POLICY_VIOLATION, EXPECTED_AUTH)
    if authenticated:
        return None
    token = parsed.get("token")
    if not token:
        return Close(POLICY_VIOLATION, NO_TOKEN)
    if not isinstance(token, str) or not token_matches(token, auth_token):
        return Close(POLICY_VIOLATION, INVALID_TOKEN)
    return None


# --- frames and replies --------------------------------------------------------------------


@attrs.frozen(slots=True)
class Nack:
    """An event refused before evaluation; ``id`` when the frame had a readable one;
    ``reason`` its kind, for the metrics: ``invalid``, ``too_large`` or ``binary``."""

    id: str | None
    error: str
    reason: str = "invalid"


BINARY_FRAME: Final = "frame: binary frames are not accepted; send each event as a JSON text frame"
EMPTY_ARRAY: Final = "frame: an empty array carries no event"
TOO_LARGE: Final = "too_large"  # a Nack's reason: past max_event_bytes


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _event_id(value: Any) -> str | None:
    """The id a rejected event claimed, if it is a valid UUID (so the client can match)."""
    raw = value.get("id") if isinstance(value, dict) else None
    if not isinstance(raw, str):
        return None
    try:
        return str(UUID(raw))
    except ValueError:
        return None


def _id_in_text(text: str) -> str | None:
    try:
        return _event_id(from_json(text))
    except ValueError:
        return None


def _too_big(size: int, limit: int) -> str:
    return f"event: {size} bytes is more than max_event_bytes ({limit})"


def _decode_array(
    text: str, size: int, received: datetime, max_event_bytes: int, max_depth: int
) -> list[ReceivedEvent | Nack]:
    try:
        values = from_json(text)
    except ValueError as exc:
        return [Nack(None, f"frame: not valid JSON: {exc}")]
    if not isinstance(values, list):  # e.g. "[1] x" is caught above; belt and braces
        return [Nack(None, "frame: expected an event object or an array of events")]
    if not values:
        return [Nack(None, EMPTY_ARRAY)]
    out: list[ReceivedEvent | Nack] = []
    for index, value in enumerate(values):
        where = f"event [{index}]"
        if not isinstance(value, dict):
            out.append(Nack(None, f"{where}: an event must be a JSON object"))
            continue
        if size > max_event_bytes:
            item_size = _utf8_size(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
            if item_size > max_event_bytes:
                out.append(
                    Nack(
                        _event_id(value),
                        f"{where}: {_too_big(item_size, max_event_bytes)}",
                        TOO_LARGE,
                    )
                )
                continue
        try:
            out.append(parse_incoming_event(value, received, max_depth))
        except EventRejected as exc:
            out.append(Nack(_event_id(value), f"{where}: {exc.message}"))
    return out


def decode_frame(
    frame: str | bytes,
    received: datetime,
    max_event_bytes: int,
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH,
) -> list[ReceivedEvent | Nack]:
    """The events in one text frame, stamped ``received``, and a ``Nack`` per bad one;
    each event may nest ``max_json_depth`` levels, whether alone or in an array."""
    if not isinstance(frame, str):
        return [Nack(None, BINARY_FRAME, "binary")]
    size = _utf8_size(frame)
    if frame.lstrip().startswith("["):
        return _decode_array(frame, size, received, max_event_bytes, max_json_depth)
    if size > max_event_bytes:
        return [Nack(_id_in_text(frame), _too_big(size, max_event_bytes), TOO_LARGE)]
    try:
        return [parse_incoming_event(frame, received, max_json_depth)]
    except EventRejected as exc:
        return [Nack(_id_in_text(frame), exc.message)]


def encode_reply(item: Submission | Nack) -> bytes:
    """The ``trigd.v1`` reply (UTF-8): ack for a committed event, nack with the reason
    otherwise."""
    if isinstance(item, Nack):
        return json.dumps({"type": "nack", "id": item.id, "error": item.error}).encode()
    if item.error is None:
        return _ACK_HEAD + str(item.event.id).encode() + _ACK_TAIL
    nack = {"type": "nack", "id": str(item.event.id), "error": item.error}
    return json.dumps(nack).encode()


_ACK_HEAD: Final = b'{"type":"ack","id":"'
_ACK_TAIL: Final = b'"}'
_ACK_FRAME: Final = (
    text_header(len(_ACK_HEAD) + len("12345678-1234-1234-1234-123456789abc") + len(_ACK_TAIL))
    + _ACK_HEAD
    + b"%b-%b-%b-%b-%b"
    + _ACK_TAIL
)
"""An ack's whole websocket frame, to fill with the five groups of the id's hex digits:
a canonical UUID is always 36 characters, so every ack frame has the same header."""


def reply_frame(item: Submission | Nack) -> bytes:
    """``encode_reply`` as a websocket text frame; an ack (once per event) the fast way."""
    if type(item) is Submission and item.error is None:
        digits = b"%032x" % item.event.id.int  # str(UUID) is Python code, %x is not
        return _ACK_FRAME % (digits[:8], digits[8:12], digits[12:16], digits[16:20], digits[20:])
    return text_frame(encode_reply(item))
