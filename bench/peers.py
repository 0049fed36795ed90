"""The benchmark's peers, each run as its own process so its CPU is not the client's.

    python bench/peers.py receiver   # a webhook receiver: 200 at once, keep-alive
    python bench/peers.py trivial    # a trigd.v1 websocket server that acks each frame at once
    python bench/peers.py trivial-runs  # the same, reading at most once per RUN_SECONDS

Each prints ``port N`` on stdout once listening on 127.0.0.1 and serves until killed.
The trivial server exists to measure what the benchmark client costs by itself: after a
wsproto handshake it decodes frames as trigd does (``daemon.wire.wsframes.FrameSplitter``) and
does nothing per frame but slice the id out and frame the ack (a run of acks per read).
``trivial-runs`` pauses RUN_SECONDS (trigd's default ``commit_linger``) after each read that
found frames, so a trickle is read in runs, as trigd's readers take it: what the transport
alone costs trigd's trio thread at that rate (``bench_daemon.py --floor``).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Final, TypeVar

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    RejectConnection,
    Request,
    TextMessage,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.core.config import COMMIT_LINGER
from daemon.wire.wsframes import FrameSplitter, text_frame

RECEIVE_BYTES: Final = 65_536  # bytes per socket read
_ID_AT: Final = len('{"id": "')  # frames from bench_daemon start with the id
_ACK: Final = b'{"type":"ack","id":"'
RUN_SECONDS: Final = COMMIT_LINGER.total_seconds()  # trigd's default window
E = TypeVar("E", bound=Event)


async def _http_client(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(RECEIVE_BYTES)
                conn.receive_data(data)
                if not data:
                    return
                continue
            if isinstance(event, h11.EndOfMessage):
                reply = conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                reply += conn.send(h11.EndOfMessage())
                await stream.send_all(reply)
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        return


async def receiver() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(f"port {listeners[0].socket.getsockname()[1]}", flush=True)
    await trio.serve_listeners(_http_client, listeners)


async def next_ws_event(stream: trio.SocketStream, ws: WSConnection, kind: type[E]) -> E:
    """Read until wsproto yields an event of `kind`: the handshake's reads, either side."""
    while True:
        for event in ws.events():
            if isinstance(event, kind):
                return event
            if isinstance(event, RejectConnection | CloseConnection):
                raise ConnectionError(f"the peer refused or closed the connection: {event!r}")
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            raise EOFError("the peer closed the connection during the handshake")
        ws.receive_data(data)


async def _trivial_client(stream: trio.SocketStream, pause: float = 0.0) -> None:
    ws = WSConnection(ConnectionType.SERVER)
    try:
        await next_ws_event(stream, ws, Request)
        await stream.send_all(ws.send(AcceptConnection(subprotocol="trigd.v1")))
        await next_ws_event(stream, ws, TextMessage)  # the auth message
        await stream.send_all(ws.send(TextMessage(data='{"type":"auth_success"}')))
        splitter = FrameSplitter(RECEIVE_BYTES)  # every bench frame is a plain text frame
        while data := await stream.receive_some(RECEIVE_BYTES):
            acks = [
                text_frame(_ACK + message[_ID_AT : _ID_AT + 36].encode() + b'"}')
                for message in splitter.feed(data)
                if isinstance(message, str)
            ]
            if acks:
                await stream.send_all(b"".join(acks))
                if pause:
                    await trio.sleep(pause)
    except (EOFError, ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError):
        return


async def trivial(pause: float = 0.0) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(f"port {listeners[0].socket.getsockname()[1]}", flush=True)
    await trio.serve_listeners(functools.partial(_trivial_client, pause=pause), listeners)


if __name__ == "__main__":
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if role == "receiver":
        trio.run(receiver)
    elif role == "trivial":
        trio.run(trivial)
    elif role == "trivial-runs":
        trio.run(trivial, RUN_SECONDS)
    else:
        sys.exit("usage: peers.py receiver|trivial|trivial-runs")
