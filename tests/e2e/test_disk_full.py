"""Disk full, for real: the database on a small tmpfs that a filler file fills up.

What trigd promises when its disk fills (and what these tests hold it to): it stays up,
stops acknowledging (an ack always means committed), logs the cause once, keeps what it
has, and once space is freed acknowledges the events that waited, each stored once. A
daemon started on a full disk waits for space instead of exiting. (Splitting a batch that
only partly fits is shown deterministically in test_evaluator.py, with SQLite's page cap.)

Mounting needs root; where it cannot be done the tests are skipped, saying why.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Final

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from store.db import Store
from tests.support.daemon_process import Daemon, running_daemon, write_config

pytestmark = pytest.mark.slow

FS_KIB: Final = 8192  # the small filesystem: room for the database and its WAL, then filler
EVIDENCE_WAIT: Final = 1.5  # seconds a test watches for an ack that must not come


@contextmanager
def small_filesystem(where: Path, kib: int = FS_KIB) -> Iterator[Path]:
    """A tmpfs of `kib` KiB mounted at `where`, unmounted after (skip if it cannot be)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kib}k,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path) -> Path:
    """Write a filler file until the filesystem has not one byte left."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler


def free(filler: Path, kib: int) -> None:
    os.truncate(filler, max(0, filler.stat().st_size - kib * 1024))


def event(number: int) -> dict[str, object]:
    """An event with a payload of a few KB, so that each one needs room of its own."""
    return {
        "id": str(uuid.uuid4()),
        "event": "pump.pressure.high",
        "resource": {"prefect.resource.id": f"pump.{number}"},
        "payload": {"reading": "x" * 3000},
    }


@asynccontextmanager
async def trigd_v1(url: str) -> AsyncIterator[WebSocketConnection]:
    async with open_websocket_url(url, subprotocols=["trigd.v1"]) as ws:
        await ws.send_message(json.dumps({"type": "auth", "token": None}))
        assert json.loads(await ws.get_message())["type"] == "auth_success"
        yield ws


async def replies(ws: WebSocketConnection, count: int) -> list[dict[str, str]]:
    return [json.loads(await ws.get_message()) for _ in range(count)]


def stored(db: Path) -> dict[str, int]:
    """Event id -> how many times it is in the database (read as `trigd status` would)."""
    reader = Store.open_readonly(db)
    try:
        rows = reader.conn.execute("SELECT id, count(*) FROM events GROUP BY id")
        return {str(event_id): int(n) for event_id, n in rows}
    finally:
        reader.close()


async def test_a_full_disk_holds_acks_until_space_is_freed(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "fs") as fs, trio.fail_after(50):
        db = fs / "trigd.db"
        config = write_config(tmp_path, store={"path": str(db)})
        async with running_daemon(config) as daemon:
            await hold_and_recover(daemon, fs, db)
            assert daemon.log.count("store trouble while committing received events") == 1
            assert await daemon.stop() == 0


async def hold_and_recover(daemon: Daemon, fs: Path, db: Path) -> None:
    """Acked events, then a full disk: events sent are not acked; then room again."""
    async with trigd_v1(daemon.url) as ws:
        before = [event(n) for n in range(5)]
        for item in before:
            await ws.send_message(json.dumps(item))
        assert await replies(ws, 5) == [{"type": "ack", "id": e["id"]} for e in before]

        filler = fill(fs)
        waiting = [event(n) for n in range(20)]
        for item in waiting:
            await ws.send_message(json.dumps(item))
        await daemon.wait_for_log("store trouble while committing received events")
        assert "FullError: database or disk is full" in daemon.log
        with trio.move_on_after(EVIDENCE_WAIT):
            early = await ws.get_message()
            pytest.fail(f"acknowledged while the disk is full: {early!r}")
        assert daemon.process.poll() is None
        assert not stored(db).keys() & {e["id"] for e in waiting}

        free(filler, 2048)
        assert await replies(ws, 20) == [{"type": "ack", "id": e["id"]} for e in waiting]
        counts = stored(db)
        assert {e["id"]: counts.get(str(e["id"])) for e in before + waiting} == {
            e["id"]: 1 for e in before + waiting
        }
        await daemon.wait_for_log("store trouble over: committing received events")


@pytest.mark.parametrize("database", ["new", "existing"])
async def test_start_up_on_a_full_disk_waits_for_space(tmp_path: Path, database: str) -> None:
    """It used to exit 1 with a traceback (FullError from the PRAGMA the connection runs
    as it opens; a new database cannot even write its lock file)."""
    with small_filesystem(tmp_path / "fs") as fs, trio.fail_after(50):
        db = fs / "trigd.db"
        if database == "existing":
            Store.open(db).close()
        filler = fill(fs)
        config = write_config(tmp_path, store={"path": str(db)})
        notify = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
        await notify.bind(str(tmp_path / "notify"))
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify")}
        async with running_daemon(config, env=env, wait_ready=False) as daemon:
            await daemon.wait_for_log("store trouble while opening the database")
            # systemd is asked for more time than TimeoutStartSec instead of restarting it
            extend = (await notify.recv(4096)).decode()
            assert extend.startswith("EXTEND_TIMEOUT_USEC=")
            assert int(extend.partition("=")[2]) > 30_000_000
            with trio.move_on_after(EVIDENCE_WAIT):
                await daemon.ready.wait()
            assert not daemon.ready.is_set()
            assert daemon.process.poll() is None
            filler.unlink()
            await daemon.ready.wait()
            while (message := await notify.recv(4096)) != b"READY=1":
                assert message.startswith(b"EXTEND_TIMEOUT_USEC=")
            await daemon.wait_for_log("store trouble over: opening the database went through")
            async with trigd_v1(daemon.url) as ws:
                item = event(1)
                await ws.send_message(json.dumps(item))
                assert await replies(ws, 1) == [{"type": "ack", "id": item["id"]}]
            assert daemon.log.count("store trouble while opening the database") == 1
            assert "Traceback" not in daemon.log
            assert await daemon.stop() == 0
        notify.close()
        assert stored(db) == {item["id"]: 1}
