"""The engine as the daemon uses it: scenarios i85, i87, i88, i97 and i98 (in trigd's
form), the inbox, loading and reloading with stable ids, restarts, and all-or-nothing
transactions."""

from __future__ import annotations

import json
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import apsw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.core.automations import Automation
from daemon.core.clock import to_us
from daemon.core.events import (
    MAX_JSON_DEPTH_CEILING,
    OCCURRED_MAX,
    RESOURCE_ID,
    EventRejected,
    ReceivedEvent,
    RelatedResource,
    Resource,
    StoredEvent,
    UnreadableEvent,
    parse_incoming_event,
)
from daemon.core.firings import TriggeredAction
from daemon.core.trigger_models import MAX_WITHIN, EventTrigger, parse_trigger
from daemon.engine.engine import MAX_AUTOMATION_CHAIN, Engine, Outcome
from store.db import Store
from store.events import rows_in_occurred_order
from tests.support.engine_harness import (
    ARACHNOPHOBIA,
    CHONK,
    CHONK_PARTY,
    EFFECTIVE,
    SPIDER,
    HarnessMaker,
    T,
    automation,
    chonk_walked,
    event,
    fired,
    moved,
    spider_walked,
    trigger,
)
from tests.support.strategies import received_events

S = timedelta(seconds=1)


def _count(h: Any, table: str) -> int:
    row = h.conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0])


# --- i85-i98 message handling, trigd's form ----------------------------------------------


def test_i85_log_writes_are_stored_but_not_evaluated(harness: HarnessMaker) -> None:
    everything = automation(
        "everything", trigger(match={"prefect.resource.id": "prefect.flow-run.*"}, threshold=1)
    )
    h = harness([everything])
    log = event("prefect.log.write", T, "prefect.flow-run.x")
    assert h.batch([log]) == [Outcome.processed]
    assert fired(h) == []
    assert _count(h, "events") == 1
    assert h.batch([event("anything.else", T, "prefect.flow-run.x")]) == [Outcome.processed]
    assert len(fired(h, everything)) == 1


def test_i87_parked_event_is_an_outcome_not_an_error(harness: HarnessMaker) -> None:
    h = harness(EFFECTIVE)
    follower = event("animal.walked", T, SPIDER, follows=uuid4())
    assert h.batch([follower]) == [Outcome.parked]
    assert fired(h) == []
    assert _count(h, "events") == 1  # stored all the same: acked means committed


def test_i88_duplicate_id_is_processed_once(harness: HarnessMaker) -> None:
    h = harness(EFFECTIVE)
    walked = spider_walked()
    assert h.batch([walked, walked]) == [Outcome.processed, Outcome.duplicate]
    assert h.batch([walked]) == [Outcome.duplicate]
    assert h.batch([moved(walked, 20 * S)]) == [Outcome.duplicate]
    assert [a.automation.id for a in fired(h)] == [ARACHNOPHOBIA.id]


def test_batch_outcomes_keep_input_order(harness: HarnessMaker) -> None:
    h = harness(EFFECTIVE)
    first = spider_walked()
    early = event("animal.walked", T, SPIDER, follows=uuid4())
    assert h.batch([first, early, first, spider_walked()]) == [
        Outcome.processed,
        Outcome.parked,
        Outcome.duplicate,
        Outcome.processed,
    ]


# --- the inbox -----------------------------------------------------------------------------

WATCHER = automation(
    "watcher", trigger(expect=["prefect.automation.triggered"], match={}, threshold=1)
)


def test_state_change_events_are_evaluated_by_the_next_drain(harness: HarnessMaker) -> None:
    h = harness([ARACHNOPHOBIA, WATCHER])
    h.batch([spider_walked()])
    actions = fired(h)
    # arachnophobia fired; its state-change event was drained and made watcher fire,
    # whose own state-change event made watcher fire again ... bounded by the drain
    assert actions[0].automation.id == ARACHNOPHOBIA.id
    assert any(a.automation.id == WATCHER.id for a in actions)
    first_watch = next(a for a in actions if a.automation.id == WATCHER.id)
    assert first_watch.triggering_event is not None
    assert first_watch.triggering_event.event == "prefect.automation.triggered"
    assert first_watch.triggering_event.resource.id == f"prefect.automation.{ARACHNOPHOBIA.id}"


