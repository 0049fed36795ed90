"""Endpoint chaos, part of the standing hardening campaign: a real `trigd serve` delivers
every firing to endpoints that hang (accept, never answer), answer 500, reset the
connection, and redirect, beside one healthy endpoint. Every firing must reach the
healthy endpoint, within a latency bound, while the daemon keeps running and each
failing endpoint's rows end where the delivery rules put them:

* a hang is a timeout, a reset a network error, a 500 a server error: all retried, and
  the endpoint is failing (one delivery at a time) until it answers;
* a 3xx is an answer: redirects are not followed, the row is dead at once, like any
  status that is neither 2xx nor one worth retrying.

Network on 127.0.0.1 only; bounded in time (about 15 s). `-s` prints the latencies.
"""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import struct
from functools import partial
from pathlib import Path
from typing import Any, Final

import pytest
import trio

from daemon.cli.emit import emit
from store.db import Store
from tests.support.daemon_process import running_daemon, write_automations, write_config
from tests.support.webhook_receiver import Receiver, Reply, Request, answer, run_receiver

pytestmark = pytest.mark.slow

TICKS: Final = 80  # events sent, each firing one webhook per endpoint
TICK_EVERY: Final = 0.1  # seconds between events
HANGING: Final = 4  # hanging endpoints: with 2 slots each they took all 8 slots before
LATENCY_BOUND: Final = 5.0  # seconds, from sending the event to the healthy request


async def hang(request: Request) -> Reply:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def resetting_endpoint() -> Any:
    """Reads the request, then resets the connection (RST: SO_LINGER 0)."""
    accepted = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.receive_some(65536)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}/hook", lambda: accepted
        nursery.cancel_scope.cancel()


def tick_automation(name: str, url: str) -> dict[str, Any]:
    return {
        "name": name,
        "trigger": {
            "type": "event",
            "match": {"prefect.resource.id": "tick.*"},
            "expect": ["chaos.tick"],
            "for_each": ["prefect.resource.id"],
            "posture": "Reactive",
            "threshold": 1,
            "within": 60,
        },
        "actions": [
            {
                "type": "call-webhook",
                "url": url,
                "payload": '{"tick": "{{ event.resource.id }}"}',
            }
        ],
    }


def outcomes(db: Path) -> dict[str, list[tuple[str, int, str | None]]]:
    """automation name -> (status, attempts, last_error) of each of its outbox rows."""
    store = Store.open(db)
    try:
        rows = store.conn.execute(
            "SELECT a.name, o.status, o.attempts, o.last_error FROM outbox o "
            "JOIN automations a ON a.id = o.automation_id"
        ).fetchall()
    finally:
        store.close()
    found: dict[str, list[tuple[str, int, str | None]]] = {}
    for name, status, attempts, error in rows:
        text = None if error is None else str(error)
        found.setdefault(str(name), []).append((str(status), int(str(attempts)), text))
    return found


@pytest.mark.parametrize(
    "delivery_timeout",
    [
        "1s",  # hangs time out during the run: those endpoints are failing, one probe each
        "15s",  # the default: no hang times out during the run, they just keep their slots
    ],
)
async def test_failing_endpoints_never_hold_up_a_healthy_one(
    tmp_path: Path, delivery_timeout: str
) -> None:
    arrived: dict[str, float] = {}
    all_arrived = trio.Event()

    async def healthy_handler(request: Request) -> Reply:
        arrived.setdefault(json.loads(request.body)["tick"], trio.current_time())
        if len(arrived) == TICKS:
            all_arrived.set()
        return Reply(200)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, resetting_endpoint() as (reset_url, resets):
            healthy: Receiver = await nursery.start(run_receiver, healthy_handler)
            hanging = [await nursery.start(run_receiver, hang) for _ in range(HANGING)]
            failing: Receiver = await nursery.start(run_receiver, answer(500))
            redirect = Reply(302, {"Location": healthy.url("/moved")})

            async def redirecting_handler(request: Request) -> Reply:
                return redirect

            redirecting: Receiver = await nursery.start(run_receiver, redirecting_handler)
            endpoints = {
                "healthy": healthy.url(),
                **{f"hang {i}": r.url() for i, r in enumerate(hanging)},
                "500": failing.url(),
                "reset": reset_url,
                "redirect": redirecting.url(),
            }
            automations = write_automations(
                tmp_path, [tick_automation(name, url) for name, url in endpoints.items()]
            )
            config = write_config(tmp_path, [automations], delivery={"timeout": delivery_timeout})
            sent: dict[str, float] = {}
            async with running_daemon(config) as daemon:
                for n in range(TICKS):
                    tick = f"tick.{n}"
                    sent[tick] = trio.current_time()
                    event = {"event": "chaos.tick", "resource": {"prefect.resource.id": tick}}
                    acked, rejected = await emit(daemon.url, None, [("tick", event)])
                    assert (acked, rejected) == (1, [])
                    await trio.sleep(TICK_EVERY)
                await all_arrived.wait()
                assert daemon.process.poll() is None, daemon.log
                assert await daemon.stop() == 0, daemon.log
            nursery.cancel_scope.cancel()

    latencies = sorted(arrived[tick] - sent[tick] for tick in sent)
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * len(latencies)))]
    print(
        f"\ntimeout {delivery_timeout}: healthy endpoint beside {HANGING} hanging, a 500, "
        "a reset and a redirect: "
        f"{len(latencies)} firings, latency p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms"
    )
    assert len(healthy.requests) == TICKS  # each once; the redirect was not followed
    assert {r.target for r in healthy.requests} == {"/hook"}
    assert latencies[-1] < LATENCY_BOUND

    rows = outcomes(tmp_path / "trigd.db")
    assert [status for status, _, _ in rows["healthy"]] == ["delivered"] * TICKS
    assert len(rows["redirect"]) == TICKS
    for status, attempts, error in rows["redirect"]:  # pending: not reached before the stop
        assert (status, attempts, error) in {
            ("dead", 1, "HTTP 302 (redirects are not followed): not retried"),
            ("pending", 0, None),
        }
    assert {r.target for r in redirecting.requests} == {"/hook"}
    errors = {"500": "HTTP 500", "reset": "Webhook call failed: "}
    if delivery_timeout == "1s":
        errors |= {f"hang {i}": "Webhook call failed: timed out after 1s" for i in range(HANGING)}
    for name, error in errors.items():
        assert {status for status, _, _ in rows[name]} <= {"pending", "in_flight"}
        tried = [e for _, attempts, e in rows[name] if attempts]
        assert tried, name
        assert all(e is not None and e.startswith(error) for e in tried), (name, tried)
        url = endpoints[name].removesuffix("/hook")
        assert f"endpoint {url} is failing" in daemon.log
    assert resets() > 0
    assert f"endpoint {redirecting.url().removesuffix('/hook')} is failing" not in daemon.log
