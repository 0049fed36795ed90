"""The ingest task over real websockets on 127.0.0.1, committing into a real SQLite file.

Every test starts ingest and the evaluator (real Engine) with ``nursery.start`` on port 0
and runs under a hard ``trio.fail_after``. Commits are observed through a separate
read-only connection, the way ``trigd status`` sees the database.

Scenarios 110-115 are the handshake matrix; the rest is docs/PROTOCOL.md, #endpoint-and-paths to
#backpressure.
"""

from __future__ import annotations

import base64
import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    open_websocket_url,
)

from daemon.core.config import ServerConfig
from daemon.core.log_throttle import LogLimits
from daemon.engine.engine import Engine
from daemon.runtime.evaluator import run_evaluator
from daemon.runtime.gateway import StoreGateway
from daemon.runtime.ingest import run_ingest
from daemon.runtime.store_trouble import RETRY_FIRST_DELAY
from daemon.wire.handshake import ACKS_SUBPROTOCOL, PREFECT_SUBPROTOCOL
from daemon.wire.submission import Submission
from store.db import Store
from tests.support.evaluator_doubles import (
    NOW,
    GatedEngine,
    TroubledEngine,
    fixed_clock,
    stored_ids,
)
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

TOKEN = "valid-token"
LIMIT = 10  # seconds: the hard bound on every test here


def received_us(path: Path, event_id: str) -> int | None:
    reader = Store.open_readonly(path)
    try:
        row = reader.conn.execute(
            "SELECT received_us FROM events WHERE id = ?", (event_id,)
        ).fetchone()
    finally:
        reader.conn.close()
    return None if row is None else int(row[0])


async def close_reason(ws: WebSocketConnection) -> tuple[int, str | None]:
    with pytest.raises(ConnectionClosed) as caught:
        await ws.get_message()
    reason = caught.value.reason
    assert reason is not None
    return reason.code, reason.reason


# --- the handshake matrix (scenarios 110-115) ---------------------------------------------


async def test_110_invalid_token_closes_1008(start: Starter) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(auth_token=TOKEN)
        async with connect(daemon.url(), subprotocols=[PREFECT_SUBPROTOCOL]) as ws:
            assert ws.subprotocol == PREFECT_SUBPROTOCOL
            await ws.send_message('{"type":"auth","token":"invalid-token"}')
            assert await close_reason(ws) == (1008, "Invalid token")


async def test_a_refused_auth_message_is_logged_at_info_without_the_token(
    start: Starter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="daemon.runtime.ingest")
    with trio.fail_after(LIMIT):
        daemon = await start(auth_token=TOKEN, log_limits=LogLimits(burst=2, window=3600))
        for _ in range(4):
            async with connect(daemon.url(), subprotocols=[PREFECT_SUBPROTOCOL]) as ws:
                await ws.send_message('{"type":"auth","token":"wr0ng-t0ken"}')
                assert await close_reason(ws) == (1008, "Invalid token")
    refused = [r for r in caplog.records if r.getMessage().startswith("refused websocket")]
    assert [r.levelno for r in refused] == [logging.INFO] * 2  # rate limited
    assert refused[0].getMessage().endswith(": Invalid token")
    assert "127.0.0.1:" in refused[0].getMessage()
    assert "wr0ng" not in caplog.text
    assert TOKEN not in caplog.text
    assert daemon.ingest.handshakes_refused == 4


@pytest.mark.parametrize("auth", ['{"type":"auth"}', '{"type":"auth","token":""}'])
async def test_111_missing_token_closes_1008(start: Starter, auth: str) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(auth_token=TOKEN)
        async with connect(daemon.url(), subprotocols=[PREFECT_SUBPROTOCOL]) as ws:
            await ws.send_message(auth)
            assert await close_reason(ws) == (1008, "Auth required but no token provided")


async def test_112_no_subprotocol_with_auth_is_refused_before_accepting(start: Starter) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(auth_token=TOKEN)
        assert await handshake_status(daemon.port) == 403
        assert daemon.ingest.handshakes_refused == 1
        assert await handshake_status(daemon.port, subprotocols=["prefect"]) == 101


async def test_113_legacy_client_sends_events_straight_away(start: Starter, db_path: Path) -> None:
    event = event_dict()
    with trio.fail_after(LIMIT):
        daemon = await start()
        async with connect(daemon.url("/events/in")) as ws:
            assert ws.subprotocol is None
            await ws.send_message(json.dumps(event))
            await ws.ping(b"checkpoint")  # pong means committed
            assert received_us(db_path, event["id"]) == int(NOW.timestamp() * 1_000_000)