def test_inbox_drain_is_bounded_per_batch(harness: HarnessMaker) -> None:
    h = harness([ARACHNOPHOBIA, WATCHER], inbox_drain_limit=10)
    h.batch([spider_walked()])
    # every firing queues 2 events (triggered + action.triggered); watcher reacts to one
    first = len(fired(h))
    assert 1 < first <= 11
    assert h.inbox(), "a self-feeding automation leaves work for the next batch"
    h.batch([])
    assert 0 < len(fired(h)) <= 10


# --- loading, reloading, restarts (97, 98) -------------------------------------------------


def _reload(h: Any, automations: list[Automation]) -> Any:
    with h.conn:
        return h.engine.load_automations(h.conn, automations, T)


def _party_bucket(h: Any) -> Any:
    return h.buckets(CHONK_PARTY.trigger.id)


def test_i97_unchanged_automation_keeps_its_buckets_across_reloads(harness: HarnessMaker) -> None:
    h = harness(EFFECTIVE)
    h.R(chonk_walked())
    h.R(moved(chonk_walked(), 1 * S, id=uuid4()))
    before = _party_bucket(h)
    assert before[0][3] == 2
    renamed = CHONK_PARTY.model_copy(update={"name": "chonk party!"})
    report = _reload(h, [renamed if a.id == renamed.id else a for a in EFFECTIVE])
    assert report.reset_triggers == frozenset()
    assert _party_bucket(h) == before
    h.R(moved(chonk_walked(), 2 * S, id=uuid4()))
    [action] = fired(h)
    assert action.automation.name == "chonk party!"


def test_i98_changed_trigger_starts_fresh(harness: HarnessMaker) -> None:
    h = harness(EFFECTIVE)
    h.R(chonk_walked())
    assert _party_bucket(h)
    changed = Automation.model_validate(
        {
            **CHONK_PARTY.model_dump(mode="json"),
            "trigger": {**CHONK_PARTY.trigger.model_dump(mode="json"), "threshold": 4},
        }
    )
    assert changed.trigger.id == CHONK_PARTY.trigger.id  # stable id, new fingerprint
    report = _reload(h, [changed if a.id == changed.id else a for a in EFFECTIVE])
    assert report.reset_triggers == {CHONK_PARTY.trigger.id}
    assert _party_bucket(h) == []


def test_i98_disabled_and_removed_automations_lose_their_state(harness: HarnessMaker) -> None:
    h = harness(EFFECTIVE)
    h.R(chonk_walked())
    disabled = CHONK_PARTY.model_copy(update={"enabled": False})
    report = _reload(h, [ARACHNOPHOBIA, disabled])
    assert CHONK_PARTY.trigger.id in report.reset_triggers
    assert _party_bucket(h) == []
    assert CHONK_PARTY.id not in h.engine.automations
    h.R(moved(chonk_walked(), 1 * S, id=uuid4()))
    assert _party_bucket(h) == []  # not evaluated while disabled
    _reload(h, EFFECTIVE)
    h.R(moved(chonk_walked(), 2 * S, id=uuid4()))
    assert _party_bucket(h)[0][3] == 1
    report = _reload(h, [ARACHNOPHOBIA])
    assert CHONK_PARTY.trigger.id in report.reset_triggers
    assert _party_bucket(h) == []


