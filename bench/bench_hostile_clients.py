"""A legitimate client's latency while others flood the daemon with connections (issue 12).

    .venv/bin/python bench/bench_hostile_clients.py                # 15 s, both floods
    .venv/bin/python bench/bench_hostile_clients.py --seconds 30 --idle 64

Set-up: the real daemon as a subprocess on its default connection settings (16 pending
handshakes, 16 sockets per address, 64 websockets), except a short ``idle_timeout`` so the
idle flood turns over within a run. Two floods run in this process:

* half-open upgrades: ``--half-open`` tasks from 127.0.0.2, each sending an unfinished
  HTTP upgrade request and starting again as soon as the daemon drops it;
* idle websockets: ``--idle`` tasks spread over 127.0.0.3-10, each upgrading,
  authenticating, then saying nothing until the daemon closes it, and starting again.

Meanwhile a canary from 127.0.0.1 connects, authenticates, sends one event, waits for its
ack and closes, over and over. Printed: connection attempts made by the floods, the
daemon's refusals (from its counters, read from the database after a clean stop), and the
canary's cycles and latency (p50, p99, max). Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Final

import apsw
import trio
from bench_daemon import launch  # this directory, first on sys.path
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

STOP_TIMEOUT: Final = 15.0  # seconds
IDLE_TIMEOUT: Final = "5s"  # the daemon's idle_timeout in this run
RECEIVE_BYTES: Final = 65_536


def start_daemon(workdir: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    return launch(
        workdir,
        f"[server]\nlisten = '127.0.0.1:0'\nidle_timeout = '{IDLE_TIMEOUT}'\n"
        f"[store]\npath = '{workdir / 'trigd.db'}'\n"
        "[triggers]\nproactive_granularity = '1s'\n",  # counters stored every second
    )


async def read_until(stream: trio.SocketStream, ws: WSConnection, kind: type) -> object:
    while True:
        for event in ws.events():
            if isinstance(event, kind):
                return event
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            raise EOFError("closed by the daemon")
        ws.receive_data(data)


async def open_websocket(port: int, local: str) -> tuple[trio.SocketStream, WSConnection]:
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=local)
    ws = WSConnection(ConnectionType.CLIENT)
    request = Request(host="127.0.0.1", target="/api/events/in", subprotocols=["trigd.v1"])
    await stream.send_all(ws.send(request))
    await read_until(stream, ws, AcceptConnection)
    await stream.send_all(ws.send(TextMessage(data='{"type":"auth"}')))
    await read_until(stream, ws, TextMessage)  # auth_success
    return stream, ws


class Tally:
    attempts = 0


async def half_open(port: int, tally: Tally) -> None:
    while True:
        tally.attempts += 1
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
            async with stream:
                await stream.send_all(b"GET /api/events/in HTTP/1.1\r\nHost: x\r\n")
                while await stream.receive_some(RECEIVE_BYTES):
                    pass  # until the daemon drops it
        except (OSError, trio.BrokenResourceError):
            await trio.sleep(0.01)


async def idle(port: int, local: str, tally: Tally) -> None:
    while True:
        tally.attempts += 1
        try:
            stream, _ = await open_websocket(port, local)
            async with stream:
                while await stream.receive_some(RECEIVE_BYTES):
                    pass  # until the daemon closes it
        except (OSError, EOFError, trio.BrokenResourceError):
            await trio.sleep(0.01)


async def canary_cycle(port: int) -> float:
    started = time.monotonic()
    stream, ws = await open_websocket(port, "127.0.0.1")
    async with stream:
        event = {
            "id": str(uuid.uuid4()),
            "event": "canary.sang",
            "resource": {"prefect.resource.id": "canary"},
        }
        await stream.send_all(ws.send(TextMessage(data=json.dumps(event))))
        reply = await read_until(stream, ws, TextMessage)
        if not (isinstance(reply, TextMessage) and '"ack"' in str(reply.data)):
            raise RuntimeError(f"the canary's event was not acknowledged: {reply!r}")
    return time.monotonic() - started


async def run(port: int, seconds: float, half_opens: int, idles: int) -> tuple[list[float], int]:
    tally = Tally()
    latencies: list[float] = []
    async with trio.open_nursery() as nursery:
        for _ in range(half_opens):
            nursery.start_soon(half_open, port, tally)
        for i in range(idles):
            nursery.start_soon(idle, port, f"127.0.0.{3 + i % 8}", tally)
        await trio.sleep(1.0)  # the floods reach their pace
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with trio.fail_after(60):
                latencies.append(await canary_cycle(port))
            await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    return latencies, tally.attempts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="canary run (default 15)")
    parser.add_argument("--half-open", type=int, default=200, help="half-open tasks (200)")
    parser.add_argument("--idle", type=int, default=64, help="idle websocket tasks (64)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        process, port, log_path = start_daemon(workdir)
        try:
            latencies, attempts = trio.run(run, port, args.seconds, args.half_open, args.idle)
            time.sleep(1.5)  # one more counters snapshot
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(STOP_TIMEOUT)
        conn = apsw.Connection(str(workdir / "trigd.db"), flags=apsw.SQLITE_OPEN_READONLY)
        row = conn.execute("SELECT value FROM meta WHERE key = 'daemon_counters'").fetchone()
        ingest = json.loads(str(row[0]))["ingest"] if row else {}
        alive = "exited 0" if code == 0 else f"exit code {code}"
        log = log_path.read_text(errors="replace")
    latencies.sort()
    p99 = latencies[max(0, round(len(latencies) * 0.99) - 1)]
    print(
        f"floods: {args.half_open} half-open tasks from 127.0.0.2, {args.idle} idle websocket "
        f"tasks from 127.0.0.3-10 (idle_timeout {IDLE_TIMEOUT}); {attempts:,} connections tried"
    )
    refused = {k: v for k, v in ingest.items() if k.startswith(("refused", "idle", "handshakes"))}
    print(f"daemon: {refused}; {alive}")
    print(
        f"canary: {len(latencies)} cycles (connect, auth, event, ack) in {args.seconds:g} s; "
        f"p50 {statistics.median(latencies) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms"
    )
    if "Traceback" in log:
        print("the daemon logged a traceback:", log[-4000:])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
