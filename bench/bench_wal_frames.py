"""The pages one commit writes to the WAL, by table and index: what COMMIT costs per batch.

    .venv/bin/python bench/bench_wal_frames.py              # batches of 7 (1,000 events/s)
    .venv/bin/python bench/bench_wal_frames.py --batch 1

The daemon benchmark's workload (`bench/bench_daemon.py`: its automations and frames),
committed through the evaluator's `process_in_transaction` on a real store file. After a
warm-up the WAL is checkpointed and truncated, `--commits` more batches are committed,
and every frame of the WAL is attributed to the b-tree its page belonged to at the
checkpoint (SQLite's `dbstat`); pages allocated since are "new pages". COMMIT's CPU grows
with these frames: each is a page copied, checksummed and written.
"""

from __future__ import annotations

import argparse
import struct
import sys
import tempfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_daemon import automations, frames  # this directory, first on sys.path

from daemon.core.automations import Automation
from daemon.core.events import parse_incoming_event
from daemon.engine.engine import Engine
from daemon.runtime.evaluator import process_in_transaction
from store.db import Store

WAL_HEADER: Final = 32  # bytes before the first frame
FRAME_HEADER: Final = 24  # bytes before each frame's page; the page number comes first
RATE: Final = 10_000.0  # events/s of the `occurred` stamps, as the engine benchmark


def wal_frames(directory: Path, batch: int, warm_up: int, commits: int) -> Counter[str]:
    """WAL frames written by `commits` batches of `batch` events, by b-tree name."""
    path = directory / "bench.db"
    store = Store.open(path, synchronous="full")
    try:
        conn = store.conn
        engine = Engine()
        loaded = [Automation.model_validate(a) for a in automations("http://127.0.0.1:9/hook")]
        with conn:
            engine.load_automations(conn, loaded, datetime.now(UTC))
        pending = iter(frames(0, (warm_up + commits) * batch, RATE))

        def commit_batches(count: int) -> None:
            for _ in range(count):
                received = datetime.now(UTC)
                events = [parse_incoming_event(next(pending)[1], received) for _ in range(batch)]
                process_in_transaction(conn, engine, events, received)

        commit_batches(warm_up)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        owner = {
            int(page): str(name) for name, page in conn.execute("SELECT name, pageno FROM dbstat")
        }
        row = conn.execute("PRAGMA page_size").fetchone()
        assert row is not None
        page_size = int(row[0])
        commit_batches(commits)
        wal = Path(f"{path}-wal").read_bytes()
    finally:
        store.close()
    counts: Counter[str] = Counter()
    for offset in range(
        WAL_HEADER, len(wal) - FRAME_HEADER - page_size + 1, FRAME_HEADER + page_size
    ):
        (page,) = struct.unpack_from(">I", wal, offset)
        counts[owner.get(page, "new pages")] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=7, help="events per commit")
    parser.add_argument("--warm-up", type=int, default=600, help="commits before counting")
    parser.add_argument("--commits", type=int, default=50, help="commits counted")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trigd-bench-wal-") as tmp:
        counts = wal_frames(Path(tmp), args.batch, args.warm_up, args.commits)
    total = sum(counts.values())
    print(f"{total / args.commits:.1f} WAL frames per commit of {args.batch} events:")
    for name, count in counts.most_common():
        print(f"  {count / args.commits:5.2f}  {name}")


if __name__ == "__main__":
    main()
