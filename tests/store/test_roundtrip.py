"""Models survive the store: what the engine writes is what a reopened database gives back."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.core.automations import Automation
from daemon.core.events import ReceivedEvent
from daemon.engine.engine import Engine, Outcome
from store import automations as automations_store
from store.db import Store
from tests.support.strategies import automations, received_events

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@settings(max_examples=40, deadline=None)
@given(st.lists(received_events(), min_size=1, max_size=5, unique_by=lambda e: e.id))
def test_events_round_trip_through_the_store(events: list[ReceivedEvent]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "t.db"
        store = Store.open(path)
        with store.conn:
            outcomes = Engine().process_batch(store.conn, events, NOW).outcomes
        store.close()
        assert Outcome.duplicate not in outcomes
        store = Store.open_readonly(path)
        try:
            stored = {
                row[0]: ReceivedEvent.model_validate_json(row[1])
                for row in store.conn.execute("SELECT id, data FROM events")
            }
        finally:
            store.close()
        assert stored == {str(event.id): event for event in events}


@settings(max_examples=40, deadline=None)
@given(st.lists(automations, min_size=1, max_size=3, unique_by=lambda a: a.name))
def test_automations_round_trip_through_the_store(loaded: list[Automation]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "t.db"
        store = Store.open(path)
        Engine().load_automations(store.conn, loaded, NOW)
        store.close()
        store = Store.open(path)
        try:
            rows = automations_store.loaded_automations(store.conn)
            again = {
                a.id: a for a in (Automation.model_validate_json(row.definition) for row in rows)
            }
            assert again == {a.id: a.redacted() for a in loaded}  # no secret at rest
            for automation in loaded:
                assert [t.id for t in again[automation.id].all_triggers()] == [
                    t.id for t in automation.all_triggers()
                ]
            # loading the same set again after the restart resets no enabled trigger
            # (a disabled automation keeps no state, so it always starts fresh)
            report = Engine().load_automations(store.conn, list(again.values()), NOW)
            disabled = {t.id for a in loaded if not a.enabled for t in a.all_triggers()}
            assert report.reset_triggers <= disabled
        finally:
            store.close()
