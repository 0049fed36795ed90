"""The two pieces of systemd's service protocol trigd speaks: readiness and the watchdog.

sd_notify is one datagram to the socket named by ``$NOTIFY_SOCKET``; the maintained
Python packages for it are blocking and unmaintained, so it is these few lines on trio.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta

import trio

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages; does nothing when not run under systemd."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        # "@name" is Linux's abstract namespace: the leading NUL is implied.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval: timedelta | None = (
            timedelta(microseconds=int(usec) / 2) if usec.isdigit() and mine else None
        )

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    async def notify(self, message: str) -> None:
        if not self._address:
            return
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
        try:
            with sock:
                await sock.sendto(message.encode(), self._address)
        except OSError as exc:  # systemd gone or socket unreadable: not worth dying for
            log.warning("sd_notify %r failed: %s", message, exc)

    async def run_watchdog(
        self,
        probe: Callable[[], Awaitable[object]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Ping at half the interval systemd asked for, but only while `probe` (a round trip
        through the store thread) completes within that half: a wedged writer gets the
        daemon restarted, an idle one does not."""
        task_status.started()
        if self.watchdog_interval is None or not self._address:
            return
        period = self.watchdog_interval.total_seconds()
        while True:
            with trio.move_on_after(period) as waited:
                await probe()
            if waited.cancelled_caught:
                log.warning("the store did not answer in %.3gs; withholding WATCHDOG=1", period)
            else:
                await self.notify("WATCHDOG=1")
                await trio.sleep(period)
