"""Entry point of the single-file executable built by ``make binary``; same as ``trigd``.

A PyInstaller onefile executable runs as two processes: the bootloader, which unpacks the
bundle into ``$TMPDIR``, forwards signals and returns the exit code, and its child, the
Python interpreter running trigd. Under systemd the bootloader is the unit's main PID, so
``WATCHDOG_PID`` names our parent and `daemon.runtime.systemd.Notifier` would ignore the watchdog
(which then kills the service). The unit sets ``NotifyAccess=all``; here the child adopts
the watchdog when it was addressed to the bootloader.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping


def adopt_watchdog(env: MutableMapping[str, str], *, pid: int, parent_pid: int) -> bool:
    """Point ``WATCHDOG_PID`` at this process when systemd addressed it to our bootloader."""
    if env.get("WATCHDOG_PID") != str(parent_pid):
        return False
    env["WATCHDOG_PID"] = str(pid)
    return True


def run() -> int:
    if getattr(sys, "frozen", False):
        adopt_watchdog(os.environ, pid=os.getpid(), parent_pid=os.getppid())
    from daemon.cli.main import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
