"""Ingest and the evaluator (real Engine) started in-process on 127.0.0.1 port 0 over a real
SQLite file, and the websocket clients the ingest and connection-limit tests talk to them with:
trio-websocket's, and wsproto by hand for the handshake and raw frames."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import attrs
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from daemon.core.config import EventsOutConfig, ServerConfig
from daemon.core.log_throttle import DEFAULT_LIMITS, LogLimits
from daemon.engine.engine import Engine
from daemon.runtime.evaluator import BatchEngine, EvaluatorStats, run_evaluator
from daemon.runtime.events_out import EventsOut, events_out_service
from daemon.runtime.gateway import StoreGateway
from daemon.runtime.http_routes import HttpApp
from daemon.runtime.http_server import HttpStats
from daemon.runtime.ingest import IngestStats, run_ingest
from daemon.runtime.metrics import Metrics
from daemon.runtime.read_pacing import ReadPacing
from daemon.wire.submission import Submission
from store.db import Store
from tests.support.evaluator_doubles import fixed_clock


def event_dict(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": str(uuid4()),
        "occurred": "2026-11-23T09:59:00Z",
        "event": "pump.pressure.high",
        "resource": {"prefect.resource.id": "pump.7", "site": "north"},
        "related": [{"prefect.resource.id": "site.north", "prefect.resource.role": "site"}],
        "payload": {"bar": 9.2},
    }
    event.update(overrides)
    return event


@attrs.define
class Daemon:
    port: int
    db_path: Path
    ingest: IngestStats
    evaluator: EvaluatorStats
    submit: trio.MemorySendChannel[Submission]
    http: HttpApp  # its routes, readiness and metrics
    events_out: EventsOut | None = None

    def http_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def url(self, path: str = "/api/events/in") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"


@attrs.define
class Starter:
    nursery: trio.Nursery
    store: Store
    db_path: Path

    async def __call__(
        self,
        *,
        engine: BatchEngine | None = None,
        queue: int = 100,
        batch_max: int = 50,
        log_limits: LogLimits = DEFAULT_LIMITS,
        events_out: EventsOutConfig | None = None,
        clock: Callable[[], datetime] = fixed_clock,
        linger: timedelta = timedelta(0),
        paced: bool = False,
        **settings: Any,
    ) -> Daemon:
        """``events_out``: serve /api/events/out with these settings; ``linger``: the
        evaluator's commit linger; ``paced``: readers hold off while the evaluator lingers or
        commits, as in the daemon (``daemon.runtime.read_pacing``)."""
        config = ServerConfig(listen="127.0.0.1:0", **settings)
        out = None
        if events_out is not None:
            out = events_out_service(self.db_path, events_out, clock)
        send, receive = trio.open_memory_channel[Submission](queue)
        pacing = ReadPacing() if paced else None
        ingest_stats, evaluator_stats = IngestStats(), EvaluatorStats()
        gateway = StoreGateway(self.store)
        http_stats = HttpStats()
        metrics = Metrics(ingest_stats, evaluator_stats, http_stats, gateway)
        http = HttpApp(config, send, fixed_clock, ingest_stats, metrics=metrics)
        await self.nursery.start(
            lambda task_status: run_evaluator(
                gateway,
                engine if engine is not None else Engine(),
                receive,
                clock=fixed_clock,
                batch_max=batch_max,
                linger=linger,
                pacing=pacing,
                stats=evaluator_stats,
                on_batch=lambda batch, seconds: metrics.observe_batch(
                    batch, seconds, fixed_clock()
                ),
                hub=None if out is None else out.hub,
                task_status=task_status,
            )
        )
        port = await self.nursery.start(
            lambda task_status: run_ingest(
                config,
                send,
                clock=fixed_clock,
                stats=ingest_stats,
                log_limits=log_limits,
                routes=http.routes(),
                http_stats=http_stats,
                events_out=out,
                pacing=pacing,
                task_status=task_status,
            )
        )
        return Daemon(port, self.db_path, ingest_stats, evaluator_stats, send, http, out)


@asynccontextmanager
async def connect(url: str, **kwargs: Any) -> AsyncIterator[WebSocketConnection]:
    """``open_websocket_url`` that also closes the socket when the server closed first
    (trio-websocket's client leaves it to the garbage collector then)."""
    async with open_websocket_url(url, **kwargs) as ws:
        try:
            yield ws
        finally:
            stream = ws._stream
    await trio.aclose_forcefully(stream)


async def authenticate(ws: WebSocketConnection, token: str | None) -> None:
    await ws.send_message(json.dumps({"type": "auth", "token": token}, separators=(",", ":")))
    assert json.loads(await ws.get_message()) == {"type": "auth_success"}


async def replies(ws: WebSocketConnection, count: int) -> list[dict[str, Any]]:
    return [json.loads(await ws.get_message()) for _ in range(count)]


async def handshake_status(
    port: int,
    path: str = "/api/events/in",
    *,
    subprotocols: list[str] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> int:
    """The HTTP status the server answers an upgrade request with (101 = accepted)."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, RejectConnection, Request

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        client = WSConnection(ConnectionType.CLIENT)
        request = Request(
            host="127.0.0.1",
            target=path,
            subprotocols=subprotocols or [],
            extra_headers=headers or [],
        )
        await stream.send_all(client.send(request))
        answer = await until_event(stream, client, (AcceptConnection, RejectConnection))
        return 101 if isinstance(answer, AcceptConnection) else answer.status_code


async def until_event(stream: trio.SocketStream, client: Any, kind: Any) -> Any:
    while True:
        for event in client.events():
            if isinstance(event, kind):
                return event
        data = await stream.receive_some(65536)
        if not data:
            raise AssertionError(f"connection closed before {kind}")
        client.receive_data(data)
