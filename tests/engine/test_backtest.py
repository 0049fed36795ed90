"""`replay` and `diff`: a backtest runs the real engine over a scratch store on the events a
real engine stored, and gets the firings that engine made (a property); a changed
automation shows its difference."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.core.automations import Automation
from daemon.core.clock import to_us
from daemon.core.events import ReceivedEvent
from daemon.engine.backtest import Firing, Replay, diff, live_firings, replay
from daemon.engine.engine import Engine
from store.db import Store
from store.events import insert_new_events
from tests.support.engine_harness import Harness, T, automation, event, trigger

UNTIL = T + timedelta(days=1)
GRANULARITY = timedelta(seconds=5)


def backtest(
    db: Path, automations: Sequence[Automation], scratch_dir: Path, until: datetime = UNTIL
) -> Replay:
    scratch_dir.mkdir(exist_ok=True)
    live = Store.open_readonly(db)
    scratch = Store.open(scratch_dir / "scratch.db")
    try:
        with live.conn:
            result = replay(
                live.conn,
                scratch.conn,
                Engine(),
                automations,
                T,
                until,
                batch=7,
                granularity=GRANULARITY,
            )
    finally:
        scratch.close()
        live.close()
    return result


def really(db: Path, automations: Sequence[Automation]) -> list[Firing]:
    live = Store.open_readonly(db)
    try:
        return live_firings(live.conn, [str(a.id) for a in automations], T, UNTIL)
    finally:
        live.close()


def identities(firings: Sequence[Firing]) -> list[Any]:
    return sorted(f.identity() for f in firings)


def burst(**fields: Any) -> Automation:
    return automation(
        "burst",
        trigger(expect=["pump.high"], for_each=["prefect.resource.id"], **fields),
    )


@st.composite
def histories(draw: st.DrawFn) -> tuple[Automation, list[ReceivedEvent], list[int]]:
    fields: dict[str, Any] = {
        "threshold": draw(st.integers(1, 4)),
        "within": draw(st.sampled_from([0, 0, 10, 60])),
    }
    if draw(st.booleans()):
        fields["after"] = ["pump.started"]
    chosen = burst(**fields)
    gaps = draw(st.lists(st.integers(0, 150_000), min_size=1, max_size=40))
    events = []
    at = T
    for gap in gaps:
        at += timedelta(milliseconds=gap)
        name = draw(st.sampled_from(["pump.high", "pump.high", "pump.started", "pump.low"]))
        resource = draw(st.sampled_from(["pump-1", "pump-2"]))
        events.append(event(name, at, resource))
    cuts = draw(st.lists(st.integers(1, 8), min_size=1, max_size=10))
    return chosen, events, cuts


def batches(events: list[ReceivedEvent], cuts: list[int]) -> Iterator[list[ReceivedEvent]]:
    start = 0
    i = 0
    while start < len(events):
        size = cuts[i % len(cuts)]
        yield events[start : start + size]
        start += size
        i += 1


def live_run(h: Harness, events: list[ReceivedEvent], cuts: list[int]) -> None:
    """The events arriving in occurred order, batched anyhow (`cuts`), with a wall clock
    that keeps up with them, and the sweeper (lost followers, closed buckets swept) at
    every tick T + k * GRANULARITY of that clock, between transactions: a batch whose
    events straddle a tick is two batches, as live its events would have arrived within
    the commit linger, not across a sweep."""
    next_sweep = T + GRANULARITY
    now = T
    for part in batches(events, cuts):
        piece: list[ReceivedEvent] = []
        for e in part:
            if e.occurred >= next_sweep:
                if piece:
                    h.batch(piece, now=piece[-1].occurred)
                    piece = []
                while next_sweep <= e.occurred:
                    h.PER(next_sweep)
                    next_sweep += GRANULARITY
            piece.append(e)
            now = e.occurred
        if piece:
            h.batch(piece, now=now)
    h.batch([], now=now)  # the last firings' events leave the inbox


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_the_same_automation_on_the_same_events_fires_as_live(
    history: tuple[Automation, list[ReceivedEvent], list[int]],
) -> None:
    chosen, events, cuts = history
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "live.db"
        h = Harness(db, [chosen])
        try:
            live_run(h, events, cuts)
        finally:
            h.close()
        live = really(db, [chosen])
        result = backtest(db, [chosen], Path(tmp))
    assert identities(result.firings) == identities(live)
    assert {kind for kind, _ in diff(result.firings, live).rows} <= {"same"}


def test_a_changed_threshold_shows_the_difference(tmp_path: Path) -> None:
    loaded = burst(threshold=3, within=60)
    h = Harness(tmp_path / "live.db", [loaded])
    events = [event("pump.high", T + timedelta(seconds=s), "pump-1") for s in range(1, 7)]
    h.batch(events)
    h.batch([])
    h.close()
    live = really(tmp_path / "live.db", [loaded])
    # the third event fires; the next window opens when this one ends, after all six
    assert [f.triggering_event for f in live] == [str(events[2].id)]
    changed = burst(threshold=2, within=60)  # same name: the same id
    assert changed.id == loaded.id
    result = backtest(tmp_path / "live.db", [changed], tmp_path)
    rows = diff(result.firings, live).rows
    assert [(kind, f.triggering_event) for kind, f in rows] == [
        ("backtest only", str(events[1].id)),
        ("live only", str(events[2].id)),
    ]
    same = backtest(tmp_path / "live.db", [loaded], tmp_path / "again")
    assert [kind for kind, _ in diff(same.firings, live).rows] == ["same"]


def test_proactive_triggers_run_on_the_replayed_events_clock(tmp_path: Path) -> None:
    silence = automation(
        "silence",
        trigger(expect=["pump.heartbeat"], posture="Proactive", threshold=1, within=30),
    )
    h = Harness(tmp_path / "live.db", [])
    beats = [0, 10, 20, 100, 110]  # a 70 s gap after 20: one window of 30 s with none
    h.batch([event("pump.heartbeat", T + timedelta(seconds=s), "pump-1") for s in beats])
    h.close()
    result = backtest(tmp_path / "live.db", [silence], tmp_path, T + timedelta(seconds=200))
    # the pass at 30 drops the window [0,30), which heard 3 beats, and the pass at 60 opens
    # the next, silent until 90: it fires; [90,120) hears 2, the next opens at 150, fires at 180
    assert [f.fired - T for f in result.firings] == [timedelta(seconds=s) for s in (90, 180)]
    assert result.replayed == len(beats)


def test_a_backtest_logs_none_of_its_firings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The replay's firings, reactive and proactive, are reported by the backtest, never
    logged as if the daemon had fired them."""
    caplog.set_level(logging.INFO, logger="daemon.engine.acting")
    chosen = burst(threshold=1, within=0)
    silence = automation(
        "silence",
        trigger(expect=["pump.heartbeat"], posture="Proactive", threshold=1, within=30),
    )
    h = Harness(tmp_path / "live.db", [])
    h.batch([event("pump.high", T + timedelta(seconds=s), "pump-1") for s in (1, 2)])
    h.close()
    result = backtest(tmp_path / "live.db", [chosen, silence], tmp_path, T + timedelta(seconds=90))
    assert {f.automation_id for f in result.firings} == {str(chosen.id), str(silence.id)}
    assert [r for r in caplog.records if r.name == "daemon.engine.acting"] == []


