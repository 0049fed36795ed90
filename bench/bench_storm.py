"""A webhook storm to one fast local endpoint, beside its ceiling. Prints numbers, asserts nothing.

    .venv/bin/python -m bench.bench_storm [--events 2000] [--automations 100]

A real `trigd serve` (default settings but for the port and the database's path) loads
AUTOMATIONS reactive automations, automation i firing on every `storm.tick` event of
resource `pump.(i % 10)` (threshold 1, within 0) and calling a signed webhook with a
rendered payload at one receiver on 127.0.0.1 (trio + h11, in this process, answering 200
at once). One websocket client (subprotocol `trigd.v1`) sends EVENTS events over the ten
pumps and waits for their acks: EVENTS x AUTOMATIONS / 10 webhooks to deliver (20,000 by
default). Printed:

* commit: from the first event sent to the last ack;
* delivered: from the first event sent to the last webhook received, and webhooks/s;
* the daemon's CPU time (/proc) per webhook over the whole run;
* ceiling: the same receiver, in the same run, taking the same number of POSTs of a body of
  the same size from a bare httpx loop (one AsyncClient, 8 tasks, keep-alive): what one
  Python client gets out of this receiver, trigd's bound.

Run the old code beside the new one with a worktree of the older commit:

    git worktree add --detach /tmp/base-a <commit>
    (cd /tmp/base-a && /work/wt-perfa/.venv/bin/python /work/wt-perfa/bench/bench_storm.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final
from uuid import uuid4

import httpx
import trio

# the code under test is the checkout the command runs in (see above)
sys.path.insert(0, os.getcwd())

from tests.support.daemon_process import running_daemon, write_automations, write_config
from tests.support.ingest_client import authenticate, connect
from tests.support.webhook_receiver import Reply, Request, run_receiver

CEILING_TASKS: Final = 8
GROUPS: Final = 10  # automation i covers pump.(i % 10): each event fires a tenth of them
SECRET: Final = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PAYLOAD: Final = '{"text": "{{ automation.name }}: {{ event.resource.id }}", "n": "{{ event.id }}"}'


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _automations(url: str, count: int) -> list[dict[str, Any]]:
    return [
        {
            "name": f"storm {i}",
            "trigger": {
                "type": "event",
                "posture": "Reactive",
                "expect": ["storm.tick"],
                "match": {"prefect.resource.id": f"pump.{i % GROUPS}"},
                "threshold": 1,
                "within": 0,
            },
            "actions": [{"type": "call-webhook", "url": url, "payload": PAYLOAD, "secret": SECRET}],
        }
        for i in range(count)
    ]


class Counter:
    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.body_bytes = 0
        self.reached = trio.Event()
        self.last = 0.0

    async def handle(self, request: Request) -> Reply:
        self.count += 1
        self.body_bytes = len(request.body)
        if self.count >= self.target and not self.reached.is_set():
            self.last = time.perf_counter()
            self.reached.set()
        return Reply(200)

    def expect(self, target: int) -> None:
        self.count, self.target, self.reached = 0, target, trio.Event()


async def _storm(
    directory: Path, counter: Counter, url: str, events: int, automations: int
) -> None:
    files = write_automations(directory, _automations(url, automations))
    config = write_config(
        directory,
        [files],
        store={"path": str(directory / "trigd.db"), "synchronous": "full"},
        triggers={"automations": [str(files)], "proactive_granularity": "5s"},
        delivery={"timeout": "15s"},
    )
    webhooks = events * automations // GROUPS
    counter.expect(webhooks)
    async with running_daemon(config) as daemon:
        pid = daemon.process.pid
        cpu = _cpu_seconds(pid)
        started = time.perf_counter()
        async with connect(daemon.url, subprotocols=["trigd.v1"]) as ws:
            await authenticate(ws, None)
            for i in range(events):
                event = {
                    "id": str(uuid4()),
                    "occurred": "2026-11-23T09:59:00Z",
                    "event": "storm.tick",
                    "resource": {"prefect.resource.id": f"pump.{i % GROUPS}"},
                }
                await ws.send_message(json.dumps(event))
            for _ in range(events):
                await ws.get_message()
            committed = time.perf_counter() - started
        with trio.fail_after(600):
            await counter.reached.wait()
        delivered = counter.last - started
        user, system = (b - a for a, b in zip(cpu, _cpu_seconds(pid), strict=True))
        used = user + system
    print(
        f"trigd:   {webhooks} webhooks from {events} events, each firing {automations // GROUPS} "
        f"of {automations} automations: "
        f"committed in {committed:.2f} s, delivered in {delivered:.2f} s "
        f"({webhooks / delivered:,.0f} webhooks/s); daemon CPU {used:.1f} s, "
        f"{used / webhooks * 1e6:.0f} µs/webhook ({user / webhooks * 1e6:.0f} user, "
        f"{system / webhooks * 1e6:.0f} system)"
    )


async def _ceiling(counter: Counter, url: str, requests: int) -> None:
    counter.expect(requests)
    body = b"x" * max(1, counter.body_bytes)
    left = requests
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=CEILING_TASKS, max_keepalive_connections=CEILING_TASKS)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                response = await client.post(
                    url, content=body, headers={"Content-Type": "application/json"}
                )
                await response.aread()

        async with trio.open_nursery() as nursery:
            for _ in range(CEILING_TASKS):
                nursery.start_soon(worker)
    elapsed = time.perf_counter() - started
    print(
        f"ceiling: {requests} POSTs of {len(body)} bytes, bare httpx loop ({CEILING_TASKS} "
        f"tasks, keep-alive): {elapsed:.2f} s ({requests / elapsed:,.0f} requests/s)"
    )


async def main_async(events: int, automations: int) -> None:
    counter = Counter()
    async with trio.open_nursery() as nursery:

        async def receive(task_status: Any) -> None:
            await run_receiver(counter.handle, record=False, task_status=task_status)

        receiver = await nursery.start(receive)
        url = receiver.url()
        with tempfile.TemporaryDirectory() as tmp:
            await _storm(Path(tmp), counter, url, events, automations)
        await _ceiling(counter, url, events * automations // GROUPS)
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2_000)
    parser.add_argument("--automations", type=int, default=100)
    args = parser.parse_args()
    trio.run(main_async, args.events, args.automations)


if __name__ == "__main__":
    main()
