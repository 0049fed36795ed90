"""Events queries (store/events.py: query_event_rows, count_events) against a real SQLite
file: they agree with `daemon.core.event_filter.matches` on random events and filters, in
the filter's order, and use the indexes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.core.clock import to_us
from daemon.core.event_filter import EventFilter, matches, parse_filter
from daemon.core.events import ReceivedEvent
from store.db import Store
from store.events import (
    count_events,
    filter_sql,
    insert_new_events,
    query_event_rows,
    rows_in_occurred_order,
)

BASE = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
# few letters, so that prefixes and names collide often; non-ASCII too (substr counts
# characters, as str.startswith does), and SQL's wildcards (which must mean nothing here)
WORD = st.text(alphabet="ab.%_é", min_size=0, max_size=4)
minutes = st.integers(min_value=0, max_value=20)


@st.composite
def stored_events(draw: st.DrawFn) -> list[ReceivedEvent]:
    count = draw(st.integers(min_value=0, max_value=25))
    ids = draw(st.lists(st.uuids(), min_size=count, max_size=count, unique=True))
    return [
        ReceivedEvent.model_validate(
            {
                "occurred": BASE + timedelta(minutes=draw(minutes)),
                "event": draw(WORD.filter(bool)),
                "resource": {"prefect.resource.id": draw(WORD.filter(bool)), **draw(LABELS)},
                "related": draw(st.lists(related(), max_size=2)),
                "id": event_id,
                "received": BASE,
            }
        )
        for event_id in ids
    ]


LABELS = st.dictionaries(st.sampled_from(["k", "z"]), WORD, max_size=2)
PATTERNS = st.dictionaries(
    st.sampled_from(["k", "z"]),
    st.text(alphabet="ab*!", max_size=3)
    | st.lists(st.text(alphabet="ab*", max_size=2), max_size=2),
    max_size=2,
)


@st.composite
def related(draw: st.DrawFn) -> dict[str, str]:
    return {
        "prefect.resource.id": draw(WORD.filter(bool)),
        "prefect.resource.role": draw(st.sampled_from(["site", "flow"])),
        **draw(LABELS),
    }


@st.composite
def any_resource(draw: st.DrawFn) -> dict[str, Any]:
    part: dict[str, Any] = {k: draw(words()) for k in ("id", "id_prefix")}
    part["labels"] = draw(st.none() | PATTERNS)
    return part


def words() -> st.SearchStrategy[list[str] | None]:
    return st.none() | st.lists(WORD, max_size=3)


@st.composite
def filters(draw: st.DrawFn, known_ids: list[UUID]) -> EventFilter:
    value: dict[str, Any] = {"order": draw(st.sampled_from(["ASC", "DESC"]))}
    occurred: dict[str, str] = {}
    for bound in ("since", "until"):
        if draw(st.booleans()):
            occurred[bound] = (BASE + timedelta(minutes=draw(minutes))).isoformat()
    value["occurred"] = occurred
    if draw(st.booleans()):
        value["event"] = {
            k: draw(words()) for k in ("prefix", "exclude_prefix", "name", "exclude_name")
        }
    if draw(st.booleans()):
        value["resource"] = {k: draw(words()) for k in ("id", "id_prefix")}
        value["resource"]["labels"] = draw(st.none() | PATTERNS)
    if draw(st.booleans()):
        value["any_resource"] = draw(any_resource() | st.lists(any_resource(), max_size=2))
    by_id: bool = draw(st.booleans())
    if known_ids and by_id:
        chosen = draw(st.lists(st.sampled_from(known_ids), max_size=2))
        value["id"] = {"id": [str(i) for i in chosen]}
    return parse_filter(value)


def rows_of(events: list[ReceivedEvent]) -> list[tuple[str, str, str, int, int, None, str]]:
    return [
        (str(e.id), e.event, e.resource.id, to_us(e.occurred), to_us(e.received), None, data)
        for e in events
        for data in [e.model_dump_json()]
    ]


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One file for every example (each deletes its events after)."""
    store = Store.open(Path(tmp_path_factory.mktemp("events")) / "trigd.db")
    try:
        yield store
    finally:
        store.close()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), events=stored_events())
