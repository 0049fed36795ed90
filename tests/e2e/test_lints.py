"""`trigd serve` logs lints (docs/TRIGGERS.md#lints) at WARNING on load and on reload, and
loads the automation all the same."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

from tests.support.daemon_process import running_daemon, write_automations, write_config

pytestmark = pytest.mark.slow

WARNING = (
    "WARNING trigd: automation 'pump silent': trigger.for_each: "
    "Proactive with for_each and no after"
)


async def test_serve_logs_lints_at_warning_on_load_and_reload(tmp_path: Path) -> None:
    silent = {
        "name": "pump silent",
        "trigger": {
            "type": "event",
            "expect": ["pump.heartbeat"],
            "for_each": ["prefect.resource.id"],
            "posture": "Proactive",
            "within": 60,
        },
        "actions": [{"type": "do-nothing"}],
    }
    automations = write_automations(tmp_path, [silent])
    with trio.fail_after(60):
        async with running_daemon(write_config(tmp_path, [automations])) as daemon:
            await daemon.wait_for_log(WARNING)
            assert daemon.log.count(WARNING) == 1
            daemon.send(signal.SIGHUP)
            await daemon.wait_for_log("reloaded 1 automations")
            assert daemon.log.count(WARNING) == 2
            silent["trigger"]["after"] = ["pump.heartbeat"]  # type: ignore[index]
            write_automations(tmp_path, [silent, {**silent, "name": "pump quiet"}])
            daemon.send(signal.SIGHUP)
            await daemon.wait_for_log("reloaded 2 automations")
            assert daemon.log.count(WARNING) == 2
            assert await daemon.stop() == 0
