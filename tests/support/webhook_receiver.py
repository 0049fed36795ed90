"""Shared pieces for the delivery tests: a real HTTP receiver (trio + h11 on 127.0.0.1),
triggered actions to deliver, and a wall clock that tests can jump.

The receiver is a plain trio server task: each request is answered by an async handler,
which may wait on an event (a slow endpoint) or return any status. Every request is also
sent into a channel so a test can await it instead of sleeping.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from uuid import UUID

import attrs
import h11
import trio

from daemon.core.automations import Automation
from daemon.core.clock import to_us
from daemon.core.events import ReceivedEvent
from daemon.core.firings import Firing, TriggeredAction, TriggerState
from store.outbox import NewOutboxRow

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
MAX_REQUEST_BYTES = 1_000_000


@attrs.frozen
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@attrs.frozen
class Reply:
    status: int = 200
    headers: dict[str, str] = attrs.field(factory=dict)
    body: bytes = b"ok"


Handler = Callable[[Request], Awaitable[Reply]]


async def _reply(status: int, request: Request) -> Reply:
    return Reply(status)


def answer(status: int) -> Handler:
    return partial(_reply, status)


@attrs.define
class Receiver:
    """A webhook receiver; `handler` can be swapped while it runs."""

    handler: Handler
    port: int = 0
    requests: list[Request] = attrs.field(factory=list)
    send: trio.MemorySendChannel[Request] | None = None
    receive: trio.MemoryReceiveChannel[Request] | None = None
    listening: trio.Event = attrs.field(factory=trio.Event)
    record: bool = True  # keep requests (tests); off for benchmarks

    def start_listening(self) -> None:
        """Until this is called (with `listen=False`) connections are refused."""
        self.listening.set()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def next_request(self) -> Request:
        assert self.receive is not None
        return await self.receive.receive()

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                request = await self._read(conn, stream)
                if request is None:
                    return
                if self.record:
                    self.requests.append(request)
                    assert self.send is not None
                    self.send.send_nowait(request)
                try:
                    reply = await self.handler(request)
                except trio.BrokenResourceError:
                    return
                body = b"" if reply.status in (204, 304) else reply.body
                headers = [(b"content-length", str(len(body)).encode())] if body else []
                headers += [(k.encode(), v.encode()) for k, v in reply.headers.items()]
                try:
                    for event in (
                        h11.Response(status_code=reply.status, headers=headers),
                        h11.Data(data=body),
                        h11.EndOfMessage(),
                    ):
                        await stream.send_all(conn.send(event) or b"")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()

    async def _read(self, conn: h11.Connection, stream: trio.SocketStream) -> Request | None:
        start: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:  # e.g. the sender was killed mid-request
                return None
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                start = event
            elif isinstance(event, h11.Data):
                body += event.data
                assert len(body) < MAX_REQUEST_BYTES
            elif isinstance(event, h11.EndOfMessage):
                assert start is not None
                headers: dict[str, str] = {}
                for k, v in start.headers:  # a repeated header reads as HTTP joins it
                    name = k.decode().lower()
                    headers[name] = (
                        f"{headers[name]}, {v.decode()}" if name in headers else v.decode()
                    )
                return Request(start.method.decode(), start.target.decode(), headers, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                return None
            else:
                return None


async def run_receiver(
    handler: Handler,
    *,
    listen: bool = True,
    record: bool = True,
    task_status: trio.TaskStatus[Receiver] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on 127.0.0.1:<free port>. With `listen=False` the port is bound but refuses
    connections until `receiver.start_listening()`."""
    send, receive = trio.open_memory_channel[Request](1000)
    receiver = Receiver(handler, send=send, receive=receive, record=record)
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    receiver.port = sock.getsockname()[1]
    if listen:
        receiver.start_listening()
    task_status.started(receiver)
    await receiver.listening.wait()
    sock.listen(64)
    await trio.serve_listeners(receiver._connection, [trio.SocketListener(sock)])


@attrs.define
class JumpingClock:
    """A wall clock for the sender. `auto`: it jumps forward whenever the sender would
    sleep, so retries due in minutes or hours happen at once, at exactly the virtual time
    due. Manual: the sender's sleep waits until the test calls `advance_to`, and
    `next_sleep()` tells the test what the sender is waiting for."""

    now: datetime = T0
    auto: bool = True
    wanted: datetime | None = None
    _asleep: trio.Event = attrs.field(factory=trio.Event)
    _advanced: trio.Event = attrs.field(factory=trio.Event)

    def __call__(self) -> datetime:
        return self.now

    async def sleep_until(self, when: datetime) -> None:
        if self.auto:
            self.now = max(self.now, when)
            await trio.lowlevel.checkpoint()
            return
        self.wanted = when
        self._asleep.set()
        while self.now < when:
            await self._advanced.wait()

    async def next_sleep(self) -> datetime:
        await self._asleep.wait()
        self._asleep = trio.Event()
        assert self.wanted is not None
        return self.wanted

    def advance_to(self, when: datetime) -> None:
        self.now = max(self.now, when)
        self._advanced.set()
        self._advanced = trio.Event()


def triggering_event() -> ReceivedEvent:
    return ReceivedEvent.model_validate(
        {
            "occurred": T0 - timedelta(seconds=1),
            "event": "pump.pressure.high",
            "resource": {"prefect.resource.id": "pump.7", "site": "north"},
            "related": [{"prefect.resource.id": "site.north", "prefect.resource.role": "site"}],
            "payload": {"bar": 9.2},
            "id": "2f0c2bde-3d0e-4c1f-9a61-6a2d2a8f3b10",
            "received": T0 - timedelta(seconds=1),
        }
    )


def make_triggered(
    action: dict[str, Any], *, event: ReceivedEvent | None = None, proactive: bool = False
) -> TriggeredAction:
    trigger: dict[str, Any] = {
        "type": "event",
        "match": {"prefect.resource.id": "pump.*"},
        "expect": ["pump.pressure.high"],
        "for_each": ["prefect.resource.id"],
        "posture": "Proactive" if proactive else "Reactive",
        "threshold": 1,
        "within": 60,
    }
    automation = Automation.model_validate(
        {"name": "pump pressure burst", "trigger": trigger, "actions": [action]}
    )
    event = event if event is not None else triggering_event()
    return triggered_by(
        automation,
        event,
        automation_triggered_event_id=UUID("0198cd3a-7b2c-7e41-9f0e-5a6b7c8d9e0f"),
    )


def triggered_by(
    automation: Automation, event: ReceivedEvent, index: int = 0, **fields: Any
) -> TriggeredAction:
    """The outbox document of `automation`'s action `index`, fired at T0 by `event` in the
    bucket of its resource."""
    labels = {"prefect.resource.id": event.resource.id}
    firing = Firing(
        trigger=automation.trigger,
        trigger_states=frozenset({TriggerState.Triggered}),
        triggered=T0,
        triggering_labels=labels,
        triggering_event=event,
    )
    return TriggeredAction(
        automation=automation,
        firing=firing,
        triggered=T0,
        triggering_labels=labels,
        triggering_event=event,
        action=automation.actions[index],
        action_index=index,
        **fields,
    )


def outbox_row(triggered: TriggeredAction, *, created: datetime = T0) -> NewOutboxRow:
    from daemon.engine.acting import endpoint_of

    return NewOutboxRow(
        id=str(triggered.id),
        automation_id=str(triggered.automation.id),
        action_index=triggered.action_index,
        action_type=triggered.action.type,
        endpoint=endpoint_of(triggered.action),
        document=triggered.model_dump_json(),
        created_us=to_us(created),
    )
