"""What events out costs the daemon per committed event, by number of subscribers.

    .venv/bin/python bench/bench_events_out.py [--events 50000] [--batch 500] [--repeat 3]

Run it from the repository root. In-process, no sockets: batches of ``ReceivedEvent``s
(Prefect's shape, half of them named ``pump.*``) go through ``EventsHub.publish`` as the
evaluator hands them over after a commit, to 0, 1 and 10 subscribers filtering on the
``pump.`` prefix; each subscriber's queue is then taken and encoded into websocket frames
as its connection task does (``Published.frame``: each event is encoded once, by the
first subscriber that sends it).
Reported: CPU time (``time.process_time``) per committed event for the evaluator's side
(publish: what ingest pays, and 0 subscribers is the cost of the feature on the hot path)
and for the subscribers' side (the writers' encoding), best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.core.event_filter import parse_filter
from daemon.core.events import ReceivedEvent
from daemon.runtime.events_hub import EventsHub, Subscriber

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def events(count: int) -> list[ReceivedEvent]:
    return [
        ReceivedEvent.model_validate(
            {
                "occurred": NOW,
                "event": "pump.pressure.high" if i % 2 else "valve.opened",
                "resource": {"prefect.resource.id": f"pump.{i % 1000}", "site": "north"},
                "related": [{"prefect.resource.id": "site.north", "prefect.resource.role": "site"}],
                "payload": {"bar": 9.2, "reading": i},
                "id": uuid4(),
                "received": NOW,
            }
        )
        for i in range(count)
    ]


def run(stream: list[ReceivedEvent], batch: int, subscribers: int) -> tuple[float, float]:
    """(publish CPU, encode CPU) in seconds for the whole stream."""
    import trio

    async def main() -> tuple[float, float]:
        hub = EventsHub()
        flt = parse_filter({"event": {"prefix": ["pump."]}})
        subs: list[Subscriber] = [hub.subscribe(flt, batch + 1) for _ in range(subscribers)]
        publish = encode = 0.0
        for start in range(0, len(stream), batch):
            chunk = stream[start : start + batch]
            t0 = time.process_time()
            if hub:  # as the evaluator does
                hub.publish(chunk)
            t1 = time.process_time()
            for sub in subs:
                frames = [published.frame() for published in sub.take()]
                assert frames
            publish += t1 - t0
            encode += time.process_time() - t1
        return publish, encode

    return trio.run(main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    stream = events(args.events)
    for subscribers in (0, 1, 10):
        best = min(
            (run(stream, args.batch, subscribers) for _ in range(args.repeat)),
            key=lambda r: r[0] + r[1],
        )
        publish_us, encode_us = (seconds / args.events * 1e6 for seconds in best)
        print(
            f"{subscribers:>2} subscribers: publish {publish_us:.2f} µs/event (the evaluator), "
            f"encode {encode_us:.2f} µs/event (their writers)"
        )


if __name__ == "__main__":
    main()
