"""daemon/core/upstream.py: the state `trigd status`, ready and metrics show."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import attrs

from daemon.core.clock import to_us
from daemon.core.upstream import UpstreamStats, describe, next_position

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def test_backlog_age_and_lag_are_measured_from_now() -> None:
    stats = UpstreamStats()
    stats.backlog_seen(12, to_us(NOW - timedelta(seconds=90)), NOW)
    assert (stats.backlog, stats.backlog_age_seconds) == (12, 90.0)
    stats.backlog_seen(0, None, NOW)
    assert (stats.backlog, stats.backlog_age_seconds) == (0, 0.0)
    stats.taken_at(NOW - timedelta(milliseconds=250), NOW)
    assert (stats.taken, stats.lag_seconds) == (1, 0.25)


def test_ready_reasons_name_the_direction_down_and_why() -> None:
    stats = UpstreamStats(last_error="forward: the upstream did not answer in time")
    assert stats.ready_reasons(forwarding=False, subscribing=False) == []
    assert stats.ready_reasons(forwarding=True, subscribing=False) == [
        "upstream forward not connected: forward: the upstream did not answer in time"
    ]
    stats.forward_connected = True
    assert stats.ready_reasons(forwarding=True, subscribing=False) == []


def test_status_lines() -> None:
    stats = UpstreamStats(forward_connected=True, backlog=3, forwarded=9, last_error="x")
    lines = describe(attrs.asdict(stats))
    assert lines[0] == "  upstream: forward connected, subscribe not connected"
    assert "backlog 3 events" in lines[1]
    assert "9 forwarded" in lines[2]
    assert lines[3] == "    last error: x"


def test_the_subscribe_position_is_the_latest_occurred_but_never_past_its_arrival() -> None:
    earlier, later = NOW - timedelta(minutes=5), NOW - timedelta(minutes=1)
    assert next_position(None, earlier, NOW) == earlier
    assert next_position(earlier, later, NOW) == later
    assert next_position(later, earlier, NOW) == later  # a backfilled event
    assert next_position(later, NOW + timedelta(days=365), NOW) == NOW  # stamped ahead
