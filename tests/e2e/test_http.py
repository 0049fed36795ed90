"""HTTP on the daemon's one port, as an operator and a script use it: health, version,
readiness while the store refuses writes, Prometheus' scrape, events posted with plain
HTTP, and malformed requests beside a websocket client that must not notice.

The real daemon runs as a subprocess on 127.0.0.1; the clients are httpx, trio-websocket
and raw sockets, and Prefect's own client; /metrics is read with prometheus-client's parser.
"""

from __future__ import annotations

import json
import ssl
import textwrap
from pathlib import Path
from uuid import uuid4

import apsw
import httpx
import trio
import trustme
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from daemon.runtime.http_routes import VERSION
from tests.support.daemon_process import (
    burst_automation,
    running_daemon,
    write_automations,
    write_config,
)
from tests.support.prefect_venv import TOKEN as PREFECT_TOKEN
from tests.support.prefect_venv import VENV_TIMEOUT, prefect_python, script_env
from tests.support.webhook_receiver import Receiver, answer, run_receiver

TOKEN = "tok-3c1f0e5b"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def received_total(text: str) -> float:
    return samples(text)[("trigd_events_received_total", ())]


def event(**overrides: object) -> dict[str, object]:
    return {
        "id": str(uuid4()),
        "event": "pump.started",
        "resource": {"prefect.resource.id": "pump.7"},
        **overrides,
    }


