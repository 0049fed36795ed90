"""Deliveries per second from the outbox to a local webhook receiver.

    .venv/bin/python -m bench.bench_sender [--rows 2000] [--slow-rows 200]

Two receivers on 127.0.0.1: one answers at once, one takes 100 ms per request. Each is
measured with the default delivery settings (concurrency 8, 2 per endpoint) and with all
8 slots allowed on the one endpoint. Every delivery is a real HTTP POST and one SQLite
transaction (synchronous=full) recording the attempt, the status and the executed event.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from daemon.core.config import DeliveryConfig
from daemon.core.events import ReceivedEvent
from daemon.runtime.gateway import StoreGateway
from daemon.runtime.sender import run_sender
from store import outbox
from store.db import Store
from tests.support.webhook_receiver import Reply, Request, make_triggered, outbox_row, run_receiver


async def _slow(request: Request) -> Reply:
    await trio.sleep(0.1)
    return Reply(200)


async def _fast(request: Request) -> Reply:
    return Reply(200)


async def measure(rows: int, slow: bool, per_endpoint: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "bench.db", synchronous="full")
        done = trio.Event()
        count = 0

        def emit(events: Sequence[ReceivedEvent]) -> None:
            nonlocal count
            count += len(events)
            if count >= rows:
                done.set()

        async with trio.open_nursery() as nursery:
            handler = _slow if slow else _fast

            async def receive(task_status: Any) -> None:
                await run_receiver(handler, record=False, task_status=task_status)

            receiver = await nursery.start(receive)
            template = make_triggered({"type": "call-webhook", "url": receiver.url()})
            triggered = [template.model_copy(update={"id": _uuid(i)}) for i in range(rows)]
            with store.conn:
                outbox.enqueue(store.conn, [outbox_row(t) for t in triggered])
            settings = DeliveryConfig(per_endpoint_concurrency=per_endpoint)
            gateway = StoreGateway(store)
            started = time.perf_counter()

            async def sender(task_status: Any) -> None:
                await run_sender(gateway, settings, emit=emit, task_status=task_status)

            await nursery.start(sender)
            await done.wait()
            elapsed = time.perf_counter() - started
            nursery.cancel_scope.cancel()
        store.close()
    return rows / elapsed


def _uuid(i: int) -> Any:
    from uuid import UUID

    return UUID(int=(1 << 100) + i)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--slow-rows", type=int, default=200)
    args = parser.parse_args()
    for label, rows, slow in (
        ("instant receiver", args.rows, False),
        ("100 ms receiver", args.slow_rows, True),
    ):
        for per_endpoint in (2, 8):
            rate = trio.run(measure, rows, slow, per_endpoint)
            print(f"{label:17} per_endpoint={per_endpoint}: {rate:8.1f} deliveries/s ({rows} rows)")


if __name__ == "__main__":
    main()
