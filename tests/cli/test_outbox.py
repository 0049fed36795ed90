"""`trigd outbox list|cancel|send-now` and `trigd status --config`, as users run them:
real `trigd` processes beside a running daemon (docs/DELIVERY.md#the-trigd-outbox-command)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.support.daemon_process import (
    burst_automation,
    pressure,
    running_daemon,
    write_automations,
    write_config,
)
from tests.support.paths import REPO
from tests.support.webhook_receiver import Receiver, Reply, Request, answer, run_receiver

pytestmark = pytest.mark.slow

TOKEN = "q-s3cr3t-t0ken"


async def trigd(*args: str, cwd: Path = REPO, stdin: str = "") -> subprocess.CompletedProcess[str]:
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    result = await trio.run_process(
        [sys.executable, "-m", "daemon", *args],
        stdin=stdin.encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": python_path},
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


async def rows(config: Path, cwd: Path) -> dict[str, dict[str, Any]]:
    listed = await trigd("outbox", "list", "--json", "--config", str(config), cwd=cwd)
    assert listed.returncode == 0, listed.stderr
    return {row["id"]: row for row in json.loads(listed.stdout)}


async def unavailable_for_an_hour(request: Request) -> Reply:
    return Reply(503, {"retry-after": "3600"})


async def test_list_cancel_and_send_now_beside_the_running_daemon(tmp_path: Path) -> None:
    cwd = tmp_path / "elsewhere"  # the database is found through --config, not the cwd
    cwd.mkdir()
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            receiver: Receiver = await nursery.start(run_receiver, unavailable_for_an_hour)
            url = f"http://user:pa55@127.0.0.1:{receiver.port}/hooks/pumps?token={TOKEN}"
            automations = write_automations(tmp_path, [burst_automation(url, threshold=1)])
            config = write_config(tmp_path, [automations])
            async with running_daemon(config) as daemon:
                events = "\n".join([pressure("pump.1"), pressure("pump.2")]) + "\n"
                assert (await trigd("emit", "--url", daemon.url, stdin=events)).returncode == 0
                await receiver.next_request()
                await receiver.next_request()
                while True:  # both attempted once, each waiting an hour (Retry-After)
                    found = await rows(config, cwd)
                    if len(found) == 2 and all(r["attempts"] == 1 for r in found.values()):
                        break
                    await trio.sleep(0.1)
                for row in found.values():
                    assert row["status"] == "pending"
                    assert row["automation"] == "pump pressure burst"
                    assert row["url"] == (
                        f"http://127.0.0.1:{receiver.port}/hooks/pumps?token=********"
                    )
                    assert row["next_attempt"] > row["created"]
                    assert row["last_error"] == "HTTP 503"

                listed = await trigd("outbox", "list", "--config", str(config), cwd=cwd)
                assert listed.returncode == 0, listed.stderr
                header, *lines = listed.stdout.splitlines()
                assert header.split("\t")[:6] == [
                    "id",
                    "status",
                    "attempts",
                    "next attempt",
                    "automation",
                    "url",
                ]
                for line in lines:
                    assert line.split("\t")[4] == "pump pressure burst"
                everything = listed.stdout + json.dumps(found)
                assert TOKEN not in everything
                assert "pa55" not in everything

                first, second = sorted(found)
                common = first[
                    : next(i for i, (a, b) in enumerate(zip(first, second, strict=True)) if a != b)
                ]
                ambiguous = await trigd(
                    "outbox", "send-now", common, "--config", str(config), cwd=cwd
                )
                assert ambiguous.returncode == 1
                assert "more than one delivery id" in ambiguous.stderr
                assert first in ambiguous.stderr
                assert second in ambiguous.stderr

                # send-now by a unique prefix, the endpoint fixed: sent at the next claim,
                # which the next firing's notify() brings at once (else within a minute)
                receiver.handler = answer(200)
                hurried = await trigd(
                    "outbox",
                    "send-now",
                    first[: len(common) + 1],
                    "--config",
                    str(config),
                    cwd=cwd,
                )
                assert hurried.returncode == 0, hurried.stderr
                assert hurried.stdout.startswith(f"{first} due now")

                cancelled = await trigd("outbox", "cancel", second, "--config", str(config))
                assert cancelled.returncode == 0, cancelled.stderr
                assert cancelled.stdout == f"{second} cancelled: it will not be sent\n"

                events = pressure("pump.3") + "\n"
                assert (await trigd("emit", "--url", daemon.url, stdin=events)).returncode == 0
                while True:
                    found = await rows(config, cwd)
                    others = [r["status"] for k, r in found.items() if k != second]
                    if len(found) == 3 and others == ["delivered", "delivered"]:
                        break
                    await trio.sleep(0.1)
                assert found[second]["status"] == "cancelled"
                assert found[second]["attempts"] == 1

                again = await trigd("outbox", "send-now", second, "--config", str(config))
                assert again.returncode == 1
                assert f"{second} is cancelled: only pending deliveries" in again.stderr
                late = await trigd("outbox", "cancel", first, "--config", str(config))
                assert late.returncode == 1
                assert f"{first} is delivered: only pending and dead" in late.stderr
                only = await trigd(
                    "outbox", "list", "--status", "cancelled", "--config", str(config), cwd=cwd
                )
                assert [line.split("\t")[0] for line in only.stdout.splitlines()[1:]] == [second]

                status = await trigd("status", "--config", str(config), cwd=cwd)
                assert status.returncode == 0, status.stderr
                assert f"database: {tmp_path / 'trigd.db'}" in status.stdout
                assert "2 delivered, 0 dead, 1 cancelled" in status.stdout
                assert await daemon.stop() == 0
            # nothing the receiver saw after the cancel was for the cancelled row
            assert sum(r.headers["webhook-id"] == second for r in receiver.requests) == 1
            nursery.cancel_scope.cancel()


async def test_an_unknown_id_is_an_error_and_changes_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with trio.fail_after(60):
        async with running_daemon(config) as daemon:
            for action in ("cancel", "send-now", "retry"):
                result = await trigd("outbox", action, "nope", "--config", str(config))
                assert result.returncode == 1
                assert (
                    result.stderr == f"trigd outbox {action}: no delivery id starts with 'nope'\n"
                )
            assert await daemon.stop() == 0


async def test_a_dead_delivery_retried_after_its_automation_was_fixed_is_sent_as_fixed(
    tmp_path: Path,
) -> None:
    broken = burst_automation("http://127.0.0.1:9/x", threshold=1, payload='{"v": "broken"}')
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            receiver: Receiver = await nursery.start(run_receiver, answer(410))
            broken["actions"][0]["url"] = receiver.url("/old")
            automations = write_automations(tmp_path, [broken])
            config = write_config(tmp_path, [automations])
            async with running_daemon(config) as daemon:
                emitted = await trigd("emit", "--url", daemon.url, stdin=pressure("pump.1") + "\n")
                assert emitted.returncode == 0
                first = await receiver.next_request()
                dead_id = first.headers["webhook-id"]
                while True:  # polled: the daemon is another process
                    if (await rows(config, tmp_path))[dead_id]["status"] == "dead":
                        break
                    await trio.sleep(0.1)

                fixed = burst_automation(
                    receiver.url("/fixed"), threshold=1, payload='{"v": "{{ event.resource.id }}"}'
                )
                automations.write_text(json.dumps([fixed]))
                daemon.send(signal.SIGHUP)
                await daemon.wait_for_log("reloaded 1 automations")
                receiver.handler = answer(200)
                retried = await trigd("outbox", "retry", dead_id[:-4], "--config", str(config))
                assert retried.returncode == 0, retried.stderr
                # the next firing wakes the sender, which claims the revived row with it
                await trigd("emit", "--url", daemon.url, stdin=pressure("pump.2") + "\n")
                again = [await receiver.next_request(), await receiver.next_request()]
                [resent] = [r for r in again if r.headers["webhook-id"] == dead_id]
                assert resent.target == "/fixed"
                assert json.loads(resent.body) == {"v": "pump.1"}  # the fixed template
                assert await daemon.stop() == 0
            nursery.cancel_scope.cancel()