def test_state_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "trigd.db"
    store = Store.open(path)
    engine = Engine()
    with store.conn:
        engine.load_automations(store.conn, EFFECTIVE, T)
        engine.process_batch(store.conn, [chonk_walked()], T)
        engine.process_batch(store.conn, [moved(chonk_walked(), 1 * S, id=uuid4())], T)
    clock = engine.clock.copy()
    store.close()

    store = Store.open(path)
    engine = Engine()
    try:
        with store.conn:
            engine.load_automations(store.conn, EFFECTIVE, T + 5 * S)
            assert engine.clock == clock  # the events clock is persisted in `meta`
            engine.process_batch(store.conn, [moved(chonk_walked(), 2 * S, id=uuid4())], T)
        rows = store.conn.execute("SELECT automation_id FROM outbox").fetchall()
        assert rows == [(str(CHONK_PARTY.id),)]
    finally:
        store.close()


def test_automations_table_describes_the_loaded_set(harness: HarnessMaker) -> None:
    h = harness(EFFECTIVE)
    names = {r[0] for r in h.conn.execute("SELECT name FROM automations")}
    assert names == {a.name for a in EFFECTIVE}
    trigger_ids = {r[0] for r in h.conn.execute("SELECT id FROM triggers")}
    assert trigger_ids == {str(a.trigger.id) for a in EFFECTIVE}


# --- all or nothing ------------------------------------------------------------------------


def test_failure_mid_firing_rolls_back_everything_and_a_retry_works(harness: HarnessMaker) -> None:
    h = harness([CHONK_PARTY])
    h.batch([chonk_walked(), moved(chonk_walked(), 1 * S, id=uuid4())])
    bucket_before = _party_bucket(h)
    assert bucket_before[0][3] == 2
    clock_before = h.engine.clock.copy()
    h.conn.execute(
        "CREATE TEMP TRIGGER outbox_on_fire BEFORE INSERT ON outbox "
        "BEGIN SELECT RAISE(ABORT, 'outbox unavailable'); END"
    )
    third = event("animal.walked", T + 2 * S, CHONK)
    with pytest.raises(apsw.ConstraintError, match="outbox unavailable"):
        h.batch([third])
    assert _party_bucket(h) == bucket_before
    assert _count(h, "outbox") == 0
    assert _count(h, "inbox") == 0
    assert h.conn.execute("SELECT 1 FROM events WHERE id = ?", (str(third.id),)).fetchall() == []
    assert h.engine.clock == clock_before

    h.conn.execute("DROP TRIGGER outbox_on_fire")
    assert h.batch([third]) == [Outcome.processed]
    [action] = fired(h)
    assert action.triggering_event == third
    assert _party_bucket(h)[0][3] == 0  # the next window, empty


def test_failing_trigger_rolls_back_only_inside_its_savepoint(harness: HarnessMaker) -> None:
    """Each trigger is evaluated in its own SAVEPOINT; the error still propagates so the
    daemon retries the whole batch (nothing half-done is committed)."""
    h = harness(EFFECTIVE)
    h.conn.execute(
        "CREATE TEMP TRIGGER outbox_on_fire BEFORE INSERT ON outbox "
        "BEGIN SELECT RAISE(ABORT, 'outbox unavailable'); END"
    )
    with pytest.raises(apsw.ConstraintError):
        h.batch([chonk_walked(), spider_walked()])
    assert h.buckets() == []
    assert _count(h, "events") == 0


def test_an_automation_feeding_on_itself_stops_at_the_chain_limit(harness: HarnessMaker) -> None:
    h = harness([ARACHNOPHOBIA, WATCHER])
    h.batch([spider_walked()])
    for _ in range(20):
        if not h.inbox():
            break
        h.batch([])
    assert h.inbox() == []
    watcher_firings = len(fired(h, WATCHER))
    assert 0 < watcher_firings <= 2 * (MAX_AUTOMATION_CHAIN + 1)


