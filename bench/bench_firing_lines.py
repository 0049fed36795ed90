"""A firing's INFO line: the store thread's CPU per firing with the lines written after
COMMIT (as the daemon does) against inside the transaction (where they were written
before 2026-12-05), on the same code, batches alternated.

    .venv/bin/python bench/bench_firing_lines.py                  # 100 firings a batch
    .venv/bin/python bench/bench_firing_lines.py --batches 100 --repeat 5

Set-up: 100 reactive automations (threshold 1, `for_each` the resource, one
`call-webhook` action each, one event name each) on a real store file, logging at INFO
in the daemon's text format to a file, as `trigd serve` does to stderr. Each batch holds
one event per automation, so each of its events fires once: 100 firings, committed in one
transaction through `write_transaction`. Measured with `time.thread_time` (CPU, not the
fsync waits): the transaction (engine, lines if inside, COMMIT) and, for the batches that
write them after, the lines alone (the trio thread's share in the daemon).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.core.automations import Automation
from daemon.core.events import ReceivedEvent, parse_incoming_event
from daemon.engine.acting import log_firings
from daemon.engine.engine import Engine
from daemon.runtime.logs import TEXT_FORMAT
from store.db import Store, write_transaction

AUTOMATIONS: Final = 100  # each fires once per batch
BATCHES: Final = 60  # per placement, alternated
WARM_UP: Final = 10  # batches not measured, per placement


def automations() -> list[Automation]:
    return [
        Automation.model_validate(
            {
                "name": f"bench firing {k}",
                "trigger": {
                    "type": "event",
                    "posture": "Reactive",
                    "expect": [f"bench.fire.{k}"],
                    "for_each": ["prefect.resource.id"],
                    "threshold": 1,
                    "within": 0,
                },
                "actions": [{"type": "call-webhook", "url": "http://127.0.0.1:9/hook"}],
            }
        )
        for k in range(AUTOMATIONS)
    ]


def batch() -> list[ReceivedEvent]:
    now = datetime.now(UTC)
    return [
        parse_incoming_event(
            {
                "id": str(uuid.uuid4()),
                "occurred": now.isoformat(),
                "event": f"bench.fire.{k}",
                "resource": {"prefect.resource.id": f"bench.res.{k}"},
            },
            now,
        )
        for k in range(AUTOMATIONS)
    ]


def commit(store: Store, engine: Engine, events: Sequence[ReceivedEvent], inside: bool) -> float:
    """Commit one batch, its lines written inside the transaction or after it; the CPU
    seconds of the lines when written after (0 when inside)."""
    with write_transaction(store.conn):
        done = engine.process_batch(store.conn, events, datetime.now(UTC))
        assert len(done.firings) == len(events)
        if inside:
            log_firings(done.firings)
    if inside:
        return 0.0
    before = time.thread_time()
    log_firings(done.firings)
    return time.thread_time() - before


def run(directory: Path, batches: int) -> tuple[float, float, float]:
    """µs of CPU per firing: the transaction with the lines inside, the transaction with
    the lines after, the lines after alone."""
    store = Store.open(directory / "bench.db", synchronous="full")
    try:
        engine = Engine()
        with store.conn:
            engine.load_automations(store.conn, automations(), datetime.now(UTC))
        spent = {True: 0.0, False: 0.0}
        lines = 0.0
        for n in range(2 * (WARM_UP + batches)):
            inside = n % 2 == 0
            events = batch()
            before = time.thread_time()
            after_lines = commit(store, engine, events, inside)
            if n >= 2 * WARM_UP:
                spent[inside] += time.thread_time() - before - after_lines
                lines += after_lines
        per = 1e6 / (batches * AUTOMATIONS)
        return spent[True] * per, spent[False] * per, lines * per
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=BATCHES, help="measured, per placement")
    parser.add_argument("--repeat", type=int, default=3, help="fresh runs, median reported")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="trigd-bench-lines-") as tmp:
        log_file = (Path(tmp) / "trigd.log").open("w")
        handler = logging.StreamHandler(log_file)
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
        logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
        for i in range(args.repeat):
            run_dir = Path(tmp) / str(i)
            run_dir.mkdir()
            inside, after, lines = run(run_dir, args.batches)
            results.append((inside, after, lines))
            print(
                f"store thread: {inside:.1f} CPU µs/firing with the lines inside the "
                f"transaction, {after:.1f} with them after COMMIT; the lines after: "
                f"{lines:.1f} µs/firing ({args.batches} batches of {AUTOMATIONS} firings "
                "each way)",
                flush=True,
            )
        log_file.close()
    if args.repeat > 1:
        print(
            "median: "
            + ", ".join(f"{statistics.median(r[i] for r in results):.1f}" for i in range(3))
            + " µs/firing (inside, after, the lines after)"
        )


if __name__ == "__main__":
    main()
