"""`trigd explain` as users run it: on a database the real engine wrote and still holds open
(the writer's lock is held: explain must not need it), text and `--json`, and its errors."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from daemon.cli.main import main
from tests.support.engine_harness import HarnessMaker, T, automation, event, trigger

PRESSURE = automation(
    "pressure",
    trigger(
        expect=["pump.pressure.high"],
        for_each=["prefect.resource.id"],
        threshold=3,
        within=60,
    ),
)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["explain", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_text_and_json_while_the_writer_holds_the_database(
    harness: HarnessMaker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h = harness([PRESSURE])
    h.batch([event("pump.pressure.high", T + timedelta(seconds=s), "pump-7") for s in (1, 2)])
    db = str(h.store.path)
    code, out, err = run(capsys, "pressure", "--db", db)
    assert (code, err) == (0, "")
    assert "fires when 3 or more pump.pressure.high arrive within 1m" in out
    assert 'key ["pump-7"]: ' in out
    assert ", 2 of 3, " in out
    code, out, err = run(capsys, str(PRESSURE.id), "--db", db, "--json", "--key", "pump-7")
    assert code == 0, err
    document = json.loads(out)
    assert document["automation"]["name"] == "pressure"
    assert document["key"] == ["pump-7"]
    assert document["trigger"]["buckets"][0]["count"] == 2


def test_errors_name_what_is_wrong(
    harness: HarnessMaker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h = harness([PRESSURE])
    db = str(h.store.path)
    code, _, err = run(capsys, "nope", "--db", db)
    assert code == 1
    assert "no loaded automation has the id or name 'nope'" in err
    code, _, err = run(capsys, "pressure", "--db", db, "--key", "[1")
    assert code == 2
    assert "--key: '[1' is not a JSON array of strings" in err
    code, _, err = run(capsys, "pressure", "--db", str(tmp_path / "missing.db"))
    assert code == 1
    assert "no such database" in err
