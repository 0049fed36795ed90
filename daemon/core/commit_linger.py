"""How long the evaluator waits for more events before committing a batch (the linger of
group commit, as Kafka's producer has ``linger.ms``).

Why: a transaction has a fixed cost (BEGIN, the engine's set-up, COMMIT with its WAL write
and fsync, two thread hand-offs) that dwarfs the work of one event. Events arriving one at
a time, each in a transaction of its own, cost many times what the same events cost in a
flood. Waiting a few milliseconds after a batch's first event lets the next ones join it.

The wait is bounded and adaptive, so it never costs much latency nor lengthens a flood:

* at most ``window`` after the batch's first event arrived;
* no wait once the batch (with what is queued) holds ``enough`` events, or ``batch_max``:
  the fixed cost is already shared, and more waiting only adds latency;
* under load, shorter: the window shrinks in proportion to the last batch's size, to nothing
  once that batch held ``enough`` events, because then the queue that builds up during each
  COMMIT already makes the batches;
* shorter by the time the last commit took, and none after one that took the whole window
  or longer (a batch of many firings, say): the events read when it ends may have arrived
  as it began, so they have waited that long already. The window bounds the wait an event
  can see, not only the sleep.

Pure: times are plain seconds on whatever clock the caller uses (trio's, in the runtime).
"""

from __future__ import annotations

import attrs


def _non_negative(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative, got {value}")


def _at_least_one(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


@attrs.frozen
class CommitLinger:
    """The evaluator's linger settings: ``window`` seconds at most, until ``enough`` events
    (and never past ``batch_max``). A window of 0 turns lingering off."""

    window: float = attrs.field(validator=_non_negative)
    enough: int = attrs.field(validator=_at_least_one)
    batch_max: int = attrs.field(validator=_at_least_one)

    def lingers_after(self, last_batch: int, last_commit: float = 0.0) -> bool:
        """Whether the batch after one of ``last_batch`` events, whose commit took
        ``last_commit`` seconds, will wait for more (unless it holds enough at once): then
        whatever arrives as it starts joins it anyway."""
        return (
            self.window > 0
            and last_batch < min(self.enough, self.batch_max)
            and last_commit < self.window
        )

    def wait(
        self,
        *,
        batch: int,
        queued: int,
        last_batch: int,
        first_at: float,
        now: float,
        last_commit: float = 0.0,
    ) -> float:
        """Seconds still to wait for more events before committing a batch of ``batch``
        events, with ``queued`` more waiting to be taken, whose first event was taken at
        ``first_at``; ``last_batch`` is the size of the batch committed before it, and
        ``last_commit`` the seconds its commit took. 0: commit now."""
        target = min(self.enough, self.batch_max)
        if batch + queued >= target:
            return 0.0
        # nothing once last_batch >= target; less what the events have waited already,
        # so nothing once last_commit >= window
        window = self.window * (1 - last_batch / target) - last_commit
        # what is left of it, never more than the window (the sum may round past it)
        return max(0.0, min(window, first_at + window - now))
