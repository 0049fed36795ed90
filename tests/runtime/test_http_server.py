"""Plain HTTP on the listen port, against ingest and the evaluator running in-process on
127.0.0.1 over a real SQLite file: httpx for the routes, raw sockets for malformed and slow
requests, each beside a websocket client that must not notice.

Clients that must look like another host bind 127.0.0.2 (all of 127.0.0.0/8 is loopback on
Linux), as in ``test_connection_limits``. Every test runs under a hard ``trio.fail_after``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import WebSocketConnection

from daemon.engine.engine import Engine
from daemon.runtime.http_routes import VERSION
from daemon.wire.handshake import ACKS_SUBPROTOCOL
from tests.support.evaluator_doubles import GatedEngine, stored_ids
from tests.support.ingest_client import (
    Daemon,
    Starter,
    authenticate,
    connect,
    event_dict,
    replies,
)

LIMIT = 10  # seconds: the hard bound on every test here
ATTACKER = "127.0.0.2"


@asynccontextmanager
async def client(daemon: Daemon) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=daemon.http_url(""), timeout=5) as http:
        yield http


@asynccontextmanager
async def websocket(daemon: Daemon, token: str | None = None) -> AsyncIterator[WebSocketConnection]:
    async with connect(daemon.url(), subprotocols=[ACKS_SUBPROTOCOL]) as ws:
        await authenticate(ws, token)
        yield ws


async def acked(ws: WebSocketConnection) -> None:
    """The websocket still takes an event and acknowledges it."""
    event = event_dict()
    await ws.send_message(json.dumps(event))
    assert await replies(ws, 1) == [{"type": "ack", "id": event["id"]}]


async def raw(daemon: Daemon, data: bytes, local: str = "127.0.0.1") -> bytes:
    """Send ``data`` on a fresh socket, then read until the server closes it."""
    stream = await trio.open_tcp_stream("127.0.0.1", daemon.port, local_address=local)
    async with stream:
        await stream.send_all(data)
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
        return answer


def status_and_body(answer: bytes) -> tuple[int, object]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


# --- routes -------------------------------------------------------------------------------


async def test_health_version_and_errors_answer_json_on_one_keep_alive_connection(
    start: Starter,
) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start()
        async with client(daemon) as http:
            health = await http.get("/api/health")
            assert (health.status_code, health.json()) == (200, True)
            assert health.headers["content-type"] == "application/json"
            version = await http.get("/api/admin/version")
            assert (version.status_code, version.json()) == (200, VERSION)
            missing = await http.get("/api/nothing")
            assert (missing.status_code, missing.json()) == (
                404,
                {"detail": "no route '/api/nothing'"},
            )
            wrong = await http.delete("/api/health")
            assert wrong.status_code == 405
            assert wrong.headers["allow"] == "GET"
            assert wrong.json() == {"detail": "DELETE is not allowed on /api/health"}
        assert daemon.ingest.connections_total == 1  # all four on one connection
        while daemon.ingest.handshakes:  # noqa: ASYNC110  its slot is released as it closes
            await trio.sleep(0.01)


async def test_with_auth_token_every_route_but_health_ready_and_metrics_needs_it(
    start: Starter,
) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(auth_token="s3cret")
        async with client(daemon) as http:
            for path in ("/api/health", "/api/ready", "/metrics"):
                assert (await http.get(path)).status_code == 200, path
            refused = await http.get("/api/admin/version")
            assert refused.status_code == 401
            assert refused.json() == {"detail": "missing or invalid bearer token"}
            assert "s3cret" not in refused.text
            posted = await http.post("/api/events", json=[event_dict()])
            assert posted.status_code == 401
            bearer = {"Authorization": "Bearer s3cret"}
            assert (await http.get("/api/admin/version", headers=bearer)).status_code == 200
            event = event_dict()
            posted = await http.post("/api/events", json=[event], headers=bearer)
            assert posted.status_code == 204
        assert event["id"] in stored_ids(daemon.db_path)


async def test_post_events_answers_204_once_they_are_committed(start: Starter) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start()
        events = [event_dict() for _ in range(3)]
        async with client(daemon) as http:
            posted = await http.post("/api/events", json=events)
            assert posted.status_code == 204
            assert posted.content == b""
            # committed when the reply came: the store has them, before any other wait
            assert {e["id"] for e in events} <= stored_ids(daemon.db_path)
            again = await http.post("/api/events", json=events[:1])  # a duplicate: a no-op
            assert again.status_code == 204
            assert (await http.post("/api/events", json=[])).status_code == 204
        assert daemon.evaluator.duplicates == 1
        assert daemon.ingest.events == 4


async def test_one_invalid_event_is_422_naming_it_and_nothing_is_committed(
    start: Starter,
) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start()
        good = [event_dict(), event_dict()]
        bad = event_dict(resource={"site": "north"})  # no prefect.resource.id
        async with client(daemon) as http:
            refused = await http.post("/api/events", json=[*good, bad])
            assert refused.status_code == 422
            assert refused.json()["detail"].startswith("event [2]: resource")
            async with websocket(daemon) as ws:
                await acked(ws)  # a later commit: anything sent before it would be in
        assert not {e["id"] for e in good} & stored_ids(daemon.db_path)
        assert daemon.evaluator.events == 1


async def test_a_body_over_max_request_bytes_is_413_before_it_is_read(start: Starter) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(max_request_bytes=1_000)
        events = [event_dict(payload={"x": "y" * 600}), event_dict()]
        async with client(daemon) as http:
            refused = await http.post("/api/events", json=events)
            assert refused.status_code == 413
            assert refused.json() == {
                "detail": "the request body is larger than 1000 bytes (max_request_bytes)"
            }
            assert refused.headers["connection"] == "close"
        # chunked, without a Content-Length: counted as it comes
        chunked = (
            b"POST /api/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4b0\r\n" + b"[" * 1200 + b"\r\n0\r\n\r\n"
        )
        status, _ = status_and_body(await raw(daemon, chunked))
        assert status == 413
        assert stored_ids(daemon.db_path) == set()


async def test_post_events_not_committed_within_request_timeout_is_503_and_commits_later(
    start: Starter,
) -> None:
    """The store holds the batch (a gated engine): the client is told to retry rather
    than kept waiting, and the events are still committed once the store goes on."""
    with trio.fail_after(LIMIT):
        engine = GatedEngine(Engine())
        daemon = await start(engine=engine, request_timeout=timedelta(seconds=0.3))
        event = event_dict()
        try:
            async with client(daemon) as http:
                refused = await http.post("/api/events", json=[event])
                assert refused.status_code == 503
                assert refused.json() == {
                    "detail": "no answer within 0.3s (request_timeout); try again"
                }
        finally:
            engine.gate.set()
        async with websocket(daemon) as ws:
            await acked(ws)  # committed after the one that waited
        assert event["id"] in stored_ids(daemon.db_path)


async def test_expect_100_continue_is_answered_before_the_body(start: Starter) -> None:
    """curl sends ``Expect: 100-continue`` before a body over 1 KiB and waits for it."""
    with trio.fail_after(LIMIT):
        daemon = await start()
        event = json.dumps([event_dict()]).encode()
        stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
        async with stream:
            head = (
                b"POST /api/events HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(event)
            )
            await stream.send_all(head)
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 100 ")
            await stream.send_all(event)
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 204 ")


async def test_ready_is_503_with_the_reasons_any_source_reports(start: Starter) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start()
        trouble: list[str] = []
        daemon.http.readiness.add("store", lambda: trouble)
        async with client(daemon) as http:
            ready = await http.get("/api/ready")
            assert (ready.status_code, ready.json()) == (200, {"ready": True, "reasons": []})
            trouble.append("not connected")
            refused = await http.get("/api/ready")
            assert refused.status_code == 503
            assert refused.json() == {
                "detail": "not ready: store: not connected",
                "reasons": ["store: not connected"],
            }


async def test_a_handler_s_bug_is_a_500_for_that_request_only(
    start: Starter, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> list[str]:
        raise KeyError("a bug")

    with trio.fail_after(LIMIT):
        daemon = await start()
        daemon.http.readiness.add("store", broken)
        async with client(daemon) as http:
            failed = await http.get("/api/ready")
            assert (failed.status_code, failed.json()) == (
                500,
                {"detail": "internal error (logged)"},
            )
            assert "KeyError" not in failed.text
            assert (await http.get("/api/health")).json() is True
        async with websocket(daemon) as ws:  # the websocket side serves on
            await acked(ws)
    assert "GET /api/ready failed" in caplog.text
    assert "KeyError: 'a bug'" in caplog.text


async def test_a_source_that_is_not_failing_is_reported_while_ready(start: Starter) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start()
        away, trouble = ["forward not connected"], list[str]()
        daemon.http.readiness.add("upstream", lambda: away, failing=False)
        daemon.http.readiness.add("store", lambda: trouble)
        async with client(daemon) as http:
            ready = await http.get("/api/ready")
            assert (ready.status_code, ready.json()) == (
                200,
                {"ready": True, "reasons": ["upstream: forward not connected"]},
            )
            trouble.append("disk full")
            refused = await http.get("/api/ready")
            assert refused.status_code == 503
            assert refused.json()["reasons"] == [
                "store: disk full",
                "upstream: forward not connected",
            ]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_are_live_and_move_after_events(start: Starter) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(max_event_bytes=2_000)
        async with client(daemon) as http:
            before = samples((await http.get("/metrics")).text)
            assert before[("trigd_events_received_total", ())] == 0
            async with websocket(daemon) as ws:
                await acked(ws)
                await acked(ws)
                during = samples((await http.get("/metrics")).text)
                assert during[("trigd_connections", ())] == 1
            assert (await http.post("/api/events", json=[event_dict()])).status_code == 204
            assert (await http.post("/api/events", json=[{"id": 1}])).status_code == 422
            big = [event_dict(payload={"x": "y" * 3_000})]
            assert (await http.post("/api/events", json=big)).status_code == 422
            async with websocket(daemon) as ws:
                await ws.send_message(b"binary")
                assert (await replies(ws, 1))[0]["type"] == "nack"
            after = await http.get("/metrics")
            assert after.headers["content-type"].startswith("text/plain; version=0.0.4")
            values = samples(after.text)
        assert values[("trigd_events_received_total", ())] == 3
        for reason in ("invalid", "too_large", "binary"):
            assert values[("trigd_events_rejected_total", (("reason", reason),))] == 1, reason
        assert values[("trigd_events_committed_total", ())] == 3
        assert values[("trigd_batch_events_count", ())] == daemon.evaluator.batches
        assert values[("trigd_batch_events_sum", ())] == 3
        assert values[("trigd_commit_seconds_count", ())] == daemon.evaluator.batches
        assert values[("trigd_open_buckets", ())] == 0
        assert values[("trigd_outbox_rows", (("status", "pending"),))] == 0
        assert values[("trigd_http_requests_total", (("code", "200"),))] == 2
        assert values[("trigd_http_requests_total", (("code", "204"),))] == 1


# --- malformed and slow requests ---------------------------------------------------------


async def test_malformed_requests_get_a_json_error_and_a_websocket_beside_them_goes_on(
    start: Starter,
) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(max_request_head_bytes=1_024)
        async with websocket(daemon) as ws:
            status, body = status_and_body(await raw(daemon, b"GARBAGE\r\n\r\n"))
            assert status == 400
            assert body["detail"].startswith("malformed HTTP request")  # type: ignore[index]
            await acked(ws)
            huge = b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4_000 + b"\r\n\r\n"
            status, body = status_and_body(await raw(daemon, huge))
            assert (status, body) == (431, {"detail": "request head larger than 1024 bytes"})
            await acked(ws)
            no_host = b"GET /api/health HTTP/1.1\r\n\r\n"  # HTTP/1.1 requires Host
            assert status_and_body(await raw(daemon, no_host))[0] == 400
            await acked(ws)


async def test_a_slow_body_is_cut_off_after_request_timeout_with_408(start: Starter) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(request_timeout=timedelta(seconds=0.3))
        stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
        async with stream:
            await stream.send_all(
                b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n["
            )
            answer = await stream.receive_some(4096)
            assert answer.startswith(b"HTTP/1.1 408 ")
            assert await stream.receive_some(4096) == b""  # and closed


async def test_an_idle_keep_alive_connection_is_closed_after_keepalive_timeout(
    start: Starter,
) -> None:
    with trio.fail_after(LIMIT):
        daemon = await start(keepalive_timeout=timedelta(seconds=0.3))
        stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
        async with stream:
            await stream.send_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await stream.receive_some(4096)).endswith(b"\r\n\r\ntrue")
            assert await stream.receive_some(4096) == b""  # closed, not waited on forever
        while daemon.ingest.handshakes:  # noqa: ASYNC110  its slot is released
            await trio.sleep(0.01)


@pytest.mark.parametrize("kind", ["slow head", "slow body", "idle keep-alive"])
async def test_a_flood_of_slow_http_clients_does_not_lock_out_websocket_clients(
    start: Starter, kind: str
) -> None:
    """Held past the test (every timeout 60 s): plain HTTP sockets take pending slots as
    handshakes do, so the flood from one host fills the pending pool, and a websocket
    client from another still gets in (taking the oldest flood socket's slot)."""
    with trio.fail_after(LIMIT):
        long = timedelta(seconds=60)
        daemon = await start(
            handshake_timeout=long,
            request_timeout=long,
            keepalive_timeout=long,
            max_connections_per_peer=64,
        )
        flood = []
        for _ in range(64):
            stream = await trio.open_tcp_stream("127.0.0.1", daemon.port, local_address=ATTACKER)
            if kind == "slow head":
                await stream.send_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n")
            elif kind == "slow body":
                await stream.send_all(
                    b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n["
                )
            else:
                await stream.send_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
            flood.append(stream)
        while daemon.ingest.connections_total < 64:  # noqa: ASYNC110
            await trio.sleep(0.01)
        async with websocket(daemon) as ws:
            await acked(ws)
        async with client(daemon) as http:  # and plain HTTP from another host too
            assert (await http.get("/api/health")).status_code == 200
        assert daemon.ingest.refused_busy > 0  # the flood was held to its share
        for stream in flood:
            await stream.aclose()
