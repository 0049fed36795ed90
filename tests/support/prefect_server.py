"""A real Prefect server for the upstream tests: `prefect server start` from the pinned Prefect
of `.venv-prefect` (tests/support/prefect_venv.py), on 127.0.0.1 and a free port, with its
own PREFECT_HOME and SQLite database under a test directory and an auth string set, so the
tests exercise Prefect's authenticated protocol.

`PrefectServer.start()` waits for `/api/health`; `stop()` ends the process (it can be started
again on the same port and database, as after an outage). `query_events` reads the server's
`POST /api/events/filter`, following its pages; `emit` sends events to its `/api/events/in`
(Prefect's protocol: the `prefect` subprotocol, the auth message, a ping after the events).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Final

import attrs
import httpx
import trio_websocket

from tests.support.prefect_venv import prefect_python

AUTH_STRING: Final = "trigd-upstream:s3cret-upstream"
"""The server's PREFECT_SERVER_API_AUTH_STRING (user:password, as Prefect's basic auth reads it)."""
START_TIMEOUT: Final = 120.0  # seconds for the server to answer /api/health


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def basic_auth(auth_string: str = AUTH_STRING) -> dict[str, str]:
    """The header Prefect's HTTP API wants when the server has an auth string."""
    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}


def server_env(home: Path, port: int) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "PREFECT_HOME": str(home / ".prefect"),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_API_AUTH_STRING": AUTH_STRING,
        "PREFECT_API_AUTH_STRING": AUTH_STRING,
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
        "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }


@attrs.define
class PrefectServer:
    home: Path
    port: int = attrs.field(factory=free_port)
    settings: dict[str, str] = attrs.field(factory=dict)  # more PREFECT_* for the server
    process: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    def address(self) -> list[str]:
        return ["--host", "127.0.0.1", "--port", str(self.port)]

    def python(self) -> Path:
        return prefect_python()

    def env(self) -> dict[str, str]:
        return {**server_env(self.home, self.port), **self.settings}

    def start(self) -> None:
        python = prefect_python()  # skips the test when Prefect cannot be installed
        self.home.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(python), "-m", "prefect", "server", "start", *self.address()],
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server ended at start:\n{self.log()}")
            try:
                if httpx.get(f"{self.api_url}/health", headers=basic_auth(), timeout=2).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"prefect server did not answer /api/health:\n{self.log()}")

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def query_events(self, filter_: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Every event the server stores that matches `filter_`, following its pages."""
        headers = basic_auth()
        body = {"filter": filter_ or {}, "limit": 50}
        reply = httpx.post(f"{self.api_url}/events/filter", json=body, headers=headers, timeout=30)
        reply.raise_for_status()
        page = reply.json()
        events: list[dict[str, Any]] = list(page["events"])
        while page.get("next_page"):
            reply = httpx.get(page["next_page"], headers=headers, timeout=30)
            reply.raise_for_status()
            page = reply.json()
            events.extend(page["events"])
        return events

    async def emit(self, events: list[dict[str, Any]]) -> None:
        """Send `events` to the server's `/api/events/in`, then wait for a ping's pong."""
        url = f"ws://127.0.0.1:{self.port}/api/events/in"
        async with trio_websocket.open_websocket_url(url, subprotocols=["prefect"]) as ws:
            await ws.send_message(json.dumps({"type": "auth", "token": AUTH_STRING}))
            assert json.loads(await ws.get_message())["type"] == "auth_success"
            for event in events:
                await ws.send_message(json.dumps(event))
            await ws.ping()
