"""``trigd tail``: watch the events a running daemon commits (docs/PROTOCOL.md#events-out).

A subscriber of ``/api/events/out`` with Prefect's protocol, as ``prefect events stream``
is: the auth message, then a filter (``--event`` prefix, ``--resource`` id, ``--since``:
how far back the stored events it starts with go, within the daemon's ``[events_out]
backfill``), then one line per event as they are committed. It pings the daemon every
``PING_SECONDS`` so that a quiet stream is not closed as idle. Ctrl-C ends it with 0; a
daemon it cannot reach, or one that closes the stream, with 1 and the reason.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TextIO
from urllib.parse import urlsplit, urlunsplit

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from daemon.cli.emit import InputError, client_token, failure_reason
from daemon.core.exit_codes import ExitCode

SUBPROTOCOL: Final = "prefect"
OUT_PATH: Final = "/api/events/out"
PING_SECONDS: Final = 20.0  # as Prefect's client (the websockets library) does
UNTIL: Final = timedelta(days=365)  # Prefect's subscriber asks for this far ahead


def out_url(url: str) -> str:
    """``--url`` as given, or with the events-out path when it names only the daemon."""
    parts = urlsplit(url)
    if parts.path in ("", "/"):
        return urlunsplit(parts._replace(path=OUT_PATH))
    return url


def filter_message(
    now: datetime, since: timedelta, event_prefix: str | None, resource_id: str | None
) -> str:
    """The subscriber's first message after auth."""
    flt: dict[str, Any] = {
        "occurred": {"since": (now - since).isoformat(), "until": (now + UNTIL).isoformat()},
    }
    if event_prefix is not None:
        flt["event"] = {"prefix": [event_prefix]}
    if resource_id is not None:
        flt["resource"] = {"id": [resource_id]}
    return json.dumps({"type": "filter", "filter": flt, "backfill": since > timedelta(0)})


def format_event(event: dict[str, Any], as_json: bool) -> str:
    """One line: the event as JSON, or its time, name and resource id."""
    if as_json:
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    resource = event.get("resource") or {}
    resource_id = resource.get("prefect.resource.id", "?") if isinstance(resource, dict) else "?"
    return f"{event.get('occurred', '?')}  {event.get('event', '?')}  {resource_id}"


async def tail(url: str, token: str | None, message: str, out: TextIO, as_json: bool) -> None:
    """Print events until the daemon closes the stream (ConnectionClosed) or cancelled."""
    async with open_websocket_url(url, subprotocols=[SUBPROTOCOL]) as ws:
        await ws.send_message(json.dumps({"type": "auth", "token": token}))
        reply = json.loads(await ws.get_message())
        if reply.get("type") != "auth_success":
            raise InputError(f"authentication failed: {reply}")
        await ws.send_message(message)
        async with trio.open_nursery() as nursery:

            async def keep_alive() -> None:
                while True:
                    await trio.sleep(PING_SECONDS)
                    await ws.ping()

            nursery.start_soon(keep_alive)
            while True:
                received = json.loads(await ws.get_message())
                if received.get("type") == "event":
                    print(format_event(received["event"], as_json), file=out, flush=True)


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def tail_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    url = out_url(args.url)
    message = filter_message(datetime.now(UTC), args.since, args.event, args.resource)
    token = client_token(args.token, os.environ)
    try:
        trio.run(tail, url, token, message, out, args.json)
    except KeyboardInterrupt:
        return ExitCode.OK
    except (OSError, HandshakeError, ConnectionClosed, InputError, BaseExceptionGroup) as exc:
        leaf = _first_leaf(exc)
        if isinstance(leaf, KeyboardInterrupt):
            return ExitCode.OK
        print(f"trigd tail: {url}: {failure_reason(leaf)}", file=err)
        return ExitCode.FAILURE
    return ExitCode.OK