def test_events_no_trigger_sees_are_skipped_but_leaders_are_not(tmp_path: Path) -> None:
    chosen = burst(threshold=1, within=0)
    h = Harness(tmp_path / "live.db", [])
    leader = event("pump.other", T + timedelta(seconds=1), "pump-1")
    follower = event("pump.high", T + timedelta(seconds=2), "pump-1", follows=leader.id)
    noise = event("pump.noise", T + timedelta(seconds=3), "pump-1")
    h.batch([leader, follower, noise])
    h.close()
    result = backtest(tmp_path / "live.db", [chosen], tmp_path)
    assert (result.replayed, result.skipped) == (2, 1)
    assert [f.triggering_event for f in result.firings] == [str(follower.id)]


def test_a_follower_whose_leader_never_came_is_evaluated_once_lost(tmp_path: Path) -> None:
    chosen = burst(threshold=1, within=0)
    h = Harness(tmp_path / "live.db", [])
    orphan = event("pump.high", T + timedelta(seconds=1), "pump-1", follows=uuid4())
    h.batch([orphan])
    h.close()
    result = backtest(tmp_path / "live.db", [chosen], tmp_path)
    assert [f.triggering_event for f in result.firings] == [str(orphan.id)]


def test_the_scratch_store_keeps_the_firings_not_the_replayed_events(tmp_path: Path) -> None:
    """Nothing reads the replayed events back from the scratch store (only the firings,
    events the replay made, are read), so they are not written there; an event stored by
    an older trigd (another key order, spacing) is replayed from the text as read."""
    chosen = burst(threshold=1, within=0)
    Harness(tmp_path / "live.db", []).close()
    old = event("pump.high", T + timedelta(seconds=1), "pump-1")
    text = json.dumps(old.model_dump(mode="json"), indent=1, sort_keys=True)
    live = Store.open(tmp_path / "live.db")
    with live.conn:
        insert_new_events(
            live.conn,
            [(str(old.id), old.event, old.resource.id, to_us(old.occurred), to_us(T), None, text)],
        )
    live.close()
    result = backtest(tmp_path / "live.db", [chosen], tmp_path / "replay")
    scratch = Store.open_readonly(tmp_path / "replay" / "scratch.db")
    try:
        stored = scratch.conn.execute("SELECT event FROM events").fetchall()
    finally:
        scratch.close()
    assert sorted(str(name) for (name,) in stored) == [  # trigd's own, made by the replay
        "prefect.automation.action.triggered",
        "prefect.automation.triggered",
    ]
    assert [f.triggering_event for f in result.firings] == [str(old.id)]


