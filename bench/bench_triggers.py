"""Trigger engine benchmark: prints numbers, asserts nothing.

    .venv/bin/python bench/bench_triggers.py

* reactive cost per event (`Engine.process_batch`, batches of 100 in one transaction,
  events stored, ordering included) with 1, 100 and 10,000 automations loaded, exactly
  one of which covers the events: once counting without firing, once firing on every
  event (act(): state-change event, outbox row, action event);
* one proactive pass over 100,000 open buckets of one for_each trigger.
"""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final
from uuid import uuid4

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.core.automations import Automation
from daemon.core.buckets import Bucket
from daemon.core.events import ReceivedEvent
from daemon.engine.engine import Engine
from store.buckets import write_bucket
from store.db import Store

T: Final = datetime(2026, 8, 21, 16, 0, 0, tzinfo=UTC)
BATCH: Final = 100  # events per transaction
EVENTS: Final = 5_000  # events per measurement
BUCKETS: Final = 100_000


def _automation(name: str, trigger: dict[str, Any]) -> Automation:
    return Automation.model_validate(
        {"name": name, "trigger": trigger, "actions": [{"type": "do-nothing"}]}
    )


def _others(n: int) -> list[Automation]:
    """Automations that cannot match the benchmark events: 90 % exact names, 10 % globs."""
    out = []
    for i in range(n):
        pattern = f"other.{i}.*" if i % 10 == 0 else f"other.{i}.happened"
        out.append(
            _automation(
                f"other {i}",
                {
                    "type": "event",
                    "posture": "Reactive",
                    "expect": [pattern],
                    "match": {"prefect.resource.id": f"thing.{i}"},
                    "for_each": ["prefect.resource.id"],
                    "threshold": 3,
                    "within": 60,
                },
            )
        )
    return out


def _matching(fires: bool) -> Automation:
    return _automation(
        "the one",
        {
            "type": "event",
            "posture": "Reactive",
            "expect": ["pump.pressure.high"],
            "match": {"prefect.resource.id": "pump.*"},
            "for_each": ["prefect.resource.id"],
            "threshold": 1 if fires else 1_000_000_000,
            "within": 0 if fires else 3600,
        },
    )


def _events(n: int) -> list[ReceivedEvent]:
    return [
        ReceivedEvent.model_validate(
            {
                "occurred": T + timedelta(milliseconds=i),
                "event": "pump.pressure.high",
                "resource": {"prefect.resource.id": f"pump.{i % 50}", "site": "north"},
                "related": [{"prefect.resource.id": "site.north", "prefect.resource.role": "site"}],
                "payload": {"bar": 9.2},
                "id": uuid4(),
                "received": T + timedelta(milliseconds=i),
            }
        )
        for i in range(n)
    ]


def bench_reactive(directory: Path, loaded: int, fires: bool) -> float:
    store = Store.open(directory / f"reactive-{loaded}-{fires}.db", synchronous="normal")
    engine = Engine()
    automations = [_matching(fires), *_others(loaded - 1)]
    with store.conn:
        engine.load_automations(store.conn, automations, T)
    events = _events(EVENTS)
    now = T + timedelta(seconds=10)
    # the inbox is drained by the next batch, so it is part of the measured cost
    started = time.perf_counter()
    for start in range(0, len(events), BATCH):
        with store.conn:
            engine.process_batch(store.conn, events[start : start + BATCH], now)
    elapsed = time.perf_counter() - started
    store.close()
    return elapsed / len(events)


def bench_proactive(directory: Path) -> tuple[float, int]:
    store = Store.open(directory / "proactive.db", synchronous="normal")
    engine = Engine()
    sla = _automation(
        "stuck pumps",
        {
            "type": "event",
            "posture": "Proactive",
            "after": ["pump.started"],
            "expect": ["pump.stopped"],
            "match": {"prefect.resource.id": "pump.*"},
            "for_each": ["prefect.resource.id"],
            "threshold": 1,
            "within": 3600,
        },
    )
    with store.conn:
        engine.load_automations(store.conn, [sla], T)
        trigger_id, automation_id = str(sla.trigger.id), str(sla.id)
        for i in range(BUCKETS):
            start = T + timedelta(milliseconds=i)
            bucket = Bucket((f"pump.{i}",), start, start + timedelta(hours=1), 0)
            write_bucket(store.conn, trigger_id, automation_id, bucket, proactive=True)
    started = time.perf_counter()
    with store.conn:
        engine.proactive(store.conn, T + timedelta(minutes=5))
    elapsed = time.perf_counter() - started
    rows = store.conn.execute("SELECT count(*) FROM buckets").fetchone()
    store.close()
    return elapsed, int(rows[0]) if rows else 0


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        print(f"reactive, per event (batches of {BATCH}, {EVENTS} events, one automation matches)")
        for loaded in (1, 100, 10_000):
            counting = bench_reactive(directory, loaded, fires=False)
            firing = bench_reactive(directory, loaded, fires=True)
            print(
                f"  {loaded:>6} automations: {counting * 1e6:7.1f} µs counting, "
                f"{firing * 1e6:7.1f} µs firing on every event"
            )
        elapsed, left = bench_proactive(directory)
        print(
            f"proactive pass over {BUCKETS} open buckets: {elapsed:.2f} s "
            f"({elapsed / BUCKETS * 1e6:.1f} µs per bucket; {left} buckets remain)"
        )


if __name__ == "__main__":
    main()