async def test_lines_a_client_causes_are_rate_limited(
    start: Starter, caplog: pytest.LogCaptureFixture
) -> None:
    """Bad frames and refused upgrades are one log line each, at most `burst` of a kind
    per window: a client sending nothing else cannot flood the journal."""
    caplog.set_level(logging.INFO, logger="daemon.runtime.ingest")
    with trio.fail_after(LIMIT):
        daemon = await start(log_limits=LogLimits(burst=2, window=3600))
        async with connect(daemon.url("/events/in")) as ws:  # legacy: no nacks, only logs
            for _ in range(10):
                await ws.send_message("not json")
            await ws.ping(b"checkpoint")  # every frame before it dealt with
        for _ in range(5):
            assert await handshake_status(daemon.port, "/not/events") == 404
    messages = caplog.messages
    assert sum(m.startswith("bad frame from") for m in messages) == 2
    assert sum(m.startswith("refused websocket from") for m in messages) == 2
    assert daemon.ingest.rejected == 10  # counted all the same


NOT_AUTH: list[str | bytes] = [
    '{"type":"event"}',
    "[]",
    "not json",
    '{"token":"x"}',
    "[" * 1000,  # 1 KB nested past the recursion limit of Python's json
    '{"a":' * 1000,
    '{"type":"auth"' + "," + '"x":' + "[" * 1000 + "]" * 1000 + "}",
    b'{"type":"auth"}',  # Prefect reads the auth message as text only
]


@pytest.mark.parametrize("token", ["", TOKEN])
@pytest.mark.parametrize("first", NOT_AUTH, ids=[repr(f[:16]) + f"...{len(f)}" for f in NOT_AUTH])
async def test_114_first_frame_not_auth_closes_1008(
    start: Starter, token: str, first: str | bytes
) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(auth_token=token)
        async with connect(daemon.url(), subprotocols=[PREFECT_SUBPROTOCOL]) as ws:
            await ws.send_message(first)
            assert await close_reason(ws) == (1008, "Expected 'auth' message")
        async with connect(daemon.url(), subprotocols=[PREFECT_SUBPROTOCOL]) as ws:
            await authenticate(ws, token)  # the daemon still serves


@pytest.mark.parametrize(("configured", "offered"), [("", None), ("", "anything"), (TOKEN, TOKEN)])
async def test_115_auth_success_then_events_are_received(
    start: Starter, db_path: Path, configured: str, offered: str | None
) -> None:
    events = [event_dict(), event_dict()]
    with trio.fail_after(LIMIT):
        daemon = await start(auth_token=configured)
        async with connect(daemon.url(), subprotocols=[PREFECT_SUBPROTOCOL]) as ws:
            await ws.ping(b"connected?")  # Prefect's client pings before authenticating
            await authenticate(ws, offered)
            for event in events:
                await ws.send_message(json.dumps(event))
            await ws.ping(b"checkpoint")
        assert stored_ids(db_path) == {e["id"] for e in events}
        assert daemon.ingest.events == 2


async def test_unknown_path_is_refused(start: Starter) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start()
        assert await handshake_status(daemon.port, "/api/events/out") == 404
        assert await handshake_status(daemon.port, "/api/events/in?x=1") == 101


@pytest.mark.parametrize(
    "header",
    [f"Bearer {TOKEN}", f"bearer {TOKEN}", "Basic " + base64.b64encode(TOKEN.encode()).decode()],
)
async def test_authorization_header_admits_a_legacy_client(
    start: Starter, db_path: Path, header: str
) -> None:
    event = event_dict()
    with trio.fail_after(LIMIT):
        daemon = await start(auth_token=TOKEN)
        headers = [(b"Authorization", header.encode())]
        async with connect(daemon.url(), extra_headers=headers) as ws:
            await ws.send_message(json.dumps(event))
            await ws.ping(b"checkpoint")
        assert stored_ids(db_path) == {event["id"]}


async def test_authorization_header_with_a_wrong_token_is_refused(start: Starter) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(auth_token=TOKEN)
        headers = [(b"Authorization", b"Bearer nope")]
        assert await handshake_status(daemon.port, headers=headers) == 403
        headers = [(b"Authorization", b"Basic !!not base64!!")]
        assert await handshake_status(daemon.port, headers=headers) == 403


async def test_bearer_header_makes_the_auth_message_token_unnecessary(start: Starter) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(auth_token=TOKEN)
        headers = [(b"Authorization", f"Bearer {TOKEN}".encode())]
        async with open_websocket_url(
            daemon.url(), subprotocols=[ACKS_SUBPROTOCOL], extra_headers=headers
        ) as ws:
            await authenticate(ws, None)


async def test_auth_must_arrive_within_the_handshake_timeout(start: Starter) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(auth_token=TOKEN, handshake_timeout=timedelta(seconds=0.2))
        async with connect(daemon.url(), subprotocols=[PREFECT_SUBPROTOCOL]) as ws:
            assert await close_reason(ws) == (1008, "Expected 'auth' message")


# --- trigd.v1: acks after commit, nacks for bad input -------------------------------------


