"""Events out without I/O: the ``/api/events/out`` subscriber's messages, and the request
and reply of ``POST /api/events/filter`` (docs/PROTOCOL.md#events-out).

Prefect's subscriber protocol, after the same handshake as ``/events/in``: the client's
first message is ``{"type": "filter", "filter": <EventFilter>, "backfill": true}``; the
server answers with ``{"type": "event", "event": {...}}`` messages. A first message that is
not a filter closes the socket with 1002 and Prefect's reasons (``Expected 'filter'
message``, ``Invalid filter: ...``).

``POST /api/events/filter`` takes Prefect's body ``{"filter": <EventFilter>, "limit": N}``
and answers Prefect's ``EventPage``: ``{"events": [...], "total": N, "next_page": URL}``;
the next page's token is Prefect's too (base64 of the resolved filter, the total, the page
size and the offset), so a client can follow ``next_page`` with ``GET
/api/events/filter/next?page-token=...``.

Stored events are ReceivedEvent JSON already; they are written into replies as they are,
never decoded and encoded again.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import attrs
from pydantic_core import from_json

from daemon.core.event_filter import EventFilter, FilterRejected, parse_filter

PROTOCOL_ERROR: Final = 1002  # websocket close code
EXPECTED_FILTER: Final = "Expected 'filter' message"
PAGE_SIZE: Final = 50
"""Prefect's ``INTERACTIVE_PAGE_SIZE``: a query's default and largest ``limit``."""
MAX_PAGE_TOKEN_CHARS: Final = 65_536


@attrs.frozen
class Subscription:
    """A subscriber's first message: what it wants, and whether stored events first."""

    filter: EventFilter
    backfill: bool


@attrs.frozen
class Refusal:
    """Close the subscriber's socket with this code and reason."""

    code: int
    reason: str


def parse_subscription(message: str | bytes) -> Subscription | Refusal:
    """Judge the subscriber's first message (after auth)."""
    if not isinstance(message, str):
        return Refusal(PROTOCOL_ERROR, EXPECTED_FILTER)
    try:
        parsed = from_json(message)
    except ValueError:
        return Refusal(PROTOCOL_ERROR, EXPECTED_FILTER)
    if not isinstance(parsed, dict) or parsed.get("type") != "filter":
        return Refusal(PROTOCOL_ERROR, EXPECTED_FILTER)
    backfill = parsed.get("backfill", True)
    if not isinstance(backfill, bool):
        return Refusal(PROTOCOL_ERROR, "Invalid filter: backfill: expected true or false")
    try:
        flt = parse_filter(parsed.get("filter"))
    except FilterRejected as exc:
        return Refusal(PROTOCOL_ERROR, _close_reason(f"Invalid filter: {exc}"))
    return Subscription(flt, backfill)


MAX_CLOSE_REASON_BYTES: Final = 123  # what fits a close frame after its code


def _close_reason(text: str) -> str:
    data = text.encode("utf-8")
    if len(data) <= MAX_CLOSE_REASON_BYTES:
        return text
    return data[: MAX_CLOSE_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."


def event_message(event_json: str) -> str:
    """One event (ReceivedEvent JSON) as the subscriber receives it."""
    return '{"type":"event","event":' + event_json + "}"


# --- POST /api/events/filter -----------------------------------------------------------------


@attrs.frozen
class PageRequest:
    """One page of a query: the resolved filter, the page size and where it starts;
    ``total`` is known from the first page on (None for a first page)."""

    filter: EventFilter
    limit: int
    offset: int = 0
    total: int | None = None


def parse_page_request(body: bytes | str | dict[str, Any] | None, now: datetime) -> PageRequest:
    """Prefect's ``{"filter": ..., "limit": N}`` (either may be left out), the filter
    resolved against ``now``; FilterRejected names the field at fault."""
    if body is None or body in (b"", ""):
        value: Any = {}
    elif isinstance(body, dict):
        value = body
    else:
        try:
            value = from_json(body)
        except ValueError as exc:
            raise FilterRejected(f"body: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FilterRejected("body: expected an object with 'filter' and 'limit'")
    unknown = sorted(set(value) - {"filter", "limit"})
    if unknown:
        raise FilterRejected(f"body.{unknown[0]}: unknown field; expected 'filter' and 'limit'")
    limit = value.get("limit", PAGE_SIZE)
    if type(limit) is not int or not 0 <= limit <= PAGE_SIZE:
        raise FilterRejected(f"body.limit: expected an integer from 0 to {PAGE_SIZE}")
    return PageRequest(parse_filter(value.get("filter")).resolve(now), limit)


def encode_page(request: PageRequest, events: Sequence[str], total: int, base_url: str) -> bytes:
    """Prefect's ``EventPage`` for ``events`` (ReceivedEvent JSON, in order) of ``total``;
    ``next_page`` is a URL under ``base_url`` (e.g. ``http://host:4280/``) or null."""
    token = next_page_token(request, total)
    next_page = None
    if token is not None:
        next_page = f"{base_url.rstrip('/')}/api/events/filter/next?page-token={token}"
    tail = json.dumps({"total": total, "next_page": next_page})
    return ('{"events":[' + ",".join(events) + "]," + tail[1:]).encode()


def next_page_token(request: PageRequest, total: int) -> str | None:
    """Prefect's page token for the page after ``request``, or None at the last one."""
    following = request.offset + request.limit
    if request.limit == 0 or following >= total:
        return None
    document = {
        "filter": request.filter.model_dump(mode="json"),
        "count": total,
        "page_size": request.limit,
        "offset": following,
    }
    return base64.b64encode(json.dumps(document).encode()).decode()


def parse_page_token(token: str) -> PageRequest:
    """The page a ``next_page`` token names; FilterRejected when it is not one of ours
    (Prefect answers 403 to a token it cannot read)."""
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise FilterRejected(f"page-token: longer than {MAX_PAGE_TOKEN_CHARS} characters")
    try:
        document = from_json(base64.b64decode(token.encode("ascii"), validate=True))
    except (ValueError, UnicodeEncodeError, binascii.Error):
        raise FilterRejected("page-token: not a token of this server") from None
    if not isinstance(document, dict):
        raise FilterRejected("page-token: not a token of this server")
    count, size, offset = (document.get(k) for k in ("count", "page_size", "offset"))
    numbers = [n for n in (count, size, offset) if type(n) is int and n >= 0]
    if len(numbers) != 3 or not 0 < numbers[1] <= PAGE_SIZE:
        raise FilterRejected("page-token: not a token of this server")
    flt = parse_filter(document.get("filter"), "page-token.filter")
    return PageRequest(flt, numbers[1], numbers[2], numbers[0])
