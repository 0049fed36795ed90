"""What the trio side of ingest costs per event: socket -> ReceivedEvent -> Submission -> ack.

    .venv/bin/python bench/bench_ingest.py [--events 100000] [--repeat 3] [--profile OUT]

Run it from the repository root: this process imports ``daemon`` from the checkout it
lives in, not from wherever the virtualenv's editable install points.

Set-up: this process runs the real ``run_ingest`` (default ``ServerConfig``: queue depth,
frame bound) with a stand-in evaluator that takes submissions off the channel in batches,
as ``run_evaluator`` does, and resolves them at once (no store, no engine). The load comes
from a child process (this file with ``--client``) so its CPU is not ours: it pre-encodes
masked client frames with wsproto (the ``trigd.v1`` auth message, then one event per
frame, JSON exactly as ``bench_daemon.frames`` makes it), opens a raw socket, does the
websocket handshake, writes the frames in large chunks from a thread and reads the acks
with a few slices per frame, checking that each one acks the expected id, in order.

Like ``trigd serve``, this process tunes the garbage collector after start-up
(``daemon.runtime.service.tune_garbage_collector``) before measuring, and reports the time spent
in collections. The number that matters is this process's CPU time per event (``time.process_time``
around the run, which covers handshake, every frame, every ack and the close).
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

if TYPE_CHECKING:
    from daemon.wire.submission import Submission

ROOT: Final = Path(__file__).resolve().parent.parent
EVENTS: Final = 100_000
CHUNK: Final = 256 * 1024  # bytes per client write
RECEIVE: Final = 256 * 1024  # bytes per client read
AUTH: Final = '{"type":"auth","token":""}'
ACK_PREFIX: Final = b'{"type":"ack","id":"'
TARGET_US: Final = 22.0


# --- the client (child process) ------------------------------------------------------------


def _handshaken(subprotocols: Sequence[str]) -> WSConnection:
    """A client connection brought to OPEN in memory, to encode frames with."""
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    request = client.send(
        Request(host="127.0.0.1", target="/api/events/in", subprotocols=list(subprotocols))
    )
    server.receive_data(request)
    proposal = next(iter(server.events()))
    assert isinstance(proposal, Request)
    client.receive_data(server.send(AcceptConnection(subprotocol=subprotocols[0])))
    assert isinstance(next(iter(client.events())), AcceptConnection)
    return client


def _encode(count: int) -> tuple[bytes, bytes, list[bytes]]:
    """The auth frame, every event frame (masked, as one byte string), and the ids."""
    from bench_daemon import TARGET_EVENTS_PER_S, frames  # this file's directory is on the path

    encoder = _handshaken(["trigd.v1"])
    pairs = frames(0, count, TARGET_EVENTS_PER_S)
    auth = encoder.send(TextMessage(data=AUTH))
    wire = b"".join(encoder.send(TextMessage(data=frame)) for _, frame in pairs)
    return auth, wire, [i.encode() for i, _ in pairs]


def _authenticate(sock: socket.socket, client: WSConnection, auth: bytes) -> None:
    """Upgrade, then send ``auth``; read until the server has accepted both."""
    sock.sendall(
        client.send(Request(host="127.0.0.1", target="/api/events/in", subprotocols=["trigd.v1"]))
    )
    accepted = authed = False
    while not (accepted and authed):
        data = sock.recv(RECEIVE)
        if not data:
            raise RuntimeError("server closed during the handshake")
        client.receive_data(data)
        for event in client.events():
            if isinstance(event, AcceptConnection):
                accepted = True
                sock.sendall(auth)
            elif isinstance(event, TextMessage) and "auth_success" in event.data:
                authed = True
            else:
                raise RuntimeError(f"unexpected {event!r}")


def run_client(port: int, count: int) -> int:
    """Send ``count`` events flat out on one connection; check every ack, in order."""
    auth, events, ids = _encode(count)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _authenticate(sock, WSConnection(ConnectionType.CLIENT), auth)
    cpu0, wall0 = time.process_time(), time.perf_counter()

    def write() -> None:
        view = memoryview(events)
        for start in range(0, len(view), CHUNK):
            sock.sendall(view[start : start + CHUNK])

    writer = threading.Thread(target=write)
    writer.start()
    buffer = b""
    acked = nacks = 0
    while acked + nacks < count:
        data = sock.recv(RECEIVE)
        if not data:
            raise RuntimeError(f"server closed after {acked + nacks} replies")
        buffer += data
        at, end = 0, len(buffer)
        while end - at >= 2:
            size = buffer[at + 1] & 0x7F
            head = 2
            if size == 126:
                if end - at < 4:
                    break
                size, head = int.from_bytes(buffer[at + 2 : at + 4], "big"), 4
            if end - at < head + size:
                break
            body = buffer[at + head : at + head + size]
            at += head + size
            expected = ids[acked + nacks]
            if body.startswith(ACK_PREFIX) and body[20:56] == expected:
                acked += 1
            else:
                nacks += 1
                print(f"unexpected reply for {expected.decode()}: {body!r}", file=sys.stderr)
        buffer = buffer[at:]
    wall = time.perf_counter() - wall0
    writer.join()
    cpu = time.process_time() - cpu0
    sock.close()
    print(
        f"  client: {acked:,} acks, {nacks} other replies in {wall:.2f} s "
        f"= {count / wall:,.0f} events/s; its CPU {cpu:.2f} s",
        flush=True,
    )
    return 0 if nacks == 0 else 1


# --- ingest (this process) ---------------------------------------------------------------


async def resolve_at_once(receive: trio.MemoryReceiveChannel[Submission], batch_max: int) -> None:
    """``run_evaluator`` without the store: batches off the channel, resolved at once."""
    async with receive:
        async for first in receive:
            batch = [first]
            while len(batch) < batch_max:
                try:
                    batch.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            for submission in batch:
                submission.sink.resolved(submission, None)


async def measure(count: int) -> float:
    """CPU seconds of this process for one client run of ``count`` events."""
    from daemon.core.config import ServerConfig
    from daemon.runtime.ingest import run_ingest
    from daemon.wire.submission import Submission

    config = ServerConfig(listen="127.0.0.1:0")
    send, receive = trio.open_memory_channel[Submission](config.queue_depth)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(resolve_at_once, receive, config.batch_max_events)
        port = await nursery.start(run_ingest, config, send)
        cpu0 = time.process_time()
        result = await trio.run_process(
            [sys.executable, __file__, "--client", str(port), "--events", str(count)],
            check=False,
            cwd=ROOT,
        )
        cpu = time.process_time() - cpu0
        nursery.cancel_scope.cancel()
    if result.returncode != 0:
        raise SystemExit(f"client failed with {result.returncode}")
    return cpu


def _time_collections() -> dict[str, float]:
    """Seconds spent in the cyclic garbage collector and collections, from now on."""
    totals = {"seconds": 0.0, "collections": 0.0}
    started = 0.0

    def callback(phase: str, info: dict[str, int]) -> None:
        nonlocal started
        if phase == "start":
            started = time.perf_counter()
        else:
            totals["seconds"] += time.perf_counter() - started
            totals["collections"] += 1

    gc.callbacks.append(callback)
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=EVENTS)
    parser.add_argument("--repeat", type=int, default=3, help="runs, each on a fresh connection")
    parser.add_argument("--profile", metavar="OUT", help="py-spy this process (raw) to OUT")
    parser.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client is not None:
        return run_client(args.client, args.events)
    sys.path.insert(0, str(ROOT))  # this checkout's daemon package, see the docstring
    from daemon.runtime.service import tune_garbage_collector  # imports the daemon, as serve does

    tune_garbage_collector()  # as `trigd serve` does after start-up
    gc_time = _time_collections()
    spy = None
    if args.profile:
        spy = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                *("record", "--pid", str(os.getpid()), "--rate", "500", "--format", "raw"),
                *("--nonblocking", "-o", args.profile),
            ],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(1.0)
    results = []
    try:
        for _ in range(args.repeat):
            gc_time.update(seconds=0.0, collections=0.0)
            cpu = trio.run(measure, args.events)
            per_event = cpu / args.events * 1e6
            results.append(per_event)
            collecting = gc_time["seconds"] / args.events * 1e6
            print(
                f"ingest: {args.events:,} events, CPU {cpu:.3f} s = {per_event:.1f} µs/event "
                f"(of which {collecting:.1f} in {gc_time['collections']:.0f} GC collections)",
                flush=True,
            )
    finally:
        if spy is not None:
            spy.send_signal(2)
            spy.wait()
    best = min(results)
    verdict = "ok" if best <= TARGET_US else "MISSED"
    print(
        f"best {best:.1f} µs/event, median {sorted(results)[len(results) // 2]:.1f} "
        f"(target ≤ {TARGET_US:.0f}): {verdict}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
