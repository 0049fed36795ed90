"""`trigd serve` as a real process, its log (docs/OPERATIONS.md#logs): every firing,
delivery outcome and refused handshake at INFO with the automation's name, in `[log]
format` text and json, at `[log] level` unless `--log-level` says otherwise; never a
secret, a token, a header value or the webhook's path and query. Network on 127.0.0.1
only; every wait bounded."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.support.daemon_process import (
    SECRET,
    burst_automation,
    pressure,
    running_daemon,
    write_automations,
    write_config,
)
from tests.support.webhook_receiver import Receiver, answer, run_receiver

pytestmark = pytest.mark.slow

TOKEN = "t0ken-for-e2e-logs"
HEADER_VALUE = "Bearer h3ader-for-e2e-logs"
QUERY_KEY = "qu3ry-key-for-e2e-logs"
PATH = "/hooks/pa7h-for-e2e-logs"
NAME = "pump pressure burst"


async def trigd(*args: str, stdin: str = "") -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "daemon", *args],
        stdin=stdin.encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


def automation(receiver: Receiver) -> dict[str, Any]:
    hook = burst_automation(receiver.url(f"{PATH}?key={QUERY_KEY}"), secret=SECRET)
    hook["actions"][0]["headers"] = {"Authorization": HEADER_VALUE}
    return hook


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_firings_deliveries_and_refusals_are_logged_without_secrets(
    tmp_path: Path, log_format: str
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            receiver: Receiver = await nursery.start(run_receiver, answer(200))
            automations = write_automations(tmp_path, [automation(receiver)])
            config = write_config(
                tmp_path, [automations], server={"auth_token": TOKEN}, log={"format": log_format}
            )
            async with running_daemon(config) as daemon:
                lines = "\n".join([pressure()] * 3) + "\n"
                url = daemon.url
                refused = await trigd("emit", "--url", url, "--token", "wr0ng-t0ken", stdin=lines)
                assert refused.returncode != 0
                emitted = await trigd("emit", "--url", url, "--token", TOKEN, stdin=lines)
                assert emitted.returncode == 0, emitted.stderr
                request = await receiver.next_request()
                assert request.headers["authorization"] == HEADER_VALUE
                await daemon.wait_for_log("delivered (HTTP 200)")
                assert await daemon.stop() == 0
            nursery.cancel_scope.cancel()
    log = daemon.log
    for hidden in (TOKEN, "wr0ng-t0ken", HEADER_VALUE, "h3ader", SECRET, QUERY_KEY, "pa7h"):
        assert hidden not in log
    endpoint = f"http://127.0.0.1:{receiver.port}"
    if log_format == "text":
        assert f"INFO daemon.engine.acting: automation '{NAME}' fired: event trigger " in log
        assert 'bucket {"prefect.resource.id": "pump.7"}, 1 actions queued' in log
        assert f"of automation '{NAME}' to {endpoint}: delivered (HTTP 200)" in log
        assert "INFO daemon.runtime.ingest: refused websocket from 127.0.0.1:" in log
        assert ": Invalid token" in log
        return
    records = [json.loads(line) for line in log.splitlines()]  # every line is JSON
    assert {"time", "level", "logger", "message"} <= set(records[0])
    [fired] = [r for r in records if r["logger"] == "daemon.engine.acting"]
    assert (fired["level"], fired["automation"], fired["trigger_type"]) == ("INFO", NAME, "event")
    assert fired["bucket"] == {"prefect.resource.id": "pump.7"}
    [delivered] = [r for r in records if r.get("outcome") == "delivered"]
    assert delivered["level"] == "INFO"
    assert (delivered["automation"], delivered["endpoint"]) == (NAME, endpoint)
    assert delivered["status_code"] == 200
    [refusal] = [r for r in records if r["message"].startswith("refused websocket")]
    assert refusal["level"] == "INFO"
    assert refusal["message"].endswith(": Invalid token")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_log_level_from_the_config_and_the_flag_over_it(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            receiver: Receiver = await nursery.start(run_receiver, answer(200))
            automations = write_automations(tmp_path, [automation(receiver)])
            port = free_port()
            config = write_config(
                tmp_path,
                [automations],
                server={"listen": f"127.0.0.1:{port}"},
                log={"level": "WARNING"},
            )
            async with running_daemon(config, wait_ready=False) as quiet:
                url = f"ws://127.0.0.1:{port}/api/events/in"
                lines = "\n".join([pressure()] * 3) + "\n"
                for _ in range(200):  # until it listens
                    if (await trigd("emit", "--url", url, stdin=lines)).returncode == 0:
                        break
                    await trio.sleep(0.1)
                await receiver.next_request()
                assert await quiet.stop() == 0
            assert " INFO " not in quiet.log, quiet.log  # not even `trigd listening`

            async with running_daemon(config, "--log-level", "INFO") as loud:
                assert await loud.stop() == 0
            assert "trigd listening on" in loud.log
            nursery.cancel_scope.cancel()
