"""Store trouble: the store refusing work for now, as opposed to a bug
(docs/OPERATIONS.md#store-trouble).

Disk full, an I/O error, another process holding the write lock past the busy timeout:
none of these is a reason for the daemon to exit. Every task that writes waits such
trouble out with a ``Backoff``: the same work is tried again after an exponential delay
(``RETRY_FIRST_DELAY`` doubling up to ``RETRY_MAX_DELAY``), the cause is logged at error
level once when the trouble starts (again only if the cause changes, so an outage of hours
is not a line every ten seconds), and once more when the work goes through. Any other
exception is a bug and is the caller's to handle.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import apsw
import attrs
import trio

from store.db import StoreError

T = TypeVar("T")

RETRY_FIRST_DELAY: Final = 0.25  # seconds before the first retry of work the store refused
RETRY_MAX_DELAY: Final = 10.0  # seconds between retries at most, while the store stays down

STORE_TROUBLE: Final = (
    StoreError,
    apsw.FullError,
    apsw.IOError,
    apsw.BusyError,
    apsw.LockedError,
    apsw.ReadOnlyError,
    apsw.CantOpenError,
    apsw.CorruptError,
    apsw.NotADBError,
)
"""Exceptions that say the store cannot take writes now, as opposed to a bug."""


@attrs.define
class TroubleBoard:
    """Which Backoffs are waiting out store trouble now, and why: what ``/api/ready``
    reports. The service sets one in ``CURRENT_BOARD`` before it starts its tasks, so
    every Backoff they make reports to it without being handed it."""

    _causes: dict[int, str] = attrs.Factory(dict)

    def reasons(self) -> list[str]:
        return sorted(set(self._causes.values()))


CURRENT_BOARD: Final = contextvars.ContextVar[TroubleBoard | None]("trouble_board", default=None)


@attrs.define
class Backoff:
    """One task waiting out store trouble while doing `what` ("claiming due deliveries");
    reusable: `cleared` starts the next episode afresh."""

    logger: logging.Logger
    what: str
    # awaited before each sleep with its length in seconds (start-up tells systemd)
    on_wait: Callable[[float], Awaitable[None]] | None = None
    delay: float = RETRY_FIRST_DELAY
    retries: int = 0  # in the current episode
    _cause: str | None = None
    _since: float = 0.0

    async def wait(self, exc: BaseException) -> None:
        """The store refused the work with `exc`: log the cause unless it was logged
        already in this episode, then sleep before the next try."""
        cause = f"{type(exc).__name__}: {exc}"
        if self.retries == 0:
            self._since = trio.current_time()
        if cause != self._cause:
            self.logger.error(
                "store trouble while %s; retrying with backoff until it clears: %s",
                self.what,
                cause,
            )
            self._cause = cause
        board = CURRENT_BOARD.get()
        if board is not None:
            board._causes[id(self)] = f"the store refuses {self.what}: {cause}"
        self.retries += 1
        if self.on_wait is not None:
            await self.on_wait(self.delay)
        await trio.sleep(self.delay)
        self.delay = min(self.delay * 2, RETRY_MAX_DELAY)

    def cleared(self) -> None:
        """The work went through: say so if there was trouble, and reset."""
        board = CURRENT_BOARD.get()
        if board is not None:
            board._causes.pop(id(self), None)
        if self.retries:
            self.logger.warning(
                "store trouble over: %s went through after %d retries (%.3gs)",
                self.what,
                self.retries,
                trio.current_time() - self._since,
            )
        self.delay = RETRY_FIRST_DELAY
        self.retries = 0
        self._cause = None

    async def call(
        self,
        attempt: Callable[[], Awaitable[T]],
        retry_on: tuple[type[BaseException], ...] = STORE_TROUBLE,
    ) -> T:
        """`attempt()` until the store takes it (`retry_on`: what counts as store trouble
        here); any other exception propagates."""
        while True:
            try:
                result = await attempt()
            except retry_on as exc:
                await self.wait(exc)
                continue
            self.cleared()
            return result
