"""The store thread under the daemon benchmark's workload: CPU µs per event, no sockets.

    .venv/bin/python bench/bench_engine.py                 # 20,000 warm-up + 50,000 measured
    .venv/bin/python bench/bench_engine.py --events 20000 --repeat 3

Exactly what the daemon's store thread does for `bench/bench_daemon.py`: its automations
(100 reactive, 5 proactive), its frames (1,000 resources; about 100 webhooks a run),
each parsed with `parse_incoming_event`, committed through the evaluator's
`process_in_transaction` on a real store file (`synchronous = "full"`) in batches of 500.
Parsing happens outside the measurement; the measured figure is the calling thread's CPU
time (`time.thread_time`: the fsync waits of COMMIT are not CPU), divided by the events.
The sweeper and the sender do not run, so the outbox and the inbox only grow as firings
add to them, as they would between two sweeper passes.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_daemon import automations, frames  # this directory, first on sys.path

from daemon.core.automations import Automation
from daemon.core.events import ReceivedEvent, parse_incoming_event
from daemon.engine.engine import BatchOutcome, Engine
from daemon.runtime.evaluator import process_in_transaction
from store.connection import Connection
from store.db import Store

BATCH: Final = 500  # events per transaction, the evaluator's batch under a flood
WARM_UP: Final = 20_000  # events before the measurement starts
EVENTS: Final = 50_000  # events measured
RATE: Final = 10_000.0  # events/s of the `occurred` stamps, as the daemon benchmark


class _Timed:
    """The engine, timing its own `process_batch`: the rest of a transaction is COMMIT."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.cpu = 0.0

    def process_batch(
        self, conn: Connection, events: Sequence[ReceivedEvent], now: datetime
    ) -> BatchOutcome:
        before = time.thread_time()
        try:
            return self.engine.process_batch(conn, events, now)
        finally:
            self.cpu += time.thread_time() - before

    def rolled_back(self) -> None:
        self.engine.rolled_back()


def _parse(batch: list[tuple[str, str]]) -> list[ReceivedEvent]:
    received = datetime.now(UTC)
    return [parse_incoming_event(frame, received) for _, frame in batch]


def run(
    directory: Path, warm_up: int, events: int, batch_size: int, profile: str | None
) -> tuple[float, float, int]:
    """CPU µs per measured event of one fresh engine on one fresh store, the part of it
    spent in `Engine.process_batch`, and how many webhooks the whole run queued (a check
    that the workload fires as it should)."""
    store = Store.open(directory / "bench.db", synchronous="full")
    try:
        engine = _Timed(Engine())
        loaded = [Automation.model_validate(a) for a in automations("http://127.0.0.1:9/hook")]
        with store.conn:
            engine.engine.load_automations(store.conn, loaded, datetime.now(UTC))
        all_frames = frames(0, warm_up + events, RATE)
        profiler = cProfile.Profile(time.thread_time) if profile else None
        cpu = engine_cpu = 0.0
        measured = 0
        for start in range(0, len(all_frames), batch_size):
            batch = _parse(all_frames[start : start + batch_size])
            timed = start >= warm_up
            if timed and profiler is not None:
                profiler.enable()
            before, engine.cpu = time.thread_time(), 0.0
            process_in_transaction(store.conn, engine, batch, datetime.now(UTC))
            if timed:
                cpu += time.thread_time() - before
                engine_cpu += engine.cpu
                measured += len(batch)
                if profiler is not None:
                    profiler.disable()
        if profiler is not None and profile is not None:
            profiler.dump_stats(profile)
        row = store.conn.execute("SELECT count(*) FROM outbox").fetchone()
        return cpu / measured * 1e6, engine_cpu / measured * 1e6, 0 if row is None else int(row[0])
    finally:
        store.close()
        for path in directory.iterdir():
            path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-up", type=int, default=WARM_UP, help="events not measured")
    parser.add_argument("--events", type=int, default=EVENTS, help="events measured")
    parser.add_argument("--repeat", type=int, default=1, help="fresh runs, median reported")
    parser.add_argument(
        "--batch", type=int, default=BATCH, help="events per transaction (1: a trickle)"
    )
    parser.add_argument("--profile", metavar="OUT", help="cProfile the measured part to OUT")
    args = parser.parse_args()
    gc.collect()
    results = []
    with tempfile.TemporaryDirectory(prefix="trigd-bench-engine-") as tmp:
        for _ in range(args.repeat):
            started = time.perf_counter()
            per_event, in_engine, webhooks = run(
                Path(tmp), args.warm_up, args.events, args.batch, args.profile
            )
            results.append(per_event)
            print(
                f"store thread: {per_event:.1f} CPU µs/event, {in_engine:.1f} of them in "
                f"process_batch, the rest COMMIT "
                f"({args.events:,} events after {args.warm_up:,}, batches of {args.batch}; "
                f"{webhooks:,} webhooks queued; run took {time.perf_counter() - started:.1f} s)",
                flush=True,
            )
    if args.repeat > 1:
        print(
            f"median of {args.repeat}: {statistics.median(results):.1f}, "
            f"best {min(results):.1f} CPU µs/event"
        )


if __name__ == "__main__":
    main()
