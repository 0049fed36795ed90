"""LogThrottle: a burst per window, then a count of the lines left out; fixed clocks."""

from __future__ import annotations

import logging

import pytest

from daemon.core.log_throttle import LogThrottle


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="throttled")
    return caplog


def test_a_burst_per_window_then_a_count_of_the_rest(records: pytest.LogCaptureFixture) -> None:
    throttle = LogThrottle(logging.getLogger("throttled"), "refused events", burst=2, window=10)
    logged = [throttle.log(t, logging.ERROR, "event %d refused", t) for t in range(7)]
    assert logged == [True, True, False, False, False, False, False]
    assert throttle.log(12.5, logging.ERROR, "event %d refused", 12) is True
    assert [r.getMessage() for r in records.records] == [
        "event 0 refused",
        "event 1 refused",
        "5 lines left out in the last 12.5s (at most 2 per 10s): refused events",
        "event 12 refused",
    ]
    assert {r.levelno for r in records.records} == {logging.ERROR}


def test_a_window_with_nothing_left_out_reports_nothing(
    records: pytest.LogCaptureFixture,
) -> None:
    throttle = LogThrottle(logging.getLogger("throttled"), "refused events", burst=2, window=10)
    for now in (0.0, 1.0, 10.0, 25.0):
        assert throttle.log(now, logging.WARNING, "line at %s", now)
    assert [r.getMessage() for r in records.records] == [
        "line at 0.0",
        "line at 1.0",
        "line at 10.0",
        "line at 25.0",
    ]


def test_the_traceback_goes_with_the_lines_let_through(
    records: pytest.LogCaptureFixture,
) -> None:
    throttle = LogThrottle(logging.getLogger("throttled"), "refused events", burst=1, window=60)
    error = RuntimeError("boom")
    throttle.log(0, logging.ERROR, "first", exc_info=error)
    throttle.log(1, logging.ERROR, "second", exc_info=error)
    [record] = records.records
    assert record.getMessage() == "first"
    assert record.exc_info is not None
    assert record.exc_info[1] is error
