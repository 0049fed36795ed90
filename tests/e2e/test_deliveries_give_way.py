"""A real `trigd serve` gives way to its clients' acks (docs/DELIVERY.md#giving-way-to-acks):
while events arrive, its sender keeps `concurrency_while_ingesting` webhooks in flight,
not `concurrency`. Here `ingest_quiet_after` is an hour, so one event keeps the daemon
"busy" for the whole test; the receiver holds every request but the first open."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Final

import apsw
import pytest
import trio

from daemon.cli.emit import emit
from tests.support.daemon_process import running_daemon, write_automations, write_config
from tests.support.webhook_receiver import Receiver, Reply, Request, run_receiver

pytestmark = pytest.mark.slow

FIRINGS: Final = 6  # webhooks of the second event, all to one endpoint
LIMIT: Final = 30  # seconds for the whole test


def automation(name: str, url: str, expect: str) -> dict[str, Any]:
    return {
        "name": name,
        "trigger": {
            "type": "event",
            "expect": [expect],
            "posture": "Reactive",
            "threshold": 1,
            "within": 0,
        },
        "actions": [{"type": "call-webhook", "url": url}],
    }


def statuses(db: Path) -> Counter[str]:
    conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return Counter(str(status) for (status,) in conn.execute("SELECT status FROM outbox"))
    finally:
        conn.close()


async def until(condition: Any) -> None:
    """Poll: the database is written by the daemon's process, which signals nothing."""
    while not condition():  # noqa: ASYNC110
        await trio.sleep(0.02)


async def test_webhooks_go_out_two_at_a_time_while_clients_send_events(tmp_path: Path) -> None:
    held = 0
    release = trio.Event()
    changed = trio.Event()

    async def handler(request: Request) -> Reply:
        nonlocal held, changed
        if b"warm-up" not in request.body:
            held += 1
            changed.set()
            changed = trio.Event()
            await release.wait()
        return Reply(200)

    db = tmp_path / "trigd.db"
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            receiver: Receiver = await nursery.start(run_receiver, handler)
            automations = write_automations(
                tmp_path,
                [automation("warm-up", receiver.url(), "give.warm")]
                + [automation(f"burst {i}", receiver.url(), "give.burst") for i in range(FIRINGS)],
            )
            config = write_config(
                tmp_path,
                [automations],
                delivery={
                    "concurrency": FIRINGS,
                    "per_endpoint_concurrency": FIRINGS,
                    "concurrency_while_ingesting": 2,
                    "ingest_quiet_after": "1h",
                },
            )
            async with running_daemon(config) as daemon:
                warm = {"event": "give.warm", "resource": {"prefect.resource.id": "w"}}
                assert await emit(daemon.url, None, [("warm", warm)]) == (1, [])
                # answered: the endpoint is trusted, with a window of FIRINGS
                await until(lambda: statuses(db)["delivered"] == 1)

                burst = {"event": "give.burst", "resource": {"prefect.resource.id": "b"}}
                assert await emit(daemon.url, None, [("burst", burst)]) == (1, [])
                while held < 2:
                    await changed.wait()
                assert statuses(db) == Counter(delivered=1, in_flight=2, pending=FIRINGS - 2)
                assert held == 2

                release.set()  # still two at a time, to the end
                await until(lambda: statuses(db)["delivered"] == 1 + FIRINGS)
                assert held == FIRINGS
                assert await daemon.stop() == 0, daemon.log
            nursery.cancel_scope.cancel()
