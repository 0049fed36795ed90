"""The publish hub of events out: every committed event, handed to each subscriber whose
filter it matches (docs/PROTOCOL.md#events-out).

Theory of operation. Whoever commits events (the evaluator for a batch, the inbox pump
for trigd's own events) calls ``publish`` after the commit returns, so a subscriber only
ever sees events that are on disk. ``publish`` never waits: each subscriber has a queue
of at most ``queue_depth`` events; one that would overflow is marked ``overflowed``, gets
nothing more, and its connection task closes it (1013). So a slow subscriber costs ingest
one flag, never a wait. With no subscribers, the committing task checks ``bool(hub)`` and
builds nothing. An event is encoded into its websocket frame once, by the first
subscriber's writer that sends it (``Published``), however many subscribers get it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import trio

from daemon.core.event_filter import EventFilter, matches
from daemon.core.events import ReceivedEvent
from daemon.wire.events_out import event_message
from daemon.wire.wsframes import text_frame


class Published:
    """A committed event, and its frame for subscribers once one of them encoded it."""

    __slots__ = ("_frame", "event")

    def __init__(self, event: ReceivedEvent) -> None:
        self.event = event
        self._frame: bytes | None = None

    def frame(self) -> bytes:
        """``{"type":"event","event":...}`` as a websocket text frame."""
        if self._frame is None:
            self._frame = text_frame(event_message(self.event.model_dump_json()).encode())
        return self._frame


class Subscriber:
    """One subscriber's filter and its queue of matching events not yet sent."""

    def __init__(self, flt: EventFilter, queue_depth: int) -> None:
        self.filter = flt
        self.queue_depth = queue_depth
        self.queue: deque[Published] = deque()
        self.overflowed = False
        self._wake = trio.Event()

    def offer(self, published: Published) -> None:
        if self.overflowed or not matches(self.filter, published.event):
            return
        if len(self.queue) >= self.queue_depth:
            self.overflowed = True
            self.queue.clear()
        else:
            self.queue.append(published)
        self._wake.set()

    async def wait(self) -> None:
        """Until there is something to send, or the subscriber overflowed."""
        while not self.queue and not self.overflowed:
            if self._wake.is_set():
                self._wake = trio.Event()
            await self._wake.wait()

    def take(self) -> list[Published]:
        events = list(self.queue)
        self.queue.clear()
        return events


class EventsHub:
    """The subscribers of events out; falsy when there is none."""

    def __init__(self) -> None:
        self._subscribers: set[Subscriber] = set()
        self.published = 0  # events offered to at least one subscriber
        self.slow_closed = 0  # subscribers closed for overflowing

    def __bool__(self) -> bool:
        return bool(self._subscribers)

    def __len__(self) -> int:
        return len(self._subscribers)

    def subscribe(self, flt: EventFilter, queue_depth: int) -> Subscriber:
        subscriber = Subscriber(flt, queue_depth)
        self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)

    def publish(self, events: Iterable[ReceivedEvent]) -> None:
        """Committed events, in commit order; never waits."""
        subscribers = tuple(self._subscribers)
        if not subscribers:
            return
        for event in events:
            self.published += 1
            published = Published(event)
            for subscriber in subscribers:
                subscriber.offer(published)