async def test_routes_of_a_running_daemon_with_a_token(tmp_path: Path) -> None:
    config = write_config(tmp_path, server={"listen": "127.0.0.1:0", "auth_token": TOKEN})
    with trio.fail_after(60):
        async with running_daemon(config) as daemon:
            base = f"http://127.0.0.1:{daemon.port}"
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                assert (await http.get("/api/health")).json() is True
                assert (await http.get("/api/ready")).status_code == 200
                version = await http.get("/api/admin/version", headers=bearer)
                assert version.json() == VERSION
                assert (await http.get("/api/admin/version")).status_code == 401
                before = received_total((await http.get("/metrics")).text)
                posted = [event(), event()]
                reply = await http.post("/api/events", json=posted, headers=bearer)
                assert reply.status_code == 204
                bad = await http.post("/api/events", json=[event(), {"id": 1}], headers=bearer)
                assert bad.status_code == 422
                assert bad.json()["detail"].startswith("event [1]: ")
                after = received_total((await http.get("/metrics")).text)
            assert after == before + 2
            assert TOKEN not in daemon.log
            assert await daemon.stop() == 0
    conn = apsw.Connection(str(tmp_path / "trigd.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        stored = {row[0] for row in conn.execute("SELECT id FROM events")}
    finally:
        conn.close()
    assert stored == {e["id"] for e in posted}


async def test_bad_http_never_disturbs_a_websocket_client(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    garbage = [
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 64,  # a TLS hello
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n[{]}x",
        b"GET /api/health HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 5000 + b"\r\n",
    ]
    with trio.fail_after(60):
        async with running_daemon(config) as daemon:
            url = f"ws://127.0.0.1:{daemon.port}/api/events/in"
            async with open_websocket_url(url, subprotocols=["trigd.v1"]) as ws:
                await ws.send_message(json.dumps({"type": "auth", "token": None}))
                assert json.loads(await ws.get_message()) == {"type": "auth_success"}
                for data in garbage:
                    stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
                    async with stream:
                        await stream.send_all(data)
                        answer = b""
                        while chunk := await stream.receive_some(65536):
                            answer += chunk
                    assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 422 ", b"HTTP/1.1 431 "))
                    sent = event()
                    await ws.send_message(json.dumps(sent))
                    assert json.loads(await ws.get_message()) == {"type": "ack", "id": sent["id"]}
            assert await daemon.stop() == 0


async def test_ready_is_503_while_the_store_refuses_writes(tmp_path: Path) -> None:
    """Another process holds the write lock past the busy timeout (5 s): the evaluator
    waits it out, and /api/ready says so until the lock is let go."""
    config = write_config(tmp_path)
    with trio.fail_after(60):
        async with running_daemon(config) as daemon:
            base = f"http://127.0.0.1:{daemon.port}"
            locker = apsw.Connection(str(tmp_path / "trigd.db"))
            try:
                locker.execute("BEGIN IMMEDIATE")
                async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                    assert (await http.get("/api/ready")).status_code == 200
                    url = f"ws://127.0.0.1:{daemon.port}/api/events/in"
                    async with open_websocket_url(url, subprotocols=["trigd.v1"]) as ws:
                        await ws.send_message(json.dumps({"type": "auth", "token": None}))
                        assert json.loads(await ws.get_message()) == {"type": "auth_success"}
                        sent = event()
                        await ws.send_message(json.dumps(sent))
                        committing = "store: the store refuses committing received events"
                        while True:
                            ready = await http.get("/api/ready")
                            reasons = ready.json()["reasons"]
                            if any(r.startswith(committing) for r in reasons):
                                break
                            await trio.sleep(0.2)
                        assert ready.status_code == 503
                        assert ready.json()["detail"] == "not ready: " + "; ".join(reasons)
                        assert any("BusyError: database is locked" in r for r in reasons)
                        locker.execute("ROLLBACK")
                        ack = json.loads(await ws.get_message())
                        assert ack == {"type": "ack", "id": sent["id"]}
                        # every task that waited it out clears on its next try (with its backoff)
                        while (await http.get("/api/ready")).status_code != 200:  # noqa: ASYNC110
                            await trio.sleep(0.2)
            finally:
                locker.close()
            assert await daemon.stop() == 0


async def test_metrics_count_a_firing_s_delivery_and_the_sweeper_s_passes(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            receiver: Receiver = await nursery.start(run_receiver, answer(200))
            automations = write_automations(tmp_path, [burst_automation(receiver.url())])
            config = write_config(tmp_path, [automations])
            async with running_daemon(config) as daemon:
                base = f"http://127.0.0.1:{daemon.port}"
                async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                    pressure = [
                        event(
                            event="pump.pressure.high", resource={"prefect.resource.id": "pump.7"}
                        )
                        for _ in range(3)
                    ]
                    assert (await http.post("/api/events", json=pressure)).status_code == 204
                    await receiver.next_request()
                    delivered = ("trigd_deliveries_total", (("outcome", "delivered"),))
                    while (values := samples((await http.get("/metrics")).text))[delivered] < 1:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                assert values[("trigd_deliveries_total", (("outcome", "dead"),))] == 0
                assert values[("trigd_delivery_seconds_count", ())] == 1
                assert values[("trigd_proactive_pass_seconds_count", ())] >= 1
                assert values[("trigd_open_buckets", ())] >= 1
                fired = ("trigd_firings_total", (("automation", "pump pressure burst"),))
                assert values[fired] == 1
                assert await daemon.stop() == 0
            nursery.cancel_scope.cancel()


async def test_https_on_a_tls_port(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    leaf.private_key_pem.write_to_path(str(key))
    chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    config = write_config(tmp_path, server={"tls_cert": str(chain), "tls_key": str(key)})
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with trio.fail_after(60):
        async with running_daemon(config) as daemon:
            base = f"https://127.0.0.1:{daemon.port}"
            async with httpx.AsyncClient(base_url=base, verify=context, timeout=10) as http:
                assert (await http.get("/api/health")).json() is True
                assert (await http.post("/api/events", json=[event()])).status_code == 204
            assert await daemon.stop() == 0


PREFECT_CLIENT = textwrap.dedent(
    """
    import asyncio, json
    from prefect.client.orchestration import get_client

    async def main():
        async with get_client() as client:
            health = await client.api_healthcheck()
            version = await client.api_version()
        print(json.dumps({"health": repr(health), "version": version}))

    asyncio.run(main())
    """
)


async def test_prefect_s_client_reads_health_and_version_with_its_auth_string(
    tmp_path: Path,
) -> None:
    """Prefect's own client (its auth string, sent as Basic, is trigd's token)."""
    config = write_config(tmp_path, server={"auth_token": PREFECT_TOKEN})
    with trio.fail_after(VENV_TIMEOUT + 60):
        python = await trio.to_thread.run_sync(prefect_python)
    with trio.fail_after(90):
        async with running_daemon(config) as daemon:
            api = f"http://127.0.0.1:{daemon.port}/api"
            ran = await trio.run_process(
                [str(python), "-c", PREFECT_CLIENT],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=script_env(tmp_path, api),
            )
            assert ran.returncode == 0, ran.stderr.decode()
            seen = json.loads(ran.stdout.decode().strip().splitlines()[-1])
            assert seen == {"health": "None", "version": VERSION}
            assert await daemon.stop() == 0


async def test_events_query_pages_newest_first_through_next_page(tmp_path: Path) -> None:
    config = write_config(tmp_path, server={"listen": "127.0.0.1:0", "auth_token": TOKEN})
    pumps = [event(occurred=f"2026-12-04T10:00:0{n}Z", event=f"pump.reading.{n}") for n in range(5)]
    valve = event(occurred="2026-12-04T10:00:09Z", event="valve.opened")
    query = {
        "filter": {
            "occurred": {"since": "2026-12-04T00:00:00Z", "until": "2026-12-05T00:00:00Z"},
            "event": {"prefix": ["pump."]},
        },
        "limit": 2,
    }
    with trio.fail_after(60):
        async with running_daemon(config) as daemon:
            base = f"http://127.0.0.1:{daemon.port}"
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(base_url=base, timeout=10, headers=bearer) as http:
                posted = await http.post("/api/events", json=[*pumps, valve])
                assert posted.status_code == 204
                pages = [await http.post("/api/events/filter", json=query)]
                while (following := pages[-1].json()["next_page"]) is not None:
                    assert following.startswith(f"{base}/api/events/filter/next?page-token=")
                    pages.append(await http.get(following))
                async with httpx.AsyncClient(base_url=base, timeout=10) as stranger:
                    anonymous = await stranger.post("/api/events/filter", json=query)
                bad = await http.post("/api/events/filter", json={"filter": {"evnt": {}}})
                forged = await http.get("/api/events/filter/next?page-token=bm90LW91cnM=")
    assert [page.status_code for page in pages] == [200, 200, 200]
    assert [page.json()["total"] for page in pages] == [5, 5, 5]
    got = [e["id"] for page in pages for e in page.json()["events"]]
    assert got == [e["id"] for e in reversed(pumps)]  # newest first, the valve left out
    assert anonymous.status_code == 401
    assert bad.status_code == 422
    assert "evnt" in bad.json()["detail"]
    assert forged.status_code == 403
