"""Dead-man switch over many devices: one proactive pass. Prints numbers, asserts nothing.

    .venv/bin/python bench/bench_proactive.py [DEVICES ...]     (default 10000 100000 1000000)

DEVICES devices heartbeat into one Proactive `for_each` trigger (`after` = `expect` =
`device.heartbeat`, threshold 1, within 60 s): every device has an open bucket whose
window ends within the next minute (its last heartbeat restarted it), except one in a
thousand, whose window ended before the pass (a dead device: the pass fires for it).
Buckets are written as the engine writes them, with the last heartbeat as `last_event`.

The pass runs as the daemon runs it: the real sweeper task (`run_sweeper`) through the
real store gateway, while a probe task sends a no-op call through the same gateway every
millisecond, as the evaluator sends each batch. Printed per size:

* pass: wall time from the start of the sweeper's first pass to its commit, and the
  process CPU time (getrusage) over it;
* stall: the longest time a probe call waited for the gateway (what an ack waits for
  while the pass holds the store thread), and the longest CPU time of one store call
  (the same hold without the other processes of a busy machine);
* db: the database's size (main file after a checkpoint) and per bucket.

Run the old code beside the new one with a worktree of the older commit:

    git worktree add --detach /tmp/base-a <commit>
    (cd /tmp/base-a && /work/wt-perfa/.venv/bin/python /work/wt-perfa/bench/bench_proactive.py)
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final
from uuid import UUID

import trio

# the code under test is the checkout the command runs in (see above)
sys.path.insert(0, os.getcwd())

from daemon.core.automations import Automation
from daemon.core.buckets import Bucket, EventRef
from daemon.core.clock import to_us
from daemon.core.events import ReceivedEvent
from daemon.engine.engine import Engine
from daemon.runtime.gateway import StoreGateway
from daemon.runtime.sweeper import SweepSettings, run_sweeper
from store.db import Store

NOW: Final = datetime(2026, 8, 21, 16, 0, 0, tzinfo=UTC)
WITHIN: Final = timedelta(seconds=60)
DEAD_EVERY: Final = 1_000  # one device in this many stopped heartbeating
WRITE_BATCH: Final = 50_000  # buckets written per transaction while populating
PROBE_PERIOD: Final = 0.001  # seconds between probe calls


def _automation() -> Automation:
    return Automation.model_validate(
        {
            "name": "device dead-man",
            "trigger": {
                "type": "event",
                "posture": "Proactive",
                "after": ["device.heartbeat"],
                "expect": ["device.heartbeat"],
                "for_each": ["prefect.resource.id"],
                "threshold": 1,
                "within": 60,
            },
            "actions": [{"type": "do-nothing"}],
        }
    )


def _heartbeat_json(i: int, occurred: datetime) -> str:
    return ReceivedEvent.model_validate(
        {
            "id": str(UUID(int=i + 1)),
            "occurred": occurred.isoformat(),
            "received": occurred.isoformat(),
            "event": "device.heartbeat",
            "resource": {"prefect.resource.id": f"device.{i:07d}"},
        }
    ).model_dump_json()


def _populate(conn: object, engine: Engine, automation: Automation, devices: int) -> None:
    """Write one bucket per device with a raw INSERT of the row `write_bucket` would write
    (the schema's columns differ between versions, so ask the table which it has)."""
    from store.buckets import write_bucket

    trigger_id, automation_id = str(automation.trigger.id), str(automation.id)
    template = _heartbeat_json(0, NOW)
    for first in range(0, devices, WRITE_BATCH):
        with conn:  # type: ignore[attr-defined]
            for i in range(first, min(devices, first + WRITE_BATCH)):
                if i % DEAD_EVERY == DEAD_EVERY - 1:
                    end = NOW - timedelta(seconds=1 + i % 30)
                else:
                    end = NOW + timedelta(microseconds=1 + (i * 7919) % 59_000_000)
                start = end - WITHIN
                event = template.replace("device.0000000", f"device.{i:07d}")
                bucket = Bucket((f"device.{i:07d}",), start, end, 0, EventRef.from_json(event))
                write_bucket(conn, trigger_id, automation_id, bucket, proactive=True)  # type: ignore[arg-type]


class TimedGateway(StoreGateway):
    """The real gateway, noting the longest CPU time (of the store thread) of one call."""

    longest_cpu = 0.0

    async def run(self, fn: Any, *args: Any) -> Any:  # type: ignore[override]
        def timed(conn: Any, *rest: Any) -> Any:
            started = time.thread_time()
            try:
                return fn(conn, *rest)
            finally:
                self.longest_cpu = max(self.longest_cpu, time.thread_time() - started)

        return await super().run(timed, *args)


async def _pass(gateway: StoreGateway, engine: Engine) -> tuple[float, float, float]:
    """One sweeper pass under probing: (wall s, CPU s, longest probe wait s)."""
    settings = SweepSettings(timedelta(hours=1), timedelta(days=7), timedelta(days=7))
    done = trio.Event()
    longest = 0.0

    async def probe() -> None:
        nonlocal longest
        while True:
            sent = time.perf_counter()
            await gateway.run(lambda conn: None)
            longest = max(longest, time.perf_counter() - sent)
            await trio.sleep(PROBE_PERIOD)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe)
        await trio.sleep(0.05)
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        await nursery.start(
            lambda *, task_status: run_sweeper(
                gateway,
                engine,
                settings,
                clock=lambda: NOW,
                on_commit=done.set,
                task_status=task_status,
            )
        )
        await done.wait()
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    used = (after.ru_utime + after.ru_stime) - (cpu.ru_utime + cpu.ru_stime)
    return wall, used, longest


def bench(directory: Path, devices: int) -> None:
    path = directory / f"proactive-{devices}.db"
    store = Store.open(path, synchronous="normal")
    engine = Engine()
    automation = _automation()
    with store.conn:
        engine.load_automations(store.conn, [automation], NOW)
    _populate(store.conn, engine, automation, devices)
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = path.stat().st_size
    gateway = TimedGateway(store)
    wall, cpu, stall = trio.run(_pass, gateway, engine)
    fired = store.conn.execute("SELECT count(*) FROM inbox").fetchone()
    left = store.conn.execute(
        "SELECT count(*) FROM buckets WHERE end_us <= ?", (to_us(NOW),)
    ).fetchone()
    store.close()
    print(
        f"{devices:>9} devices: pass {wall * 1e3:8.1f} ms wall, {cpu * 1e3:8.1f} ms CPU; "
        f"longest stall {stall * 1e3:7.1f} ms (longest store call {gateway.longest_cpu * 1e3:6.1f} "
        f"ms CPU); db {size / 2**20:7.1f} MiB "
        f"({size / devices:5.0f} B/bucket); fired {fired[0] if fired else '?'}, "
        f"due left {left[0] if left else '?'}"
    )


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [10_000, 100_000, 1_000_000]
    with tempfile.TemporaryDirectory() as tmp:
        for devices in sizes:
            bench(Path(tmp), devices)


if __name__ == "__main__":
    main()
