"""POST /api/events/filter as a function (daemon/runtime/events_query.py), on a real SQLite
file: Prefect's EventPage newest first, paged by Prefect's tokens, 422 naming the field,
403 for a token not ours; and the subscriber's backfill."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit
from uuid import uuid4

import pytest

from daemon.core.clock import to_us
from daemon.core.event_filter import parse_filter
from daemon.core.events import ReceivedEvent
from daemon.runtime.events_query import (
    read_backfill,
    read_events,
    read_events_from,
    read_next_page,
    read_next_page_from,
)
from store.db import Store
from store.events import insert_new_events

NOW = datetime(2026, 11, 23, 10, 30, tzinfo=UTC)
BASE_URL = "http://127.0.0.1:4280/"


def store_events(store: Store, names_and_minutes: list[tuple[str, int]]) -> list[str]:
    """Events that occurred that many minutes before NOW; their ids, in the same order."""
    events = [
        ReceivedEvent.model_validate(
            {
                "occurred": NOW - timedelta(minutes=minutes),
                "event": name,
                "resource": {"prefect.resource.id": f"r.{name}"},
                "id": uuid4(),
                "received": NOW,
            }
        )
        for name, minutes in names_and_minutes
    ]
    rows = [
        (
            str(e.id),
            e.event,
            e.resource.id,
            to_us(e.occurred),
            to_us(NOW),
            None,
            e.model_dump_json(),
        )
        for e in events
    ]
    with store.conn:
        insert_new_events(store.conn, rows)
    return [str(e.id) for e in events]


@pytest.fixture
def reader(store: Store, db_path: Path) -> Store:
    return Store.open_readonly(db_path)


def test_newest_first_with_the_total_and_a_next_page(store: Store, reader: Store) -> None:
    ids = store_events(store, [(f"pump.{i}", i) for i in range(5)] + [("valve.x", 0)])
    status, body = read_events(
        reader.conn, b'{"filter": {"event": {"prefix": ["pump."]}}, "limit": 2}', NOW, BASE_URL
    )
    assert status == 200
    page = json.loads(body)
    assert [e["id"] for e in page["events"]] == ids[0:2]  # 0 and 1 minute ago
    assert page["total"] == 5
    seen = [e["id"] for e in page["events"]]
    while page["next_page"] is not None:
        url = urlsplit(page["next_page"])
        assert url.path == "/api/events/filter/next"
        token = parse_qs(url.query)["page-token"][0]
        status, body = read_next_page(reader.conn, token, BASE_URL)
        assert status == 200
        page = json.loads(body)
        assert page["total"] == 5
        seen += [e["id"] for e in page["events"]]
    assert seen == ids[:5]


def test_the_default_body_takes_prefects_defaults(store: Store, reader: Store) -> None:
    ids = store_events(store, [("a", 1), ("b", -1)])  # b occurred after now: past `until`
    status, body = read_events(reader.conn, b"", NOW, BASE_URL)
    assert status == 200
    assert json.loads(body) == {
        "events": [json.loads(body)["events"][0]],
        "total": 1,
        "next_page": None,
    }
    assert json.loads(body)["events"][0]["id"] == ids[0]


def test_oldest_first_on_asking(store: Store, reader: Store) -> None:
    ids = store_events(store, [("a", 1), ("b", 2)])
    status, body = read_events(reader.conn, b'{"filter": {"order": "ASC"}}', NOW, BASE_URL)
    assert status == 200
    assert [e["id"] for e in json.loads(body)["events"]] == [ids[1], ids[0]]


def test_an_invalid_body_is_422_naming_the_field(reader: Store) -> None:
    status, body = read_events(reader.conn, b'{"filter": {"resource": {"ids": []}}}', NOW, BASE_URL)
    assert status == 422
    assert json.loads(body) == {
        "detail": "filter.resource.ids: Extra inputs are not permitted",
    }


def test_the_route_functions_open_their_own_read_only_connection(
    store: Store, db_path: Path
) -> None:
    ids = store_events(store, [(f"e{i}", i) for i in range(3)])
    status, body = read_events_from(db_path, b'{"limit": 2}', NOW, BASE_URL)
    assert status == 200
    page = json.loads(body)
    assert [e["id"] for e in page["events"]] == ids[:2]
    token = parse_qs(urlsplit(page["next_page"]).query)["page-token"][0]
    status, body = read_next_page_from(db_path, token, BASE_URL)
    assert (status, [e["id"] for e in json.loads(body)["events"]]) == (200, ids[2:])


def test_a_token_not_ours_is_403(reader: Store) -> None:
    status, body = read_next_page(reader.conn, "bm9wZQ==", BASE_URL)
    assert status == 403
    assert json.loads(body)["detail"].startswith("page-token: ")


def test_the_backfill_is_the_newest_within_the_window_oldest_first(
    store: Store, reader: Store
) -> None:
    ids = store_events(store, [("a", 20), ("b", 9), ("c", 5), ("d", 1), ("e", -1)])
    rows = read_backfill(reader.conn, parse_filter({}), NOW, timedelta(minutes=10), 2)
    assert [event_id for event_id, _ in rows] == [ids[2], ids[3]]  # e is past `until` = now
    everything = read_backfill(
        reader.conn,
        parse_filter({"occurred": {"until": (NOW + timedelta(days=1)).isoformat()}}),
        NOW,
        timedelta(minutes=10),
        10,
    )
    assert [event_id for event_id, _ in everything] == [ids[1], ids[2], ids[3], ids[4]]


def test_labels_and_related_resources_are_read_from_the_stored_event(
    store: Store, reader: Store
) -> None:
    ids = store_events(store, [("pump.a", 1), ("pump.b", 2)])
    body = b'{"filter": {"any_resource": {"id": ["r.pump.b"]}, "resource": {"labels": {}}}}'
    status, reply = read_events(reader.conn, body, NOW, BASE_URL)
    assert status == 200
    assert [e["id"] for e in json.loads(reply)["events"]] == [ids[1]]
    assert json.loads(reply)["total"] == 1
