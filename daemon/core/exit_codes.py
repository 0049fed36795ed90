"""The exit codes of every ``trigd`` command, in one place."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """What a ``trigd`` command returns to its caller (the shell, systemd)."""

    OK = 0
    """The work asked was done (``check``: every file is valid)."""
    FAILURE = 1
    """The work asked failed: an invalid file, a store that cannot be opened, a rejected
    event, a setting that failed for now (the port is taken) and may work on a retry."""
    USAGE = 2
    """Bad usage or bad configuration; the message names the key or flag and why."""
    INTERRUPTED = 130
    """``serve`` was interrupted a second time while stopping (128 + SIGINT)."""