async def test_acks_arrive_after_the_event_is_committed(start: Starter, db_path: Path) -> None:
    events = [event_dict() for _ in range(20)]
    with trio.fail_after(LIMIT):
        daemon = await start(auth_token=TOKEN)
        async with connect(daemon.url(), subprotocols=[ACKS_SUBPROTOCOL]) as ws:
            assert ws.subprotocol == ACKS_SUBPROTOCOL
            await authenticate(ws, TOKEN)
            for event in events:
                await ws.send_message(json.dumps(event))
            for event in events:
                reply = json.loads(await ws.get_message())
                assert reply == {"type": "ack", "id": event["id"]}
                assert received_us(db_path, event["id"]) is not None


async def test_v1_is_preferred_when_both_subprotocols_are_offered(start: Starter) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start()
        async with open_websocket_url(
            daemon.url(), subprotocols=[PREFECT_SUBPROTOCOL, ACKS_SUBPROTOCOL]
        ) as ws:
            assert ws.subprotocol == ACKS_SUBPROTOCOL


def _no_resource_id() -> str:
    return json.dumps(event_dict(resource={"site": "north"}))


def _in_payload(text: str) -> str:
    """An event whose payload's `bar` is ``text``, which need not be valid JSON."""
    return json.dumps(event_dict(payload={"bar": "@"})).replace('"@"', text)


# Scenarios 83, 84 and 86 (Prefect's message-bus guards) become: a frame without usable
# data, an object without the event's fields, and an unreadable id are each refused.
BAD_FRAMES: list[tuple[str, str | bytes, str]] = [
    ("not json", "{nope", "Invalid JSON"),
    ("i83 empty frame", "", "Invalid JSON"),
    ("json, not an event", "42", "Input should be an object"),
    ("i84 object, not an event", '{"hello": "world"}', "event: Field required"),
    ("i86 id not a uuid", json.dumps(event_dict(id="do you even UUID, bro?")), "id: "),
    ("missing resource id", _no_resource_id(), "resource: Resources must include"),
    ("related without role", json.dumps(event_dict(related=[{"prefect.resource.id": "x"}])), ""),
    ("follows itself", "", "follows"),
    ("binary frame", b'{"event": "x"}', "binary frames are not accepted"),
    ("oversize", json.dumps(event_dict(payload={"blob": "x" * 3000})), "max_event_bytes (2000)"),
    ("1 KB of [", "[" * 1000, "recursion limit exceeded"),
    ("4 KB of {", '{"":' * 1000, "event: 4000 bytes is more than max_event_bytes"),
    ("1 KB of [ in a payload", _in_payload("[" * 1000), "recursion limit exceeded"),
    ("payload deeper than max_json_depth", _in_payload("[" * 70 + "]" * 70), "(max_json_depth)"),
    ("empty array", "[]", "frame: an empty array carries no event"),
    ("NaN in a payload", _in_payload('{"x": NaN}'), "payload.bar.x: NaN and Infinity are not"),
    ("Infinity in an array", f"[{_in_payload('-Infinity')}]", "event [0]: payload.bar: NaN"),
    (
        "year 1",
        json.dumps(event_dict(occurred="0001-01-01T00:00:00Z")),
        "occurred: Input should be greater than or equal to 1970",
    ),
    (
        "year 9999",
        json.dumps(event_dict(occurred="9999-12-31T23:59:30Z")),
        "occurred: Input should be less than or equal to 8999",
    ),
]


@pytest.mark.parametrize(("kind", "frame", "says"), BAD_FRAMES, ids=[b[0] for b in BAD_FRAMES])
async def test_bad_input_gets_a_nack_and_the_connection_stays_open(
    start: Starter, db_path: Path, kind: str, frame: str | bytes, says: str
) -> None:
    if kind == "follows itself":
        same = str(uuid4())
        frame = json.dumps(event_dict(id=same, follows=same))
    if kind == "related without role":
        says = "related[0]: Related Resources must include the prefect.resource.role label"
    before, after = event_dict(), event_dict()
    with trio.fail_after(LIMIT):
        daemon = await start(max_event_bytes=2000)
        async with connect(daemon.url(), subprotocols=[ACKS_SUBPROTOCOL]) as ws:
            await authenticate(ws, None)
            await ws.send_message(json.dumps(before))
            await ws.send_message(frame)
            await ws.send_message(json.dumps(after))
            first, nack, last = await replies(ws, 3)
        assert first == {"type": "ack", "id": before["id"]}
        assert nack["type"] == "nack"
        assert says in nack["error"], nack
        assert last == {"type": "ack", "id": after["id"]}
        assert stored_ids(db_path) == {before["id"], after["id"]}
        assert daemon.ingest.rejected == 1


async def test_a_nack_names_the_event_id_when_it_is_readable(start: Starter) -> None:
    event = event_dict(resource={"site": "north"})
    with trio.fail_after(LIMIT):
        daemon = await start()
        async with connect(daemon.url(), subprotocols=[ACKS_SUBPROTOCOL]) as ws:
            await authenticate(ws, None)
            await ws.send_message(json.dumps(event))
            await ws.send_message("{nope")
            with_id, without = await replies(ws, 2)
        assert with_id["id"] == event["id"]
        assert without["id"] is None


