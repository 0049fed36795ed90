"""Connection slots against real sockets: clients that never finish a handshake, idle
websockets, and too many from one address must not lock anyone else out.

Ingest and the evaluator run in-process (``tests.support.ingest_client.Starter``) on
127.0.0.1 with a real SQLite file. "Another address" is another loopback address: the
attacker's sockets are bound to 127.0.0.2 (all of 127.0.0.0/8 is loopback on Linux), the
well-behaved client connects from 127.0.0.1. Every test runs under a hard
``trio.fail_after``; the few that must let a timeout lapse configure it well under a second
or two.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Pong, Request, TextMessage

from daemon.core.config import ServerConfig
from daemon.engine.engine import Engine
from daemon.wire.handshake import ACKS_SUBPROTOCOL, PREFECT_SUBPROTOCOL
from tests.support.evaluator_doubles import GatedEngine, stored_ids
from tests.support.ingest_client import (
    Daemon,
    Starter,
    authenticate,
    connect,
    event_dict,
    handshake_status,
    replies,
    until_event,
)

LIMIT = 10  # seconds: the hard bound on every test here
ATTACKER = "127.0.0.2"
OTHER = "127.0.0.3"


async def half_open(port: int, local: str) -> trio.SocketStream:
    """A socket from ``local`` that starts an upgrade request and never finishes it."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=local)
    await stream.send_all(b"GET /api/events/in HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return stream


@asynccontextmanager
async def raw_client(
    port: int, local: str, *, subprotocol: str = ACKS_SUBPROTOCOL, auth: bool = True
) -> AsyncIterator[tuple[trio.SocketStream, WSConnection]]:
    """A websocket opened by hand from ``local``; after the auth message unless ``auth`` is
    False (then it is upgraded and owes one). AssertionError if trigd closes it first."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=local)
    async with stream:
        client = WSConnection(ConnectionType.CLIENT)
        request = Request(host="127.0.0.1", target="/api/events/in", subprotocols=[subprotocol])
        await stream.send_all(client.send(request))
        await until_event(stream, client, AcceptConnection)
        if auth:
            await stream.send_all(client.send(TextMessage(data='{"type":"auth"}')))
            reply = await until_event(stream, client, TextMessage)
            assert json.loads(reply.data) == {"type": "auth_success"}
        yield stream, client


async def refused_unread(port: int, local: str) -> None:
    """The socket is closed without an answer to its upgrade request."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=local)
    async with stream:
        client = WSConnection(ConnectionType.CLIENT)
        request = Request(host="127.0.0.1", target="/api/events/in", subprotocols=[])
        try:
            await stream.send_all(client.send(request))
            assert await stream.receive_some(65536) == b""
        except trio.BrokenResourceError:  # reset: closed with the request unread
            pass


async def until(done: Callable[[], bool]) -> None:
    """Until ``done()`` (ingest's counters have no event to wait on); bound it."""
    while not done():  # noqa: ASYNC110
        await trio.sleep(0.01)


async def event_is_acked(daemon: Daemon) -> None:
    """A client from 127.0.0.1 connects, authenticates, and gets its event acked."""
    event = event_dict()
    async with connect(daemon.url(), subprotocols=[ACKS_SUBPROTOCOL]) as ws:
        await authenticate(ws, None)
        await ws.send_message(json.dumps(event))
        assert await replies(ws, 1) == [{"type": "ack", "id": event["id"]}]
    assert event["id"] in stored_ids(daemon.db_path)


# --- half-open handshakes ------------------------------------------------------------------


@pytest.mark.parametrize("per_peer", [16, 64])
async def test_64_half_open_upgrades_from_one_address_do_not_lock_out_a_new_client(
    start: Starter, per_peer: int
) -> None:
    """Held well past the test (handshake_timeout 60s). With the per-peer bound as large as
    every pool, the flood fills the pending pool and the client takes its oldest slot."""
    with trio.fail_after(LIMIT):
        daemon = await start(
            handshake_timeout=timedelta(seconds=60), max_connections_per_peer=per_peer
        )
        flood = [await half_open(daemon.port, ATTACKER) for _ in range(64)]
        await until(lambda: daemon.ingest.connections_total == 64)
        await event_is_acked(daemon)
        await event_is_acked(daemon)  # and again: the flood does not win its slot back
        stats = daemon.ingest
        # the flood's 16 handshakes filled the pending pool: the first client took the
        # oldest one's slot, the second found it still free
        assert stats.handshakes == 15
        over_the_bound = 48 if per_peer == 16 else 0
        assert stats.refused_per_peer == over_the_bound
        assert stats.refused_busy == 48 - over_the_bound + 1
        assert stats.handshakes_refused == 49
        for stream in flood:
            await stream.aclose()


async def test_upgraded_clients_that_never_authenticate_cannot_take_established_slots(
    start: Starter,
) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(
            handshake_timeout=timedelta(seconds=60), max_connections=2, max_pending_handshakes=4
        )
        async with (
            raw_client(daemon.port, ATTACKER, subprotocol=PREFECT_SUBPROTOCOL, auth=False),
            raw_client(daemon.port, ATTACKER, subprotocol=PREFECT_SUBPROTOCOL, auth=False),
            raw_client(daemon.port, OTHER, subprotocol=PREFECT_SUBPROTOCOL, auth=False),
        ):
            assert (daemon.ingest.handshakes, daemon.ingest.connections) == (3, 0)
            async with raw_client(daemon.port, OTHER):
                await event_is_acked(daemon)  # the second established slot
                assert (daemon.ingest.handshakes, daemon.ingest.connections) == (3, 2)


# --- the per-peer bound --------------------------------------------------------------------


async def test_websockets_over_the_per_peer_bound_are_refused_while_another_client_is_fine(
    start: Starter, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(max_connections_per_peer=4)
        async with (
            raw_client(daemon.port, ATTACKER),
            raw_client(daemon.port, ATTACKER),
            raw_client(daemon.port, ATTACKER),
            raw_client(daemon.port, ATTACKER),
        ):
            assert daemon.ingest.connections == 4
            await refused_unread(daemon.port, ATTACKER)
            await event_is_acked(daemon)
            async with raw_client(daemon.port, OTHER):
                pass
        assert (daemon.ingest.refused_per_peer, daemon.ingest.handshakes_refused) == (1, 1)
        await until(lambda: daemon.ingest.connections == 0)
        async with raw_client(daemon.port, ATTACKER):  # its websockets closed: room again
            pass
    assert f"refused a connection from {ATTACKER}: {ATTACKER} already holds" in caplog.text


# --- the established pool ------------------------------------------------------------------


async def test_a_handshake_finding_every_connection_taken_is_refused_with_503(
    start: Starter,
) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(max_connections=1, handshake_timeout=timedelta(seconds=0.3))
        async with connect(daemon.url()) as one:
            await one.ping(b"established")
            assert await handshake_status(daemon.port) == 503
            assert (daemon.ingest.refused_busy, daemon.ingest.handshakes_refused) == (1, 1)
        assert await handshake_status(daemon.port) == 101


async def test_an_auth_message_finding_every_connection_taken_is_closed_1013(
    start: Starter,
) -> None:
    """The upgrade found a slot free, but a legacy client took it before the auth message."""
    with trio.fail_after(LIMIT):
        daemon = await start(max_connections=1, handshake_timeout=timedelta(seconds=0.5))
        async with (
            raw_client(daemon.port, OTHER, auth=False) as (stream, client),
            connect(daemon.url()) as legacy,
        ):
            await legacy.ping(b"established")
            await stream.send_all(client.send(TextMessage(data='{"type":"auth"}')))
            close = await until_event(stream, client, CloseConnection)
        assert close.code == 1013
        assert close.reason == "max_connections (1) are all taken; try again later"
        assert daemon.ingest.refused_busy == 1


# --- idle websockets -----------------------------------------------------------------------


async def test_idle_websockets_are_closed_and_their_slots_go_to_a_waiting_client(
    start: Starter,
) -> None:
    """Every established slot held by authenticated clients that send nothing: a new client
    waits for one, and gets it once they have been idle for idle_timeout."""
    with trio.fail_after(LIMIT):
        daemon = await start(max_connections=2, idle_timeout=timedelta(seconds=0.5))
        async with (
            raw_client(daemon.port, ATTACKER) as first,
            raw_client(daemon.port, OTHER) as second,
        ):
            await event_is_acked(daemon)
            for stream, client in (first, second):
                close = await until_event(stream, client, CloseConnection)
                assert (close.code, close.reason) == (1001, "no frame for 500ms (idle_timeout)")
        assert daemon.ingest.idle_closed == 2


async def test_a_pinging_client_is_not_idle(start: Starter, db_path: Path) -> None:
    """Prefect's client pings (keepalive, checkpoints) and sends nothing else for a while."""
    with trio.fail_after(LIMIT):
        daemon = await start(idle_timeout=timedelta(seconds=0.5))
        async with raw_client(daemon.port, OTHER) as (stream, client):
            for beat in range(12):  # 3 s in all: 6 idle timeouts
                await stream.send_all(client.send(Ping(payload=b"%d" % beat)))
                pong = await until_event(stream, client, Pong)
                assert pong.payload == b"%d" % beat
                await trio.sleep(0.25)
            event = event_dict()
            await stream.send_all(client.send(TextMessage(data=json.dumps(event))))
            ack = await until_event(stream, client, TextMessage)
            assert json.loads(ack.data) == {"type": "ack", "id": event["id"]}
            assert daemon.ingest.idle_closed == 0
            close = await until_event(stream, client, CloseConnection)  # once it stops
        assert close.code == 1001
        assert daemon.ingest.idle_closed == 1


async def test_a_client_waiting_for_its_acks_is_not_idle(start: Starter, db_path: Path) -> None:
    """The evaluator is stalled (the store, say) for longer than idle_timeout: the client
    owed acks is kept, and gets them."""
    engine = GatedEngine(Engine())
    event = event_dict()
    with trio.fail_after(LIMIT):
        daemon = await start(engine=engine, idle_timeout=timedelta(seconds=0.3))
        try:
            async with raw_client(daemon.port, OTHER) as (stream, client):
                await stream.send_all(client.send(TextMessage(data=json.dumps(event))))
                await trio.to_thread.run_sync(engine.entered.wait)
                await trio.sleep(1.0)  # three idle timeouts
                engine.gate.set()
                ack = await until_event(stream, client, TextMessage)
                assert json.loads(ack.data) == {"type": "ack", "id": event["id"]}
        finally:
            engine.gate.set()
        assert daemon.ingest.idle_closed == 0


def test_the_defaults_leave_room_for_a_normal_site() -> None:
    server = ServerConfig()
    assert (server.max_connections, server.max_pending_handshakes) == (64, 16)
    assert server.max_connections_per_peer == 16
    assert server.idle_timeout == timedelta(minutes=5)  # Prefect's client pings every 20 s
