"""The benchmark's peers, each run as its own process so its CPU is not the client's.

    python bench/peers.py receiver   # a webhook receiver: 200 at once, keep-alive
    python bench/peers.py trivial    # a trigd.v1 websocket server that acks each frame at once

Each prints ``port N`` on stdout once listening on 127.0.0.1 and serves until killed.
The trivial server exists to measure what the benchmark client costs by itself: after a
wsproto handshake it does nothing per frame but unmask the id and write the ack (a run of
acks per socket read).
"""

from __future__ import annotations

import sys
from typing import Final, TypeVar

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Event, Request, TextMessage

RECEIVE_BYTES: Final = 65_536  # bytes per socket read
_ID_AT: Final = len('{"id": "')  # frames from bench_daemon start with the id
_ACK: Final = b'{"type":"ack","id":"'
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


async def _next_ws_event(stream: trio.SocketStream, ws: WSConnection, kind: type[E]) -> E:
    while True:
        for event in ws.events():
            if isinstance(event, kind):
                return event
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            raise EOFError
        ws.receive_data(data)


def _acks(buffer: bytearray) -> tuple[bytes, int]:
    """Ack frames for every complete (masked, single-frame) text frame; bytes consumed."""
    out, at = bytearray(), 0
    while len(buffer) - at >= 2:
        size, head = buffer[at + 1] & 0x7F, 2
        if size == 126:
            head, size = 4, int.from_bytes(buffer[at + 2 : at + 4], "big")
        elif size == 127:
            head, size = 10, int.from_bytes(buffer[at + 2 : at + 10], "big")
        if len(buffer) - at < head + 4 + size:
            break
        mask = buffer[at + head : at + head + 4]
        body = at + head + 4
        event_id = bytes(buffer[body + i] ^ mask[i % 4] for i in range(_ID_AT, _ID_AT + 36))
        reply = _ACK + event_id + b'"}'
        out += bytes((0x81, len(reply))) + reply
        at = body + size
    return bytes(out), at


async def _trivial_client(stream: trio.SocketStream) -> None:
    ws = WSConnection(ConnectionType.SERVER)
    try:
        await _next_ws_event(stream, ws, Request)
        await stream.send_all(ws.send(AcceptConnection(subprotocol="trigd.v1")))
        await _next_ws_event(stream, ws, TextMessage)  # the auth message
        await stream.send_all(ws.send(TextMessage(data='{"type":"auth_success"}')))
        buffer = bytearray()
        while data := await stream.receive_some(RECEIVE_BYTES):
            buffer += data
            acks, used = _acks(buffer)
            del buffer[:used]
            if acks:
                await stream.send_all(acks)
    except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
        return


async def trivial() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(f"port {listeners[0].socket.getsockname()[1]}", flush=True)
    await trio.serve_listeners(_trivial_client, listeners)


if __name__ == "__main__":
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if role == "receiver":
        trio.run(receiver)
    elif role == "trivial":
        trio.run(trivial)
    else:
        sys.exit("usage: peers.py receiver|trivial")
