"""Events out over real websockets on 127.0.0.1: ingest and the evaluator (real Engine)
in-process on a real SQLite file, subscribers on ``/api/events/out``: backfill then live
without gap or duplicate, Prefect's refusals, the slots, and a subscriber too slow to keep
up closed with 1013 while ingest goes on."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import AsyncGenerator
from datetime import datetime, timedelta
from typing import Any

import pytest
import trio
import trio.lowlevel
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from daemon.core.config import EventsOutConfig
from daemon.core.event_filter import EventFilter
from daemon.wire.handshake import ACKS_SUBPROTOCOL, PREFECT_SUBPROTOCOL
from tests.support.ingest_client import (
    Daemon,
    Starter,
    authenticate,
    connect,
    event_dict,
    handshake_status,
    until_event,
)

TOKEN = "valid-token"
LIMIT = 20  # seconds: the hard bound on every test here
OUT = EventsOutConfig()


def subscribe_message(flt: dict[str, Any] | None = None, backfill: bool = True) -> str:
    return json.dumps({"type": "filter", "filter": flt or {}, "backfill": backfill})


async def send_events(daemon: Daemon, events: list[dict[str, Any]]) -> None:
    """Send over trigd.v1 and wait for every ack: committed."""
    async with connect(daemon.url(), subprotocols=[ACKS_SUBPROTOCOL]) as ws:
        await authenticate(ws, TOKEN)

        async def pipe() -> None:
            for event in events:
                await ws.send_message(json.dumps(event))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipe)
            for _ in events:
                assert json.loads(await ws.get_message())["type"] == "ack"


async def close_reason(ws: WebSocketConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as closed:
        await ws.get_message()
    reason = closed.value.reason
    assert reason is not None
    return reason.code, reason.reason or ""


async def next_event(ws: WebSocketConnection) -> dict[str, Any]:
    message = json.loads(await ws.get_message())
    assert message["type"] == "event"
    event: dict[str, Any] = message["event"]
    return event


async def test_backfill_oldest_first_then_live_matching_events(start: Starter) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(auth_token=TOKEN, events_out=OUT)
        early = [
            event_dict(occurred=f"2026-11-23T09:5{i}:00Z", resource={"prefect.resource.id": "p"})
            for i in (3, 1, 2)
        ]
        await send_events(daemon, [*early, event_dict(event="valve.open")])
        async with connect(daemon.url("/api/events/out"), subprotocols=[PREFECT_SUBPROTOCOL]) as ws:
            await authenticate(ws, TOKEN)
            await ws.send_message(subscribe_message({"event": {"prefix": ["pump."]}}))
            backfill = [await next_event(ws) for _ in early]
            assert [e["occurred"] for e in backfill] == [
                "2026-11-23T09:51:00Z",
                "2026-11-23T09:52:00Z",
                "2026-11-23T09:53:00Z",
            ]
            assert backfill[0]["received"] == "2026-11-23T10:00:00Z"
            live = [event_dict(), event_dict(event="valve.closed"), event_dict()]
            await send_events(daemon, live)
            assert [(await next_event(ws))["id"] for _ in range(2)] == [
                live[0]["id"],
                live[2]["id"],
            ]
            with trio.move_on_after(0.3):  # nothing else comes: the valve was filtered out
                pytest.fail(f"unexpected {await ws.get_message()!r}")


async def test_no_backfill_when_the_subscriber_asks_for_none(start: Starter) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(events_out=OUT)
        await send_events(daemon, [event_dict()])
        async with connect(daemon.url("/api/events/out")) as ws:  # no token: legacy client
            await ws.send_message(subscribe_message(backfill=False))
            fresh = event_dict()
            await send_events(daemon, [fresh])
            assert (await next_event(ws))["id"] == fresh["id"]


async def test_backfill_is_bounded_by_window_and_count(start: Starter) -> None:
    out = EventsOutConfig(backfill=timedelta(minutes=5), backfill_max_events=2)
    with trio.fail_after(LIMIT):
        daemon = await start(events_out=out)  # the clock says 10:00
        times = ["09:50", "09:56", "09:57", "09:58"]
        await send_events(daemon, [event_dict(occurred=f"2026-11-23T{t}:00Z") for t in times])
        async with connect(daemon.url("/api/events/out")) as ws:
            await ws.send_message(subscribe_message())
            assert [(await next_event(ws))["occurred"] for _ in range(2)] == [
                "2026-11-23T09:57:00Z",
                "2026-11-23T09:58:00Z",
            ]
            fresh = event_dict()
            await send_events(daemon, [fresh])
            assert (await next_event(ws))["id"] == fresh["id"]  # live right after


async def test_a_backfill_of_several_pages_is_the_newest_oldest_first(start: Starter) -> None:
    out = EventsOutConfig(backfill_max_events=230)  # three pages of at most 100
    with trio.fail_after(LIMIT):
        daemon = await start(events_out=out)
        stored = [
            event_dict(occurred=f"2026-11-23T09:5{i % 10}:{i // 10:02d}Z") for i in range(250)
        ]
        await send_events(daemon, stored)
        async with connect(daemon.url("/api/events/out")) as ws:
            await ws.send_message(subscribe_message())
            got = [await next_event(ws) for _ in range(230)]
        newest = sorted(stored, key=lambda e: str(e["occurred"]))[20:]
        assert [e["id"] for e in got] == [e["id"] for e in newest]


async def test_events_committed_around_the_backfill_read_come_once_each(start: Starter) -> None:
    """The subscriber is on the hub before the backfill is read: an event committed just
    before the read is in both (sent once), one committed just after is live (no gap)."""
    with trio.fail_after(LIMIT):
        daemon = await start(events_out=OUT)
        assert daemon.events_out is not None
        stored = [event_dict()]
        before, after = [event_dict(), event_dict()], [event_dict()]
        await send_events(daemon, stored)
        read_backfill = daemon.events_out.backfill

        async def backfill_with_commits_around(
            flt: EventFilter, now: datetime
        ) -> AsyncGenerator[list[tuple[str, str]], None]:
            await send_events(daemon, before)
            pages = read_backfill(flt, now)
            async with contextlib.aclosing(pages):
                async for page in pages:  # the snapshot is taken: commit more
                    await send_events(daemon, after)
                    yield page

        daemon.events_out.backfill = backfill_with_commits_around
        async with connect(daemon.url("/api/events/out")) as ws:
            await ws.send_message(subscribe_message())
            got = [(await next_event(ws))["id"] for _ in range(4)]
            with trio.move_on_after(0.3):
                pytest.fail(f"unexpected {await ws.get_message()!r}")
        assert got == [e["id"] for e in [*stored, *before, *after]]


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ('{"type": "auth", "token": "x"}', "Expected 'filter' message"),
        ('{"type": "filter", "filter": {"text": {"query": "x"}}}', "Invalid filter: filter.text"),
    ],
)
async def test_a_first_message_that_is_no_filter_closes_1002(
    start: Starter, message: str, reason: str
) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(events_out=OUT)
        async with connect(daemon.url("/api/events/out")) as ws:
            await ws.send_message(message)
            code, text = await close_reason(ws)
            assert code == 1002
            assert text.startswith(reason)


async def test_a_wrong_token_closes_1008_as_on_events_in(start: Starter) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(auth_token=TOKEN, events_out=OUT)
        async with connect(daemon.url("/api/events/out"), subprotocols=[PREFECT_SUBPROTOCOL]) as ws:
            await ws.send_message('{"type":"auth","token":"wrong"}')
            assert await close_reason(ws) == (1008, "Invalid token")
        assert await handshake_status(daemon.port, "/api/events/out") == 403


async def test_subscribers_take_connection_slots(start: Starter) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(events_out=OUT, max_connections=1, handshake_timeout=0.5)
        async with connect(daemon.url("/api/events/out")) as ws:
            await ws.send_message(subscribe_message())
            with trio.fail_after(5):
                while daemon.ingest.connections != 1:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            assert await handshake_status(daemon.port, "/api/events/out") == 503


async def test_without_events_out_the_path_is_not_found(start: Starter) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start()
        assert await handshake_status(daemon.port, "/api/events/out") == 404


class SlowSubscriber:
    """A subscriber that reads nothing after its filter: a small receive buffer, wsproto
    by hand."""

    def __init__(self, stream: trio.SocketStream, client: WSConnection) -> None:
        self.stream, self.client = stream, client

    @classmethod
    async def open(cls, port: int) -> SlowSubscriber:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
        client = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(client.send(Request(host="127.0.0.1", target="/api/events/out")))
        await until_event(stream, client, AcceptConnection)
        await stream.send_all(client.send(TextMessage(subscribe_message(backfill=False))))
        return cls(stream, client)

    async def read_to_close(self) -> tuple[int, int, str]:
        """Read all that waits, at last: (events, close code, close reason)."""
        events = 0
        while True:
            for event in self.client.events():
                if isinstance(event, TextMessage):
                    events += 1
                elif isinstance(event, CloseConnection):
                    return events, event.code, event.reason or ""
            data = await self.stream.receive_some(65536)
            if not data:
                raise AssertionError(f"closed without a close frame after {events} events")
            self.client.receive_data(data)


async def test_a_subscriber_too_slow_is_closed_1013_and_ingest_never_waits(
    start: Starter,
) -> None:
    depth = 100
    out = EventsOutConfig(queue_depth=depth, send_timeout=timedelta(seconds=60))
    with trio.fail_after(LIMIT):
        daemon = await start(events_out=out, batch_max=10)
        assert daemon.events_out is not None
        slow = await SlowSubscriber.open(daemon.port)
        with trio.fail_after(5):
            while not daemon.events_out.hub:  # noqa: ASYNC110
                await trio.sleep(0.01)
        # more than the socket buffers between trigd and the slow one can hold
        flood = [event_dict(payload={"pad": "x" * 8000}) for _ in range(1000)]
        await send_events(daemon, flood)  # every ack comes: ingest never waited for it
        async with slow.stream:
            events, code, reason = await slow.read_to_close()
        assert code == 1013
        assert reason == f"too slow: more than {depth} events waiting (events_out.queue_depth)"
        assert events < len(flood)
        print(f"the slow subscriber got {events} events before its close")
        assert daemon.events_out.stats.slow_closed == 1
        assert len(daemon.events_out.hub) == 0
