"""A sender started on a real store (delivery settings for tests, no jitter), delivering to
the receiver of `tests.support.webhook_receiver`; for the sender and store-trouble tests."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import attrs
import trio

from daemon.core.config import DeliveryConfig
from daemon.core.events import ReceivedEvent
from daemon.core.firings import TriggeredAction
from daemon.runtime.gateway import StoreGateway
from daemon.runtime.sender import IngestActivity, Sender, run_sender
from store import outbox
from store.db import Store
from tests.support.webhook_receiver import JumpingClock, Receiver, make_triggered, outbox_row

TEST_TIMEOUT = 10  # seconds of real time per test


@attrs.define
class Harness:
    store: Store
    gateway: StoreGateway
    sender: Sender
    clock: Any
    events: trio.MemoryReceiveChannel[ReceivedEvent]

    async def enqueue(self, *triggered: TriggeredAction) -> None:
        def write(conn: Any) -> None:
            with conn:
                outbox.enqueue(conn, [outbox_row(t, created=self.clock()) for t in triggered])

        await self.gateway.run(write)
        self.sender.notify()

    async def next_event(self) -> ReceivedEvent:
        return await self.events.receive()

    def row(self, triggered: TriggeredAction) -> outbox.OutboxRow:
        return outbox.get(self.store.conn, str(triggered.id))

    def attempts(self, triggered: TriggeredAction) -> list[outbox.AttemptRow]:
        return outbox.attempts(self.store.conn, str(triggered.id))


def settings(**overrides: Any) -> DeliveryConfig:
    values: dict[str, Any] = {
        "timeout": timedelta(seconds=5),
        "max_age": timedelta(hours=72),
        "concurrency": 4,
        "per_endpoint_concurrency": 2,
        "lease": timedelta(seconds=60),
    }
    values.update(overrides)
    return DeliveryConfig(**values)


async def start(
    nursery: trio.Nursery,
    store: Store,
    clock: Any = None,
    ingest: IngestActivity | None = None,
    **overrides: Any,
) -> Harness:
    """`ingest`: when clients last sent events, for the sender to give way (None: never)."""
    clock = clock if clock is not None else JumpingClock()
    send, receive = trio.open_memory_channel[ReceivedEvent](1000)

    def emit(events: Sequence[ReceivedEvent]) -> None:
        for event in events:
            send.send_nowait(event)

    gateway = StoreGateway(store)
    sender = await nursery.start(
        lambda task_status: run_sender(
            gateway,
            settings(**overrides),
            clock=clock,
            emit=emit,
            random=lambda: 0.5,  # no jitter: waits are exactly the schedule
            ingest=ingest,
            task_status=task_status,
        )
    )
    return Harness(store, gateway, sender, clock, receive)


def webhook(receiver: Receiver, **fields: Any) -> TriggeredAction:
    return make_triggered({"type": "call-webhook", "url": receiver.url(), **fields})
