"""Readers hold off while the evaluator lingers or commits: a trickle is read in runs.

Why: events arriving one at a time each cost the trio thread a wake-up and a socket read
(one that finds the frame, one that finds nothing), more than the rest of their handling.
While the evaluator holds a batch open waiting for more events (``daemon.core.commit_linger``),
reading them the moment they arrive gains nothing: they are committed when the window
closes anyway. So a connection reader that has handed its frames over, some of them events
still waiting for their commit, and finds the evaluator lingering waits until the window
closes before its next read; meanwhile the kernel gathers that connection's frames, and
they are read in one go, just before the evaluator takes what is queued. The same holds
while it commits a batch: what arrives meanwhile can only join the next batch, so it is
read, in one go, when the commit is over. A client waiting for no ack (all its events
answered; it may be pinging) is read at once.

Bounds: a reader waits at most until the window it saw open closes (the evaluator closes
it after ``commit_linger`` at most, and always, even when cancelled), or the commit it saw
start ends (not the waits for store trouble that may follow: readers read meanwhile, up to
the usual bounds), so an event is never taken into a later batch than before. At the end
of a window the evaluator gives the readers it woke a few scheduler passes (``ROUNDS``) to
hand their frames over before it takes them, so they join that same batch unless they are
held up by a bound (then the next batch takes them). Only the evaluator opens and closes;
readers only wait.
"""

from __future__ import annotations

from typing import Final

import trio

ROUNDS: Final = 4
"""Scheduler passes the evaluator gives woken readers: one to wake, one inside the read,
one to hand the frames over, one to spare (TLS)."""


class ReadPacing:
    """The evaluator's linger window, as the connection readers see it."""

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

    async def close(self) -> None:
        """The evaluator stops waiting, or its commit is over: wake the readers, and give
        them ``ROUNDS`` scheduler passes to hand over what they read (fewer when they are
        done), so it joins the batch the evaluator takes next."""
        closed, self._closed = self._closed, None
        if closed is None:
            return
        closed.set()
        for _ in range(ROUNDS):
            if self._resumed <= 0:
                break
            await trio.lowlevel.checkpoint()
        self._resumed = 0  # the late ones join the next batch

    async def hold(self) -> bool:
        """For a reader that handed its frames over: if the evaluator is lingering, wait
        until the window closes, and return True (then call ``handed_over`` once the
        next read's frames are handed over)."""
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
