"""daemon/runtime/logs.py: `[log] format` text and json, `[log] level`
(docs/OPERATIONS.md#logs)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from daemon.runtime.logs import JsonFormatter, configure_logging


class Stderr:
    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys

    def getvalue(self) -> str:
        return self._capsys.readouterr().err


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Stderr]:
    """What configure_logging's handler writes; the root logger restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    yield Stderr(capsys)
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_time_level_logger_message_and_the_extra_fields(
    stderr: Stderr,
) -> None:
    configure_logging("INFO", "json")
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    logging.getLogger("daemon.test").info(
        "automation %r fired",
        "pump",
        extra={"automation": "pump", "bucket": {"id": "p.1"}, "next_attempt": at, "n": 3},
    )
    logging.getLogger("daemon.test").debug("not at INFO")
    [line] = stderr.getvalue().splitlines()
    record = json.loads(line)
    assert datetime.fromisoformat(record.pop("time")).tzinfo is not None
    assert record == {
        "level": "INFO",
        "logger": "daemon.test",
        "message": "automation 'pump' fired",
        "automation": "pump",
        "bucket": {"id": "p.1"},
        "next_attempt": "2026-01-02T03:04:05+00:00",
        "n": 3,
    }


def test_json_lines_hold_a_traceback_in_one_line(stderr: Stderr) -> None:
    configure_logging("INFO", "json")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("daemon.test").exception("failed")
    [line] = stderr.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR"
    assert "ValueError: boom" in record["exception"]


def test_text_lines_and_the_level(stderr: Stderr) -> None:
    configure_logging("WARNING", "text")
    logging.getLogger("daemon.test").info("hidden")
    logging.getLogger("daemon.test").warning("shown %d", 1, extra={"automation": "a"})
    [line] = stderr.getvalue().splitlines()
    assert line.endswith(" WARNING daemon.test: shown 1")
    assert not line.startswith("WARNING")  # a timestamp first, outside journald


def test_text_lines_under_journald_leave_the_time_to_it(
    stderr: Stderr, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    configure_logging("INFO")
    logging.getLogger("daemon.test").info("hello")
    assert stderr.getvalue() == "INFO daemon.test: hello\n"


def test_formatter_does_not_let_an_extra_replace_the_message() -> None:
    record = logging.LogRecord("x", logging.INFO, "", 0, "real", None, None)
    record.level = "forged"
    assert json.loads(JsonFormatter().format(record))["level"] == "INFO"
