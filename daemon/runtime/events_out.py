"""One events-out subscriber's connection: ``ws://HOST:PORT/api/events/out``
(docs/PROTOCOL.md#events-out).

Theory of operation. Ingest does the handshake (the same as ``/events/in``'s: slots, auth)
and hands over the subscriber's first message. ``EventsOut.serve`` then:

1. judges it (``daemon.wire.events_out.parse_subscription``: 1002 when it is not a
   filter);
2. subscribes to the hub *before* reading the backfill, so an event committed meanwhile
   is either in the backfill, or queued live, or both: none is lost between the two;
3. sends the backfill (stored events that match, oldest first, within ``backfill`` of
   now and the newest ``backfill_max_events`` of them), read on a read-only connection
   in worker threads so the writer never waits for it, a page at a time within one read
   transaction, so a backfill of large events is never all in memory;
4. sends each newly committed matching event, skipping the ids the backfill already sent.

Bounds: the hub queues at most ``queue_depth`` events for a subscriber; past that it is
closed with 1013 and a reason naming the setting, and ingest never waited for it. Every
send has ``send_timeout``: a client that takes no data at all is dropped.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from datetime import datetime
from pathlib import Path
from typing import Final

import attrs
import trio
from trio_websocket import ConnectionClosed

from daemon.core.config import EventsOutConfig
from daemon.core.durations import format_duration
from daemon.core.event_filter import EventFilter
from daemon.runtime.connection import CheckpointConnection
from daemon.runtime.events_hub import EventsHub, Subscriber
from daemon.runtime.events_query import backfill_plan
from daemon.wire.events_out import Refusal, Subscription, event_message, parse_subscription
from daemon.wire.wsframes import text_frame
from store.db import Store
from store.events import query_event_rows

log = logging.getLogger(__name__)

TRY_AGAIN_LATER: Final = 1013  # close code: too slow to keep up
CLOSE_TIMEOUT: Final = 1.0  # seconds for the client to answer a close

Backfill = Callable[[EventFilter, datetime], AsyncGenerator[list[tuple[str, str]], None]]
"""(filter, now) -> the stored events to send first, oldest first, as (id, JSON), a page
at a time: a backfill of large events is never all in memory at once."""


@attrs.define
class EventsOutStats:
    subscribers: int = 0  # connected now
    subscribers_total: int = 0
    slow_closed: int = 0  # closed with 1013 for overflowing their queue
    stalled: int = 0  # dropped after send_timeout without taking a frame
    sent: int = 0  # event messages sent


@attrs.define
class EventsOut:
    """What ingest needs to serve subscribers: the hub, the limits, the backfill."""

    hub: EventsHub
    settings: EventsOutConfig
    backfill: Backfill
    clock: Callable[[], datetime]
    stats: EventsOutStats = attrs.Factory(EventsOutStats)

    async def serve(self, conn: CheckpointConnection, message: str | bytes, peer: str) -> None:
        """Serve one subscriber whose first message is ``message``, until it goes away,
        is too slow, or is cancelled."""
        subscription = parse_subscription(message)
        if isinstance(subscription, Refusal):
            log.info("refused subscriber %s: %s", peer, subscription.reason)
            await _close(conn, subscription.code, subscription.reason)
            return
        settings = self.settings
        subscriber = self.hub.subscribe(subscription.filter, settings.queue_depth)
        self.stats.subscribers += 1
        self.stats.subscribers_total += 1
        try:
            await self._stream(conn, subscription, subscriber)
        finally:
            self.hub.unsubscribe(subscriber)
            self.stats.subscribers -= 1

    async def _stream(
        self, conn: CheckpointConnection, subscription: Subscription, subscriber: Subscriber
    ) -> None:
        sent: set[str] = set()
        if subscription.backfill:
            pages = self.backfill(subscription.filter, self.clock())
            async with contextlib.aclosing(pages):
                async for page in pages:
                    sent.update(event_id for event_id, _ in page)
                    frames = [text_frame(event_message(data).encode()) for _, data in page]
                    if not await self._send(conn, frames):
                        return
        while True:
            await subscriber.wait()
            if subscriber.overflowed:
                self.hub.unsubscribe(subscriber)  # at once: the close may take a while
                self.stats.slow_closed += 1
                self.hub.slow_closed += 1
                depth = self.settings.queue_depth
                reason = f"too slow: more than {depth} events waiting (events_out.queue_depth)"
                log.info("closed subscriber: %s", reason)
                await _close(conn, TRY_AGAIN_LATER, reason)
                return
            frames = []
            for published in subscriber.take():
                if sent:
                    event_id = str(published.event.id)
                    if event_id in sent:
                        sent.discard(event_id)
                        continue
                frames.append(published.frame())
            if frames and not await self._send(conn, frames):
                return

    async def _send(self, conn: CheckpointConnection, frames: list[bytes]) -> bool:
        """Send within ``send_timeout``; False when the client is gone or was dropped."""
        timeout = self.settings.send_timeout
        with trio.move_on_after(timeout.total_seconds()) as scope:
            try:
                await conn.send_frames(frames)
            except ConnectionClosed:
                return False
        if scope.cancelled_caught:
            self.stats.stalled += 1
            log.info("dropped a subscriber that took no data for %s", format_duration(timeout))
            await conn.abort()
            return False
        self.stats.sent += len(frames)
        return True


BACKFILL_PAGE: Final = 100  # stored events read, and written, at a time


async def _close(conn: CheckpointConnection, code: int, reason: str) -> None:
    with trio.CancelScope(shield=True) as closing:
        closing.deadline = trio.current_time() + CLOSE_TIMEOUT
        await conn.aclose(code, reason)


def events_out_service(
    db_path: Path, settings: EventsOutConfig, clock: Callable[[], datetime]
) -> EventsOut:
    """Events out for the daemon whose database is ``db_path``: each backfill is read on a
    read-only connection of its own, in worker threads, in one read transaction (one
    snapshot however many pages), a page at a time."""

    async def backfill(
        flt: EventFilter, now: datetime
    ) -> AsyncGenerator[list[tuple[str, str]], None]:
        store = await trio.to_thread.run_sync(Store.open_readonly, db_path)
        try:

            def plan() -> tuple[EventFilter, int]:
                store.conn.execute("BEGIN")
                window, most = settings.backfill, settings.backfill_max_events
                return backfill_plan(store.conn, flt, now, window, most)

            oldest_first, offset = await trio.to_thread.run_sync(plan)
            left = settings.backfill_max_events
            while left > 0:
                size = min(BACKFILL_PAGE, left)
                page = await trio.to_thread.run_sync(
                    query_event_rows, store.conn, oldest_first, size, offset
                )
                if not page:
                    return
                yield page
                offset += len(page)
                left -= len(page)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(store.close)

    return EventsOut(EventsHub(), settings, backfill, clock)
