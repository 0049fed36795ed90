"""`trigd backtest`'s replay speed: stored events per CPU second (target 50,000).

    .venv/bin/python bench/bench_backtest.py                       # 200,000 events, 3 runs
    .venv/bin/python bench/bench_backtest.py --events 100000 --repeat 5 --unseen 0.5

A live database is written first (not measured) with the daemon benchmark's workload
(bench_daemon.py: 100 reactive automations over 1,000 resources, 5 proactive ones; a
stamp every 1/10,000 s), plus `--unseen` as a share of events no trigger names (0 by
default: every event is evaluated, the worst case). Then `replay` (daemon/engine/backtest.py)
runs over it as `trigd backtest` runs it (its scratch store, `open_scratch`, and its GC
settings, `replay_gc`, and `[insight] backtest_bucket_cache`, `--bucket-cache`, and
`backtest_seen_cache`, `--seen-cache`), in batches
of `--batch`, and its CPU time (user + system of this
process, `resource.getrusage`: the replay is single-threaded) is divided into the events
in the window.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_daemon import automations, frames  # this directory, first on sys.path

from daemon.cli.backtest import open_scratch, replay_gc
from daemon.core.automations import Automation
from daemon.core.clock import to_us
from daemon.core.events import parse_incoming_event
from daemon.engine.backtest import BUCKET_CACHE, SEEN_CACHE, replay
from daemon.engine.engine import Engine
from store.db import Store
from store.events import EventRow, insert_new_events


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_live(path: Path, count: int, unseen: float) -> tuple[datetime, datetime]:
    """The live database: `count` events as ingest stores them; their occurred range."""
    store = Store.open(path, synchronous="normal")
    first = last = None
    try:
        chunk = 10_000
        done = 0
        while done < count:
            rows: list[EventRow] = []
            for _, frame in frames(done, min(chunk, count - done), 10_000.0):
                now = datetime.now(UTC)
                event = parse_incoming_event(frame.encode(), now)
                if unseen and (done + len(rows)) % 100 < unseen * 100:
                    event = event.model_copy(update={"event": "bench.unseen"})
                first = first or event.occurred
                last = event.occurred
                rows.append(
                    (
                        str(event.id),
                        event.event,
                        event.resource.id,
                        to_us(event.occurred),
                        to_us(now),
                        None,
                        event.model_dump_json(),
                    )
                )
            with store.conn:
                insert_new_events(store.conn, rows)
            done += len(rows)
    finally:
        store.close()
    assert first is not None
    assert last is not None
    return first, last


def run_once(
    live_path: Path,
    loaded: list[Automation],
    since: datetime,
    until: datetime,
    batch: int,
    bucket_cache: int,
    seen_cache: int,
) -> tuple[float, float, int, int]:
    """CPU seconds and wall seconds of one replay, and its replayed and skipped events."""
    with tempfile.TemporaryDirectory(prefix="bench-backtest-") as tmp:
        scratch = open_scratch(Path(tmp) / "scratch.db")
        live = Store.open_readonly(live_path)
        gc.collect()
        before, started = cpu(), time.perf_counter()
        try:
            with live.conn, replay_gc():  # as `trigd backtest` runs it
                result = replay(
                    live.conn,
                    scratch.conn,
                    Engine(),
                    loaded,
                    since,
                    until,
                    batch=batch,
                    granularity=timedelta(seconds=5),
                    bucket_cache=bucket_cache,
                    seen_cache=seen_cache,
                )
        finally:
            spent, wall = cpu() - before, time.perf_counter() - started
            live.close()
            scratch.close()
    return spent, wall, result.replayed, result.skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2_000)
    parser.add_argument(
        "--unseen", type=float, default=0.0, help="share of events no trigger names"
    )
    parser.add_argument(
        "--bucket-cache",
        type=int,
        default=BUCKET_CACHE,
        help="buckets kept between batches ([insight] backtest_bucket_cache; 0: none)",
    )
    parser.add_argument(
        "--seen-cache",
        type=int,
        default=SEEN_CACHE,
        help="seen marks kept, not written ([insight] backtest_seen_cache; 0: none)",
    )
    args = parser.parse_args()
    loaded = [Automation.model_validate(a) for a in automations("http://127.0.0.1:9/hook")]
    with tempfile.TemporaryDirectory(prefix="bench-backtest-live-") as tmp:
        live_path = Path(tmp) / "live.db"
        first, last = write_live(live_path, args.events, args.unseen)
        since, until = first, last + timedelta(microseconds=1)
        rates = []
        for run in range(args.repeat):
            spent, wall, replayed, skipped = run_once(
                live_path, loaded, since, until, args.batch, args.bucket_cache, args.seen_cache
            )
            total = replayed + skipped
            rates.append(total / spent)
            print(
                json.dumps(
                    {
                        "run": run + 1,
                        "events": total,
                        "replayed": replayed,
                        "skipped": skipped,
                        "cpu_s": round(spent, 3),
                        "cpu_us_per_event": round(spent / total * 1e6, 2),
                        "events_per_cpu_s": round(total / spent),
                        "events_per_s": round(total / wall),
                    }
                )
            )
        print(f"median {statistics.median(rates):,.0f} events per CPU second (target 50,000)")


if __name__ == "__main__":
    main()
