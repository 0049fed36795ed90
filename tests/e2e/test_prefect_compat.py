"""Prefect's real client against trigd (docs/PROTOCOL.md#using-prefects-client):
`PrefectEventsClient` and `emit_event`, unchanged, with PREFECT_API_URL pointing at the daemon.

Prefect lives in its own virtualenv, `.venv-prefect/` at the repository root, made on the
first run (about a minute and a half) and reused afterwards; a marker file says it was
completed. When the package registry cannot be reached the test is skipped, saying so.
tests/support/prefect_client_script.py is what runs inside it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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
from tests.support.paths import REPO, SUPPORT
from tests.support.webhook_receiver import Receiver, answer, run_receiver

pytestmark = pytest.mark.slow

VENV: Final = REPO / ".venv-prefect"
READY_MARKER: Final = VENV / ".trigd-ready"
PREFECT_REQUIREMENT: Final = "prefect>=3.8,<3.9.1"  # 3.9.1 wants a newer certifi than we get
SCRIPT: Final = SUPPORT / "prefect_client_script.py"
TOKEN: Final = "prefect-compat-token"
VENV_TIMEOUT: Final = 540  # seconds to create the virtualenv and install Prefect
RUN_TIMEOUT: Final = 90  # seconds for the daemon, the script and the webhooks
READINGS: Final = 3  # per pump, as the script sends them; the threshold


def _python() -> Path:
    return VENV / "bin" / "python"


@contextmanager
def _venv_lock() -> Iterator[None]:
    """Two test processes must not build the same virtualenv at once."""
    with open(REPO / ".venv-prefect.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=VENV_TIMEOUT, check=False
    )


def prefect_python() -> Path:
    """The Prefect virtualenv's python, made once; skips the test when it cannot be made."""
    with _venv_lock():
        if READY_MARKER.exists():
            return _python()
        shutil.rmtree(VENV, ignore_errors=True)
        made = _run(sys.executable, "-m", "venv", VENV)
        if made.returncode != 0:
            pytest.skip(f"cannot create {VENV}: {made.stderr.strip()[-500:]}")
        installed = _run(_python(), "-m", "pip", "install", "--quiet", PREFECT_REQUIREMENT)
        if installed.returncode != 0:
            errors = [line for line in installed.stderr.splitlines() if "ERROR" in line]
            shutil.rmtree(VENV, ignore_errors=True)
            pytest.skip(f"cannot install {PREFECT_REQUIREMENT}: {' '.join(errors)[-500:]}")
        READY_MARKER.write_text(PREFECT_REQUIREMENT + "\n")
        return _python()


def script_env(home: Path, api_url: str) -> dict[str, str]:
    """Only what the script needs: no TRIGD_* and nothing from the developer's profile."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "PREFECT_HOME": str(home / ".prefect"),
        "PREFECT_API_URL": api_url,
        "PREFECT_API_AUTH_STRING": TOKEN,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
        "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }


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
    # Prefect's GET /api/admin/version fails against trigd and is ignored
    # (docs/PROTOCOL.md#using-prefects-client)
    checks = [line for line in report["log"] if "check server version" in line]
    assert checks, report["log"]
    assert all("Unauthorized" not in line for line in checks)
