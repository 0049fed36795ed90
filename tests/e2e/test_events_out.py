"""Events out from a real daemon to Prefect's own subscribers, unchanged: the
`PrefectEventSubscriber` class (tests/support/prefect_subscriber_script.py, in the Prefect
virtualenv) and the `prefect events stream` command, with PREFECT_API_URL pointing at
trigd and PREFECT_API_AUTH_STRING holding its token. Each gets the stored events first
(backfill), then the events committed after it subscribed, trigd's own automation events
included."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import pytest
import trio

from tests.support.daemon_process import (
    Daemon,
    burst_automation,
    pressure,
    run_trigd,
    running_daemon,
    write_automations,
    write_config,
)
from tests.support.paths import SUPPORT
from tests.support.prefect_venv import TOKEN, VENV_TIMEOUT, prefect_python, script_env
from tests.support.webhook_receiver import Receiver, answer, run_receiver

pytestmark = pytest.mark.slow

SCRIPT: Final = SUPPORT / "prefect_subscriber_script.py"
AUTOMATION: Final = "prefect.automation."  # the prefix of an automation's resource id
TRIGGERED: Final = "prefect.automation.triggered"
RUN_TIMEOUT: Final = 60  # seconds for the daemon, the subscriber and the webhooks


class Lines:
    """A child process's stdout, a line at a time."""

    def __init__(self, process: trio.Process) -> None:
        assert process.stdout is not None
        self.stdout = process.stdout
        self.buffer = b""

    async def next(self) -> str:
        while b"\n" not in self.buffer:
            chunk = await self.stdout.receive_some(65536)
            if not chunk:
                raise AssertionError(f"the subscriber ended; left: {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()


@asynccontextmanager
async def child(args: list[str], env: dict[str, str]) -> AsyncIterator[Lines]:
    process = await trio.lowlevel.open_process(
        args,
        stdout=-1,
        stderr=-1,
        stdin=-3,
        env=env,  # -1 PIPE, -3 DEVNULL
    )
    try:
        yield Lines(process)
    finally:
        process.kill()
        await process.wait()
        assert process.stderr is not None
        await process.stderr.aclose()
        assert process.stdout is not None
        await process.stdout.aclose()


async def emit(daemon: Daemon, *lines: str) -> None:
    done = await run_trigd(
        "emit", "--url", daemon.url, stdin="\n".join(lines) + "\n", env={"TRIGD_TOKEN": TOKEN}
    )
    assert done.returncode == 0, done.stderr


def automation_config(tmp_path: Path, receiver: Receiver) -> Path:
    fire_each = burst_automation(receiver.url(), name="each reading", threshold=1)
    automations = write_automations(tmp_path, [fire_each])
    return write_config(tmp_path, [automations], server={"auth_token": TOKEN})


def named(seen: list[dict[str, Any]], event: str, resource_prefix: str) -> list[dict[str, Any]]:
    return [e for e in seen if e["event"] == event and e["resource"].startswith(resource_prefix)]


@pytest.mark.timeout(VENV_TIMEOUT + RUN_TIMEOUT + 30)  # the first run builds the virtualenv
async def test_prefects_event_subscriber_gets_backfill_then_live_events(tmp_path: Path) -> None:
    with trio.fail_after(VENV_TIMEOUT):
        python = await trio.to_thread.run_sync(prefect_python)
    with trio.fail_after(RUN_TIMEOUT):
        async with trio.open_nursery() as nursery:
            receiver: Receiver = await nursery.start(run_receiver, answer(204))
            async with running_daemon(automation_config(tmp_path, receiver)) as daemon:
                valve = pressure("valve.1").replace("pump.pressure", "valve.x")
                await emit(daemon, pressure("pump.1"), valve)
                await receiver.next_request()  # the first firing is done
                env = script_env(tmp_path, f"http://127.0.0.1:{daemon.port}/api")
                async with child([str(python), str(SCRIPT), "p", "100"], env) as lines:
                    assert await lines.next() == "ready"
                    seen: list[dict[str, Any]] = []

                    async def until(event: str, resource_prefix: str, count: int = 1) -> None:
                        while len(named(seen, event, resource_prefix)) < count:
                            seen.append(json.loads(await lines.next()))

                    # the backfill: the reading and trigd's own event of its firing
                    await until("pump.pressure.high", "pump.1")
                    await until(TRIGGERED, AUTOMATION)
                    backfilled = len(seen)
                    await emit(daemon, pressure("pump.2"))
                    await until("pump.pressure.high", "pump.2")  # live
                    await until(TRIGGERED, AUTOMATION, count=2)  # and the firing it caused
                    assert seen.index(named(seen, TRIGGERED, AUTOMATION)[1]) >= backfilled
                    assert not [e for e in seen if e["event"] == "valve.x"]  # not a match
                    ids = [e["id"] for e in seen]
                    assert len(ids) == len(set(ids))
                await receiver.next_request()
                assert await daemon.stop() == 0, daemon.log
            nursery.cancel_scope.cancel()


@pytest.mark.timeout(VENV_TIMEOUT + RUN_TIMEOUT + 30)
async def test_prefect_events_stream_prints_trigds_events(tmp_path: Path) -> None:
    with trio.fail_after(VENV_TIMEOUT):
        python = await trio.to_thread.run_sync(prefect_python)
    prefect = str(Path(python).parent / "prefect")
    with trio.fail_after(RUN_TIMEOUT):
        config = write_config(tmp_path, server={"auth_token": TOKEN})
        async with running_daemon(config) as daemon:
            await emit(daemon, pressure("pump.1"))
            env = script_env(tmp_path, f"http://127.0.0.1:{daemon.port}/api")
            env["PYTHONUNBUFFERED"] = "1"  # its print() to a pipe would wait for more
            command = [prefect, "--no-prompt", "events", "stream", "--format", "text"]
            async with child(command, env) as lines:
                first = await lines.next()
                while not first.endswith(" pump.pressure.high pump.1"):  # past the banner
                    first = await lines.next()
                await emit(daemon, pressure("pump.2"))
                assert (await lines.next()).endswith(" pump.pressure.high pump.2")
            assert await daemon.stop() == 0, daemon.log
