"""Prefect's own event clients against trigd. Not a test module: tests/e2e/test_prefect_compat.py
runs it with the Python of a separate virtualenv that has Prefect installed, with
PREFECT_API_URL pointing at a test daemon, and reads the one JSON object it prints.

Two paths, as users take them:

* `PrefectEventsClient` as an async context manager, `await client.emit(event)`;
* `emit_event(...)`, which hands events to the global `EventsWorker` (a background
  thread with its own client); `EventsWorker.drain_all` waits until they are sent, since
  the process would otherwise exit first.

Prefect checks the server version (`GET {api}/admin/version`) before connecting; trigd
does not serve it. The log records of that check are captured and reported.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

import prefect  # type: ignore[import-not-found, unused-ignore]
from prefect.events import Event, emit_event  # type: ignore[import-not-found, unused-ignore]
from prefect.events.clients import (  # type: ignore[import-not-found, unused-ignore]
    PrefectEventsClient,
)
from prefect.events.worker import EventsWorker  # type: ignore[import-not-found, unused-ignore]

CLIENT_PUMP = "pump.7"
WORKER_PUMP = "pump.8"
READINGS = 3  # per pump: the automation's threshold
DRAIN_TIMEOUT = 30.0  # seconds for the events worker to send what it holds


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname} {record.name}: {record.getMessage()}")


def reading(pump: str, index: int) -> dict[str, Any]:
    return {
        "event": "pump.pressure.high",
        "resource": {"prefect.resource.id": pump, "site": "north"},
        "related": [{"prefect.resource.id": "site.north", "prefect.resource.role": "site"}],
        "payload": {"reading": index},
    }


async def with_client() -> list[str]:
    ids: list[str] = []
    async with PrefectEventsClient() as client:
        for index in range(READINGS):
            event = Event(**reading(CLIENT_PUMP, index))
            await client.emit(event)
            ids.append(str(event.id))
    return ids


def with_emit_event() -> list[dict[str, str | None]]:
    sent: list[dict[str, str | None]] = []
    previous = None
    for index in range(READINGS):
        event = emit_event(**reading(WORKER_PUMP, index), follows=previous)
        if event is None:
            raise SystemExit("emit_event did not emit: is PREFECT_API_URL set?")
        sent.append({"id": str(event.id), "follows": event.follows and str(event.follows)})
        previous = event
    EventsWorker.drain_all(timeout=DRAIN_TIMEOUT)
    return sent


def main() -> int:
    recorder = Recorder()
    prefect_logger = logging.getLogger("prefect")
    prefect_logger.addHandler(recorder)
    logging.getLogger("prefect.events.clients").setLevel(logging.DEBUG)
    client_ids = asyncio.run(with_client())
    worker_events = with_emit_event()
    print(
        json.dumps(
            {
                "prefect_version": prefect.__version__,
                "client": client_ids,
                "emit_event": worker_events,
                "log": recorder.messages,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