def test_a_within_zero_bucket_is_swept_as_the_sweeper_would(tmp_path: Path) -> None:
    """Found by the property above: a `within: 0` bucket is left to the sweep (Prefect's
    way), so a sweep between two events decides whether the second counts in it. Live,
    the sweeper passed before the two events a minute later; the replay sweeps on the same
    ticks."""
    chosen = burst(threshold=3, within=0)
    events = [event("pump.high", T, "pump-1") for _ in range(16)]
    events += [event("pump.high", T + timedelta(minutes=1), "pump-1") for _ in range(2)]
    h = Harness(tmp_path / "live.db", [chosen])
    try:
        live_run(h, events, [1])
    finally:
        h.close()
    live = really(tmp_path / "live.db", [chosen])
    fired = {f.identity()[2] for f in live}
    assert fired == {str(events[i].id) for i in (2, 5, 8, 11, 14)}  # not 17: swept at T + 1 min
    result = backtest(tmp_path / "live.db", [chosen], tmp_path / "scratch")
    assert identities(result.firings) == identities(live)


def test_a_follower_finds_its_leader_seen_in_an_earlier_batch(tmp_path: Path) -> None:
    """The replay holds seen marks in memory across batches: a follower replayed a
    batch (of 7) after its leader proceeds at once, as live, instead of waiting until it
    is lost (it would then count after `later` and fire in its place)."""
    chosen = burst(threshold=2, within=60)
    leader = event("pump.other", T + timedelta(seconds=1), "pump-1")
    elsewhere = [event("pump.high", T + timedelta(seconds=1.1), "pump-2") for _ in range(6)]
    follower = event("pump.high", T + timedelta(seconds=2), "pump-1", follows=leader.id)
    later = event("pump.high", T + timedelta(seconds=3), "pump-1")
    h = Harness(tmp_path / "live.db", [chosen])
    try:
        h.batch([leader, *elsewhere, follower, later], now=later.occurred)
    finally:
        h.close()
    live = really(tmp_path / "live.db", [chosen])
    result = backtest(tmp_path / "live.db", [chosen], tmp_path / "scratch")
    assert identities(result.firings) == identities(live)
    assert str(later.id) in {f.triggering_event for f in result.firings}
