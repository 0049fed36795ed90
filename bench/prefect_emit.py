"""Prefect's own client emitting events to a Prefect server, for bench/bench_upstream.py.
Not run by trigd's interpreter: bench_upstream runs it with the Prefect virtualenv's Python
(PREFECT_API_URL and PREFECT_API_AUTH_STRING set) and reads the JSON object it prints.

    python prefect_emit.py COUNT CHECKPOINT_EVERY

Emits COUNT events with `PrefectEventsClient` (checkpoint_every = CHECKPOINT_EVERY), then a
final checkpoint, and reports the seconds from the first emit to the last pong, its own
CPU seconds, and the id of the last event.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time

from prefect.events import Event  # type: ignore[import-not-found, unused-ignore]
from prefect.events.clients import (  # type: ignore[import-not-found, unused-ignore]
    PrefectEventsClient,
)


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main(count: int, every: int) -> None:
    events = [
        Event(
            event="pump.pressure.high",
            resource={"prefect.resource.id": f"pump.{i % 1000}", "site": "north"},
            related=[{"prefect.resource.id": "site.north", "prefect.resource.role": "site"}],
            payload={"bar": 9.2, "reading": i},
        )
        for i in range(count)
    ]
    async with PrefectEventsClient(checkpoint_every=every) as client:
        cpu0, start = cpu(), time.perf_counter()
        for event in events:
            await client.emit(event)
        await client._force_checkpoint()  # the same confirmation trigd waits for
        elapsed, used = time.perf_counter() - start, cpu() - cpu0
    print(json.dumps({"seconds": elapsed, "cpu": used, "last_id": str(events[-1].id)}))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
