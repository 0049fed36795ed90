"""Prefect's own `PrefectEventSubscriber` against trigd's events out. Not a test module:
tests/e2e/test_events_out.py runs it with the Python of the Prefect virtualenv, with
PREFECT_API_URL pointing at a test daemon.

Usage: `python prefect_subscriber_script.py PREFIX COUNT`: subscribes to the events whose
name starts with PREFIX, prints `ready` once subscribed, then one JSON line per event
received (id, event, resource id), and exits after COUNT of them.
"""

from __future__ import annotations

import asyncio
import json
import sys

from prefect.events.clients import (  # type: ignore[import-not-found, unused-ignore]
    PrefectEventSubscriber,
)
from prefect.events.filters import (  # type: ignore[import-not-found, unused-ignore]
    EventFilter,
    EventNameFilter,
)


async def main(prefix: str, count: int) -> None:
    flt = EventFilter(event=EventNameFilter(prefix=[prefix]))
    async with PrefectEventSubscriber(filter=flt, reconnection_attempts=0) as subscriber:
        print("ready", flush=True)
        seen = 0
        async for event in subscriber:
            line = {"id": str(event.id), "event": event.event, "resource": event.resource.id}
            print(json.dumps(line), flush=True)
            seen += 1
            if seen == count:
                return


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
