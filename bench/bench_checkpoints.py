"""COMMIT times of a trickle with WAL checkpoints inside the COMMIT (SQLite's autocheckpoint)
and beside it (the daemon's checkpointer, ``daemon/runtime/checkpointer.py``).

    .venv/bin/python bench/bench_checkpoints.py [--commits 3000] [--rate 110] [--rounds 2]

Each mode, alternately, on a fresh database file (``synchronous = full``, as the daemon's
default): ``--commits`` transactions, ``--rate`` a second (a trickle of 1,000 events/s
commits about 110 batches a second), each writing seven rows of about 1 KiB, the WAL
frames of a batch of seven events (28 frames), through the store gateway as the evaluator
does. Printed: each COMMIT's time (p50, p99, max, in the store thread), and the store
thread's and the checkpointing thread's CPU per commit.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Final

import apsw
import trio

from daemon.runtime.checkpointer import Checkpointer
from daemon.runtime.gateway import StoreGateway
from store.db import WAL_AUTOCHECKPOINT_PAGES, Store, write_transaction

ROWS: Final = 7
ROW_BYTES: Final = 1_000


def _commit(conn: apsw.Connection, n: int, times: list[float], cpu: list[float]) -> None:
    """One batch: seven rows with random keys (random index pages, as buckets are)."""
    c0, t0 = time.thread_time(), time.perf_counter()
    with write_transaction(conn):
        for j in range(ROWS):
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                (f"{random.random():.17f} {n} {j}", "x" * ROW_BYTES),
            )
    times.append(time.perf_counter() - t0)
    cpu.append(time.thread_time() - c0)


def _pages(path: str) -> int:
    """The most frames the WAL file held (SQLite starts it over, does not shrink it)."""
    return os.path.getsize(path) // 4096


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def _run(mode: str, commits: int, rate: float) -> str:
    with tempfile.TemporaryDirectory(prefix="trigd-ckpt-") as tmp:
        store = Store.open(Path(tmp) / "t.db")
        gateway = StoreGateway(store)
        times: list[float] = []
        cpu: list[float] = []
        before = {t.ident for t in threading.enumerate()}
        try:
            async with trio.open_nursery() as nursery:
                checkpointer = None
                if mode == "beside":
                    checkpointer = Checkpointer(
                        gateway, request_at=WAL_AUTOCHECKPOINT_PAGES, inline_at=16_000
                    )
                    await nursery.start(checkpointer.run)
                start = trio.current_time()
                for n in range(commits):
                    await trio.sleep_until(start + n / rate)
                    await gateway.run(_commit, n, times, cpu)
                others = _other_threads_cpu(before)
                nursery.cancel_scope.cancel()
            wal = _pages(f"{store.path}-wal")
        finally:
            store.close()
    ms = [t * 1e3 for t in times]
    extra = f", checkpoints {checkpointer.stats.checkpoints}" if checkpointer else ""
    return (
        f"{mode:>7}: COMMIT p50 {_pct(ms, 50):.2f} ms, p99 {_pct(ms, 99):.2f}, max {max(ms):.2f}; "
        f"store thread {sum(cpu) / commits * 1e6:.0f} µs CPU/commit, other threads "
        f"{others / commits * 1e6:.0f}; WAL file {wal} pages{extra}"
    )


def _other_threads_cpu(before: set[int | None]) -> float:
    """CPU seconds of this process's threads started since ``before`` but the store
    thread's (the checkpointer's worker), from /proc."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate() if t.ident not in before}
    for native_id, name in names.items():
        if name == "trigd-store":
            continue
        fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=3_000)
    parser.add_argument("--rate", type=float, default=110.0, help="commits per second")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each mode, alternated")
    args = parser.parse_args()
    for _ in range(args.rounds):
        for mode in ("inside", "beside"):
            print(trio.run(_run, mode, args.commits, args.rate), flush=True)


if __name__ == "__main__":
    main()