async def test_invalid_utf8_closes_1007(start: Starter) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start()
        code = await send_raw_text_frame(daemon.port, b'{"event": "\xc3\x28"}')
        assert code == 1007
        async with connect(daemon.url()) as ws:  # the server is still up
            await ws.ping(b"alive")


CONTINUATIONS = {
    "final": bytes([0x80, 0x82]) + b"\0\0\0\0{}",
    "not final": bytes([0x00, 0x82]) + b"\0\0\0\0{}",
    "invalid utf-8": bytes([0x80, 0x82]) + b"\0\0\0\0\xc3\x28",
    "after an event": bytes([0x81, 0x82]) + b"\0\0\0\0{}" + bytes([0x80, 0x81, 0, 0, 0, 0, 0x7D]),
}


@pytest.mark.parametrize("auth", [True, False], ids=["after auth", "before auth"])
@pytest.mark.parametrize("wire", CONTINUATIONS.values(), ids=CONTINUATIONS.keys())
async def test_a_continuation_frame_with_nothing_to_continue_closes_1002(
    start: Starter, wire: bytes, auth: bool
) -> None:
    from wsproto.events import CloseConnection, TextMessage

    with trio.fail_after(LIMIT):
        daemon = await start()
        stream, client = await raw_upgrade(daemon.port, [ACKS_SUBPROTOCOL])
        async with stream:
            if auth:
                await stream.send_all(client.send(TextMessage(data='{"type":"auth"}')))
            await stream.send_all(wire)
            close = await until_event(stream, client, CloseConnection)
        assert close.code == 1002  # a protocol error, not a bad payload (1007)


async def test_a_frame_too_large_to_buffer_closes_1009(start: Starter, db_path: Path) -> None:
    event = event_dict()
    with trio.fail_after(LIMIT):
        daemon = await start(max_event_bytes=2000)
        async with connect(daemon.url(), subprotocols=[ACKS_SUBPROTOCOL]) as ws:
            await authenticate(ws, None)
            await ws.send_message(json.dumps(event))
            assert json.loads(await ws.get_message()) == {"type": "ack", "id": event["id"]}
            await ws.send_message("x" * 4001)
            code, _ = await close_reason(ws)
        assert code == 1009
        assert stored_ids(db_path) == {event["id"]}


async def test_frames_after_a_frame_too_large_to_buffer_are_dropped(start: Starter) -> None:
    """What a client sends after the server closed (until it sees the close) is not read:
    a second frame too large once was a second close, which wsproto refuses to send."""
    from wsproto.events import CloseConnection, Ping, TextMessage

    with trio.fail_after(LIMIT):
        daemon = await start(max_event_bytes=2000)
        stream, client = await raw_upgrade(daemon.port, [ACKS_SUBPROTOCOL])
        async with stream:
            wire = client.send(TextMessage(data='{"type":"auth"}'))
            wire += client.send(TextMessage(data="x" * 4001))
            wire += client.send(TextMessage(data="y" * 4001))  # in the same read
            wire += client.send(Ping(payload=b"after"))
            await stream.send_all(wire)
            close = await until_event(stream, client, CloseConnection)
        assert close.code == 1009
        async with connect(daemon.url()) as ws:  # the server is still up
            await ws.ping(b"alive")


async def test_duplicates_are_acked_and_stored_once(start: Starter, db_path: Path) -> None:
    event = event_dict()
    with trio.fail_after(LIMIT):
        daemon = await start()
        async with connect(daemon.url(), subprotocols=[ACKS_SUBPROTOCOL]) as ws:
            await authenticate(ws, None)
            await ws.send_message(json.dumps(event))
            assert json.loads(await ws.get_message()) == {"type": "ack", "id": event["id"]}
            await ws.send_message(json.dumps(event))
            assert json.loads(await ws.get_message()) == {"type": "ack", "id": event["id"]}
        assert stored_ids(db_path) == {event["id"]}
        assert daemon.evaluator.duplicates == 1


async def test_array_frames_carry_several_events(start: Starter, db_path: Path) -> None:
    good = [event_dict(), event_dict()]
    bad = event_dict(resource={})
    with trio.fail_after(LIMIT):
        daemon = await start()
        async with connect(daemon.url(), subprotocols=[ACKS_SUBPROTOCOL]) as ws:
            await authenticate(ws, None)
            await ws.send_message(json.dumps([good[0], bad, 7, good[1]]))
            first, nack, not_object, last = await replies(ws, 4)
        assert first == {"type": "ack", "id": good[0]["id"]}
        assert nack["id"] == bad["id"]
        assert nack["error"].startswith("event [1]: resource: ")
        assert not_object == {
            "type": "nack",
            "id": None,
            "error": "event [2]: an event must be a JSON object",
        }
        assert last == {"type": "ack", "id": good[1]["id"]}
        assert stored_ids(db_path) == {e["id"] for e in good}