def test_an_event_as_deep_as_ingest_allows_stays_readable_down_the_chain(
    harness: HarnessMaker,
) -> None:
    """trigd nests an event in its own events and outbox documents; at the largest
    max_json_depth, every one of them still parses (nothing is dropped as unreadable)."""

    def chain_of(walked: Any) -> list[str]:
        h = harness([ARACHNOPHOBIA, WATCHER])
        h.batch([walked])
        for _ in range(20):
            if not h.inbox():
                break
            h.batch([])
        stored = [str(r[0]) for r in h.conn.execute("SELECT data FROM events ORDER BY rowid")]
        for text in stored:
            ReceivedEvent.model_validate_json(text)
        documents = [str(r[0]) for r in h.conn.execute("SELECT document FROM outbox")]
        for text in documents:
            TriggeredAction.model_validate_json(text)
        return [json.loads(text)["event"] for text in stored]

    deep: Any = []
    for _ in range(MAX_JSON_DEPTH_CEILING - 3):  # the event 1, payload 2, "a" the last level
        deep = [deep]
    walked = spider_walked().model_dump(mode="json") | {"payload": {"a": deep}}
    accepted = parse_incoming_event(json.dumps(walked), T, max_depth=MAX_JSON_DEPTH_CEILING)
    with pytest.raises(EventRejected, match="max_json_depth"):
        parse_incoming_event(walked | {"payload": {"a": [deep]}}, T, MAX_JSON_DEPTH_CEILING)
    assert chain_of(accepted) == chain_of(spider_walked())


@pytest.mark.parametrize("posture", ["Reactive", "Proactive"])
def test_the_latest_occurred_fits_the_longest_within(harness: HarnessMaker, posture: str) -> None:
    """An event at the end of the accepted range, in a trigger with the longest `within`:
    the window's end, the proactive deadline and the stored microseconds stay in range."""
    longest = automation(
        "longest",
        trigger(
            posture=posture,
            expect=["animal.walked"],
            after=["animal.walked"] if posture == "Proactive" else [],
            for_each=["prefect.resource.id"],
            threshold=2,
            within=MAX_WITHIN,
        ),
    )
    h = harness([longest])
    last = event("animal.walked", OCCURRED_MAX, "spider.1")
    assert h.batch([last], now=OCCURRED_MAX) == [Outcome.processed]
    h.P(longest, OCCURRED_MAX)  # a proactive pass at that time too
    h.PER(OCCURRED_MAX)  # and the sweep of buckets past their window


def test_a_replayed_batch_of_stored_rows_stores_them_as_they_are_and_evaluates_them(
    harness: HarnessMaker,
) -> None:
    """A replay hands the engine the rows it read (JSON written by an older trigd,
    another receipt time): stored as they are, not made again; the events are evaluated
    as the models would be."""
    burst = automation("burst", trigger(expect=["pump.high"], threshold=2, within=60))
    h = harness([burst])
    events = [event("pump.high", T + s * S, "pump-1") for s in (1, 2)]
    rows = [
        (
            str(e.id),
            e.event,
            e.resource.id,
            to_us(e.occurred),
            to_us(T - 5 * S),
            None,
            json.dumps(e.model_dump(mode="json"), indent=1, sort_keys=True),
        )
        for e in events
    ]
    assert rows[0][6] != events[0].model_dump_json()  # what the engine would store otherwise
    with h.conn:
        outcome = h.engine.replay_batch(h.conn, rows, T + 3 * S)
    assert outcome.outcomes == [Outcome.processed, Outcome.processed]
    columns = "id, event, resource_id, occurred_us, received_us, follows, data"
    stored = h.conn.execute(
        f"SELECT {columns} FROM events WHERE event = ? ORDER BY rowid", ("pump.high",)
    )
    assert stored.fetchall() == rows
    assert len(fired(h, burst)) == 1


# --- stored rows evaluated from their columns (a backtest's replay) -----------------------

_ID_SPECS = st.sampled_from(
    [{}, {"prefect.resource.id": "a*"}, {"prefect.resource.id": ["!a*", "b"]}]
) | st.dictionaries(st.sampled_from(["prefect.resource.id", "x"]), st.sampled_from(["a*", "*"]))
_STORED_TRIGGERS = st.builds(
    lambda **kw: parse_trigger({"type": "event", "posture": "Reactive", **kw}),
    match=_ID_SPECS,
    match_related=st.sampled_from([{}, {"prefect.resource.role": "r"}]),
    for_each=st.sampled_from([[], ["prefect.resource.id"], ["x"], ["related:r:x"]]),
)


