"""Prefect's events protocol as a client speaks it, without I/O: what trigd sends to an
upstream Prefect server's `/events/in` and `/events/out`, and how it reads the replies
(README.md#trigd-beside-your-prefect-server).

* The websocket URLs come from the API URL, as Prefect's client derives them: `http` becomes
  `ws`, `https` becomes `wss`, and `/events/in` or `/events/out` is appended.
* A self-hosted server: the `prefect` subprotocol, then `{"type": "auth", "token": ...}`
  (the auth string, or null when none is set), answered `{"type": "auth_success"}`; its
  HTTP upgrade also carries the auth string as Basic credentials, for proxies that check
  them first. Prefect Cloud: `Authorization: Bearer <api_key>` on the upgrade; its
  `/events/in` takes no auth message, its `/events/out` takes the key as the token.
* `/events/out`: after auth, `{"type": "filter", "filter": ..., "backfill": true}`; every
  later message is `{"type": "event", "event": {...}}`.

Replies are parsed by pydantic-core, bounded by the caller's message size limit.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Final

import attrs
from pydantic_core import from_json

from daemon.core.events import EventRejected, ReceivedEvent, parse_incoming_event

PREFECT_SUBPROTOCOL: Final = "prefect"
BACKFILL_MARGIN: Final = timedelta(minutes=1)
"""A reconnect asks for events from this long before the latest taken (Prefect's own
subscriber does the same): late arrivals are not missed, repeats are dropped by id."""
UNTIL_AHEAD: Final = timedelta(days=365)
"""The filter's `occurred.until`: as far ahead as Prefect's subscriber sets it."""


class UpstreamRefused(Exception):
    """The upstream answered, but not as the protocol says (auth refused, a bad reply);
    the message says why and never holds a credential."""


@attrs.frozen
class Credentials:
    """Resolved `auth_string` or `api_key` (at most one); never shown in a repr."""

    auth_string: str = attrs.field(default="", repr=False)
    api_key: str = attrs.field(default="", repr=False)


def socket_url(api_url: str, path: str) -> str:
    """`http://prefect:4200/api` + `/events/in` -> `ws://prefect:4200/api/events/in`."""
    if api_url.startswith("https://"):
        base = "wss://" + api_url.removeprefix("https://")
    else:
        base = "ws://" + api_url.removeprefix("http://")
    return base.rstrip("/") + path


def upgrade_headers(credentials: Credentials) -> list[tuple[bytes, bytes]]:
    """The extra headers of the websocket upgrade."""
    if credentials.api_key:
        return [(b"authorization", f"Bearer {credentials.api_key}".encode())]
    if credentials.auth_string:
        basic = base64.b64encode(credentials.auth_string.encode()).decode()
        return [(b"authorization", f"Basic {basic}".encode())]
    return []


def auth_message(credentials: Credentials, *, events_out: bool) -> str | None:
    """The first message after the upgrade, or None when the upstream takes none (Prefect
    Cloud's `/events/in`, authenticated by its header)."""
    if credentials.api_key and not events_out:
        return None
    token = credentials.api_key or credentials.auth_string or None
    return json.dumps({"type": "auth", "token": token})


def check_auth_reply(message: str | bytes) -> None:
    """Raise UpstreamRefused unless the reply is `auth_success`."""
    try:
        reply = from_json(message)
    except ValueError:
        raise UpstreamRefused("the auth reply is not JSON") from None
    if not isinstance(reply, dict) or reply.get("type") != "auth_success":
        reason = reply.get("reason") if isinstance(reply, dict) else None
        raise UpstreamRefused(
            "authentication refused" + (f": {str(reason)[:200]}" if reason else "")
        )


def filter_message(
    event_filter: Mapping[str, Any], position: datetime | None, now: datetime
) -> str:
    """The filter message: the configured filter, occurred from `position` less the margin
    (or from the margin before `now` the first time), ascending, with backfill."""
    since = (position if position is not None else now) - BACKFILL_MARGIN
    body = {
        **event_filter,
        "occurred": {"since": since.isoformat(), "until": (now + UNTIL_AHEAD).isoformat()},
        "order": "ASC",
    }
    return json.dumps({"type": "filter", "filter": body, "backfill": True})


ENVELOPE_BYTES: Final = 4_096
"""Room for `{"type": "event", "event": ...}` around an event of `max_event_bytes`."""


class OversizedEvent(EventRejected):
    """An `/events/out` message larger than trigd takes; `event_id` and `occurred` are
    those it names, when it does (to log it, and to move the position past it)."""

    def __init__(
        self, size: int, limit: int, event_id: str | None, occurred: datetime | None
    ) -> None:
        named = f"event {event_id}: " if event_id else ""
        super().__init__(f"{named}{size} bytes, larger than max_event_bytes ({limit})")
        self.event_id = event_id
        self.occurred = occurred


def _oversized(message: str | bytes, max_event_bytes: int) -> OversizedEvent:
    """Read the id and `occurred` of a message too large to take as an event (the socket's
    own limit bounds this parse)."""
    event_id: str | None = None
    occurred: datetime | None = None
    try:
        event = from_json(message).get("event")
        event_id = str(event["id"])[:64] if isinstance(event.get("id"), str) else None
        occurred = datetime.fromisoformat(event["occurred"])
        occurred = occurred if occurred.tzinfo is not None else None
    except (ValueError, TypeError, KeyError, AttributeError):
        pass
    return OversizedEvent(len(message), max_event_bytes, event_id, occurred)


def event_from_message(
    message: str | bytes, received: datetime, max_depth: int, max_event_bytes: int
) -> ReceivedEvent:
    """One `/events/out` message as an event received now, held to what trigd accepts from
    any client; EventRejected names what is wrong (OversizedEvent past `max_event_bytes`
    and the envelope's room)."""
    if len(message) > max_event_bytes + ENVELOPE_BYTES:
        raise _oversized(message, max_event_bytes)
    try:
        envelope = from_json(message)
    except ValueError as exc:
        raise EventRejected(f"not JSON: {exc}") from None
    if not isinstance(envelope, dict) or envelope.get("type") != "event":
        raise EventRejected('expected a message {"type": "event", "event": {...}}')
    event = envelope.get("event")
    if not isinstance(event, dict):
        raise EventRejected("event: expected an object")
    return parse_incoming_event(event, received, max_depth)
