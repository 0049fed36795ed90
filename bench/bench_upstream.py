"""`[upstream]` forward rate beside Prefect's own ingest rate, to the same local Prefect server.

    .venv/bin/python bench/bench_upstream.py                  # 5,000 events, 2 rounds
    .venv/bin/python bench/bench_upstream.py --events 20000 --rounds 2   # docs/PERFORMANCE.md

Set-up: a real Prefect server (`prefect server start`, SQLite, from `.venv-prefect`, as the
tests start it: tests/support/prefect_server.py) on 127.0.0.1. Each round, alternating:

1. trigd forward: a fresh trigd database is filled with N events (sent to a trigd without
   `[upstream]`); then trigd starts with `[upstream] url` set and forwards them all from
   its cursor, in pages of `page_events` (500), each confirmed with a ping. Measured from
   the first move of the cursor (start-up and the first page left out) to the cursor
   reaching the last event (read from the database), with the CPU seconds of trigd and of
   the Prefect server's processes over that time.
2. Prefect client: `PrefectEventsClient` (bench/prefect_emit.py, in Prefect's virtualenv)
   emits N events of the same shape, checkpointing every 500, then a last checkpoint.
   Measured from its first emit to its last pong, with its own CPU and the server's.

3. trigd ingest: N events committed from one client (frames of 500, a ping after each),
   once without `[upstream]` and once while the forwarder sends them on: the cost of
   forwarding to ingest (wall time: both share the machine with the Prefect server).

Both paths end at the same place (Prefect's `/events/in`, confirmed by a pong), so the
server's own ingest is what bounds either; the CPU columns show who spends what. CPU times
are read from /proc (utime + stime of every process of the server's session).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import apsw
import pytest
import trio

ROOT: Final = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.ingest_client import connect, event_dict  # noqa: E402
from tests.support.prefect_server import AUTH_STRING, PrefectServer  # noqa: E402

EMIT: Final = Path(__file__).resolve().parent / "prefect_emit.py"
PAGE: Final = 500
FRAME_EVENTS: Final = 500  # events per frame when filling trigd's database (a JSON array)
TICK: Final = os.sysconf("SC_CLK_TCK")


def session_cpu(sid: int) -> float:
    """CPU seconds (user + system) of every live process in session `sid`."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after the name: state ppid pgrp session ...
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def write_config(directory: Path, upstream: str | None) -> Path:
    lines = [
        "[server]",
        'listen = "127.0.0.1:0"',
        "queue_depth = 5000",
        "[store]",
        f'path = "{directory / "trigd.db"}"',
        "[log]",
        'level = "WARNING"',
    ]
    if upstream:
        lines += ["[upstream]", f'url = "{upstream}"', f'auth_string = "{AUTH_STRING}"']
        lines += [f"page_events = {PAGE}"]
    path = directory / "trigd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def daemon(config: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """trigd serve, its process and port (read from its listening line)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "daemon", "serve", "--config", str(config), "--log-level", "INFO"],
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stderr is not None
    port = 0
    for raw in process.stderr:
        line = raw.decode()
        if "trigd listening on" in line:
            port = int(line.rsplit(":", 1)[1])
            break
    try:
        yield process, port
    finally:
        process.terminate()
        process.wait(timeout=30)


async def fill(port: int, count: int) -> None:
    async with connect(f"ws://127.0.0.1:{port}/api/events/in") as ws:
        for start in range(0, count, FRAME_EVENTS):
            frame = [
                event_dict(resource={"prefect.resource.id": f"pump.{i % 1000}", "site": "north"})
                for i in range(start, min(count, start + FRAME_EVENTS))
            ]
            await ws.send_message(json.dumps(frame))
            await ws.ping()


def cursor_and_last(db: Path) -> tuple[int, int]:
    conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'upstream_forwarded'").fetchone()
        last = conn.execute("SELECT max(rowid) FROM events").fetchone()
        return (int(row[0]) if row else 0), int(last[0] if last and last[0] else 0)
    finally:
        conn.close()


def ingest_round(server: PrefectServer, count: int, work: Path, upstream: bool) -> float:
    """Events/s trigd commits from one client, with forwarding running or not."""
    work.mkdir()
    with daemon(write_config(work, server.api_url if upstream else None)) as (_, port):
        start = time.perf_counter()
        trio.run(fill, port, count)
        return count / (time.perf_counter() - start)


def trigd_round(server: PrefectServer, count: int, work: Path) -> dict[str, float]:
    work.mkdir()
    with daemon(write_config(work, None)) as (_, port):
        trio.run(fill, port, count)
    db = work / "trigd.db"
    server_sid = os.getsid(server.process.pid) if server.process else 0
    with daemon(write_config(work, server.api_url)) as (process, _):
        while (first := cursor_and_last(db))[0] == 0:  # start-up is not forwarding
            time.sleep(0.005)
        server0, trigd0 = session_cpu(server_sid), process_cpu(process.pid)
        start = time.perf_counter()
        while True:
            cursor, last = cursor_and_last(db)
            if cursor >= last:
                break
            time.sleep(0.005)
        elapsed = time.perf_counter() - start
        trigd_cpu = process_cpu(process.pid) - trigd0
    forwarded = last - first[0]
    return {
        "seconds": elapsed,
        "events_per_s": forwarded / elapsed,
        "client_cpu": trigd_cpu,
        "server_cpu": session_cpu(server_sid) - server0,
    }


def prefect_round(server: PrefectServer, count: int) -> dict[str, float]:
    server_sid = os.getsid(server.process.pid) if server.process else 0
    server0 = session_cpu(server_sid)
    ran = subprocess.run(
        [str(server.python()), str(EMIT), str(count), str(PAGE)],
        env=server.env(),
        cwd=server.home,
        capture_output=True,
        check=True,
    )
    report = json.loads(ran.stdout.decode().strip().splitlines()[-1])
    return {
        "seconds": report["seconds"],
        "events_per_s": count / report["seconds"],
        "client_cpu": report["cpu"],
        "server_cpu": session_cpu(server_sid) - server0,
    }


def show(name: str, result: dict[str, float], count: int) -> None:
    print(
        f"{name:<16} {result['events_per_s']:8.0f} events/s  ({result['seconds']:.2f} s)  "
        f"client CPU {1e6 * result['client_cpu'] / count:6.0f} µs/event  "
        f"server CPU {1e6 * result['server_cpu'] / count:6.0f} µs/event",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-upstream-") as tmp:
        server = PrefectServer(Path(tmp) / "prefect")
        try:
            server.start()
        except pytest.skip.Exception as skipped:  # Prefect could not be installed
            print(f"skipped: {skipped}")
            return
        try:
            print(f"{args.events} events to a local Prefect server, per round:")
            for round_ in range(args.rounds):
                show(
                    "trigd forward",
                    trigd_round(server, args.events, Path(tmp) / f"t{round_}"),
                    args.events,
                )
                show("Prefect client", prefect_round(server, args.events), args.events)
                off = ingest_round(server, args.events, Path(tmp) / f"off{round_}", False)
                on = ingest_round(server, args.events, Path(tmp) / f"on{round_}", True)
                print(
                    f"trigd ingest     {off:8.0f} events/s without [upstream], "
                    f"{on:.0f} while forwarding them",
                    flush=True,
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
