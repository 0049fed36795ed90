"""`trigd tail` (daemon/cli/tail.py) as a user runs it, against a real daemon: the stored
events first, then new ones as they are committed, filtered by --event and --resource,
text or JSON lines; Ctrl-C exits 0; a daemon it cannot reach is one clear line and exit 1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pytest
import trio

from daemon.cli.tail import filter_message, format_event, out_url
from tests.support.daemon_process import TRIGD, pressure, run_trigd, running_daemon, write_config

pytestmark = pytest.mark.slow

TOKEN: Final = "tail-token"
LIMIT: Final = 30  # seconds


class Tail:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.buffer = b""

    async def line(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self.buffer:
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                raise AssertionError(f"trigd tail ended; left: {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()


async def start_tail(*args: str) -> Tail:
    process = await trio.lowlevel.open_process(
        [*TRIGD, "tail", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "TRIGD_TOKEN": TOKEN},
    )
    return Tail(process)


async def emit(url: str, *lines: str) -> None:
    done = await run_trigd(
        "emit", "--url", url, stdin="\n".join(lines) + "\n", env={"TRIGD_TOKEN": TOKEN}
    )
    assert done.returncode == 0, done.stderr


def event_line(name: str, resource: str) -> str:
    return json.dumps({"event": name, "resource": {"prefect.resource.id": resource}})


async def test_tail_prints_stored_then_new_events_and_exits_0_on_ctrl_c(tmp_path: Path) -> None:
    config = write_config(tmp_path, server={"auth_token": TOKEN})
    with trio.fail_after(LIMIT):
        async with running_daemon(config) as daemon:
            await emit(daemon.url, pressure("pump.1"), event_line("valve.open", "pump.1"))
            base = f"ws://127.0.0.1:{daemon.port}"
            tail = await start_tail("--url", base, "--event", "pump.", "--resource", "pump.1")
            first = await tail.line()
            assert first.endswith("  pump.pressure.high  pump.1"), first
            datetime.fromisoformat(first.split("  ")[0])  # the time comes first
            await emit(daemon.url, pressure("pump.2"), pressure("pump.1"))
            assert (await tail.line()).endswith("  pump.pressure.high  pump.1")
            tail.process.send_signal(signal.SIGINT)
            assert await tail.process.wait() == 0
            assert tail.process.stdout is not None
            rest = tail.buffer + await tail.process.stdout.receive_some(65536)
            assert b"pump.2" not in rest
            assert b"valve" not in rest


async def test_tail_json_prints_each_event_as_received(tmp_path: Path) -> None:
    config = write_config(tmp_path, server={"auth_token": TOKEN})
    with trio.fail_after(LIMIT):
        async with running_daemon(config) as daemon:
            url = f"ws://127.0.0.1:{daemon.port}/api/events/out"
            tail = await start_tail("--url", url, "--json", "--since", "0")
            await trio.sleep(1)  # no backfill asked: what comes is what is committed after
            await emit(daemon.url, pressure("pump.3"))
            event = json.loads(await tail.line())
            assert event["event"] == "pump.pressure.high"
            assert event["resource"] == {"prefect.resource.id": "pump.3"}
            assert {"id", "occurred", "received", "payload", "related"} <= set(event)
            tail.process.kill()
            await tail.process.wait()


async def test_tail_without_a_daemon_says_so_and_exits_1() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with trio.fail_after(LIMIT):
        done = await run_trigd("tail", "--url", f"ws://127.0.0.1:{port}")
    assert done.returncode == 1
    assert done.stderr.decode() == (
        f"trigd tail: ws://127.0.0.1:{port}/api/events/out: connection refused\n"
    )


async def test_tail_with_a_wrong_token_says_why(tmp_path: Path) -> None:
    config = write_config(tmp_path, server={"auth_token": TOKEN})
    with trio.fail_after(LIMIT):
        async with running_daemon(config) as daemon:
            url = f"ws://127.0.0.1:{daemon.port}/api/events/out"
            done = await run_trigd("tail", "--url", url, "--token", "wrong")
    assert done.returncode == 1
    assert done.stderr.decode() == (
        f"trigd tail: {url}: the server closed the connection: 1008 Invalid token\n"
    )
    assert "wrong" not in done.stdout.decode()


def test_bad_since_is_a_usage_error() -> None:
    done = subprocess.run([*TRIGD, "tail", "--since", "soon"], capture_output=True, check=False)
    assert done.returncode == 2
    assert b"argument --since:" in done.stderr


def test_the_filter_message_and_the_url() -> None:
    now = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    message = json.loads(filter_message(now, timedelta(minutes=10), "pump.", "pump.7"))
    assert message == {
        "type": "filter",
        "filter": {
            "occurred": {
                "since": "2026-11-23T09:50:00+00:00",
                "until": "2027-11-23T10:00:00+00:00",
            },
            "event": {"prefix": ["pump."]},
            "resource": {"id": ["pump.7"]},
        },
        "backfill": True,
    }
    assert json.loads(filter_message(now, timedelta(0), None, None))["backfill"] is False
    assert out_url("ws://h:1") == "ws://h:1/api/events/out"
    assert out_url("wss://h:1/") == "wss://h:1/api/events/out"
    assert out_url("ws://h:1/events/out") == "ws://h:1/events/out"
    event = {"occurred": "T", "event": "e", "resource": {"prefect.resource.id": "r"}}
    assert format_event(event, False) == "T  e  r"
    assert format_event(event, True) == json.dumps(event, separators=(",", ":"))