@st.composite
def _storable_events(draw: st.DrawFn) -> list[ReceivedEvent]:
    found = draw(st.lists(received_events(), min_size=1, max_size=6, unique_by=lambda e: e.id))
    shaped = []
    for e in found:
        labels = {**e.resource.root, RESOURCE_ID: draw(st.sampled_from(["a", "ab", "b", "c.a"]))}
        if draw(st.booleans()):
            labels["x"] = draw(st.sampled_from(["a", "b"]))
        related = list(e.related)
        if draw(st.booleans()):
            role = {RESOURCE_ID: "site", "prefect.resource.role": "r", "x": "a"}
            related.append(RelatedResource(role))
        shaped.append(e.model_copy(update={"resource": Resource(labels), "related": related}))
    return shaped


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_storable_events(), st.lists(_STORED_TRIGGERS, max_size=4))
def test_a_stored_row_reads_as_the_event_it_was_stored_from(
    events: list[ReceivedEvent], triggers: list[EventTrigger]
) -> None:
    """What a replay evaluates without parsing (`StoredEvent`: the columns) is what the
    model says, through every accessor and every trigger's matching and bucketing (and
    those are what the trigger's specifications say of the whole event)."""
    with tempfile.TemporaryDirectory(prefix="stored-row-") as tmp:
        store = Store.open(Path(tmp) / "trigd.db")
        try:
            with store.conn:
                Engine().process_batch(store.conn, events, T)
            rows = [
                row for page in rows_in_occurred_order(store.conn, 0, 2**62, 10) for row in page
            ]
        finally:
            store.close()
    models = {str(e.id): e for e in events}
    assert sorted(models) == sorted(row[0] for row in rows)
    for row in rows:
        view, model = StoredEvent(*row), models[row[0]]
        assert (view.id, view.event, view.resource_id, view.follows) == (
            model.id,
            model.event,
            model.resource.id,
            model.follows,
        )
        for mine, theirs in ((view.occurred, model.occurred), (view.received, model.received)):
            assert (mine, mine.isoformat()) == (theirs, theirs.isoformat())
        for t in triggers:
            related = t.match_related if isinstance(t.match_related, list) else [t.match_related]
            covered = t.match.matches(model.resource) and all(
                spec.includes(model.related) for spec in related if len(spec)
            )
            key = tuple(model.find_resource_label(label) or "" for label in t.sorted_for_each)
            assert t.covers_resources(view) == t.covers_resources(model) == covered
            assert t.bucketing_key(view) == t.bucketing_key(model) == key
        assert view.parsed() == model


def test_a_replayed_row_is_parsed_only_when_a_trigger_needs_more_than_its_columns(
    harness: HarnessMaker,
) -> None:
    """A row whose JSON is not an event is evaluated from its columns (name, resource id,
    times) while no trigger needs more; when it fires, the firing needs the event: it
    fails, naming the row."""
    burst = automation(
        "burst",
        trigger(expect=["pump.high"], for_each=["prefect.resource.id"], threshold=2, within=60),
    )
    h = harness([burst])
    rows = [
        (str(uuid4()), "pump.high", "pump-1", to_us(T + s * S), to_us(T + s * S), None, "{}")
        for s in (1, 2)
    ]
    with h.conn:
        outcome = h.engine.replay_batch(h.conn, rows[:1], T + S)
    assert outcome.outcomes == [Outcome.processed]
    assert h.buckets(burst.trigger.id)[0][3] == 1
    unreadable = f"stored event {rows[1][0]} does not parse"
    with pytest.raises(UnreadableEvent, match=unreadable), h.conn:
        h.engine.replay_batch(h.conn, rows[1:], T + 2 * S)
