"""`[upstream]` against a real Prefect server (README.md#trigd-beside-your-prefect-server):
events sent to trigd reach the server's `POST /api/events/filter`, each id once, across a
server outage and a SIGKILL of trigd mid-stream; a real `@flow`'s state events, taken from
the server through `subscribe`, fire a trigd automation; forwarding and subscribing together
do not loop.

One Prefect server (tests/support/prefect_server.py) serves the whole module.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import apsw
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon_process import (
    run_trigd,
    running_daemon,
    write_automations,
    write_config,
)
from tests.support.ingest_client import connect, event_dict
from tests.support.paths import SUPPORT
from tests.support.prefect_server import AUTH_STRING, PrefectServer
from tests.support.prefect_venv import prefect_python
from tests.support.webhook_receiver import Receiver, answer, run_receiver

pytestmark = pytest.mark.slow

FLOW_SCRIPT: Final = SUPPORT / "prefect_flow_script.py"
SINCE: Final = "2026-01-01T00:00:00Z"
WAIT: Final = 60.0  # seconds for events to show up upstream
AUTH_ENV: Final = "UPSTREAM_AUTH_FOR_TEST"  # the auth string reaches trigd as env:NAME


UPSTREAM_MAX_LABELS: Final = 50
"""The server's PREFECT_SERVER_EVENTS_MAXIMUM_LABELS_PER_RESOURCE: lower than trigd's (500),
so that an event trigd takes can be one the server refuses."""


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    server = PrefectServer(
        tmp_path_factory.mktemp("prefect"),
        settings={"PREFECT_SERVER_EVENTS_MAXIMUM_LABELS_PER_RESOURCE": str(UPSTREAM_MAX_LABELS)},
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def upstream_config(server: PrefectServer, **more: Any) -> dict[str, Any]:
    return {"url": server.api_url, "auth_string": f"env:{AUTH_ENV}", **more}


async def upstream_ids(server: PrefectServer, ids: list[str]) -> list[str]:
    """The ids among `ids` the server answers, as often as it answers each. Asked 50 ids
    at a time: a next page's URL carries the whole filter, and one with hundreds of ids is
    longer than the server takes in a request line."""
    found: list[str] = []
    for start in range(0, len(ids), 50):
        chunk = {"id": {"id": ids[start : start + 50]}, "occurred": {"since": SINCE}}
        events = await trio.to_thread.run_sync(server.query_events, chunk)
        found += [e["id"] for e in events]
    return found


async def until_upstream(server: PrefectServer, ids: list[str]) -> list[str]:
    with trio.fail_after(WAIT):
        while True:
            found = await upstream_ids(server, ids)
            if set(found) == set(ids):
                return found
            await trio.sleep(0.5)


async def send_events(url: str, count: int, **fields: Any) -> list[str]:
    """`count` events sent to trigd and committed (the pong comes after the commit)."""
    ids = []
    async with connect(url) as ws:
        for _ in range(count):
            event = event_dict(**{"occurred": "2026-12-01T10:00:00Z", **fields})
            ids.append(event["id"])
            await ws.send_message(json.dumps(event))
        await ws.ping()
    return ids


def stored_ids(db: Path) -> list[str]:
    conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [str(row[0]) for row in conn.execute("SELECT id FROM events")]
    finally:
        conn.close()


async def status(config: Path) -> dict[str, Any]:
    ran = await run_trigd("status", "--config", str(config), "--json")
    assert ran.returncode == 0, ran.stderr
    result: dict[str, Any] = json.loads(ran.stdout)
    return result


async def until_stored(config: Path) -> None:
    """Until the stored forward cursor is past every event (`resend_window` after the
    upstream confirmed the last page)."""
    with trio.fail_after(WAIT):
        while (await status(config))["upstream"]["unforwarded"]:  # noqa: ASYNC110
            await trio.sleep(0.5)


async def http_get(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        return await client.get(path)


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_forward_reaches_prefect_once_across_an_outage_and_a_sigkill(
    tmp_path: Path, prefect_server: PrefectServer
) -> None:
    env = {AUTH_ENV: AUTH_STRING}
    config = write_config(tmp_path, upstream=upstream_config(prefect_server, page_events=7))
    async with running_daemon(config, env=env) as daemon:
        first = await send_events(daemon.url, 20)
        assert sorted(await until_upstream(prefect_server, first)) == sorted(first)

        # the server goes away for a while: trigd keeps taking events, and says so
        await trio.to_thread.run_sync(prefect_server.stop)
        during = await send_events(daemon.url, 20)
        with trio.fail_after(WAIT):
            await daemon.wait_for_log("retrying with backoff")
            while (await status(config))["upstream"]["unforwarded"] < len(during):  # noqa: ASYNC110
                await trio.sleep(0.5)
        # /api/ready reports the outage without failing: local work goes on
        ready = await http_get(daemon.port, "/api/ready")
        assert ready.status_code == 200
        assert any(
            r.startswith("upstream: upstream forward not connected")
            for r in ready.json()["reasons"]
        )
        assert AUTH_STRING not in ready.text
        with trio.fail_after(WAIT):  # the backlog is counted about once a second
            while True:
                outage = metric_samples((await http_get(daemon.port, "/metrics")).text)
                if outage[("trigd_upstream_backlog_events", ())] >= len(during):
                    break
                await trio.sleep(0.2)
        assert outage[("trigd_upstream_connected", (("direction", "forward"),))] == 0
        assert outage[("trigd_upstream_backlog_age_seconds", ())] > 0
        await trio.to_thread.run_sync(prefect_server.start)
        assert sorted(await until_upstream(prefect_server, during)) == sorted(during)
        await daemon.wait_for_log("upstream forward: connected to http")
        assert (await http_get(daemon.port, "/api/ready")).json()["reasons"] == []
        back = metric_samples((await http_get(daemon.port, "/metrics")).text)
        assert back[("trigd_upstream_connected", (("direction", "forward"),))] == 1
        assert back[("trigd_upstream_forwarded_total", ())] >= len(first) + len(during)
        assert back[("trigd_upstream_refused_total", ())] == 0  # an outage refuses nothing

        # SIGKILL while a stream of events is being forwarded, in pages of 7
        killed = await send_events(daemon.url, 600)
        daemon.send(signal.SIGKILL)
        await daemon.stop()
    assert (await status(config))["upstream"]["unforwarded"] > 0  # killed mid-stream
    async with running_daemon(config, env=env) as again:
        everything = first + during + killed
        found = await until_upstream(prefect_server, everything)
        await until_stored(config)  # the stored cursor follows `resend_window` later
    assert sorted(found) == sorted(everything)  # each id exactly once in the server's answer
    assert sorted(stored_ids(tmp_path / "trigd.db")) == sorted(everything)
    summary = await status(config)
    assert summary["upstream"]["unforwarded"] == 0
    assert AUTH_STRING not in json.dumps(summary)
    assert AUTH_STRING not in daemon.log + again.log


async def test_an_event_the_upstream_refuses_is_found_skipped_and_counted_and_the_rest_go_on(
    tmp_path: Path, prefect_server: PrefectServer
) -> None:
    env = {AUTH_ENV: AUTH_STRING}
    upstream = upstream_config(prefect_server, page_events=5, retry_max="2s")
    config = write_config(tmp_path, upstream=upstream)
    labels = {f"label-{n}": "refused-label-value" for n in range(UPSTREAM_MAX_LABELS + 10)}
    poison = event_dict(resource={"prefect.resource.id": "pump.9", **labels})
    async with running_daemon(config, env=env) as daemon:
        before = await send_events(daemon.url, 7)
        async with connect(daemon.url) as ws:  # the 8th of 12, in the second page of 5
            await ws.send_message(json.dumps(poison))
            await ws.ping()
        after = await send_events(daemon.url, 4)
        assert sorted(await until_upstream(prefect_server, before + after)) == sorted(
            before + after
        )
        with trio.fail_after(WAIT):
            while (await counters(config))["upstream"]["refused"] < 1:  # noqa: ASYNC110
                await trio.sleep(0.5)
        # back to full pages: more events go up
        later = await send_events(daemon.url, 12)
        assert sorted(await until_upstream(prefect_server, later)) == sorted(later)
        metrics = metric_samples((await http_get(daemon.port, "/metrics")).text)
        await until_stored(config)
        ran = await run_trigd("status", "--config", str(config))
        assert await daemon.stop() == 0, daemon.log
    assert await upstream_ids(prefect_server, [poison["id"]]) == []
    assert metrics[("trigd_upstream_refused_total", ())] == 1
    assert "1 refused upstream" in ran.stdout.decode()
    assert (await status(config))["upstream"]["unforwarded"] == 0
    refusals = [line for line in daemon.log.splitlines() if "refused event" in line]
    assert len(refusals) == 1
    assert f"the upstream refused event {poison['id']} (the upstream closed" in refusals[0]
    assert "refused-label-value" not in daemon.log


@contextlib.contextmanager
def late_upstream(directory: Path, stall: float, ws: str) -> Iterator[tuple[int, Path, Path]]:
    """tests/support/late_upstream_app.py under uvicorn with its websocket implementation
    `ws`, on a free port: (port, the file of the ids it took, the file that opens it)."""
    taken, opened = directory / "taken.txt", directory / "open"
    taken.touch()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LATE_UPSTREAM_TAKEN": str(taken),
        "LATE_UPSTREAM_OPEN": str(opened),
        "LATE_UPSTREAM_STALL": str(stall),
    }
    command = [str(prefect_python()), "-m", "uvicorn", "--app-dir", str(SUPPORT)]
    command += ["late_upstream_app:app", "--fd", str(sock.fileno()), "--ws", ws]
    command += ["--log-level", "critical"]
    process = subprocess.Popen(command, env=env, pass_fds=[sock.fileno()])
    try:
        yield int(sock.getsockname()[1]), taken, opened
    finally:
        process.terminate()
        process.wait(timeout=10)
        sock.close()


@pytest.mark.parametrize("ws", ["websockets-sansio", "websockets"])
async def test_a_server_that_stalls_on_a_refused_event_loses_none_of_the_events_after_it(
    tmp_path: Path, ws: str
) -> None:
    """The server stalls past `settle` before closing on the refused event in the middle of
    a page. With Prefect's own stack (uvicorn's `websockets-sansio`, which reads a ping
    only once the app has taken the frames before it) the checkpoint is never answered
    and the close must end it at once, not after `timeout`: otherwise each close looks
    like a timeout, no evidence, and the event is never found. With a server that answers
    pings as it reads them (uvicorn's legacy `websockets`, a proxy) the page was counted
    and the events after the refused one were never taken: the resend window sends it
    again."""
    with late_upstream(tmp_path, stall=1.5, ws=ws) as (port, taken, opened):
        upstream = {
            "url": f"http://127.0.0.1:{port}/api",
            "page_events": 5,
            "settle": "200ms",
            "retry_max": "1s",
        }
        config = write_config(tmp_path, upstream=upstream)
        refused = event_dict(resource={"prefect.resource.id": "pump.9", "refuse": "yes"})
        async with running_daemon(config) as daemon:
            # all committed before the upstream opens: pages of 5, the refused event the
            # 8th, in the middle of its page
            before = await send_events(daemon.url, 7)
            async with connect(daemon.url) as client:
                await client.send_message(json.dumps(refused))
                await client.ping()
            after = await send_events(daemon.url, 4)
            opened.touch()
            with trio.fail_after(WAIT):
                while set(taken.read_text().split()) != set(before + after):  # noqa: ASYNC110
                    await trio.sleep(0.2)
                await daemon.wait_for_log(f"the upstream refused event {refused['id']}")
            await until_stored(config)
    assert refused["id"] not in taken.read_text()


async def automation_events(server: PrefectServer) -> list[dict[str, Any]]:
    filter_ = {"event": {"name": ["prefect.automation.triggered"]}, "occurred": {"since": SINCE}}
    return await trio.to_thread.run_sync(server.query_events, filter_)


async def flow_run_completed(server: PrefectServer, flow_run_id: str) -> bool:
    filter_ = {
        "event": {"name": ["prefect.flow-run.Completed"]},
        "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]},
        "occurred": {"since": SINCE},
    }
    return bool(await trio.to_thread.run_sync(server.query_events, filter_))


async def counters(config: Path) -> dict[str, Any]:
    """The daemon's counters as its sweeper last stored them (`trigd status`)."""
    with trio.fail_after(WAIT):
        while (snapshot := (await status(config))["daemon"]) is None:  # noqa: ASYNC110
            await trio.sleep(0.5)
    return dict(snapshot)


def flow_automation(url: str) -> dict[str, Any]:
    return {
        "name": "edge flow completed",
        "trigger": {
            "type": "event",
            "match": {"prefect.resource.id": "prefect.flow-run.*"},
            "expect": ["prefect.flow-run.Completed"],
            "posture": "Reactive",
            "threshold": 1,
            "within": 0,
        },
        "actions": [
            {
                "type": "call-webhook",
                "url": url,
                "payload": '{"flow_run": "{{ event.resource.id }}"}',
            }
        ],
    }


async def run_flow(server: PrefectServer) -> str:
    ran = await trio.run_process(
        [str(server.python()), str(FLOW_SCRIPT)],
        env=server.env(),
        cwd=server.home,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr.decode(errors="replace")
    return str(json.loads(ran.stdout.decode().strip().splitlines()[-1])["flow_run_id"])


async def test_subscribe_fires_an_automation_on_a_real_flow_run_and_does_not_loop(
    tmp_path: Path, prefect_server: PrefectServer
) -> None:
    subscribe = {"event": {"prefix": ["prefect.flow-run.", "edge."]}}
    env = {AUTH_ENV: AUTH_STRING}
    async with trio.open_nursery() as nursery:
        receiver: Receiver = await nursery.start(run_receiver, answer(204))
        automations = write_automations(tmp_path, [flow_automation(receiver.url())])
        config = write_config(
            tmp_path,
            [automations],
            upstream=upstream_config(prefect_server, subscribe=json.dumps(subscribe)),
        )
        async with running_daemon(config, env=env) as daemon:
            with trio.fail_after(WAIT):
                await daemon.wait_for_log("upstream subscribe: connected to")
            flow_run_id = await run_flow(prefect_server)
            with trio.move_on_after(WAIT):
                hook = await receiver.next_request()
            assert receiver.requests, daemon.log
            assert json.loads(hook.body) == {"flow_run": f"prefect.flow-run.{flow_run_id}"}
            # the firing's own event, made by trigd, reaches the server too
            with trio.fail_after(WAIT):
                while not (fired := await automation_events(prefect_server)):  # noqa: ASYNC110
                    await trio.sleep(0.5)
            assert fired[0]["resource"]["prefect.resource.name"] == "edge flow completed"

            # an event sent to trigd goes up, matches the subscription, comes back: dropped
            now = datetime.now(UTC).isoformat()  # the subscription wants recent events
            sent = await send_events(daemon.url, 3, event="edge.reading", occurred=now)
            await until_upstream(prefect_server, sent)
            with trio.fail_after(WAIT):
                while (await counters(config))["evaluator"]["duplicates"] < len(sent):  # noqa: ASYNC110
                    await trio.sleep(0.5)
            settled = await counters(config)
            await trio.sleep(3)  # a loop would keep sending them round: 3 sweeper snapshots
            assert (await counters(config))["evaluator"] == settled["evaluator"]
            assert await daemon.stop() == 0, daemon.log

        # a flow runs while trigd is stopped: it catches up from its position on restart
        missed = await run_flow(prefect_server)
        with trio.fail_after(WAIT):  # a backfill reads what the server has stored
            while not await flow_run_completed(prefect_server, missed):  # noqa: ASYNC110
                await trio.sleep(0.5)
        async with running_daemon(config, env=env) as again:
            with trio.fail_after(WAIT):
                hook = await receiver.next_request()
            assert json.loads(hook.body) == {"flow_run": f"prefect.flow-run.{missed}"}
            with trio.fail_after(WAIT):  # the missed run's states, counted since the restart
                while (await counters(config))["upstream"]["taken"] < 3:  # noqa: ASYNC110
                    await trio.sleep(0.5)
            assert await again.stop() == 0, again.log
        nursery.cancel_scope.cancel()
    stored = stored_ids(tmp_path / "trigd.db")
    assert len(stored) == len(set(stored))
    assert set(sent) <= set(stored)
    assert sorted(await upstream_ids(prefect_server, sent)) == sorted(sent)
    summary = await status(config)
    upstream = summary["daemon"]["upstream"]
    assert upstream["rejected"] == 0
    assert summary["upstream"]["subscribe_position"] is not None
    assert len(receiver.requests) == 2


async def test_a_refused_auth_string_is_reported_and_never_shown(
    tmp_path: Path, prefect_server: PrefectServer
) -> None:
    wrong = "trigd-upstream:not-the-password-4711"
    config = write_config(
        tmp_path, upstream={"url": prefect_server.api_url, "auth_string": f"env:{AUTH_ENV}"}
    )
    async with running_daemon(config, env={AUTH_ENV: wrong}) as daemon:
        with trio.fail_after(WAIT):
            await daemon.wait_for_log("upstream forward: ")
            while not (await counters(config)).get("upstream", {}).get("last_error"):  # noqa: ASYNC110
                await trio.sleep(0.5)
        upstream = (await counters(config))["upstream"]
        assert await daemon.stop() == 0
    assert upstream["forward_connected"] is False
    assert upstream["last_error"].startswith("forward: ")
    assert "retrying with backoff" in daemon.log
    ran = await run_trigd("status", "--config", str(config))
    for shown in (daemon.log, json.dumps(upstream), ran.stdout.decode()):
        assert "not-the-password" not in shown


async def test_an_auth_string_reference_that_does_not_resolve_stops_start_up(
    tmp_path: Path,
) -> None:
    config = write_config(
        tmp_path, upstream={"url": "http://127.0.0.1:9/api", "auth_string": f"env:{AUTH_ENV}"}
    )
    async with running_daemon(config, wait_ready=False) as daemon:
        with trio.fail_after(WAIT):
            assert await daemon.process.wait() == 2
        await daemon.wait_for_log("trigd serve:")
    assert f"[upstream] auth_string (reference): 'env:{AUTH_ENV}': the environment" in daemon.log


async def test_a_subscribed_event_past_max_event_bytes_is_refused_and_passed_over(
    tmp_path: Path, prefect_server: PrefectServer
) -> None:
    subscribe = {"event": {"prefix": ["edge.big."]}}
    async with trio.open_nursery() as nursery:
        receiver: Receiver = await nursery.start(run_receiver, answer(204))
        automation = {
            "name": "edge big ok",
            "trigger": {
                "type": "event",
                "match": {"prefect.resource.id": "edge.big.*"},
                "expect": ["edge.big.ok"],
                "posture": "Reactive",
                "threshold": 1,
                "within": 0,
            },
            "actions": [
                {
                    "type": "call-webhook",
                    "url": receiver.url(),
                    "payload": '{"id": "{{ event.id }}"}',
                }
            ],
        }
        config = write_config(
            tmp_path,
            [write_automations(tmp_path, [automation])],
            server={"max_event_bytes": 2_000},
            upstream=upstream_config(
                prefect_server, forward=False, subscribe=json.dumps(subscribe)
            ),
        )
        async with running_daemon(config, env={AUTH_ENV: AUTH_STRING}) as daemon:
            with trio.fail_after(WAIT):
                await daemon.wait_for_log("upstream subscribe: connected to")
            now = datetime.now(UTC).isoformat()
            big = event_dict(
                event="edge.big.blob",
                occurred=now,
                resource={"prefect.resource.id": "edge.big.1"},
                payload={"blob": "x" * 20_000},  # past max_event_bytes and the envelope's room
            )
            ok = event_dict(
                event="edge.big.ok", occurred=now, resource={"prefect.resource.id": "edge.big.1"}
            )
            await prefect_server.emit([big, ok])
            with trio.move_on_after(WAIT):
                hook = await receiver.next_request()
            assert receiver.requests, daemon.log
            assert json.loads(hook.body) == {"id": ok["id"]}
            with trio.fail_after(WAIT):
                while (await counters(config))["upstream"]["rejected"] < 1:  # noqa: ASYNC110
                    await trio.sleep(0.5)
            upstream = (await counters(config))["upstream"]
            assert await daemon.stop() == 0, daemon.log
        nursery.cancel_scope.cancel()
    assert (upstream["rejected"], upstream["taken"]) == (1, 1)
    assert f"upstream event refused: event {big['id']}: " in daemon.log
    assert "larger than max_event_bytes (2000)" in daemon.log
    assert "1009" not in daemon.log
    assert "retrying with backoff" not in daemon.log
    stored = stored_ids(tmp_path / "trigd.db")
    assert ok["id"] in stored
    assert big["id"] not in stored
