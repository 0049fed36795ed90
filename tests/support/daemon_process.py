"""Running the real daemon as a subprocess, for end-to-end tests.

The daemon listens on 127.0.0.1 port 0 and logs ``trigd listening on ws://HOST:PORT``;
the port is read from its stderr. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import trio

LISTENING = re.compile(rb"trigd listening on (wss?)://([^\s:]+|\[[^\]]+\]):(\d+)")


def write_config(directory: Path, automations: Sequence[Path] = (), **sections: Any) -> Path:
    """A TOML config for a test daemon: port 0, a database in `directory`, fast sweeps."""
    values: dict[str, dict[str, Any]] = {
        "server": {"listen": "127.0.0.1:0"},
        "store": {"path": str(directory / "trigd.db"), "synchronous": "normal"},
        "triggers": {
            "automations": [str(p) for p in automations],
            "proactive_granularity": "1s",
        },
        "delivery": {"timeout": "5s"},
    }
    for section, overrides in sections.items():
        values.setdefault(section, {}).update(overrides)
    lines: list[str] = []
    for section, keys in values.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    path = directory / "trigd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


SECRET: Final = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


BURST_PAYLOAD: Final = '{"text": "{{ automation.name }}: {{ event.resource.id }}"}'


def burst_automation(
    url: str,
    *,
    name: str = "pump pressure burst",
    expect: str = "pump.pressure.high",
    threshold: int = 3,
    within: int = 60,
    payload: str | None = BURST_PAYLOAD,
    secret: str | None = SECRET,
) -> dict[str, Any]:
    """A reactive per-pump automation calling a webhook at `url` (payload or secret None:
    the action has no such key)."""
    action: dict[str, Any] = {"type": "call-webhook", "url": url}
    if payload is not None:
        action["payload"] = payload
    if secret is not None:
        action["secret"] = secret
    return {
        "name": name,
        "trigger": {
            "type": "event",
            "match": {"prefect.resource.id": "pump.*"},
            "expect": [expect],
            "for_each": ["prefect.resource.id"],
            "posture": "Reactive",
            "threshold": threshold,
            "within": within,
        },
        "actions": [action],
    }


def pressure(pump: str = "pump.7") -> str:
    """One `pump.pressure.high` event of this pump, as a line of JSON."""
    return json.dumps({"event": "pump.pressure.high", "resource": {"prefect.resource.id": pump}})


def write_automations(directory: Path, automations: list[dict[str, Any]]) -> Path:
    path = directory / "automations.json"
    path.write_text(json.dumps(automations, indent=2))
    return path


class Daemon:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stderr = bytearray()
        self.port = 0
        self.ready = trio.Event()
        self._output = trio.Event()  # set (and replaced) whenever stderr grows
        self._closed = False  # stderr reached its end: the daemon exited

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/events/in"

    @property
    def log(self) -> str:
        return self.stderr.decode(errors="replace")

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.stderr += chunk
            self._output.set()
            self._output = trio.Event()
            if not self.ready.is_set():
                match = LISTENING.search(self.stderr)
                if match:
                    self.port = int(match.group(3))
                    self.ready.set()
        self._closed = True
        self._output.set()

    def send(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait_for_log(self, text: str) -> None:
        """Until `text` appears in the daemon's log (bound it with the test's fail_after);
        AssertionError, with the log, if the daemon exits first."""
        while text not in self.log:
            if self._closed:
                raise AssertionError(f"trigd exited without logging {text!r}:\n{self.log}")
            await self._output.wait()

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        """Signal the daemon and wait (at most 15 s) for it to exit; returns its code."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        with trio.fail_after(15):
            return await self.process.wait()


TRIGD: Final = (sys.executable, "-m", "daemon")


async def run_trigd(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """One `trigd` command (not `serve`) as a user runs it: its output and exit code."""
    return await trio.run_process(
        [*TRIGD, *args],
        stdin=stdin.encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, **(env or {})},
    )


"""How `running_daemon` runs trigd by default: this checkout, with the test interpreter."""


@asynccontextmanager
async def running_daemon(
    config: Path,
    *args: str,
    env: dict[str, str] | None = None,
    start_timeout: float = 30,
    command: Sequence[str] = TRIGD,
    wait_ready: bool = True,
) -> AsyncIterator[Daemon]:
    """Start `trigd serve --config config`, trigd being `command` (the built executable,
    say); on exit SIGKILL it if it still runs. `wait_ready=False`: at once, before it
    listens (`daemon.ready` is set when it does)."""
    process = await trio.lowlevel.open_process(
        [*command, "serve", "--config", str(config), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    daemon = Daemon(process)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon._read_stderr)
        try:
            with trio.fail_after(start_timeout):
                while wait_ready and not daemon.ready.is_set():
                    if process.poll() is not None:
                        raise RuntimeError(f"trigd exited early:\n{daemon.log}")
                    with trio.move_on_after(0.05):
                        await daemon.ready.wait()
            yield daemon
        finally:
            if process.poll() is None:
                process.kill()
            with trio.move_on_after(10):
                await process.wait()
            nursery.cancel_scope.cancel()


def database_bytes(directory: Path) -> bytes:
    """The database, its -wal and -shm as they are on disk."""
    return b"".join(p.read_bytes() for p in sorted(directory.glob("trigd.db*")))
