"""A websocket client that streams events the way Prefect's `PrefectEventsClient` does
(docs/PROTOCOL.md#ping-and-pong-the-checkpoint), written on trio for the crash tests.

Prefect's client gets no acknowledgements. It keeps every event it sent as *unconfirmed*;
after every `checkpoint_every` events it pings and waits for the pong, which confirms every
event sent before the ping (trigd delays the pong until those are committed). When the
connection breaks it reconnects (ping, then the `prefect` auth handshake) and resends all
unconfirmed events, then the current one again, so the server sees duplicates.

The one liberty taken: Prefect retries a fixed number of times against a fixed URL; this
client asks `DaemonSlot` for the next daemon instead, because each restarted test daemon
listens on a fresh port. It never sleeps to wait for a daemon: it waits for the slot.

trio-websocket leaves a `ping()` waiting forever when the connection dies, so each
connection has a watcher task that notices the close, and a checkpoint waits for
whichever comes first.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Final
from urllib.parse import urlsplit

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

PREFECT_SUBPROTOCOL: Final = "prefect"
CONNECT_TIMEOUT: Final = 10.0  # seconds for TCP + upgrade against a live daemon
CLOSE_TIMEOUT: Final = 1.0  # seconds for a close handshake


class LinkBroken(Exception):
    """The connection to the daemon is gone (or never came up); reconnect and resend."""


class AuthRefused(Exception):
    """The daemon answered the auth message with something other than auth_success."""


@attrs.define
class DaemonSlot:
    """Where the current daemon listens; the test bumps `generation` on every start."""

    generation: int = 0
    url: str | None = None
    _changed: trio.Event = attrs.Factory(trio.Event)

    def up(self, url: str) -> None:
        self.generation += 1
        self.url = url
        self._changed.set()
        self._changed = trio.Event()

    def down(self) -> None:
        self.url = None

    async def url_after(self, generation: int) -> tuple[int, str]:
        """The URL of a running daemon started after `generation`."""
        while self.url is None or self.generation <= generation:
            await self._changed.wait()
        return self.generation, self.url


@attrs.define(eq=False)
class _Link:
    """One connection, watched: the first message is the auth reply, then none at all."""

    ws: WebSocketConnection
    stream: trio.SocketStream
    generation: int
    closed: trio.Event = attrs.Factory(trio.Event)
    auth_reply: str | bytes | None = None
    replied: trio.Event = attrs.Factory(trio.Event)
    unexpected: list[str | bytes] = attrs.Factory(list)

    async def watch(self) -> None:
        try:
            self.auth_reply = await self.ws.get_message()
            self.replied.set()
            while True:
                self.unexpected.append(await self.ws.get_message())
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()


@attrs.define(eq=False)
class ResendingClient:
    """Send events with `emit`; `confirmed` holds the ids a pong has covered.

    Every connection failure is taken to mean "this daemon is gone": the client then
    waits for the next one the test starts (`DaemonSlot.up`).
    """

    slot: DaemonSlot
    nursery: trio.Nursery
    token: str | None = None
    checkpoint_every: int = 700
    unconfirmed: list[tuple[str, str]] = attrs.Factory(list)  # (id, JSON), in send order
    confirmed: set[str] = attrs.Factory(set)
    emitted: int = 0  # distinct events handed to emit()
    resent: int = 0  # events sent again after a reconnect
    connections: int = 0  # successful handshakes
    generation: int = 0  # of the daemon last authenticated to
    unexpected: list[str | bytes] = attrs.Factory(list)  # messages trigd should not send
    _link: _Link | None = None
    _failed_generation: int = 0
    _progress: trio.Event = attrs.Factory(trio.Event)

    async def emit(self, event_id: str, event_json: str) -> None:
        """Like `PrefectEventsClient._emit`: remember, send, checkpoint; on a broken
        connection reconnect, resend everything unconfirmed, and send this one again."""
        self.unconfirmed.append((event_id, event_json))
        self.emitted += 1
        self._notify()
        while True:
            try:
                if self._link is None:
                    await self._reconnect()
                await self._send(event_json)
                await self.checkpoint(force=False)
                return
            except LinkBroken:
                self._drop_link()

    async def flush(self) -> None:
        """Checkpoint whatever is unconfirmed (reconnecting as often as needed)."""
        while self.unconfirmed:
            try:
                if self._link is None:
                    await self._reconnect()
                await self.checkpoint(force=True)
            except LinkBroken:
                self._drop_link()

    async def wait_emitted(self, count: int) -> None:
        while self.emitted < count:
            await self._progress.wait()

    async def wait_connected(self, generation: int) -> None:
        """Until the client has authenticated to the daemon of this generation."""
        while self.generation < generation:
            await self._progress.wait()

    def _notify(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def checkpoint(self, *, force: bool) -> None:
        """A pong confirms the events sent before its ping, and only those."""
        count = len(self.unconfirmed)
        if count == 0 or (not force and count < self.checkpoint_every):
            return
        await self._ping()
        self.confirmed.update(event_id for event_id, _ in self.unconfirmed[:count])
        del self.unconfirmed[:count]

    async def aclose(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            self.unexpected += link.unexpected
            await _close(link)

    # --- the connection ----------------------------------------------------------------

    def _drop_link(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            self.unexpected += link.unexpected
            self.nursery.start_soon(_close, link)

    def _broken(self, link: _Link, why: str) -> LinkBroken:
        self._failed_generation = max(self._failed_generation, link.generation)
        return LinkBroken(why)

    async def _reconnect(self) -> None:
        """Connect to a daemon newer than the last one that failed (ping, auth), then
        resend every unconfirmed event."""
        generation, url = await self.slot.url_after(self._failed_generation)
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
        assert host is not None, url
        assert port is not None, url
        stream: trio.SocketStream | None = None
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await trio.open_tcp_stream(host, port)
                ws = await wrap_client_stream(
                    self.nursery,
                    stream,
                    f"{host}:{port}",
                    parts.path,
                    subprotocols=[PREFECT_SUBPROTOCOL],
                )
        except (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError) as exc:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            self._failed_generation = generation
            raise LinkBroken(f"connect to {url}: {exc!r}") from exc
        link = _Link(ws, stream, generation)
        self._link = link
        self.nursery.start_soon(link.watch)
        await self._ping()  # as Prefect: make sure the socket is really up
        await self._send(json.dumps({"type": "auth", "token": self.token}))
        if not await _first(link.replied, link.closed):
            raise self._broken(link, "closed before the auth reply")
        assert link.auth_reply is not None
        if json.loads(link.auth_reply).get("type") != "auth_success":
            raise AuthRefused(repr(link.auth_reply))
        self.connections += 1
        self.generation = generation
        self._notify()
        for _, event_json in list(self.unconfirmed):
            await self._send(event_json)
            self.resent += 1

    async def _send(self, text: str) -> None:
        link = self._link
        if link is None:
            raise LinkBroken("no connection")
        try:
            await link.ws.send_message(text)
        except ConnectionClosed as exc:
            raise self._broken(link, f"send: {exc!r}") from exc

    async def _ping(self) -> None:
        link = self._link
        if link is None:
            raise LinkBroken("no connection")
        ponged = trio.Event()

        async def ping() -> None:
            with contextlib.suppress(ConnectionClosed):
                await link.ws.ping()
                ponged.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ping)
            answered = await _first(ponged, link.closed)
            nursery.cancel_scope.cancel()
        if not answered:
            raise self._broken(link, "closed while waiting for a pong")


async def _close(link: _Link) -> None:
    """Close (the peer may be gone: then this is quick) and release the socket, which
    trio-websocket leaves open when the connection was aborted."""
    with trio.move_on_after(CLOSE_TIMEOUT):
        await link.ws.aclose()
    await trio.aclose_forcefully(link.stream)


async def _first(wanted: trio.Event, closed: trio.Event) -> bool:
    """Wait for either; True when `wanted` is set."""
    async with trio.open_nursery() as nursery:

        async def until(which: trio.Event) -> None:
            await which.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(until, wanted)
        nursery.start_soon(until, closed)
    return wanted.is_set()


@contextlib.asynccontextmanager
async def open_resending_client(
    slot: DaemonSlot, *, token: str | None = None, checkpoint_every: int = 700
) -> AsyncIterator[ResendingClient]:
    async with trio.open_nursery() as nursery:
        client = ResendingClient(slot, nursery, token=token, checkpoint_every=checkpoint_every)
        try:
            yield client
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()