async def test_oversize_events_inside_an_array_are_refused_alone(
    start: Starter, db_path: Path
) -> None:
    small = event_dict()
    big = event_dict(payload={"blob": "y" * 2500})
    with trio.fail_after(LIMIT):
        daemon = await start(max_event_bytes=2000)
        async with connect(daemon.url(), subprotocols=[ACKS_SUBPROTOCOL]) as ws:
            await authenticate(ws, None)
            await ws.send_message(json.dumps([small, big]))
            ack, nack = await replies(ws, 2)
        assert ack == {"type": "ack", "id": small["id"]}
        assert nack["id"] == big["id"]
        assert "more than max_event_bytes (2000)" in nack["error"]


# --- checkpoints: pong after commit -------------------------------------------------------


async def test_pong_waits_until_earlier_events_are_committed(
    start: Starter, db_path: Path, store: Store
) -> None:
    engine = GatedEngine(Engine())
    events = [event_dict() for _ in range(3)]
    ponged = trio.Event()
    committed_at_pong: list[set[str]] = []
    with trio.fail_after(LIMIT):
        daemon = await start(engine=engine)
        async with connect(daemon.url(), subprotocols=[PREFECT_SUBPROTOCOL]) as ws:
            await authenticate(ws, None)
            for event in events:
                await ws.send_message(json.dumps(event))
            await trio.to_thread.run_sync(engine.entered.wait)  # a batch is in the store

            async def checkpoint() -> None:
                await ws.ping(b"checkpoint")
                committed_at_pong.append(stored_ids(db_path))
                ponged.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(checkpoint)
                await trio.testing.wait_all_tasks_blocked()
                assert daemon.ingest.pings == 1  # the server has the ping ...
                assert not ponged.is_set()  # ... and holds the pong
                assert stored_ids(db_path) == set()
                engine.gate.set()
        assert committed_at_pong == [{e["id"] for e in events}]


async def test_pong_is_immediate_when_nothing_is_pending(start: Starter) -> None:
    engine = GatedEngine(Engine())  # never opened: nothing may need the store
    with trio.fail_after(LIMIT):
        daemon = await start(engine=engine)
        async with connect(daemon.url(), subprotocols=[PREFECT_SUBPROTOCOL]) as ws:
            await ws.ping(b"before auth")
            await authenticate(ws, None)
            await ws.ping(b"after auth")
            await ws.send_message("{nope")  # refused: nothing to commit
            await ws.ping(b"after a bad frame")
        assert engine.batches == []


# --- robustness and bounds ----------------------------------------------------------------


def _bad_frame(index: int) -> str:
    return ["{nope", "[1, 2", "42", _no_resource_id(), '{"event": null}'][index % 5]


async def test_a_flood_of_bad_frames_does_not_disturb_good_ones(
    start: Starter, db_path: Path
) -> None:
    frames_per_client = 120
    good: list[str] = []

    async def acks_client() -> None:
        async with connect(daemon.url(), subprotocols=[ACKS_SUBPROTOCOL]) as ws:
            await authenticate(ws, TOKEN)
            expected: list[str | None] = []
            for index in range(frames_per_client):
                if index % 2:
                    await ws.send_message(_bad_frame(index))
                    expected.append(None)
                else:
                    event = event_dict()
                    good.append(event["id"])
                    await ws.send_message(json.dumps(event))
                    expected.append(event["id"])
            got = await replies(ws, frames_per_client)
            assert [r["id"] if r["type"] == "ack" else None for r in got] == expected

    async def prefect_client() -> None:
        async with connect(daemon.url(), subprotocols=[PREFECT_SUBPROTOCOL]) as ws:
            await authenticate(ws, TOKEN)
            for index in range(frames_per_client):
                if index % 3:
                    await ws.send_message(_bad_frame(index))
                else:
                    event = event_dict()
                    good.append(event["id"])
                    await ws.send_message(json.dumps(event))
            await ws.ping(b"checkpoint")

    with trio.fail_after(LIMIT):
        daemon = await start(auth_token=TOKEN, batch_max=16)
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(acks_client)
            nursery.start_soon(prefect_client)
        assert stored_ids(db_path) == set(good)
        assert daemon.ingest.rejected == 3 * 60 + 80
        async with connect(daemon.url(), subprotocols=[ACKS_SUBPROTOCOL]) as ws:
            await authenticate(ws, TOKEN)  # still serving


async def test_a_stalled_evaluator_stops_the_reading_of_sockets(
    start: Starter, db_path: Path
) -> None:
    engine = GatedEngine(Engine())
    queue, batch_max, total = 8, 4, 3000
    filler = "z" * 4000  # 12 MB in all: far more than the socket buffers hold
    events = [event_dict(payload={"filler": filler}) for _ in range(total)]
    sent = 0
    with trio.fail_after(3 * LIMIT):
        daemon = await start(engine=engine, queue=queue, batch_max=batch_max)
        async with connect(daemon.url(), subprotocols=[ACKS_SUBPROTOCOL]) as ws:
            await authenticate(ws, None)

            async def send_all() -> None:
                nonlocal sent
                for event in events:
                    await ws.send_message(json.dumps(event))
                    sent += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all)
                await trio.to_thread.run_sync(engine.entered.wait)
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                buffered = daemon.submit.statistics().current_buffer_used
                taken = daemon.ingest.events
                assert buffered <= queue
                # the queue, the batch in the store thread, one reader blocked in send()
                assert taken <= queue + batch_max + 1
                assert sent < total  # the client is blocked: nobody reads its socket
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                assert daemon.ingest.events == taken  # still stopped
                engine.gate.set()
            acks = await replies(ws, total)
        assert [a["id"] for a in acks] == [e["id"] for e in events]
        assert len(stored_ids(db_path)) == total


