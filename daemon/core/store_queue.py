"""Which store job runs next: urgent work first, with background work's wait bounded.

Why: the store has one writer thread, and every piece of store work queues for it. The
evaluator's batches are the work clients wait on (an event is acknowledged only after its
batch commits); the sender's claims and results, the inbox pump, the sweeper, metrics and
HTTP reads are not. In one plain FIFO a batch that queued behind a burst of background jobs
(a second in which many automations fire, say) waits for all of them, and so do its acks.
So the queue keeps two classes: an urgent job goes before every waiting background job,
but after ``urgent_in_a_row`` urgent jobs run in a row while background work waits, one
background job runs, so a flood of urgent work never starves the rest.

Within a class the order is first in, first out. Pure: no threads, no clock; the store
gateway (``daemon.runtime.gateway``) holds it under its lock.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Final, Generic, TypeVar

T = TypeVar("T")

URGENT_IN_A_ROW: Final = 4
"""Urgent jobs that may run in a row while a background job waits. Not a setting: the
urgent jobs come from one evaluator, which leaves the thread free between its batches
anyway; the bound only matters in a flood, where a background job then waits for at most
four batches."""


class JobClass(enum.Enum):
    """How a store job is scheduled: ``URGENT`` (a client waits on it) or ``BACKGROUND``."""

    URGENT = "urgent"
    BACKGROUND = "background"


class StoreQueue(Generic[T]):
    """Two FIFO queues and the rule that picks the next job from them."""

    def __init__(self, urgent_in_a_row: int = URGENT_IN_A_ROW) -> None:
        if urgent_in_a_row < 1:
            raise ValueError(f"urgent_in_a_row must be at least 1, got {urgent_in_a_row}")
        self._limit = urgent_in_a_row
        self._urgent: deque[T] = deque()
        self._background: deque[T] = deque()
        self._in_a_row = 0  # urgent jobs taken in a row while background work waited

    def __len__(self) -> int:
        return len(self._urgent) + len(self._background)

    def put(self, job: T, job_class: JobClass) -> None:
        if job_class is JobClass.URGENT:
            self._urgent.append(job)
        else:
            self._background.append(job)

    def take(self) -> T | None:
        """The next job to run, or None when both queues are empty."""
        if self._urgent and (not self._background or self._in_a_row < self._limit):
            self._in_a_row = self._in_a_row + 1 if self._background else 0
            return self._urgent.popleft()
        self._in_a_row = 0
        if self._background:
            return self._background.popleft()
        return None
