"""Rate limits for log lines that one event (or one batch) can cause.

A client can send events that fail one after the other; a line per event, with a
traceback of a few KB each, would let it fill the journal and drown every other line.
A ``LogThrottle`` lets the first ``burst`` lines of its kind through in each ``window``,
counts the rest, and reports that count with the first line of a later window (a count
is therefore logged only once another line of its kind comes). Sans-IO: the caller passes
``now``, any monotonic clock in seconds.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import attrs


@attrs.frozen
class LogLimits:
    """How many lines of one kind (`burst`) each `window` of seconds lets through: the
    ``[log]`` settings, shared by every task that logs what a client's input causes."""

    burst: int = 5
    window: float = 60.0

    def throttle(self, logger: logging.Logger, what: str) -> LogThrottle:
        return LogThrottle(logger, what, self.burst, self.window)


DEFAULT_LIMITS: Final = LogLimits()


@attrs.define
class LogThrottle:
    """At most `burst` lines of one kind (`what`) per `window` seconds."""

    logger: logging.Logger
    what: str  # names the kind of line in the report of suppressed ones
    burst: int
    window: float
    _window_start: float | None = None
    _logged: int = 0
    _suppressed: int = 0

    def log(self, now: float, level: int, msg: str, *args: object, exc_info: Any = None) -> bool:
        """Log `msg % args` unless this window's burst is spent; whether it was logged."""
        start = self._window_start
        if start is None or now - start >= self.window:
            if start is not None and self._suppressed:
                self.logger.log(
                    level,
                    "%d lines left out in the last %.3gs (at most %d per %.3gs): %s",
                    self._suppressed,
                    now - start,
                    self.burst,
                    self.window,
                    self.what,
                )
            self._window_start = now
            self._logged = 0
            self._suppressed = 0
        if self._logged >= self.burst:
            self._suppressed += 1
            return False
        self._logged += 1
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True