def test_the_query_and_matches_agree(
    shared_store: Store, data: st.DataObject, events: list[ReceivedEvent]
) -> None:
    flt = data.draw(filters([e.id for e in events]))
    conn = shared_store.conn
    arrival = {e.id: index for index, e in enumerate(events)}
    expected = sorted(
        (e for e in events if matches(flt, e)),
        key=lambda e: (e.occurred, arrival[e.id]),
        reverse=flt.order == "DESC",
    )
    with conn:
        insert_new_events(conn, rows_of(events))
    try:
        got = query_event_rows(conn, flt, limit=len(events) + 1)
        assert [UUID(i) for i, _ in got] == [e.id for e in expected]
        assert [ReceivedEvent.model_validate_json(d) for _, d in got] == expected
        assert count_events(conn, flt) == len(expected)
        if expected:  # a page from an offset is the same order, cut
            page = query_event_rows(conn, flt, limit=2, offset=1)
            assert [UUID(i) for i, _ in page] == [e.id for e in expected[1:3]]
    finally:
        with conn:
            conn.execute("DELETE FROM events")


def test_an_occurred_window_is_read_through_its_index(conn: Any) -> None:
    flt = parse_filter({"occurred": {"since": BASE.isoformat(), "until": BASE.isoformat()}})
    where, params = filter_sql(flt)
    plan = conn.execute(
        f"EXPLAIN QUERY PLAN SELECT id, data FROM events WHERE {where} "
        "ORDER BY occurred_us DESC, rowid DESC LIMIT 10",
        params,
    ).fetchall()
    assert any("events_occurred" in str(row) for row in plan), plan


def test_rows_in_occurred_order_are_the_stored_rows_ties_in_arrival_order_paged(
    tmp_path: Path,
) -> None:
    """What a backtest replays: every column as stored, in `occurred` order, paged."""
    opened = Store.open(tmp_path / "events.db")
    try:
        rows = []
        for name, minute in (("c", 3), ("a", 1), ("b2", 2), ("b1", 2), ("old", -5), ("late", 99)):
            occurred = to_us(BASE + timedelta(minutes=minute))
            rows.append((str(uuid4()), name, "pump-1", occurred, to_us(BASE), name, f"{name}!"))
        with opened.conn:
            insert_new_events(opened.conn, rows)
        pages = list(
            rows_in_occurred_order(opened.conn, to_us(BASE), to_us(BASE + timedelta(minutes=50)), 2)
        )
    finally:
        opened.close()
    assert pages == [[rows[1], rows[2]], [rows[3], rows[0]]]


def _row(event_id: str, data: str) -> tuple[str, str, str, int, int, None, str]:
    return (event_id, "e", "pump-1", to_us(BASE), to_us(BASE), None, data)


def test_insert_new_events_returns_the_ids_not_stored_yet_and_keeps_the_first_copy(
    tmp_path: Path,
) -> None:
    """Duplicates, stored already or repeated in the rows, are left out of what is
    inserted and returned; rows with none are all returned; the caller's transaction
    goes on (no savepoint is left open)."""
    opened = Store.open(tmp_path / "events.db")
    conn = opened.conn
    a, b, c, d = (str(uuid4()) for _ in range(4))
    try:
        with conn:
            assert insert_new_events(conn, [_row(a, "a1")]) == {a}
            assert insert_new_events(
                conn, [_row(b, "b1"), _row(a, "a2"), _row(c, "c1"), _row(b, "b2")]
            ) == {b, c}
            assert insert_new_events(conn, [_row(d, "d1")]) == {d}
            assert insert_new_events(conn, []) == set()
            assert conn.in_transaction
        stored = {str(i): str(d) for i, d in conn.execute("SELECT id, data FROM events")}
        assert not conn.in_transaction
    finally:
        opened.close()
    assert stored == {a: "a1", b: "b1", c: "c1", d: "d1"}


def test_insert_new_events_that_fails_raises_its_error_and_inserts_nothing(
    tmp_path: Path,
) -> None:
    opened = Store.open(tmp_path / "events.db")
    conn = opened.conn
    good = str(uuid4())
    try:
        with conn:
            unbindable: Any = object()
            with pytest.raises(TypeError):  # a value SQLite cannot bind
                insert_new_events(conn, [_row(good, "ok"), _row(str(uuid4()), unbindable)])
            assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)
            assert insert_new_events(conn, [_row(good, "ok")]) == {good}
        count = conn.execute("SELECT count(*) FROM events").fetchone()
    finally:
        opened.close()
    assert count == (1,)
