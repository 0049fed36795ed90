"""Reactive evaluation through the engine: scenarios b16-b23, c24-c30 and d31-d33."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import uuid4

from daemon.core.index import TriggerIndex
from daemon.engine.engine import Outcome
from tests.support.engine_harness import (
    ANIMAL_LOVER,
    ARACHNOPHOBIA,
    CHONK_LONELY,
    CHONK_PARTY,
    EFFECTIVE,
    SPIDER,
    HarnessMaker,
    T,
    automation,
    chonk_table,
    chonk_walked,
    event,
    fired,
    gobbled,
    moved,
    nibbled,
    only_trigger,
    spider_walked,
    trigger,
)

SPIDERS = automation(
    "spiders", trigger(expect=["animal.walked"], match={"class": "Arachnida"}, threshold=1)
)
ANIMALS = automation("animals", trigger(expect=["animal.*"], threshold=1))
EVERYTHING = automation("everything", trigger(threshold=1))
FLOW_RUN_ID = {"prefect.resource.id": "prefect.flow-run.*"}

# --- b16-b23 candidate selection ---------------------------------------------------------


def _index(*automations: Any) -> TriggerIndex:
    return TriggerIndex(t for a in automations for t in a.event_triggers())


def test_b16_spider_automation_selects_spider_event() -> None:
    walked = event(
        "animal.walked", T, {"prefect.resource.id": "daddy-long-legs", "class": "Arachnida"}
    )
    assert _index(SPIDERS).interested(walked) == [only_trigger(SPIDERS)]


def test_b17_spider_automation_ignores_plants() -> None:
    assert _index(SPIDERS).interested(event("plant.grew", T, "my-lily")) == []


def test_b18_wildcard_expect() -> None:
    index = _index(ANIMALS)
    assert len(index.interested(event("animal.walked", T, "x"))) == 1
    assert index.interested(event("plant.grew", T, "x")) == []


def test_b19_catch_all_selects_everything() -> None:
    index = _index(EVERYTHING)
    assert len(index.interested(event("animal.walked", T, "x"))) == 1
    assert len(index.interested(event("plant.grew", T, "x"))) == 1


def test_b20_three_candidates() -> None:
    walked = event(
        "animal.walked", T, {"prefect.resource.id": "daddy-long-legs", "class": "Arachnida"}
    )
    assert len(_index(SPIDERS, ANIMALS, EVERYTHING).interested(walked)) == 3


def test_b21_forgotten_automation_selects_nothing(harness: HarnessMaker) -> None:
    h = harness([SPIDERS])
    with h.conn:
        h.engine.load_automations(h.conn, [], T)
    walked = event(
        "animal.walked", T, {"prefect.resource.id": "daddy-long-legs", "class": "Arachnida"}
    )
    assert h.engine.index.interested(walked) == []


def test_b22_resource_filter_still_applies() -> None:
    walked = event("animal.walked", T, {"prefect.resource.id": "woodchonk", "class": "Mammalia"})
    assert _index(SPIDERS).interested(walked) == []


def test_b23_sla_style_after_with_empty_expect() -> None:
    sla = automation(
        "sla",
        trigger(
            match=FLOW_RUN_ID,
            for_each=["prefect.resource.id"],
            after=["prefect.flow-run.pending"],
            threshold=1,
        ),
    )
    index = _index(sla)
    for name in ("prefect.flow-run.pending", "prefect.flow-run.completed"):
        assert index.interested(event(name, T, "prefect.flow-run.abc")) == [only_trigger(sla)]


def test_index_glob_quirks() -> None:
    """`*` needs one character in the name regex; `?` is literal there
    (docs/TRIGGERS.md#which-triggers-see-an-event)."""
    star = automation("star", trigger(expect=["prefect.flow-run.*"]))
    question = automation("question", trigger(expect=["a?c"]))
    index = _index(star, question)
    assert index.interested(event("prefect.flow-run.", T, "x")) == []
    assert len(index.interested(event("prefect.flow-run.x", T, "x"))) == 1
    assert index.interested(event("abc", T, "x")) == []
    assert len(index.interested(event("a?c", T, "x"))) == 1


# --- c24-c30 reactive basics -------------------------------------------------------------


def test_c24_immediate_trigger_fires_per_event(harness: HarnessMaker) -> None:
    h = harness(EFFECTIVE)
    walked = spider_walked()
    h.R(walked)
    [action] = fired(h)
    assert action.automation.id == ARACHNOPHOBIA.id
    assert action.triggering_labels == {}
    assert action.triggering_event == walked
    assert action.firing is not None
    assert action.firing.triggered == T
    again = moved(walked, timedelta(seconds=10, microseconds=1))
    h.R(again)
    [action] = fired(h)
    assert action.automation.id == ARACHNOPHOBIA.id
    assert action.triggering_event == again


def test_c25_only_expected_names(harness: HarnessMaker) -> None:
    h = harness(EFFECTIVE)
    walked = spider_walked()
    h.R(walked.model_copy(update={"event": "animal.snoozed"}))
    assert fired(h) == []
    h.R(walked)
    assert [a.automation.id for a in fired(h)] == [ARACHNOPHOBIA.id]


def test_c26_reactive_fires_as_soon_as_it_can(harness: HarnessMaker) -> None:
    h = harness(EFFECTIVE)
    walked = chonk_walked()
    outcomes = []
    for step in (0, 1, 1, 1, 1, 20, 1, 1):
        walked = moved(walked, timedelta(seconds=step))
        h.R(walked)
        outcomes.append([a.triggering_event for a in fired(h, CHONK_PARTY)])
    assert [len(o) for o in outcomes] == [0, 0, 1, 0, 0, 0, 0, 1]
    assert outcomes[-1] == [walked]


def test_c27_threshold_not_met(harness: HarnessMaker) -> None:
    h = harness(EFFECTIVE)
    walked = chonk_walked()
    for step in (0, 1, 20):
        walked = moved(walked, timedelta(seconds=step))
        h.R(walked)
    assert fired(h) == []


def test_c28_irrelevant_event_creates_nothing(harness: HarnessMaker) -> None:
    h = harness(EFFECTIVE)
    table = chonk_table()
    h.R(table.model_copy(update={"event": "animal.eat"}))
    assert fired(h) == []
    later = moved(table, timedelta(seconds=500))
    h.R(later)
    [action] = fired(h)
    assert action.automation.id == CHONK_LONELY.id
    assert action.triggering_event == later


def test_c29_for_each_related_labels(harness: HarnessMaker) -> None:
    flowers = automation(
        "flowers",
        trigger(
            expect=["animal.ingested"],
            for_each=["related:meal:genus", "related:meal:species"],
            threshold=3,
            within=600,
        ),
    )
    h = harness([flowers])
    nib, gob = nibbled(), gobbled()
    results = []
    for base, step in ((nib, 1), (nib, 2), (gob, 1), (nib, 3), (gob, 2), (gob, 3)):
        e = moved(base, timedelta(seconds=step), id=uuid4())
        h.R(e)
        results.append([(a.triggering_labels, a.triggering_event) for a in fired(h)])
    assert [len(r) for r in results] == [0, 0, 0, 1, 0, 1]
    assert results[3][0][0] == {
        "related:meal:genus": "Hemerocallis",
        "related:meal:species": "fulva",
    }
    assert results[5][0][0] == {
        "related:meal:genus": "Dicentra",
        "related:meal:species": "cucullaria",
    }


FLOW_FAILED = automation(
    "flow failed",
    trigger(
        match=FLOW_RUN_ID,
        match_related={
            "prefect.resource.id": ["prefect.flow.ffffffff"],
            "prefect.resource.role": "flow",
        },
        expect=["prefect.flow-run.Failed"],
        for_each=["prefect.resource.id"],
        threshold=1,
        within=10,
    ),
)
FLOW = {"prefect.resource.id": "prefect.flow.ffffffff", "prefect.resource.role": "flow"}


def test_c30_reactive_clean_up_and_sweep(harness: HarnessMaker) -> None:
    h = harness([FLOW_FAILED])
    run = "prefect.flow-run.frfrfrfr"
    h.R(event("prefect.flow-run.Running", T, run, related=[FLOW], received=T))
    assert fired(h) == []
    assert h.buckets() == []
    h.R(event("prefect.flow-run.Failed", T + timedelta(seconds=1), run, related=[FLOW], received=T))
    assert len(fired(h)) == 1
    from daemon.core.clock import to_us

    [(key, start_us, end_us, _)] = h.buckets()
    assert key == '["prefect.flow-run.frfrfrfr"]'
    assert (start_us, end_us) == (
        to_us(T + timedelta(seconds=11)),
        to_us(T + timedelta(seconds=21)),
    )
    with h.conn:
        h.engine.reset_events_clock(h.conn)
    h.PER(T + timedelta(seconds=21))
    assert len(h.buckets()) == 1
    with h.conn:
        h.engine.reset_events_clock(h.conn)
    h.PER(T + timedelta(seconds=21 + 61))
    assert h.buckets() == []


def test_c30_events_clock_offset_delays_the_sweep(harness: HarnessMaker) -> None:
    """With the clock still set (offset -1 s... lagging), the sweep runs in event time."""
    h = harness([FLOW_FAILED])
    run = "prefect.flow-run.frfrfrfr"
    h.R(event("prefect.flow-run.Failed", T - timedelta(minutes=5), run, related=[FLOW]))
    assert len(h.buckets()) == 1
    # wall clock is 5 minutes ahead of event time: the bucket ended at T-5min+20s in
    # event time, so at wall T+2min (event time T-3min) it is past the 60 s buffer
    h.PER(T + timedelta(seconds=20 + 59))
    assert len(h.buckets()) == 1
    h.PER(T + timedelta(seconds=20 + 61))
    assert h.buckets() == []


# --- d31-d33 causal ordering through the engine ---------------------------------------

RUN_FAILED = automation(
    "run failed",
    trigger(
        match=FLOW_RUN_ID,
        expect=["prefect.flow-run.Failed"],
        for_each=["prefect.resource.id"],
        threshold=1,
        within=10,
    ),
)
RUN = "prefect.flow-run.frfrfrfr"


def test_d31_follower_released_by_its_leader(harness: HarnessMaker) -> None:
    h = harness([RUN_FAILED])
    pending = event("prefect.flow-run.Pending", T, RUN, received=T + timedelta(seconds=2))
    running = event(
        "prefect.flow-run.Running",
        T + timedelta(minutes=1),
        RUN,
        follows=pending.id,
        received=T + timedelta(minutes=1, seconds=2),
    )
    failed = event(
        "prefect.flow-run.Failed",
        T + timedelta(minutes=3),
        RUN,
        follows=running.id,
        received=T + timedelta(minutes=2, seconds=3),
    )
    assert h.R(pending) is Outcome.processed
    assert h.R(failed) is Outcome.parked
    assert fired(h) == []
    assert h.R(running) is Outcome.processed
    [action] = fired(h)
    assert action.triggering_labels == {"prefect.resource.id": RUN}
    assert action.triggering_event == failed


def test_d32_old_followers_are_not_held(harness: HarnessMaker) -> None:
    h = harness([RUN_FAILED])
    b = T - timedelta(hours=1)
    pending = event("prefect.flow-run.Pending", b, RUN, received=b + timedelta(seconds=1))
    running = event(
        "prefect.flow-run.Running",
        b + timedelta(minutes=1),
        RUN,
        follows=pending.id,
        received=b + timedelta(minutes=1, seconds=2),
    )
    failed = event(
        "prefect.flow-run.Failed",
        b + timedelta(minutes=3),
        RUN,
        follows=running.id,
        received=b + timedelta(minutes=2, seconds=3),
    )
    h.R(pending)
    assert h.R(failed) is Outcome.processed
    [action] = fired(h)
    assert action.triggering_event == failed
    assert h.R(running) is Outcome.processed
    assert fired(h) == []


def test_d33_lost_followers_processed_by_periodic(harness: HarnessMaker) -> None:
    h = harness([RUN_FAILED])
    b = T - timedelta(minutes=15)
    bogus = event("nope", b, "never")
    pending = event("prefect.flow-run.Pending", b, RUN, received=b + timedelta(seconds=1))
    running = event(
        "prefect.flow-run.Running",
        b + timedelta(minutes=1),
        RUN,
        follows=bogus.id,
        received=b + timedelta(minutes=1, seconds=2),
    )
    failed = event(
        "prefect.flow-run.Failed",
        b + timedelta(minutes=3),
        RUN,
        follows=bogus.id,
        received=b + timedelta(minutes=2, seconds=3),
    )
    assert h.R(pending, now=b + timedelta(minutes=3)) is Outcome.processed
    assert h.R(failed, now=b + timedelta(minutes=3)) is Outcome.parked
    assert h.R(running, now=b + timedelta(minutes=3)) is Outcome.parked
    h.PER(b + timedelta(minutes=10))
    assert fired(h) == []
    with h.conn:
        periodic = h.engine.periodic(h.conn, b + timedelta(minutes=20))
    [action] = fired(h)
    assert action.triggering_labels == {"prefect.resource.id": RUN}
    assert action.triggering_event == failed
    assert action.triggered == b + timedelta(minutes=20)
    # its log line comes out with the pass, for the sweeper to write after its commit
    assert [line.firing for line in periodic.firings] == [action.firing and action.firing.id]


def test_animal_lover_threshold_zero_fires_on_first_event(harness: HarnessMaker) -> None:
    h = harness([ANIMAL_LOVER])
    h.R(spider_walked())
    assert len(fired(h)) == 1
    h.R(event("animal.walked", T + timedelta(seconds=1), SPIDER))
    # still inside the cool-down window that started at the firing's old end
    assert fired(h) == []
