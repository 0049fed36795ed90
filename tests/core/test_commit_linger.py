"""The commit linger's decision: how long a batch waits for more events, with fixed clocks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.core.commit_linger import CommitLinger

LINGER = CommitLinger(window=0.005, enough=64, batch_max=500)


def test_a_lone_event_after_an_idle_spell_waits_the_whole_window() -> None:
    assert LINGER.wait(batch=1, queued=0, last_batch=0, first_at=100.0, now=100.0) == pytest.approx(
        0.005
    )


def test_the_wait_never_rounds_past_the_window() -> None:
    """64.0 + 0.001 - 64.0 is 0.0010000000000047748 in floating point (found by the
    property below): the wait is what is left of the window, never more."""
    linger = CommitLinger(window=0.001, enough=2, batch_max=2)
    assert linger.wait(batch=1, queued=0, last_batch=0, first_at=64.0, now=64.0) <= 0.001


def test_the_wait_counts_from_the_first_event() -> None:
    wait = LINGER.wait(batch=3, queued=0, last_batch=0, first_at=100.0, now=100.002)
    assert wait == pytest.approx(0.003)
    assert LINGER.wait(batch=3, queued=0, last_batch=0, first_at=100.0, now=100.005) == 0
    assert LINGER.wait(batch=3, queued=0, last_batch=0, first_at=100.0, now=101.0) == 0


def test_the_window_shrinks_with_the_last_batch() -> None:
    """Under load the queue built during a COMMIT makes the batch: the window is the share
    of `enough` the last batch left unfilled."""
    assert LINGER.wait(batch=1, queued=0, last_batch=16, first_at=0.0, now=0.0) == pytest.approx(
        0.005 * 48 / 64
    )
    assert LINGER.wait(batch=1, queued=0, last_batch=64, first_at=0.0, now=0.0) == 0
    assert LINGER.wait(batch=1, queued=0, last_batch=500, first_at=0.0, now=0.0) == 0


def test_no_wait_once_enough_events_are_taken_or_queued() -> None:
    assert LINGER.wait(batch=64, queued=0, last_batch=0, first_at=0.0, now=0.0) == 0
    assert LINGER.wait(batch=10, queued=54, last_batch=0, first_at=0.0, now=0.0) == 0
    assert LINGER.wait(batch=10, queued=53, last_batch=0, first_at=0.0, now=0.0) > 0


def test_batch_max_below_enough_is_the_target() -> None:
    small = CommitLinger(window=0.005, enough=64, batch_max=4)
    assert small.wait(batch=4, queued=0, last_batch=0, first_at=0.0, now=0.0) == 0
    assert small.wait(batch=1, queued=0, last_batch=4, first_at=0.0, now=0.0) == 0
    assert small.wait(batch=3, queued=0, last_batch=0, first_at=0.0, now=0.0) == 0.005


def test_the_window_is_shorter_by_the_last_commit() -> None:
    """The events read when a commit ends may have arrived as it began: the window counts
    what they waited meanwhile, and there is none after a commit of 5 ms or more."""

    def wait(last_commit: float) -> float:
        return LINGER.wait(
            batch=1, queued=0, last_batch=1, first_at=0.0, now=0.0, last_commit=last_commit
        )

    assert wait(0.0) == pytest.approx(0.005 * 63 / 64)
    assert wait(0.001) == pytest.approx(0.005 * 63 / 64 - 0.001)
    assert wait(0.00495) == 0  # the shrunk window (4.92 ms) is used up
    assert wait(0.005) == 0
    assert wait(0.030) == 0
    assert LINGER.lingers_after(1, 0.0049)
    assert not LINGER.lingers_after(1, 0.005)


def test_a_zero_window_never_waits() -> None:
    off = CommitLinger(window=0.0, enough=64, batch_max=500)
    assert off.wait(batch=1, queued=0, last_batch=0, first_at=0.0, now=0.0) == 0


@pytest.mark.parametrize(
    ("window", "enough", "batch_max", "message"),
    [
        (-0.001, 64, 500, "window must not be negative"),
        (0.005, 0, 500, "enough must be at least 1"),
        (0.005, 64, 0, "batch_max must be at least 1"),
    ],
)
def test_bad_settings_are_refused(window: float, enough: int, batch_max: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CommitLinger(window=window, enough=enough, batch_max=batch_max)


settings = st.builds(
    CommitLinger,
    window=st.floats(0, 1),
    enough=st.integers(1, 1_000),
    batch_max=st.integers(1, 1_000),
)


@given(
    settings,
    st.integers(1, 1_000),
    st.integers(0, 1_000),
    st.integers(0, 1_000),
    st.floats(0, 1e6),
    st.floats(0, 10),
)
def test_the_wait_is_bounded_and_ends_the_window_in_time(
    linger: CommitLinger, batch: int, queued: int, last_batch: int, first_at: float, since: float
) -> None:
    """Never negative, never past `window` after the first event, nothing once the batch
    could be full; and a later look never waits longer (the window only closes)."""
    now = first_at + since
    wait = linger.wait(
        batch=batch, queued=queued, last_batch=last_batch, first_at=first_at, now=now
    )
    assert 0 <= wait <= linger.window
    assert now + wait <= first_at + linger.window + 1e-9 or wait == 0
    if batch + queued >= min(linger.enough, linger.batch_max):
        assert wait == 0
    later = linger.wait(
        batch=batch, queued=queued, last_batch=last_batch, first_at=first_at, now=now + 0.001
    )
    assert later <= wait
    bigger_last = linger.wait(
        batch=batch, queued=queued, last_batch=last_batch + 1, first_at=first_at, now=now
    )
    assert bigger_last <= wait


@given(last_batch=st.integers(0, 1_000))
def test_the_next_batch_lingers_exactly_when_its_window_is_open(last_batch: int) -> None:
    """`lingers_after` agrees with `wait` for a lone first event: a window is coming."""
    for linger in (LINGER, CommitLinger(window=0.005, enough=64, batch_max=10)):
        wait = linger.wait(batch=1, queued=0, last_batch=last_batch, first_at=0.0, now=0.0)
        assert linger.lingers_after(last_batch) is (wait > 0)
    assert CommitLinger(window=0.0, enough=64, batch_max=500).lingers_after(1) is False
