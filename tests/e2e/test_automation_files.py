"""Automation files as `trigd serve` reads them (docs/TRIGGERS.md#automations-and-ids):
strict keys, Prefect's `automations:` wrapper, durations in `within`. Real processes on
127.0.0.1; every wait bounded."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import trio
import yaml

from tests.support.daemon_process import (
    SECRET,
    burst_automation,
    pressure,
    running_daemon,
    write_config,
)
from tests.support.webhook_receiver import Receiver, answer, run_receiver

pytestmark = pytest.mark.slow


def prefect_file(path: Path, url: str, **trigger: object) -> Path:
    """A YAML file as `prefect automation create --from-file` takes it."""
    automation = burst_automation(url, threshold=1)
    automation["trigger"].update(trigger)
    path.write_text(yaml.safe_dump({"automations": [automation]}, sort_keys=False))
    return path


async def emit(url: str, pump: str = "pump.7") -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "daemon", "emit", "--url", url],
        stdin=(pressure(pump) + "\n").encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


async def test_serve_refuses_a_misspelt_key_naming_file_line_and_suggestion(
    tmp_path: Path,
) -> None:
    automations = prefect_file(tmp_path / "a.yaml", "https://hooks.example.com/in")
    automations.write_text(automations.read_text().replace("expect:", "expcet:"))
    config = write_config(tmp_path, [automations])
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-m", "daemon", "serve", "--config", str(config)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    line = automations.read_text().splitlines().index("    expcet:") + 1
    assert (
        f"{automations}:{line}: automation 'pump pressure burst': trigger.expcet: unknown key "
        "(did you mean 'expect'?)"
    ) in stderr
    assert SECRET not in stderr


async def test_serve_runs_a_prefect_file_and_refuses_a_typo_on_reload(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            receiver: Receiver = await nursery.start(run_receiver, answer(200))
            automations = prefect_file(tmp_path / "a.yaml", receiver.url("/first"), within="1h30m")
            async with running_daemon(write_config(tmp_path, [automations])) as daemon:
                await emit(daemon.url)
                assert (await receiver.next_request()).target == "/first"
                broken = prefect_file(tmp_path / "a.yaml", receiver.url("/second"), within="5m")
                broken.write_text(broken.read_text().replace("posture:", "postrue:"))
                daemon.send(signal.SIGHUP)
                await daemon.wait_for_log("reload refused")
                assert "trigger.postrue: unknown key (did you mean 'posture'?)" in daemon.log
                assert SECRET not in daemon.log
                prefect_file(tmp_path / "a.yaml", receiver.url("/second"), within="5m")
                daemon.send(signal.SIGHUP)
                await daemon.wait_for_log("reloaded 1 automations")
                await emit(daemon.url, "pump.8")
                assert (await receiver.next_request()).target == "/second"
                assert await daemon.stop() == 0
            assert [r.target for r in receiver.requests] == ["/first", "/second"]
            nursery.cancel_scope.cancel()
