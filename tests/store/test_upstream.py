"""store/upstream.py: the forward cursor over the events' commit order, the backlog it leaves,
the subscribe position, and the event retention that spares what was not forwarded."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import apsw
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.core.clock import to_us
from store import upstream as upstream_store
from store.db import Store, write_transaction
from store.events import read_meta

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def add_event(conn: apsw.Connection, event_id: str, received: datetime) -> int:
    conn.execute(
        "INSERT INTO events (id, event, resource_id, occurred_us, received_us, data)"
        " VALUES (?, 'e', 'r', ?, ?, ?)",
        (event_id, to_us(received), to_us(received), f'{{"id": "{event_id}"}}'),
    )
    return int(conn.last_insert_rowid())


def ids(conn: apsw.Connection) -> list[str]:
    return [str(r[0]) for r in conn.execute("SELECT id FROM events ORDER BY rowid")]


def test_pages_follow_commit_order_past_the_cursor(store: Store) -> None:
    conn = store.conn
    with write_transaction(conn):
        seqs = [add_event(conn, f"e{i}", NOW - timedelta(seconds=10 - i)) for i in range(5)]
    assert upstream_store.forward_cursor(conn) == 0
    page = upstream_store.unforwarded_page(conn, 0, 2)
    assert [(r.seq, r.data) for r in page] == [(seqs[0], '{"id": "e0"}'), (seqs[1], '{"id": "e1"}')]
    assert [r.id for r in page] == ["e0", "e1"]  # to name an event the upstream refuses
    with write_transaction(conn):
        upstream_store.set_forward_cursor(conn, page[-1].seq)
    assert upstream_store.forward_cursor(conn) == seqs[1]
    assert [r.seq for r in upstream_store.unforwarded_page(conn, seqs[1], 10)] == seqs[2:]
    assert upstream_store.backlog(conn, seqs[1]) == upstream_store.Backlog(
        3, to_us(NOW - timedelta(seconds=8))
    )
    assert upstream_store.backlog(conn, seqs[-1]) == upstream_store.Backlog(0, None)


def test_the_cursor_never_moves_back(store: Store) -> None:
    conn = store.conn
    assert read_meta(conn, upstream_store.FORWARD_CURSOR_KEY) is None
    with write_transaction(conn):
        upstream_store.set_forward_cursor(conn, 0)  # forwarding started, nothing confirmed
    assert read_meta(conn, upstream_store.FORWARD_CURSOR_KEY) == "0"
    with write_transaction(conn):
        upstream_store.set_forward_cursor(conn, 7)
        upstream_store.set_forward_cursor(conn, 3)
    assert upstream_store.forward_cursor(conn) == 7


def test_the_subscribe_position_keeps_the_latest(store: Store) -> None:
    conn = store.conn
    assert upstream_store.subscribe_position(conn) is None
    with write_transaction(conn):
        upstream_store.set_subscribe_position(conn, NOW)
        upstream_store.set_subscribe_position(conn, NOW - DAY)  # a backfilled event
    assert upstream_store.subscribe_position(conn) == NOW
    with write_transaction(conn):
        upstream_store.set_subscribe_position(conn, NOW + DAY)
    assert upstream_store.subscribe_position(conn) == NOW + DAY


def test_retention_spares_unforwarded_events_until_the_backlog_bound(store: Store) -> None:
    conn = store.conn
    with write_transaction(conn):
        forwarded = add_event(conn, "forwarded-old", NOW - 10 * DAY)
        add_event(conn, "waiting-very-old", NOW - 10 * DAY)
        add_event(conn, "waiting-old", NOW - 8 * DAY)
        add_event(conn, "waiting-new", NOW - DAY)
    with write_transaction(conn):
        pruned = upstream_store.prune_events_sparing(
            conn, to_us(NOW - 7 * DAY), cursor=forwarded, backlog_before_us=to_us(NOW - 9 * DAY)
        )
    assert pruned == upstream_store.Pruned(events=2, unforwarded=1)
    assert ids(conn) == ["waiting-old", "waiting-new"]


def test_retention_without_forwarding_keeps_only_the_newest_row(store: Store) -> None:
    conn = store.conn
    with write_transaction(conn):
        add_event(conn, "a", NOW - 10 * DAY)
        last = add_event(conn, "b", NOW - 9 * DAY)
    with write_transaction(conn):
        pruned = upstream_store.prune_events_sparing(conn, to_us(NOW))
    assert pruned == upstream_store.Pruned(events=1, unforwarded=0)
    assert ids(conn) == ["b"]
    with write_transaction(conn):
        assert add_event(conn, "c", NOW) == last + 1  # its rowid is not one used before


@settings(max_examples=40, deadline=None)
@given(
    rounds=st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 6), st.booleans()), min_size=1, max_size=12
    )
)
def test_a_cursor_reader_sees_every_event_once_whatever_retention_does(
    tmp_path_factory: object, rounds: list[tuple[int, int, bool]]
) -> None:
    """Events arrive, some are forwarded, retention deletes everything old (also all of
    the table but its newest row): reading past the cursor never skips or repeats one."""
    path = Path(tmp_path_factory.mktemp("db")) / "trigd.db"  # type: ignore[attr-defined]
    store = Store.open(path)
    conn = store.conn
    try:
        made: list[str] = []
        forwarded: list[str] = []
        cursor = 0
        for step, (arrive, forward, prune) in enumerate(rounds):
            with write_transaction(conn):
                for i in range(arrive):
                    made.append(f"{step}-{i}")
                    add_event(conn, made[-1], NOW - 30 * DAY + step * DAY)
            for row in upstream_store.unforwarded_page(conn, cursor, forward):
                forwarded.append(row.data)
                cursor = row.seq
            if prune:  # everything forwarded is old by now
                with write_transaction(conn):
                    dropped = upstream_store.prune_events_sparing(
                        conn, to_us(NOW), cursor=cursor, backlog_before_us=0
                    )
                assert dropped.unforwarded == 0
        for row in upstream_store.unforwarded_page(conn, cursor, 10_000):
            forwarded.append(row.data)
        assert forwarded == [f'{{"id": "{event_id}"}}' for event_id in made]
    finally:
        store.close()
