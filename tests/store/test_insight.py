"""The reads of `trigd explain` and `trigd backtest` on a real database file."""

from __future__ import annotations

from datetime import timedelta

from daemon.core.clock import to_us
from store import insight
from store.connection import Connection
from store.events import insert_new_events, push_inbox
from tests.support.engine_harness import T, event


def store_events(conn: Connection, *specs: tuple[str, int]) -> list[str]:
    """Events named and occurring at T + seconds, stored in the order given."""
    rows = []
    for name, seconds in specs:
        e = event(name, T + timedelta(seconds=seconds), "pump-1")
        occurred = to_us(e.occurred)
        rows.append(
            (str(e.id), e.event, e.resource.id, occurred, occurred, None, e.model_dump_json())
        )
    with conn:
        insert_new_events(conn, rows)
    return [r[0] for r in rows]


def test_firing_events_of_one_automation_from_the_inbox_and_the_store(conn: Connection) -> None:
    resource = insight.automation_resource_id("a-1")
    mine = event(insight.TRIGGERED_EVENT, T, resource)
    theirs = event(insight.TRIGGERED_EVENT, T, insight.automation_resource_id("a-2"))
    stored = event(insight.TRIGGERED_EVENT, T - timedelta(seconds=1), resource)
    occurred = to_us(stored.occurred)
    with conn:
        push_inbox(conn, [mine, theirs])
        insert_new_events(
            conn,
            [
                (
                    str(stored.id),
                    stored.event,
                    resource,
                    occurred,
                    occurred,
                    None,
                    stored.model_dump_json(),
                )
            ],
        )
    found = insight.firing_events(conn, "a-1", 10)
    assert [str(e) for e in found] == [mine.model_dump_json(), stored.model_dump_json()]
    assert insight.firing_events(conn, "a-1", 1) == [mine.model_dump_json()]
    assert len(insight.all_firing_events(conn, ["a-1", "a-2"])) == 3
