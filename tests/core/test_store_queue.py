"""daemon/core/store_queue.py: urgent first, FIFO per class, background work never starved."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.core.store_queue import URGENT_IN_A_ROW, JobClass, StoreQueue

# an operation: put an urgent job, put a background job, or take the next job
OPS = st.lists(st.sampled_from(["urgent", "background", "take"]), max_size=200)


def test_an_urgent_job_goes_before_waiting_background_jobs() -> None:
    queue: StoreQueue[str] = StoreQueue()
    queue.put("b1", JobClass.BACKGROUND)
    queue.put("b2", JobClass.BACKGROUND)
    queue.put("u1", JobClass.URGENT)
    assert [queue.take(), queue.take(), queue.take(), queue.take()] == ["u1", "b1", "b2", None]


def test_after_the_bound_one_background_job_runs() -> None:
    queue: StoreQueue[str] = StoreQueue(urgent_in_a_row=2)
    queue.put("b1", JobClass.BACKGROUND)
    queue.put("b2", JobClass.BACKGROUND)
    for n in range(5):
        queue.put(f"u{n}", JobClass.URGENT)
    taken = [queue.take() for _ in range(8)]
    assert taken == ["u0", "u1", "b1", "u2", "u3", "b2", "u4", None]


def test_the_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="urgent_in_a_row must be at least 1, got 0"):
        StoreQueue(urgent_in_a_row=0)


@given(ops=OPS, limit=st.integers(min_value=1, max_value=URGENT_IN_A_ROW + 2))
def test_fifo_per_class_bounded_wait_nothing_lost_or_twice(ops: list[str], limit: int) -> None:
    queue: StoreQueue[tuple[str, int]] = StoreQueue(urgent_in_a_row=limit)
    put: dict[str, list[int]] = {"urgent": [], "background": []}
    taken: dict[str, list[int]] = {"urgent": [], "background": []}
    waiting = {"urgent": 0, "background": 0}
    in_a_row = 0  # urgent jobs taken in a row while a background job waited
    serial = 0

    def take() -> None:
        nonlocal in_a_row
        background_waited = waiting["background"] > 0
        job = queue.take()
        if job is None:
            assert waiting == {"urgent": 0, "background": 0}
            return
        kind, n = job
        taken[kind].append(n)
        waiting[kind] -= 1
        if kind == "urgent":
            in_a_row = in_a_row + 1 if background_waited else 0
            assert in_a_row <= limit  # no background job waits behind more than `limit`
        else:
            # background only when no urgent job waits, or after `limit` of them in a row
            assert waiting["urgent"] == 0 or in_a_row == limit
            in_a_row = 0

    for op in ops:
        if op == "take":
            take()
            continue
        serial += 1
        queue.put((op, serial), JobClass(op))
        put[op].append(serial)
        waiting[op] += 1
        assert len(queue) == waiting["urgent"] + waiting["background"]
    while len(queue):
        take()
    assert queue.take() is None
    assert taken == put  # FIFO within each class, each job exactly once
