"""``trigd emit``: push events to a running daemon and wait until each is acknowledged.

It speaks the ``trigd.v1`` subprotocol (docs/PROTOCOL.md#subprotocols): after the auth handshake
every event frame gets an ``ack`` once committed, or a ``nack`` naming the field at fault. Events
without an ``id`` get one here (uuid7, as Prefect's client does) so that every reply can be matched
to its input line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, Final, TextIO

import trio
import uuid6
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
    open_websocket_url,
)

from daemon.core.config import AUTH_TOKEN_ENV
from daemon.core.exit_codes import ExitCode

SUBPROTOCOL: Final = "trigd.v1"


class InputError(Exception):
    """The input file could not be read as events."""


def read_events(text: str) -> Iterator[tuple[str, Any]]:
    """Yield (where, value) for a JSON array or for JSON lines; `where` names the line."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"not a JSON array: {exc}") from None
        for index, value in enumerate(values):
            yield f"item {index}", value
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"line {number}", InputError(f"not JSON: {exc.msg} at column {exc.colno}")


def _event_id(value: dict[str, Any]) -> str | None:
    raw = value.get("id")
    if raw is None:
        value["id"] = str(uuid6.uuid7())
        return str(value["id"])
    try:
        return str(uuid.UUID(str(raw)))
    except ValueError:
        return None


async def emit(url: str, token: str | None, items: list[tuple[str, Any]]) -> tuple[int, list[str]]:
    """Send the events; return (acknowledged count, rejection messages)."""
    rejected: list[str] = []
    waiting: dict[str, str] = {}  # event id -> where
    unmatched: list[str] = []  # sent events whose id the server cannot echo
    frames: list[str] = []
    for where, value in items:
        if isinstance(value, InputError):
            rejected.append(f"{where}: {value}")
            continue
        if not isinstance(value, dict):
            rejected.append(f"{where}: an event must be a JSON object")
            continue
        event_id = _event_id(value)
        if event_id is None:
            unmatched.append(where)
        else:
            waiting[event_id] = where
        frames.append(json.dumps(value, separators=(",", ":")))
    acked = 0
    if not frames:
        return acked, rejected
    async with open_websocket_url(url, subprotocols=[SUBPROTOCOL]) as ws:
        await ws.send_message(json.dumps({"type": "auth", "token": token}))
        reply = json.loads(await ws.get_message())
        if reply.get("type") != "auth_success":
            raise InputError(f"authentication failed: {reply}")
        async with trio.open_nursery() as nursery:

            async def send_all() -> None:
                with contextlib.suppress(ConnectionClosed):  # the reader reports it
                    for frame in frames:
                        await ws.send_message(frame)

            nursery.start_soon(send_all)
            try:
                for _ in range(len(frames)):
                    message = json.loads(await ws.get_message())
                    event_id = message.get("id")
                    known = waiting.pop(event_id, None) if event_id else None
                    if known is not None:
                        where = known
                    else:
                        where = unmatched.pop(0) if unmatched else f"event {event_id}"
                    if message.get("type") == "ack":
                        acked += 1
                    else:
                        rejected.append(f"{where}: {message.get('error', message)}")
            except ConnectionClosed as exc:
                # closed for a bad frame (1007, 1009) or going away: trigd answered every
                # frame before it, so what is left was not stored (or not known to be)
                why = failure_reason(exc)
                rejected += [f"{where}: not acknowledged: {why}" for where in waiting.values()]
                rejected += [f"{where}: not acknowledged: {why}" for where in unmatched]
                nursery.cancel_scope.cancel()
    return acked, rejected


async def _emit_within(
    url: str, token: str | None, items: list[tuple[str, Any]], seconds: float
) -> tuple[int, list[str]]:
    try:
        with trio.fail_after(seconds):
            return await emit(url, token, items)
    except BaseExceptionGroup as group:  # the sender task and the reader fail together
        raise _first_leaf(group) from group


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def failure_reason(exc: BaseException) -> str:
    """Why the websocket failed, in words. trio-websocket's HandshakeError has no message
    of its own: the cause is the OSError it was raised from, itself raised from a group of
    them, one per address tried."""
    if isinstance(exc, ConnectionRejected):
        body = (exc.body or b"").decode(errors="replace").strip()
        return f"the server refused the websocket: HTTP {exc.status_code}" + (
            f": {body}" if body else ""
        )
    if isinstance(exc, ConnectionTimeout):
        return "timed out opening the websocket"
    if isinstance(exc, ConnectionClosed):
        closed = exc.reason
        if closed is None:
            return "the server closed the connection"
        return f"the server closed the connection: {closed.code} {closed.reason or closed.name}"
    if isinstance(exc, BaseExceptionGroup):
        return failure_reason(exc.exceptions[0])
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host ({exc.strerror})"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()  # trio's text repeats the address
    cause = exc.__cause__
    if cause is not None and isinstance(exc, HandshakeError | OSError):
        return failure_reason(cause)
    return str(exc) or type(exc).__name__


def client_token(flag: str | None, environ: Mapping[str, str]) -> str | None:
    """`--token`, else the variable `serve` reads its token from, else the older
    `TRIGD_TOKEN`: the token is named the same way on both ends."""
    if flag is not None:
        return flag
    return environ.get(AUTH_TOKEN_ENV) or environ.get("TRIGD_TOKEN")


def emit_command(args: argparse.Namespace, stdin: TextIO, out: TextIO, err: TextIO) -> int:
    try:
        if args.file in (None, "-"):
            text = stdin.read()
        else:
            with open(args.file, encoding="utf-8") as handle:
                text = handle.read()
        items = list(read_events(text))
    except (OSError, InputError) as exc:
        print(f"trigd emit: {exc}", file=err)
        return ExitCode.FAILURE
    token = client_token(args.token, os.environ)
    try:
        acked, rejected = trio.run(_emit_within, args.url, token, items, args.timeout)
    except trio.TooSlowError:
        print(f"trigd emit: no reply within {args.timeout:g}s from {args.url}", file=err)
        return ExitCode.FAILURE
    except (OSError, HandshakeError, ConnectionClosed, InputError) as exc:
        print(f"trigd emit: {args.url}: {failure_reason(exc)}", file=err)
        return ExitCode.FAILURE
    for message in rejected:
        print(f"rejected {message}", file=err)
    print(f"{acked} acknowledged, {len(rejected)} rejected", file=out)
    return ExitCode.FAILURE if rejected else ExitCode.OK
