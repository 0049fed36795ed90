"""A webhook storm to one fast local endpoint, beside its ceiling. Prints numbers, asserts nothing.

    .venv/bin/python bench/bench_storm.py [--events 2000] [--automations 100] [--receivers 2]

The receiver runs in RECEIVERS processes of their own sharing one port (SO_REUSEPORT), each
an asyncio protocol that reads a request's head and Content-Length and answers 200 at once:
a few tens of microseconds a request, so that it is not what bounds the rate. Its capacity
is measured first, alone: CLIENTS processes of raw keep-alive sockets (8 each, one request
in flight per socket) post requests of the storm's size for a few seconds.

Then a real `trigd serve` (default settings but for the port and the database's path)
loads AUTOMATIONS reactive automations, automation i firing on every `storm.tick` event of
resource `pump.(i % 10)` (threshold 1, within 0) and calling a signed webhook with a
rendered payload at the receiver. One websocket client (subprotocol `trigd.v1`) sends
EVENTS events over the ten pumps and waits for their acks: EVENTS x AUTOMATIONS / 10
webhooks to deliver (20,000 by default). Printed:

* commit: from the first event sent to the last ack;
* delivered: from the first event sent to the last webhook received, and webhooks/s; how
  many were delivered by the last ack, and the rate of the rest after it (while clients
  send events the sender gives way to their acks: docs/DELIVERY.md#giving-way-to-acks);
* the daemon's CPU time (/proc) per webhook over the whole run;
* ceiling: the same receiver, in the same run, taking the same number of POSTs of a body of
  the same size from a bare httpx loop in a process of its own (one AsyncClient, 8 trio
  tasks, keep-alive): what one Python process gets out of httpx, trigd's bound, and
  trigd's rate against it; then the same from a bare loop sending as trigd's sender does
  (the client builds each request, its transport sends it: no auth, redirect or cookie
  layers), and from a bare httpcore loop (httpx's transport, one AsyncConnectionPool on
  trio, the headers prepared once): what the library under httpx gets.

Run the old code beside the new one with a worktree of the older commit:

    git worktree add --detach /tmp/base-j <commit>
    (cd /tmp/base-j && /work/wt-storm/.venv/bin/python /work/wt-storm/bench/bench_storm.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final
from uuid import uuid4

import httpcore
import httpx
import trio

# the code under test is the checkout the command runs in (see above)
sys.path.insert(0, os.getcwd())

from tests.support.daemon_process import running_daemon, write_automations, write_config
from tests.support.ingest_client import authenticate, connect

CEILING_TASKS: Final = 8
CLIENT_SOCKETS: Final = 8  # per load-client process of the receiver's own measurement
CAPACITY_SECONDS: Final = 3.0
GROUPS: Final = 10  # automation i covers pump.(i % 10): each event fires a tenth of them
SECRET: Final = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PAYLOAD: Final = '{"text": "{{ automation.name }}: {{ event.resource.id }}", "n": "{{ event.id }}"}'
STATS: Final = 3  # per receiver process: requests, perf_counter of the last, last body size
REPLY: Final = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"
MAX_HEAD: Final = 65_536


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of a process so far, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    seconds: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        seconds[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return seconds


# --- the receiver: its own processes -------------------------------------------------------


class _Answer(asyncio.Protocol):
    """HTTP/1.1 keep-alive, requests with a Content-Length body, answered 200 at once."""

    def __init__(self, stats: Any, index: int) -> None:
        self._stats, self._index = stats, index
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        answers = 0
        body_size = 0
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    assert self._transport is not None
                    self._transport.close()
                break
            head = bytes(buffer[:end]).lower()
            at = head.find(b"content-length:")
            stop = head.find(b"\r\n", at)
            length = 0 if at < 0 else int(head[at + 15 : stop if stop >= 0 else None])
            if len(buffer) < end + 4 + length:
                break
            del buffer[: end + 4 + length]
            answers += 1
            body_size = length
        if answers:
            assert self._transport is not None
            self._transport.write(REPLY * answers)
            base = self._index * STATS
            self._stats[base] += answers
            self._stats[base + 1] = time.perf_counter()  # CLOCK_MONOTONIC: across processes
            self._stats[base + 2] = body_size


def _receive(port: int, index: int, stats: Any, ready: Any) -> None:
    async def serve() -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(512)
        server = await asyncio.get_running_loop().create_server(
            lambda: _Answer(stats, index), sock=sock
        )
        ready.release()
        await server.serve_forever()

    asyncio.run(serve())


class Receivers:
    """RECEIVERS processes answering on one port; their counts in shared memory."""

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._holder = socket.socket()  # reserves the port until the processes listen
        self._holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._holder.bind(("127.0.0.1", 0))
        self.port = self._holder.getsockname()[1]
        self._stats: Any = context.Array("d", processes * STATS, lock=False)
        ready = context.Semaphore(0)
        self.processes = [
            context.Process(target=_receive, args=(self.port, i, self._stats, ready), daemon=True)
            for i in range(processes)
        ]
        for process in self.processes:
            process.start()
        for _ in self.processes:
            ready.acquire()
        self._holder.close()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def count(self) -> int:
        return int(sum(self._stats[i * STATS] for i in range(len(self.processes))))

    def last(self) -> float:
        return float(max(self._stats[i * STATS + 1] for i in range(len(self.processes))))

    def body_size(self) -> int:
        return int(max(self._stats[i * STATS + 2] for i in range(len(self.processes))))

    def until(self, count: int, seconds: float) -> float:
        """Wait until `count` requests were answered in all (polled: the counts are in
        shared memory); when the last one was."""
        deadline = time.perf_counter() + seconds
        while self.count() < count:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{self.count()} of {count} requests after {seconds} s")
            time.sleep(0.01)
        return self.last()

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
            process.join()


# --- load: the receiver alone (raw sockets), and the bare httpx ceiling ----------------------


def _load(port: int, body_size: int, seconds: float, done: Any) -> None:
    """CLIENT_SOCKETS keep-alive sockets posting for `seconds`; how many were answered."""
    request = (
        f"POST /hook HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {body_size}\r\n\r\n"
    ).encode() + b"x" * body_size

    async def client(deadline: float) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answered = 0
        while time.perf_counter() < deadline:
            writer.write(request)
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)  # the receiver's body: "ok"
            answered += 1
        writer.close()
        return answered

    async def run() -> int:
        deadline = time.perf_counter() + seconds
        return sum(await asyncio.gather(*(client(deadline) for _ in range(CLIENT_SOCKETS))))

    done.put(asyncio.run(run()))


async def _in_tasks(requests: int, post: Callable[[], Awaitable[None]]) -> None:
    """`post` called `requests` times in all by CEILING_TASKS trio tasks, each taking the
    next request as soon as its last one is answered (what every ceiling loop shares)."""
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await post()

    async with trio.open_nursery() as nursery:
        for _ in range(CEILING_TASKS):
            nursery.start_soon(worker)


def _ceiling(url: str, body_size: int, requests: int, done: Any) -> None:
    """The bare httpx loop: one AsyncClient, CEILING_TASKS trio tasks, keep-alive."""
    body = b"x" * body_size

    async def run() -> float:
        limits = httpx.Limits(
            max_connections=CEILING_TASKS, max_keepalive_connections=CEILING_TASKS
        )
        started = time.perf_counter()
        async with httpx.AsyncClient(limits=limits, trust_env=False) as client:

            async def post() -> None:
                response = await client.post(
                    url, content=body, headers={"Content-Type": "application/json"}
                )
                await response.aread()

            await _in_tasks(requests, post)
        return time.perf_counter() - started

    done.put(trio.run(run))


def _ceiling_transport(url: str, body_size: int, requests: int, done: Any) -> None:
    """The bare loop as trigd's sender sends: the client builds each request (its headers,
    the timeout) and its transport sends it, the response read raw; CEILING_TASKS tasks."""
    body = b"x" * body_size

    async def run() -> float:
        limits = httpx.Limits(
            max_connections=CEILING_TASKS, max_keepalive_connections=CEILING_TASKS
        )
        transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
        started = time.perf_counter()
        async with httpx.AsyncClient(transport=transport, trust_env=False) as client:

            async def post() -> None:
                request = client.build_request(
                    "POST",
                    url,
                    content=body,
                    headers={"Content-Type": "application/json"},
                    timeout=15,
                )
                response = await transport.handle_async_request(request)
                async for _ in response.aiter_raw():
                    pass
                await response.aclose()

            await _in_tasks(requests, post)
        return time.perf_counter() - started

    done.put(trio.run(run))


def _ceiling_httpcore(url: str, body_size: int, requests: int, done: Any) -> None:
    """The bare httpcore loop: one AsyncConnectionPool (the transport httpx is built on,
    on trio), CEILING_TASKS tasks, keep-alive, the headers prepared once."""
    body = b"x" * body_size
    headers = [
        (b"Host", url.split("/")[2].encode()),
        (b"Content-Type", b"application/json"),
        (b"Content-Length", str(body_size).encode()),
    ]

    async def run() -> float:
        started = time.perf_counter()
        async with httpcore.AsyncConnectionPool(
            max_connections=CEILING_TASKS, max_keepalive_connections=CEILING_TASKS
        ) as pool:

            async def post() -> None:
                await pool.request("POST", url, headers=headers, content=body)

            await _in_tasks(requests, post)
        return time.perf_counter() - started

    done.put(trio.run(run))


def _in_process(target: Any, *args: Any) -> Any:
    """Run `target(*args, queue)` in a spawned process; what it put in the queue."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def capacity(receivers: Receivers, clients: int, body_size: int) -> float:
    """Requests/s the receiver answers alone, to `clients` raw-socket load processes."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [
        context.Process(target=_load, args=(receivers.port, body_size, CAPACITY_SECONDS, queue))
        for _ in range(clients)
    ]
    for process in processes:
        process.start()
    answered: int = sum(queue.get() for _ in processes)
    for process in processes:
        process.join()
    return answered / CAPACITY_SECONDS


# --- the storm -------------------------------------------------------------------------------


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


async def storm(
    directory: Path, receivers: Receivers, events: int, automations: int, profile: str | None
) -> float:
    """Run the storm; webhooks/s. `profile`: record the daemon with py-spy (raw stacks of
    the thread holding the GIL: where the Python CPU goes)."""
    files = write_automations(directory, _automations(receivers.url(), automations))
    config = write_config(
        directory,
        [files],
        store={"path": str(directory / "trigd.db"), "synchronous": "full"},
        triggers={"automations": [str(files)], "proactive_granularity": "5s"},
        delivery={"timeout": "15s"},
    )
    webhooks = events * automations // GROUPS
    base = receivers.count()
    async with running_daemon(config) as daemon:
        pid = daemon.process.pid
        spy = None
        if profile is not None:
            py_spy = Path(sys.executable).parent / "py-spy"  # pip install py-spy
            spy = await trio.lowlevel.open_process(
                [
                    *(str(py_spy), "record", "--pid", str(pid), "--rate", "200"),
                    *("--format", "raw", "--threads", "--gil", "--nonblocking", "-o", profile),
                ],
                stdout=subprocess.DEVNULL,
            )
            await trio.sleep(1.0)
        cpu = _cpu_seconds(pid)
        threads = _thread_cpu(pid)
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
        by_last_ack = receivers.count() - base
        delivered = await trio.to_thread.run_sync(receivers.until, base + webhooks, 600) - started
        user, system = (b - a for a, b in zip(cpu, _cpu_seconds(pid), strict=True))
        spent = {tid: t - threads.get(tid, 0.0) for tid, t in _thread_cpu(pid).items()}
        used = user + system
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            with trio.fail_after(30):
                await spy.wait()
    rate = webhooks / delivered
    print(
        f"trigd:    {webhooks} webhooks from {events} events, each firing "
        f"{automations // GROUPS} of {automations} automations: "
        f"committed in {committed:.2f} s, delivered in {delivered:.2f} s "
        f"({rate:,.0f} webhooks/s); daemon CPU {used:.1f} s, "
        f"{used / webhooks * 1e6:.0f} µs/webhook ({user / webhooks * 1e6:.0f} user, "
        f"{system / webhooks * 1e6:.0f} system)",
        flush=True,
    )
    after = (webhooks - by_last_ack) / max(delivered - committed, 1e-9)
    print(
        f"          by the last ack {by_last_ack} delivered; the other {webhooks - by_last_ack} "
        f"after it at {after:,.0f} webhooks/s",
        flush=True,
    )
    main_thread = spent.pop(pid, 0.0)
    busiest = max(spent.values(), default=0.0)
    print(
        f"          by thread: event loop {main_thread / webhooks * 1e6:.0f} µs/webhook, "
        f"busiest other thread (the store's) {busiest / webhooks * 1e6:.0f}, "
        f"the {len(spent) - 1} others {(sum(spent.values()) - busiest) / webhooks * 1e6:.0f}",
        flush=True,
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2_000)
    parser.add_argument("--automations", type=int, default=100)
    parser.add_argument("--receivers", type=int, default=2, help="receiver processes")
    parser.add_argument("--clients", type=int, default=2, help="load processes (capacity)")
    parser.add_argument("--profile", metavar="OUT", help="py-spy raw stacks of the daemon to OUT")
    args = parser.parse_args()
    receivers = Receivers(args.receivers)
    try:
        answered = capacity(receivers, args.clients, 73)  # the storm's body size
        print(
            f"receiver: {args.receivers} processes, alone against {args.clients} raw-socket "
            f"clients x {CLIENT_SOCKETS} keep-alive sockets: {answered:,.0f} requests/s",
            flush=True,
        )
        with tempfile.TemporaryDirectory() as tmp:
            rate = trio.run(
                storm, Path(tmp), receivers, args.events, args.automations, args.profile
            )
        requests = args.events * args.automations // GROUPS
        size = receivers.body_size()
        for loop, what in (
            (_ceiling, f"bare httpx loop in its own process ({CEILING_TASKS} tasks, keep-alive)"),
            (
                _ceiling_transport,
                "bare loop as the sender sends (httpx client builds, its transport sends)",
            ),
            (
                _ceiling_httpcore,
                f"bare httpcore loop in its own process ({CEILING_TASKS} tasks, keep-alive)",
            ),
        ):
            elapsed = _in_process(loop, receivers.url(), size, requests)
            ceiling = requests / elapsed
            print(
                f"ceiling:  {requests} POSTs of {size} bytes, {what}: {elapsed:.2f} s "
                f"({ceiling:,.0f} requests/s); trigd / ceiling {rate / ceiling:.2f}",
                flush=True,
            )
    finally:
        receivers.stop()


if __name__ == "__main__":
    main()
