"""Stored events for readers: ``POST /api/events/filter`` (and its next pages) and an
events-out subscriber's backfill (docs/PROTOCOL.md#events-out).

Synchronous functions of a read connection (``store.db.Store.open_readonly``), run in a
worker thread by their caller so that a long query never holds the writer's thread: WAL
lets them read while batches commit.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import apsw

from daemon.core.event_filter import EventFilter, FilterRejected, Order
from daemon.wire.events_out import encode_page, parse_page_request, parse_page_token
from store.db import Store
from store.events import count_events, query_event_rows, query_events

Reply = tuple[int, bytes]
"""An HTTP status and its JSON body."""


def _detail(status: int, text: str) -> Reply:
    return status, json.dumps({"detail": text}).encode()


def read_events(conn: apsw.Connection, body: bytes | None, now: datetime, base_url: str) -> Reply:
    """``POST /api/events/filter``: 200 with Prefect's ``EventPage``, newest first unless
    the filter says ``ASC``; 422 naming the field of a body that is not a query."""
    try:
        request = parse_page_request(body, now)
    except FilterRejected as exc:
        return _detail(422, str(exc))
    with conn:  # one read transaction: the count and the page see the same events
        total = count_events(conn, request.filter)
        events = query_events(conn, request.filter, request.limit)
    return 200, encode_page(request, events, total, base_url)


def read_next_page(conn: apsw.Connection, token: str, base_url: str) -> Reply:
    """``GET /api/events/filter/next?page-token=...``; 403 for a token not ours, as
    Prefect."""
    try:
        request = parse_page_token(token)
    except FilterRejected as exc:
        return _detail(403, str(exc))
    total = request.total if request.total is not None else 0
    events = query_events(conn, request.filter, request.limit, request.offset)
    return 200, encode_page(request, events, total, base_url)


def backfill_plan(
    conn: apsw.Connection, flt: EventFilter, now: datetime, window: timedelta, max_events: int
) -> tuple[EventFilter, int]:
    """A subscriber's backfill is the newest ``max_events`` stored events that match
    ``flt`` and occurred within ``window`` before ``now``, sent oldest first: the filter
    that reads them in that order, and how many of its first events to skip."""
    oldest_first = flt.resolve(now).clamp(now - window).model_copy(update={"order": Order.ASC})
    return oldest_first, max(0, count_events(conn, oldest_first) - max_events)


def read_backfill(
    conn: apsw.Connection, flt: EventFilter, now: datetime, window: timedelta, max_events: int
) -> list[tuple[str, str]]:
    """The whole backfill at once (``backfill_plan``), as (id, ReceivedEvent JSON)."""
    with conn:  # one snapshot for the count and the rows
        oldest_first, skip = backfill_plan(conn, flt, now, window, max_events)
        rows = query_event_rows(conn, oldest_first, max_events, skip)
    return rows


def read_events_from(db_path: Path, body: bytes | None, now: datetime, base_url: str) -> Reply:
    """``read_events`` on a read-only connection of its own (run it in a worker thread:
    ``trio.to_thread.run_sync``), as the HTTP route does."""
    store = Store.open_readonly(db_path)
    try:
        return read_events(store.conn, body, now, base_url)
    finally:
        store.close()


def read_next_page_from(db_path: Path, token: str, base_url: str) -> Reply:
    """``read_next_page`` on a read-only connection of its own (in a worker thread)."""
    store = Store.open_readonly(db_path)
    try:
        return read_next_page(store.conn, token, base_url)
    finally:
        store.close()