async def test_connections_beyond_the_limit_wait_for_a_slot(start: Starter) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(max_connections=2)
        connected: list[int] = []

        async def third() -> None:
            async with connect(daemon.url()) as ws:
                connected.append(3)
                await ws.ping(b"hello")

        async with connect(daemon.url()) as one, connect(daemon.url()) as two:
            await two.ping(b"hi")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(third)
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                assert connected == []
                assert daemon.ingest.connections == 2
                await one.aclose()
        assert connected == [3]


# --- a raw client, for what trio-websocket will not send ----------------------------------


async def send_raw_text_frame(port: int, payload: bytes) -> int:
    """Open a websocket by hand, send one (masked) text frame of raw bytes, and return
    the close code the server answers with."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Request

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        client = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(client.send(Request(host="127.0.0.1", target="/api/events/in")))
        await until_event(stream, client, AcceptConnection)
        assert len(payload) < 126
        mask = b"\x00\x00\x00\x00"  # masked with zeros: the payload goes as is
        await stream.send_all(bytes([0x81, 0x80 | len(payload)]) + mask + payload)
        close = await until_event(stream, client, CloseConnection)
        assert isinstance(close, CloseConnection)
        return close.code


# --- several frames in one chunk --------------------------------------------------------


async def raw_upgrade(port: int, subprotocols: list[str]) -> tuple[trio.SocketStream, Any]:
    """A websocket opened by hand: the stream and the wsproto client, after the upgrade."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    client = WSConnection(ConnectionType.CLIENT)
    request = Request(host="127.0.0.1", target="/api/events/in", subprotocols=subprotocols)
    await stream.send_all(client.send(request))
    await until_event(stream, client, AcceptConnection)
    return stream, client


async def raw_replies(stream: trio.SocketStream, client: Any, count: int) -> list[object]:
    """The next ``count`` text messages (parsed) and pongs (as ``("pong", payload)``)."""
    from wsproto.events import Pong, TextMessage

    out: list[object] = []
    while len(out) < count:
        event = await until_event(stream, client, (TextMessage, Pong))
        if isinstance(event, Pong):
            out.append(("pong", bytes(event.payload)))
        else:
            out.append(json.loads(event.data))
    return out


async def test_auth_events_and_a_ping_in_one_write(start: Starter, db_path: Path) -> None:
    from wsproto.events import Ping, TextMessage

    events = [event_dict() for _ in range(3)]
    with trio.fail_after(LIMIT):
        daemon = await start(auth_token=TOKEN)
        stream, client = await raw_upgrade(daemon.port, [ACKS_SUBPROTOCOL])
        async with stream:
            wire = client.send(TextMessage(data=json.dumps({"type": "auth", "token": TOKEN})))
            for event in events:
                wire += client.send(TextMessage(data=json.dumps(event)))
            wire += client.send(Ping(payload=b"checkpoint"))
            await stream.send_all(wire)
            got = await raw_replies(stream, client, 5)
        assert got == [
            {"type": "auth_success"},
            *({"type": "ack", "id": e["id"]} for e in events),
            ("pong", b"checkpoint"),
        ]
        assert stored_ids(db_path) == {e["id"] for e in events}


@pytest.mark.parametrize("bad", ["invalid utf-8", "too large to buffer"])
async def test_events_before_a_frame_that_closes_the_connection_are_acked_first(
    start: Starter, db_path: Path, bad: str
) -> None:
    from wsproto.events import CloseConnection, TextMessage

    events = [event_dict() for _ in range(3)]
    with trio.fail_after(LIMIT):
        daemon = await start(max_event_bytes=2000)
        stream, client = await raw_upgrade(daemon.port, [ACKS_SUBPROTOCOL])
        async with stream:
            wire = client.send(TextMessage(data=json.dumps({"type": "auth", "token": None})))
            for event in events:
                wire += client.send(TextMessage(data=json.dumps(event)))
            if bad == "invalid utf-8":
                payload = b'{"event": "\xc3\x28"}'  # masked with zeros: sent as is
                wire += bytes([0x81, 0x80 | len(payload)]) + b"\x00" * 4 + payload
            else:
                wire += client.send(TextMessage(data="x" * 4001))
            await stream.send_all(wire)  # one write: the bad frame is read with the rest
            got = await raw_replies(stream, client, 4)
            close = await until_event(stream, client, CloseConnection)
        assert got == [{"type": "auth_success"}, *({"type": "ack", "id": e["id"]} for e in events)]
        assert close.code == (1007 if bad == "invalid utf-8" else 1009)
        assert stored_ids(db_path) == {e["id"] for e in events}


