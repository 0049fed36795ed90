"""sd_notify: READY=1 after start, watchdog pings only while the store answers, STOPPING=1."""

from __future__ import annotations

import signal
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio

from daemon.runtime.systemd import Notifier
from tests.support.daemon_process import running_daemon, write_config


@attrs.frozen
class NotifySocket:
    """What systemd listens on: a datagram socket named by $NOTIFY_SOCKET."""

    sock: trio.socket.SocketType
    path: str

    async def next(self) -> bytes:
        return await self.sock.recv(100)


@pytest.fixture
async def notify() -> AsyncIterator[NotifySocket]:
    # AF_UNIX paths are short: keep the socket near the root of /tmp
    path = Path(tempfile.mkdtemp(prefix="trigd-")) / "notify"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(path))
    yield NotifySocket(sock, str(path))
    sock.close()
    path.unlink(missing_ok=True)
    path.parent.rmdir()


async def test_no_socket_means_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    await notifier.notify("READY=1")  # must not raise
    with trio.fail_after(1):
        await notifier.run_watchdog(trio.lowlevel.checkpoint)  # returns at once


async def test_watchdog_pings_only_while_the_probe_answers(
    notify: NotifySocket, autojump_clock: object
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000"})
    assert notifier.watchdog_interval is not None
    assert notifier.watchdog_interval.total_seconds() == 1  # half of what systemd asked
    healthy = True

    async def probe() -> None:
        if not healthy:
            await trio.sleep_forever()

    pings: list[float] = []
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(notifier.run_watchdog, probe)
            while len(pings) < 3:
                message = await notify.next()
                assert message == b"WATCHDOG=1"
                pings.append(trio.current_time())
            healthy = False
            with trio.move_on_after(10):
                await notify.next()
                pytest.fail("a ping was sent while the store did not answer")
            healthy = True
            assert await notify.next() == b"WATCHDOG=1"
            nursery.cancel_scope.cancel()
    assert pings == [0, 1, 2]


async def test_watchdog_for_another_pid_is_not_ours() -> None:
    notifier = Notifier(
        {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    )
    assert notifier.watchdog_interval is None


@pytest.mark.slow
async def test_daemon_reports_ready_watchdog_and_stopping(
    tmp_path: Path, notify: NotifySocket
) -> None:
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"}
    with trio.fail_after(60):
        async with running_daemon(write_config(tmp_path), env=env) as daemon:
            messages = [await notify.next()]
            assert messages == [b"READY=1"]
            assert "trigd listening on" in daemon.log  # READY=1 came after the server was up
            assert await notify.next() == b"WATCHDOG=1"
            daemon.send(signal.SIGTERM)
            while (message := await notify.next()) == b"WATCHDOG=1":
                pass
            assert message == b"STOPPING=1"
            assert await daemon.process.wait() == 0  # the one SIGTERM was enough
