"""`trigd serve` as a real process with secrets given as references: a systemd credential
and an environment variable. The webhook is signed and carries its header, while no body,
database file, log line, `trigd status` or `trigd outbox list` holds either value; a
reload whose reference does not resolve, or a header that would break the request, is
refused naming the field. Network on 127.0.0.1 only; every wait bounded."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import trio
from standardwebhooks import Webhook

from tests.support.daemon_process import (
    burst_automation,
    database_bytes,
    run_trigd,
    running_daemon,
    write_automations,
    write_config,
)
from tests.support.webhook_receiver import Receiver, answer, run_receiver

pytestmark = pytest.mark.slow

SIGNING = "whsec_c2VjcmV0LWZyb20tYS1jcmVkZW50aWFs"  # in $CREDENTIALS_DIRECTORY/hook
TOKEN = "Bearer e2e-1f0a7d"  # in the environment, HOOK_TOKEN_E2E


def pressure() -> str:
    return json.dumps({"event": "pump.pressure.high", "resource": {"prefect.resource.id": "p.1"}})


async def test_referenced_secrets_sign_and_authorize_but_are_never_shown(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "hook").write_text(f"{SIGNING}\n")
    env = {"CREDENTIALS_DIRECTORY": str(credentials), "HOOK_TOKEN_E2E": TOKEN}
    db = str(tmp_path / "trigd.db")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            receiver: Receiver = await nursery.start(run_receiver, answer(200))
            hook = burst_automation(receiver.url(), payload=None, secret="credential:hook")
            hook["trigger"]["match"] = {"prefect.resource.id": "p.*"}
            hook["actions"][0]["headers"] = {"Authorization": "env:HOOK_TOKEN_E2E"}
            automations = write_automations(tmp_path, [hook])
            async with running_daemon(write_config(tmp_path, [automations]), env=env) as daemon:
                lines = "\n".join([pressure()] * 3) + "\n"
                emitted = await run_trigd("emit", "--url", daemon.url, stdin=lines)
                assert emitted.returncode == 0, emitted.stderr
                request = await receiver.next_request()
                Webhook(SIGNING).verify(request.body, request.headers)
                assert request.headers["authorization"] == TOKEN
                sent = json.loads(request.body)  # the default body: the TriggeredAction
                assert sent["action"]["secret"] == "********"
                assert sent["action"]["headers"] == {"Authorization": "********"}

                shown = [
                    await run_trigd("status", "--db", db, "--json"),
                    await run_trigd("status", "--db", db),
                    await run_trigd("outbox", "list", "--db", db),
                ]
                assert all(r.returncode == 0 for r in shown), shown

                (credentials / "hook").unlink()
                daemon.send(signal.SIGHUP)
                await daemon.wait_for_log("reload refused")
                assert "actions[0].secret: 'credential:hook' cannot be read" in daemon.log
                assert await daemon.stop() == 0
            nursery.cancel_scope.cancel()
    stored = database_bytes(tmp_path)
    everything = [request.body, stored, daemon.log.encode()]
    everything += [r.stdout + r.stderr for r in shown]
    for where in everything:
        for secret in (SIGNING, TOKEN, SIGNING.removeprefix("whsec_")):
            assert secret.encode() not in where


async def test_serve_refuses_a_header_that_would_break_the_request(tmp_path: Path) -> None:
    hook = burst_automation("http://127.0.0.1:9/x")
    hook["actions"][0]["headers"] = {"Content-Length": "0", "X-Key": "k3y\r\nHost: elsewhere"}
    automations = write_automations(tmp_path, [hook])
    with trio.fail_after(30):
        result = await run_trigd("serve", "--config", str(write_config(tmp_path, [automations])))
    assert result.returncode == 2
    error = result.stderr.decode()
    assert "automation 'pump pressure burst': actions[0].headers: " in error
    assert "header 'Content-Length' cannot be set by an automation" in error
    assert "header 'X-Key': the value must be printable ASCII" in error
    assert "k3y" not in error