async def test_a_fragmented_event_with_a_ping_inside_is_one_event(
    start: Starter, db_path: Path
) -> None:
    from wsproto.events import Ping, TextMessage

    event = event_dict()
    text = json.dumps(event)
    third = len(text) // 3
    with trio.fail_after(LIMIT):
        daemon = await start()
        stream, client = await raw_upgrade(daemon.port, [ACKS_SUBPROTOCOL])
        async with stream:
            await stream.send_all(client.send(TextMessage(data='{"type":"auth"}')))
            assert await raw_replies(stream, client, 1) == [{"type": "auth_success"}]
            wire = client.send(TextMessage(data=text[:third], message_finished=False))
            wire += client.send(Ping(payload=b"inside"))
            wire += client.send(TextMessage(data=text[third : 2 * third], message_finished=False))
            wire += client.send(TextMessage(data=text[2 * third :]))
            await stream.send_all(wire)
            # the pong waits for nothing (the event was not complete at the ping)
            got = await raw_replies(stream, client, 2)
        assert got == [("pong", b"inside"), {"type": "ack", "id": event["id"]}]
        assert stored_ids(db_path) == {event["id"]}


async def test_events_before_a_close_in_the_same_write_are_taken(
    start: Starter, db_path: Path
) -> None:
    from wsproto.events import CloseConnection, TextMessage

    events = [event_dict() for _ in range(3)]
    with trio.fail_after(LIMIT):
        daemon = await start()
        stream, client = await raw_upgrade(daemon.port, [])
        async with stream:
            wire = b"".join(client.send(TextMessage(data=json.dumps(e))) for e in events)
            await stream.send_all(wire + client.send(CloseConnection(code=1000)))
            await until_event(stream, client, CloseConnection)
        last = event_dict()  # batches commit in channel order: once this one is acked ...
        async with connect(daemon.url(), subprotocols=[ACKS_SUBPROTOCOL]) as ws:
            await authenticate(ws, None)
            await ws.send_message(json.dumps(last))
            assert await replies(ws, 1) == [{"type": "ack", "id": last["id"]}]
        assert stored_ids(db_path) == {e["id"] for e in [*events, last]}
        assert daemon.ingest.events == len(events) + 1


async def test_a_bad_frame_from_a_client_already_reset_is_logged_without_its_address(
    start: Starter, caplog: pytest.LogCaptureFixture
) -> None:
    """The log line naming the peer of a legacy client's bad frame is written after the
    client reset the connection, when the socket no longer has a peer address."""
    import socket
    import struct

    from wsproto.events import TextMessage

    with trio.fail_after(LIMIT):
        daemon = await start()
        stream, client = await raw_upgrade(daemon.port, [])
        # without a checkpoint between them, so the daemon reads after the reset
        with socket.socket(fileno=stream.socket.detach()) as raw:
            raw.sendall(client.send(TextMessage(data="{nope")))
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        async with connect(daemon.url()) as ws:
            await ws.ping(b"still serving")
        assert daemon.ingest.rejected == 1
        assert "bad frame from 127.0.0.1:" in caplog.text


async def test_a_client_gone_before_its_auth_message_is_not_counted_as_refused(
    start: Starter,
) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(auth_token=TOKEN)
        stream, _ = await raw_upgrade(daemon.port, [PREFECT_SUBPROTOCOL])
        await stream.aclose()
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert daemon.ingest.connections == 0
        assert daemon.ingest.handshakes_refused == 0


async def test_shutdown_closes_connections_with_going_away(store: Store) -> None:
    send, receive = trio.open_memory_channel[Submission](10)
    config = ServerConfig(listen="127.0.0.1:0")
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_evaluator(
                    StoreGateway(store),
                    Engine(),
                    receive,
                    clock=fixed_clock,
                    batch_max=10,
                    task_status=task_status,
                )
            )
            ingest_scope = trio.CancelScope()

            async def ingest(task_status: trio.TaskStatus[int]) -> None:
                with ingest_scope:
                    await run_ingest(config, send, task_status=task_status)

            port = await nursery.start(ingest)
            async with connect(f"ws://127.0.0.1:{port}/api/events/in") as ws:
                await ws.send_message(json.dumps(event_dict()))
                await ws.ping(b"committed")
                ingest_scope.cancel()
                assert await close_reason(ws) == (1001, "trigd is shutting down")
        # ingest closed its sender: the evaluator drained the channel and returned


# --- reads paced by the commit linger --------------------------------------------------


async def _trickle(
    daemon: Daemon, ws: WebSocketConnection, events: list[dict[str, Any]]
) -> list[int]:
    """Send ``events`` one write each, letting the daemon do all it can after each; how
    many events ingest had read after each write."""
    read = []
    for event in events:
        await ws.send_message(json.dumps(event))
        await trio.testing.wait_all_tasks_blocked()
        read.append(daemon.ingest.events)
    return read


