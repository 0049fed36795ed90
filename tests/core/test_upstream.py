"""daemon/core/upstream.py: the state `trigd status`, ready and metrics show."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import attrs
from hypothesis import given
from hypothesis import strategies as st

from daemon.core.clock import to_us
from daemon.core.upstream import (
    PoisonHunt,
    ResendWindow,
    UpstreamStats,
    describe,
    next_position,
)

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
    assert lines[2] == (
        "    9 forwarded, 0 refused upstream, 0 taken, 0 rejected, 0 dropped past backlog"
    )
    assert lines[3] == "    last error: x"


def test_the_subscribe_position_is_the_latest_occurred_but_never_past_its_arrival() -> None:
    earlier, later = NOW - timedelta(minutes=5), NOW - timedelta(minutes=1)
    assert next_position(None, earlier, NOW) == earlier
    assert next_position(earlier, later, NOW) == later
    assert next_position(later, earlier, NOW) == later  # a backfilled event
    assert next_position(later, NOW + timedelta(days=365), NOW) == NOW  # stamped ahead


def test_a_page_the_upstream_keeps_closing_on_is_sent_one_event_at_a_time_to_find_the_one() -> None:
    hunt = PoisonHunt(strikes=3)
    assert hunt.limit(10, 7) == 7
    # events 11..17 sent from cursor 10, the server closes: twice is not yet evidence
    assert hunt.ended(10, 17, closed_by_server=True) is None
    assert hunt.ended(10, 17, closed_by_server=True) is None
    assert hunt.limit(10, 7) == 7
    assert hunt.ended(10, 17, closed_by_server=True) is None  # the third: one at a time
    assert [hunt.limit(c, 7) for c in (10, 13, 16, 17)] == [1, 1, 1, 7]
    # 11 and 12 confirmed one by one; 13 is closed on, three times: it is refused
    assert hunt.ended(12, 13, closed_by_server=True) is None
    assert hunt.ended(12, 13, closed_by_server=True) is None
    assert hunt.ended(12, 13, closed_by_server=True) == 13
    # the forwarder moves past 13; 14..17 still one at a time, then full pages
    assert hunt.limit(13, 7) == 1
    assert hunt.limit(17, 7) == 7


def test_closes_from_different_cursors_are_not_in_a_row() -> None:
    hunt = PoisonHunt(strikes=2)
    assert hunt.ended(10, 17, closed_by_server=True) is None
    assert hunt.ended(17, 24, closed_by_server=True) is None  # progress in between
    assert hunt.limit(17, 7) == 7
    assert hunt.ended(17, 24, closed_by_server=True) is None
    assert hunt.limit(17, 7) == 1


def test_no_evidence_from_an_upstream_down_or_from_a_close_with_nothing_sent() -> None:
    hunt = PoisonHunt(strikes=2)
    for _ in range(10):
        # a connect error, a refusal before auth, a timeout: not closed by the server
        assert hunt.ended(10, 17, closed_by_server=False) is None
        assert hunt.ended(10, 10, closed_by_server=True) is None  # closed before sending
    assert hunt.limit(10, 7) == 7
    # and they do not break a run of closes either
    assert hunt.ended(10, 17, closed_by_server=True) is None
    assert hunt.ended(10, 17, closed_by_server=False) is None
    assert hunt.ended(10, 17, closed_by_server=True) is None
    assert hunt.limit(10, 7) == 1


@given(
    st.lists(
        st.tuples(st.integers(0, 50), st.integers(0, 20), st.booleans()),
        max_size=60,
    )
)
def test_only_an_event_sent_alone_and_closed_on_is_ever_skipped(
    endings: list[tuple[int, int, bool]],
) -> None:
    hunt = PoisonHunt(strikes=2)
    for cursor, more, by_server in endings:
        alone = hunt.limit(cursor, 7) == 1
        skipped = hunt.ended(cursor, cursor + more, closed_by_server=by_server)
        if skipped is not None:
            assert by_server
            assert alone
            assert skipped == cursor + more


def test_a_connection_that_starts_before_the_closes_sends_those_pages_in_full() -> None:
    hunt = PoisonHunt(strikes=2)
    assert hunt.ended(17, 24, closed_by_server=True) is None
    assert hunt.ended(17, 24, closed_by_server=True) is None  # from 17, one at a time
    # the stored cursor is 10 (pages held back): 11..17 go as a page, then 18..24 alone
    assert [hunt.limit(c, 7) for c in (10, 17, 20, 24)] == [7, 1, 1, 7]
    assert hunt.ended(20, 21, closed_by_server=True) is None
    assert hunt.ended(20, 21, closed_by_server=True) == 21


def test_a_page_is_stored_once_it_has_been_confirmed_for_the_window() -> None:
    window = ResendWindow(10.0)
    assert window.counted(7, now=100.0, alone=False) is None
    assert window.counted(14, now=104.0, alone=False) is None
    assert window.due(109.9) is None
    assert window.due(110.0) == 7
    assert window.due(110.0) is None  # stored once
    assert window.counted(21, now=115.0, alone=False) == 14  # 14 came of age meanwhile
    window.clear()  # a new connection: what was held is sent again
    assert window.due(1000.0) is None


def test_an_event_sent_alone_while_hunting_is_stored_at_once() -> None:
    window = ResendWindow(10.0)
    assert window.counted(7, now=100.0, alone=False) is None
    assert window.counted(8, now=101.0, alone=True) == 8
    assert window.due(1000.0) is None  # 7 is behind the stored 8
