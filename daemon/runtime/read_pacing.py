"""Readers hold off while their events wait for the evaluator: a trickle is read in runs.

Why: events arriving one at a time each cost the trio thread a wake-up and a socket read
(one that finds the frame, one that finds nothing), more than the rest of their handling.
While a client's events are not committed yet, the evaluator is about to take them,
lingering for more (``daemon.core.commit_linger``), or committing them; reading that
client's next frames the moment they arrive gains nothing: they can only join the batch
the evaluator takes when its window closes, or the next one once the commit is over. So a
connection reader that has handed its frames over, some of them events still waiting for
their commit, waits for the evaluator's next close (the end of its window, or of its
commit) before its next read; meanwhile the kernel gathers that connection's frames, and
they are read in one go, just before the evaluator takes what is queued. A client waiting
for no ack (all its events answered; it may be pinging) is read at once.

A reader that finds the evaluator idle gives it a couple of scheduler passes first
(``SETTLE``): the evaluator, woken by the frames just handed over, takes them and opens
its window (or its commit) in its next step; without that, the reader would park in the
socket and be woken again by each frame arriving in the window. If nothing opens (the
evaluator is still busy after a commit), the reader reads at once, as events read now may
still join the batch the evaluator takes next.

Bounds: a reader waits at most until that close (the evaluator closes after
``commit_linger`` at most, and after each commit attempt, even when cancelled), so an
event is never taken into a later batch than before; while the evaluator waits out store
trouble nothing is open, and readers read at once, up to the usual bounds. At a close the
evaluator gives the readers it woke a few scheduler passes (``ROUNDS``) to hand their
frames over before it takes them, so they join that same batch unless they are held up
by a bound (then the next batch takes them); at the end of a commit that the next
batch's window follows it gives none, since what they read joins that window anyway.
Only the evaluator opens and closes; readers only wait.
"""

from __future__ import annotations

from typing import Final

import trio

ROUNDS: Final = 4
"""Scheduler passes the evaluator gives woken readers: one to wake, one inside the read,
one to hand the frames over, one to spare (TLS)."""


SETTLE: Final = 2
"""Scheduler passes a reader that handed frames over gives the evaluator to take them and
open: one to wake it, one more since trio may run a pass's tasks in either order."""


class ReadPacing:
    """The evaluator's linger window and commits, as the connection readers see them."""

    __slots__ = ("_closed", "_resumed")

    def __init__(self) -> None:
        self._closed: trio.Event | None = None  # set when the open window closes
        self._resumed = 0  # readers woken by the last close, not done handing over

    @property
    def lingering(self) -> bool:
        return self._closed is not None

    def open(self) -> None:
        """The evaluator starts waiting for more events, or committing a batch."""
        if self._closed is None:
            self._closed = trio.Event()

    async def close(self, rounds: int = ROUNDS) -> None:
        """The evaluator stops waiting, or its commit is over: wake the readers, and give
        them ``rounds`` scheduler passes to hand over what they read (fewer when they are
        done), so it joins the batch the evaluator takes next. None after a commit that
        the next batch's window follows: what they read joins that window anyway."""
        closed, self._closed = self._closed, None
        if closed is None:
            return
        closed.set()
        for _ in range(rounds):
            if self._resumed <= 0:
                break
            await trio.lowlevel.checkpoint()
        self._resumed = 0  # the late ones join the next batch

    async def hold(self) -> bool:
        """For a reader that handed over frames whose events are not committed yet: if
        the evaluator is lingering or committing, or starts to within ``SETTLE`` scheduler
        passes, wait until that closes, and return True (then call ``handed_over`` once
        the next read's frames are handed over). False: read now (nothing opened: the
        evaluator is busy after a commit, or waits out store trouble)."""
        for _ in range(SETTLE):
            if self._closed is not None:
                break
            await trio.lowlevel.checkpoint()
        closed = self._closed
        if closed is None:
            return False
        self._resumed += 1
        await closed.wait()
        return True

    def handed_over(self) -> None:
        """A reader woken by ``close`` has handed over its next read's frames (or quit)."""
        if self._resumed > 0:
            self._resumed -= 1
