"""The benchmark's peers, each run as its own process so its CPU is not the client's.

    python bench/peers.py receiver   # a webhook receiver: 200 at once, keep-alive
    python bench/peers.py trivial    # a trigd.v1 websocket server that acks each frame at once

Each prints ``port N`` on stdout once listening on 127.0.0.1 and serves until killed.
The trivial server exists to measure what the benchmark client costs by itself: it does
nothing per frame but slice the id out and send the ack.
"""

from __future__ import annotations

import sys
from typing import Final

import h11
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

RECEIVE_BYTES: Final = 65_536  # bytes per socket read
_ID_AT: Final = len('{"id": "')  # frames from bench_daemon start with the id


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


async def _trivial_client(request: WebSocketRequest) -> None:
    ws = await request.accept(subprotocol="trigd.v1")
    try:
        await ws.get_message()  # the auth message
        await ws.send_message('{"type":"auth_success"}')
        while True:
            frame = await ws.get_message()
            assert isinstance(frame, str)
            event_id = frame[_ID_AT : _ID_AT + 36]
            await ws.send_message('{"type":"ack","id":"' + event_id + '"}')
    except ConnectionClosed:
        return


async def trivial() -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, _trivial_client, "127.0.0.1", 0, None)
        print(f"port {server.port}", flush=True)


if __name__ == "__main__":
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if role == "receiver":
        trio.run(receiver)
    elif role == "trivial":
        trio.run(trivial)
    else:
        sys.exit("usage: peers.py receiver|trivial")