@pytest.mark.parametrize("paced", [True, False])
async def test_frames_arriving_while_the_evaluator_lingers_are_read_together(
    start: Starter, db_path: Path, mock_clock: trio.testing.MockClock, paced: bool
) -> None:
    """A reader that handed over an event waits for the evaluator's window to close
    before reading again (even before the evaluator, woken by that event, has opened
    it): the frames sent meanwhile wait in the socket and are read in one go when it
    closes, in time to join that same batch and its commit. (Virtual time stands still
    until the test moves it.)"""
    events = [event_dict() for _ in range(4)]
    with trio.fail_after(LIMIT):
        daemon = await start(linger=timedelta(milliseconds=5), paced=paced)
        async with connect(daemon.url(), subprotocols=[ACKS_SUBPROTOCOL]) as ws:
            await authenticate(ws, None)
            read = await _trickle(daemon, ws, events)
            mock_clock.jump(0.005)
            acks = await replies(ws, 4)
        # the first event opens the window, and its reader holds
        assert read == ([1, 1, 1, 1] if paced else [1, 2, 3, 4])
        assert [a["id"] for a in acks] == [e["id"] for e in events]
        assert (daemon.evaluator.batches, daemon.evaluator.largest_batch) == (1, 4)
        assert stored_ids(db_path) == {e["id"] for e in events}


async def test_frames_arriving_during_a_commit_are_read_together_after_it(
    start: Starter, db_path: Path
) -> None:
    """What arrives while a batch is being committed can only join the next batch: the
    reader whose event is being committed holds off until the commit is over, then reads
    the rest in one go (no linger here, so nothing else holds it)."""
    engine = GatedEngine(Engine())
    events = [event_dict() for _ in range(4)]
    with trio.fail_after(LIMIT):
        daemon = await start(engine=engine, paced=True)
        async with connect(daemon.url(), subprotocols=[ACKS_SUBPROTOCOL]) as ws:
            await authenticate(ws, None)
            await ws.send_message(json.dumps(events[0]))
            await trio.to_thread.run_sync(engine.entered.wait)  # its batch is in the store
            read = await _trickle(daemon, ws, events[1:])
            engine.gate.set()
            acks = await replies(ws, 4)
        assert read == [1, 1, 1]
        assert [a["id"] for a in acks] == [e["id"] for e in events]
        assert daemon.evaluator.batches == 2
        assert stored_ids(db_path) == {e["id"] for e in events}


async def test_frames_are_read_at_once_while_the_evaluator_waits_out_store_trouble(
    start: Starter, db_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """While the store refuses a batch, the evaluator waits before it tries again: the
    readers do not wait for that next attempt, they read (up to their usual bounds)."""
    engine = TroubledEngine(Engine(), failures=1)
    events = [event_dict() for _ in range(4)]
    with trio.fail_after(LIMIT):
        daemon = await start(engine=engine, paced=True)
        async with connect(daemon.url(), subprotocols=[ACKS_SUBPROTOCOL]) as ws:
            await authenticate(ws, None)
            await ws.send_message(json.dumps(events[0]))
            while daemon.evaluator.store_retries == 0:  # until the store thread refused it
                await trio.lowlevel.checkpoint()
            read = await _trickle(daemon, ws, events[1:])  # during the backoff
            mock_clock.jump(RETRY_FIRST_DELAY)
            acks = await replies(ws, 4)
        assert read == [2, 3, 4]
        assert [a["id"] for a in acks] == [e["id"] for e in events]
        assert stored_ids(db_path) == {e["id"] for e in events}


async def test_a_client_waiting_for_no_ack_is_read_at_once_during_a_commit(
    start: Starter, db_path: Path
) -> None:
    """Only a reader whose client waits for acks holds off: one whose events are all
    answered (here it only pings) is read, and its pings answered, while another
    client's batch is being committed."""
    engine = GatedEngine(Engine())
    with trio.fail_after(LIMIT):
        daemon = await start(engine=engine, paced=True)
        async with (
            connect(daemon.url(), subprotocols=[ACKS_SUBPROTOCOL]) as busy,
            connect(daemon.url(), subprotocols=[ACKS_SUBPROTOCOL]) as pinging,
        ):
            await authenticate(busy, None)
            await authenticate(pinging, None)
            event = event_dict()
            await busy.send_message(json.dumps(event))
            await trio.to_thread.run_sync(engine.entered.wait)  # its batch is in the store
            ponged = []
            try:
                for payload in (b"one", b"two"):
                    await pinging.ping(payload)  # returns once the pong came
                    ponged.append(payload)
            finally:
                engine.gate.set()
            assert json.loads(await busy.get_message()) == {"type": "ack", "id": event["id"]}
        assert ponged == [b"one", b"two"]
        assert stored_ids(db_path) == {event["id"]}
