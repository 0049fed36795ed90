"""`trigd backtest FILE` as users run it: on a database the real engine wrote (and still
holds open), with a changed threshold in the file: the firings beside the live ones."""

from __future__ import annotations

import gc
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from daemon.cli.backtest import REPLAY_YOUNG_COLLECTIONS, open_scratch, replay_gc
from daemon.cli.main import main
from daemon.core.clock import to_us
from store.events import insert_new_events
from tests.support.daemon_process import write_automations
from tests.support.engine_harness import HarnessMaker, automation, event, trigger


def burst(threshold: int) -> dict[str, Any]:
    return {
        "name": "burst",
        "trigger": trigger(
            expect=["pump.high"], for_each=["prefect.resource.id"], threshold=threshold, within=60
        ),
        "actions": [{"type": "do-nothing"}],
    }


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["backtest", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_changed_threshold_beside_the_live_firings(
    harness: HarnessMaker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h = harness([automation("burst", burst(3)["trigger"])])
    start = datetime.now(UTC) - timedelta(hours=1)  # inside the default --since 24h
    events = [event("pump.high", start + timedelta(seconds=s), "pump-1") for s in range(1, 5)]
    h.batch(events, now=start + timedelta(seconds=5))
    h.batch([], now=start + timedelta(seconds=5))
    db = str(h.store.path)
    file = write_automations(tmp_path, [burst(2)])
    code, out, err = run(capsys, str(file), "--db", db, "--json")
    assert code == 0, err
    document = json.loads(out)
    # the live firing's own events are not replayed: the scratch engine makes its own
    assert (document["replayed"], document["skipped"]) == (4, 2)
    [entry] = document["automations"]
    assert entry["loaded"] is True
    assert [(f["diff"], f["triggering_event"]) for f in entry["firings"]] == [
        ("backtest only", str(events[1].id)),
        ("live only", str(events[2].id)),
    ]
    code, out, err = run(capsys, str(file), "--db", db)
    assert code == 0, err
    assert "burst (" in out
    assert "would fire 1, fired live 1" in out
    assert f"  + {events[1].occurred.isoformat().replace('+00:00', 'Z')}" in out
    # nothing older than --since is replayed
    code, out, err = run(capsys, str(file), "--db", db, "--since", "10m", "--json")
    assert json.loads(out)["replayed"] == 0


def test_errors_name_what_is_wrong(
    harness: HarnessMaker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h = harness([])
    db = str(h.store.path)
    file = write_automations(tmp_path, [burst(2)])
    code, _, err = run(capsys, str(file), "--db", db, "--since", "yesterday")
    assert code == 2
    assert "--since: expected a duration" in err
    (tmp_path / "bad").mkdir()
    bad = write_automations(tmp_path / "bad", [{"name": "x", "trigger": {"threshold": "many"}}])
    code, _, err = run(capsys, str(bad), "--db", db)
    assert code == 2
    assert "threshold" in err
    code, _, err = run(capsys, str(file), "--db", str(tmp_path / "missing.db"))
    assert code == 1
    assert "no such database" in err


def test_a_stored_event_that_no_longer_parses_stops_the_backtest_naming_it(
    harness: HarnessMaker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A row is parsed only when the replay needs the whole event (here: it fires); one
    that is not an event then stops the backtest with an error naming it."""
    h = harness([])
    at = to_us(datetime.now(UTC) - timedelta(hours=1))
    bad = str(uuid4())
    with h.conn:
        insert_new_events(h.conn, [(bad, "pump.high", "pump-1", at, at, None, '{"id": 1}')])
    file = write_automations(tmp_path, [burst(1)])
    code, out, err = run(capsys, str(file), "--db", str(h.store.path))
    assert (code, out) == (1, "")
    assert f"trigd backtest: stored event {bad} does not parse" in err


def test_the_replay_collects_less_often_and_as_before_afterwards() -> None:
    """Young collections every REPLAY_YOUNG_COLLECTIONS new objects while replaying, what
    start-up built frozen; the process's settings come back after, even on an error."""
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    inside: list[tuple[tuple[int, int, int], int]] = []

    def failing_replay() -> None:
        with replay_gc():
            inside.append((gc.get_threshold(), gc.get_freeze_count()))
            raise RuntimeError("the replay failed")

    with pytest.raises(RuntimeError, match="the replay failed"):
        failing_replay()
    ((threshold, frozen_inside),) = inside
    assert threshold == (REPLAY_YOUNG_COLLECTIONS, *before[1:])
    assert frozen_inside > frozen
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == frozen


def test_the_scratch_store_keeps_no_wal_and_never_syncs(tmp_path: Path) -> None:
    """Thrown away after the replay: pages written once (rollback journal in memory, no
    WAL), no fsync; a failed transaction still rolls back."""
    scratch = open_scratch(tmp_path / "scratch.db")
    try:
        conn = scratch.conn
        assert conn.execute("PRAGMA journal_mode").fetchall() == [("memory",)]
        assert conn.execute("PRAGMA synchronous").fetchall() == [(0,)]

        def failing_transaction() -> None:
            with conn:
                conn.execute("INSERT INTO meta (key, value) VALUES ('k', 'v')")
                raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError, match="rolled back"):
            failing_transaction()
        assert conn.execute("SELECT count(*) FROM meta WHERE key = 'k'").fetchall() == [(0,)]
    finally:
        scratch.close()
    assert not (tmp_path / "scratch.db-wal").exists()
