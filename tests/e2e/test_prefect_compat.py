"""Prefect's real client against trigd (docs/PROTOCOL.md#using-prefects-client):
`PrefectEventsClient` and `emit_event`, unchanged, with PREFECT_API_URL pointing at the daemon.

Prefect lives in its own virtualenv (tests/support/prefect_venv.py);
tests/support/prefect_client_script.py is what runs inside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import apsw
import pytest
import trio

from tests.support.daemon_process import (
    burst_automation,
    running_daemon,
    write_automations,
    write_config,
)
from tests.support.paths import SUPPORT
from tests.support.prefect_venv import TOKEN, VENV_TIMEOUT, prefect_python, script_env
from tests.support.webhook_receiver import Receiver, answer, run_receiver

pytestmark = pytest.mark.slow

SCRIPT: Final = SUPPORT / "prefect_client_script.py"
RUN_TIMEOUT: Final = 90  # seconds for the daemon, the script and the webhooks
READINGS: Final = 3  # per pump, as the script sends them; the threshold


def pressure_automation(url: str) -> dict[str, Any]:
    return burst_automation(
        url,
        name="pressure from prefect clients",
        threshold=READINGS,
        payload='{"pump": "{{ event.resource.id }}"}',
        secret=None,
    )


def stored(db: Path, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The stored events among `ids`, by id."""
    conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        marks = ",".join("?" * len(ids))
        rows = conn.execute(f"SELECT id, data FROM events WHERE id IN ({marks})", ids)
        return {str(id_): json.loads(data) for id_, data in rows}
    finally:
        conn.close()


@pytest.mark.timeout(VENV_TIMEOUT + RUN_TIMEOUT + 30)  # the first run builds the virtualenv
async def test_prefect_events_client_and_emit_event_reach_trigd_and_fire(tmp_path: Path) -> None:
    with trio.fail_after(VENV_TIMEOUT):
        python = await trio.to_thread.run_sync(prefect_python)
    with trio.fail_after(RUN_TIMEOUT):
        async with trio.open_nursery() as nursery:
            receiver: Receiver = await nursery.start(run_receiver, answer(204))
            automations = write_automations(tmp_path, [pressure_automation(receiver.url())])
            config = write_config(tmp_path, [automations], server={"auth_token": TOKEN})
            async with running_daemon(config) as daemon:
                api_url = f"http://127.0.0.1:{daemon.port}/api"
                ran = await trio.run_process(
                    [str(python), str(SCRIPT)],
                    env=script_env(tmp_path, api_url),
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                assert ran.returncode == 0, ran.stderr.decode(errors="replace")
                report = json.loads(ran.stdout.decode().strip().splitlines()[-1])
                hooks = sorted(
                    [json.loads((await receiver.next_request()).body)["pump"] for _ in range(2)]
                )
                assert await daemon.stop() == 0, daemon.log
            nursery.cancel_scope.cancel()

    assert hooks == ["pump.7", "pump.8"]
    assert len(receiver.requests) == 2
    client_ids = report["client"]
    worker = report["emit_event"]
    events = stored(tmp_path / "trigd.db", client_ids + [e["id"] for e in worker])
    assert set(events) == set(client_ids) | {e["id"] for e in worker}
    for event in events.values():
        assert event["event"] == "pump.pressure.high"
        assert event["resource"]["site"] == "north"
        assert event["related"] == [
            {"prefect.resource.id": "site.north", "prefect.resource.role": "site"}
        ]
    # emit_event's follows (set because the events are close in time) reach trigd
    assert [e["follows"] for e in worker] == [None] + [e["id"] for e in worker[:-1]]
    assert [events[e["id"]]["follows"] for e in worker] == [e["follows"] for e in worker]
    # Prefect's GET /api/admin/version gets trigd's version, which it cannot parse as a
    # Prefect release and so skips (docs/PROTOCOL.md#using-prefects-client)
    checks = [line for line in report["log"] if "server version" in line]
    assert checks, report["log"]
    assert all("Unable to parse server version 'trigd " in line for line in checks), checks
