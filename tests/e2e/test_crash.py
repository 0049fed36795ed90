"""Crash safety (docs/OPERATIONS.md#durability) with real processes and SIGKILL.

1. A Prefect-like client streams a few thousand events — pump readings over several
   resources, `follows` chains delivered out of order, followers whose leader never comes —
   while the daemon is SIGKILLed and restarted 3-5 times on the same database. Afterwards
   every confirmed event is stored once, every bucket crossing fired once (with exactly the
   triggering event the semantics predict), every chain event and every lost follower was
   evaluated once, and nothing is left parked.
2. Deliveries survive a crash: firings made while the receiver refuses connections are
   delivered after a SIGKILL and restart, each with the `webhook-id` it had before, once;
   a delivery in flight at the kill is sent again with the same `webhook-id`.

The kill moments are random; the seed is in every failure message
(`CRASH_TEST_SEED=<seed>` replays it).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Final

import apsw
import attrs
import pytest
import trio
from standardwebhooks import Webhook

from tests.support.daemon_process import (
    SECRET,
    Daemon,
    burst_automation,
    running_daemon,
    write_automations,
    write_config,
)
from tests.support.resending_client import DaemonSlot, open_resending_client
from tests.support.webhook_receiver import Receiver, Reply, Request, answer, run_receiver

pytestmark = pytest.mark.slow

TOKEN: Final = "crash-test-token"
THRESHOLD: Final = 40  # pump readings that make a crossing
PUMPS: Final = 40
SIZES: Final = (THRESHOLD - 1, THRESHOLD, THRESHOLD + 1, THRESHOLD + 9, 2 * THRESHOLD)
WITHIN: Final = 86_400  # seconds: one window holds all of a pump's readings
CHAINS: Final = 50
CHAIN_LENGTH: Final = 4
ORPHANS: Final = 20  # followers of an event that is never sent
CHECKPOINT_EVERY: Final = 100  # events between pings, as Prefect's checkpoint_every
POLL: Final = 0.1  # seconds between looks at the database
LOOKBACK: Final = "2s"  # ordering.preceding_event_lookback: orphans are lost quickly


def _seed() -> int:
    return int(os.environ.get("CRASH_TEST_SEED", random.randrange(2**32)))


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _event(
    name: str,
    resource: str,
    occurred: datetime,
    follows: str | None = None,
    event_id: str | None = None,
) -> str:
    """An event exactly as Prefect's client serialises one (docs/PROTOCOL.md#event-format)."""
    return json.dumps(
        {
            "occurred": _iso(occurred),
            "event": name,
            "resource": {"prefect.resource.id": resource},
            "related": [],
            "payload": {},
            "id": event_id or str(uuid.uuid4()),
            "follows": follows,
        }
    )


@attrs.define
class Plan:
    """What the client sends, in order, and what must come of it."""

    stream: list[tuple[str, str]] = attrs.Factory(list)  # (id, JSON)
    crossings: list[str] = attrs.Factory(list)  # the reading that makes each crossing
    chain_ids: list[str] = attrs.Factory(list)  # every chain event, leaders included
    orphan_ids: list[str] = attrs.Factory(list)

    def add(self, document: str) -> str:
        event_id = str(json.loads(document)["id"])
        self.stream.append((event_id, document))
        return event_id


def make_plan(rng: random.Random, now: datetime) -> Plan:
    """Pump readings shuffled across pumps, `occurred` rising with the send order, with
    chain blocks (in shuffled order, so followers mostly come before their leaders) and
    orphans mixed in.

    Reactive, `for_each` pump, threshold N, within a day: a pump's first reading opens a
    window [t - lookback, t + 1 day); its N-th reading fires and closes it; the next window
    starts a day later, so later readings are ignored. A pump with k readings therefore
    fires exactly once, on its N-th reading, iff k >= N — provided its readings are
    evaluated in `occurred` order, which holds however often the client resends, because
    it resends in send order and duplicates are dropped.
    """
    plan = Plan()
    sizes = [SIZES[i % len(SIZES)] for i in range(PUMPS)]
    order = [f"pump.{p}" for p, size in enumerate(sizes) for _ in range(size)]
    rng.shuffle(order)
    blocks: dict[int, list[tuple[str, list[tuple[str, str | None]]]]] = {}
    for chain in range(CHAINS):
        ids = [str(uuid.uuid4()) for _ in range(CHAIN_LENGTH)]
        links = [(ids[i], ids[i - 1] if i else None) for i in range(CHAIN_LENGTH)]
        rng.shuffle(links)
        blocks.setdefault(rng.randrange(len(order) + 1), []).append((f"chain.{chain}", links))
    for orphan in range(ORPHANS):
        links = [(str(uuid.uuid4()), str(uuid.uuid4()))]
        blocks.setdefault(rng.randrange(len(order) + 1), []).append((f"orphan.{orphan}", links))
    start = now - timedelta(minutes=10)
    seen: Counter[str] = Counter()
    for position in range(len(order) + 1):
        moment = start + timedelta(milliseconds=position)
        for resource, links in blocks.get(position, []):
            kind = plan.orphan_ids if resource.startswith("orphan") else plan.chain_ids
            for step, (event_id, follows) in enumerate(links):
                occurred = moment + timedelta(microseconds=step + 1)
                plan.add(_event("chain.step", resource, occurred, follows, event_id))
                kind.append(event_id)
        if position < len(order):
            pump = order[position]
            event_id = plan.add(_event("pump.reading", pump, moment))
            seen[pump] += 1
            if seen[pump] == THRESHOLD:
                plan.crossings.append(event_id)
    return plan


def automations(url: str | None = None) -> list[dict[str, Any]]:
    action: dict[str, Any] = {"type": "do-nothing"}
    return [
        {
            "name": "pump crossings",
            "trigger": {
                "type": "event",
                "match": {"prefect.resource.id": "pump.*"},
                "expect": ["pump.reading"],
                "for_each": ["prefect.resource.id"],
                "posture": "Reactive",
                "threshold": THRESHOLD,
                "within": WITHIN,
            },
            "actions": [action],
        },
        {
            "name": "every chain step",
            "trigger": {
                "type": "event",
                "match": {"prefect.resource.id": ["chain.*", "orphan.*"]},
                "expect": ["chain.step"],
                "posture": "Reactive",
                "threshold": 1,
                "within": 0,
            },
            "actions": [action],
        },
    ]


# --- reading the database --------------------------------------------------------------


@contextmanager
def read_only(db: Path) -> Iterator[apsw.Connection]:
    conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    conn.set_busy_timeout(5_000)
    try:
        yield conn
    finally:
        conn.close()


def scalar(conn: apsw.Connection, sql: str, *args: Any) -> int:
    row = conn.execute(sql, args).fetchone()
    assert row is not None
    return int(row[0])


def automation_ids(conn: apsw.Connection) -> dict[str, str]:
    return {str(name): str(id_) for id_, name in conn.execute("SELECT id, name FROM automations")}


def firings_by_triggering_event(conn: apsw.Connection, automation_id: str) -> Counter[str]:
    """How many outbox rows (one per firing: one action each) each event triggered."""
    counts: Counter[str] = Counter()
    for (document,) in conn.execute(
        "SELECT document FROM outbox WHERE automation_id = ?", (automation_id,)
    ):
        triggered = json.loads(document)
        counts[str(triggered["firing"]["triggering_event"]["id"])] += 1
    return counts


def state_changes_by_triggering_event(conn: apsw.Connection, automation_id: str) -> Counter[str]:
    """`prefect.automation.triggered` events stored for this automation, by the event
    they name as triggering."""
    counts: Counter[str] = Counter()
    for (data,) in conn.execute(
        "SELECT data FROM events WHERE event = 'prefect.automation.triggered' AND resource_id = ?",
        (f"prefect.automation.{automation_id}",),
    ):
        event = json.loads(data)
        refs = [r for r in event["related"] if r["prefect.resource.role"] == "triggering-event"]
        assert len(refs) == 1, event
        counts[refs[0]["prefect.resource.id"].removeprefix("prefect.event.")] += 1
    return counts


def confirmed_but_not_stored(db: Path, confirmed: set[str]) -> set[str]:
    with read_only(db) as conn:
        stored = {str(row[0]) for row in conn.execute("SELECT id FROM events")}
    return confirmed - stored


def settled(db: Path) -> bool:
    """Nothing parked, nothing in the inbox, no delivery open, every firing's
    state-change event stored."""
    with read_only(db) as conn:
        return (
            scalar(conn, "SELECT count(*) FROM ordering_followers") == 0
            and scalar(conn, "SELECT count(*) FROM inbox") == 0
            and scalar(conn, "SELECT count(*) FROM outbox WHERE status != 'delivered'") == 0
            and scalar(conn, "SELECT count(*) FROM outbox") == state_changes(conn)
        )


def state_changes(conn: apsw.Connection) -> int:
    return scalar(conn, "SELECT count(*) FROM events WHERE event = 'prefect.automation.triggered'")


async def wait_until(what: str, predicate: Callable[[], bool], *, seconds: float = 30) -> None:
    """Poll the database, where there is no event to wait on, for at most `seconds`."""
    for _ in range(int(seconds / POLL)):
        if predicate():
            return
        await trio.sleep(POLL)
    raise AssertionError(f"not {what} after {seconds}s")


# --- 1. streaming through SIGKILLs -------------------------------------------------------


async def test_sigkills_lose_no_confirmed_event_and_fire_every_crossing_once(
    tmp_path: Path,
) -> None:
    seed = _seed()
    note = f"(CRASH_TEST_SEED={seed})"
    rng = random.Random(seed)
    plan = make_plan(rng, datetime.now(UTC))
    total = len(plan.stream)
    kills = rng.randint(3, 5)
    most = total // (kills + 1)
    # The stream may not run past `allowed` events: however slow a kill is (the client
    # goes on sending to a dying daemon), it cannot finish the stream before the last
    # kill, and every life has at least one event left to send, which reconnects it.
    allowed = 0
    raised = trio.Event()
    config = write_config(
        tmp_path,
        [write_automations(tmp_path, automations())],
        server={"auth_token": TOKEN},
        store={"synchronous": "full"},
        ordering={"preceding_event_lookback": LOOKBACK},
    )
    db = tmp_path / "trigd.db"
    slot = DaemonSlot()
    logs: list[str] = []
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            streamed = trio.Event()
            async with open_resending_client(
                slot, token=TOKEN, checkpoint_every=CHECKPOINT_EVERY
            ) as client:

                async def stream() -> None:
                    for sent, (event_id, document) in enumerate(plan.stream):
                        while sent >= allowed:
                            await raised.wait()
                        await client.emit(event_id, document)
                    await client.flush()
                    streamed.set()

                def allow(count: int) -> None:
                    nonlocal allowed, raised
                    allowed = count
                    raised.set()
                    raised = trio.Event()

                nursery.start_soon(stream)
                for life in range(kills + 1):
                    async with running_daemon(config) as daemon:
                        slot.up(daemon.url)
                        if life < kills:
                            ceiling = total - (kills - life)  # never the whole stream
                            target = min(client.emitted + rng.randint(100, most), ceiling)
                            allow(min(target + 2 * CHECKPOINT_EVERY, ceiling))
                            await client.wait_connected(slot.generation)
                            await client.wait_emitted(target)
                            await trio.sleep(rng.uniform(0, 0.05))  # anywhere in a batch
                            await kill(daemon)
                            slot.down()
                            lost = confirmed_but_not_stored(db, client.confirmed)
                            assert lost == set(), f"after kill {life + 1}: {len(lost)} {note}"
                        else:
                            allow(total)
                            await streamed.wait()
                            await wait_until("settled", lambda: settled(db))
                            assert await daemon.stop() == 0, daemon.log
                        logs.append(daemon.log)
                assert client.unexpected == [], note
                confirmed = set(client.confirmed)
                connections = client.connections
                resent = client.resent

    ids = [event_id for event_id, _ in plan.stream]
    assert confirmed == set(ids), note  # the final flush confirmed everything
    assert connections == kills + 1, note
    assert resent >= kills, note  # a kill always leaves something unconfirmed
    assert "Traceback" not in "".join(logs), note
    with read_only(db) as conn:
        stored = Counter(
            str(row[0])
            for row in conn.execute(
                "SELECT id FROM events WHERE event IN ('pump.reading', 'chain.step')"
            )
        )
        assert stored == Counter(ids), note
        named = automation_ids(conn)
        pump, chain = named["pump crossings"], named["every chain step"]
        expected_crossings = Counter(plan.crossings)
        assert len(expected_crossings) == PUMPS * 4 // 5, note  # the plan is what it says
        assert firings_by_triggering_event(conn, pump) == expected_crossings, note
        assert state_changes_by_triggering_event(conn, pump) == expected_crossings, note
        every_step = Counter(plan.chain_ids + plan.orphan_ids)
        assert firings_by_triggering_event(conn, chain) == every_step, note
        assert state_changes_by_triggering_event(conn, chain) == every_step, note
        assert scalar(conn, "SELECT count(*) FROM ordering_followers") == 0, note
        assert scalar(conn, "SELECT count(*) FROM inbox") == 0, note


async def kill(daemon: Daemon) -> None:
    daemon.send(signal.SIGKILL)
    with trio.fail_after(10):
        assert await daemon.process.wait() == -signal.SIGKILL


# --- 2. deliveries survive a crash ---------------------------------------------------------

FIRINGS: Final = 6  # pumps, one webhook each


def webhook_automation(url: str) -> dict[str, Any]:
    return burst_automation(
        url, name="pump alarm", expect="pump.alarm", threshold=1, within=0, payload=None
    )


def outbox_rows(db: Path) -> dict[str, tuple[str, int, str | None]]:
    """id -> (status, attempts, last_error)"""
    with read_only(db) as conn:
        return {
            str(id_): (str(status), int(attempts), error)
            for id_, status, attempts, error in conn.execute(
                "SELECT id, status, attempts, last_error FROM outbox"
            )
        }


async def emit(url: str, lines: list[str]) -> None:
    """`trigd emit`: returns once every event is acknowledged, i.e. committed."""
    result = await trio.run_process(
        [sys.executable, "-m", "daemon", "emit", "--url", url],
        stdin="\n".join(lines).encode() + b"\n",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, "TRIGD_TOKEN": TOKEN},
    )
    assert result.returncode == 0, result.stderr
    assert f"{len(lines)} acknowledged, 0 rejected".encode() in result.stdout


async def test_deliveries_refused_before_a_sigkill_are_sent_after_it_with_the_same_webhook_id(
    tmp_path: Path,
) -> None:
    db = tmp_path / "trigd.db"
    alarms = [_event("pump.alarm", f"pump.{p}", datetime.now(UTC)) for p in range(FIRINGS)]
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            receiver: Receiver = await nursery.start(
                partial(run_receiver, answer(200), listen=False)
            )
            automations_file = write_automations(tmp_path, [webhook_automation(receiver.url())])
            config = write_config(tmp_path, [automations_file], server={"auth_token": TOKEN})
            async with running_daemon(config) as daemon:
                await emit(daemon.url, alarms)
                await wait_until(
                    "every delivery refused once",
                    lambda: (
                        [row[:2] for row in outbox_rows(db).values()] == [("pending", 1)] * FIRINGS
                    ),
                )
                before = outbox_rows(db)
                await kill(daemon)
            assert all(error for _, _, error in before.values()), before
            async with running_daemon(config) as daemon:
                receiver.start_listening()
                requests = [await receiver.next_request() for _ in range(FIRINGS)]
                await wait_until(
                    "every delivery recorded",
                    lambda: {row[0] for row in outbox_rows(db).values()} == {"delivered"},
                )
                assert await daemon.stop() == 0, daemon.log
            after = outbox_rows(db)
            nursery.cancel_scope.cancel()

    delivered = Counter(request.headers["webhook-id"] for request in receiver.requests)
    assert delivered == Counter(before.keys())  # the same ids, each exactly once
    assert set(after) == set(before)
    assert all(attempts >= 2 for _, attempts, _ in after.values()), after
    for request in requests:
        Webhook(SECRET).verify(request.body, request.headers)
        triggered = json.loads(request.body)
        assert triggered["id"] == request.headers["webhook-id"]
    fired_by = sorted(json.loads(r.body)["triggering_event"]["id"] for r in requests)
    assert fired_by == sorted(json.loads(alarm)["id"] for alarm in alarms)


async def test_a_delivery_in_flight_at_a_sigkill_is_sent_again_with_the_same_webhook_id(
    tmp_path: Path,
) -> None:
    """The receiver got the request but never answered: after the restart the row is
    released (its unfinished attempt recorded) and sent again — at least once, same id."""
    db = tmp_path / "trigd.db"
    first_seen = trio.Event()

    async def hang_once(request: Request) -> Reply:
        if not first_seen.is_set():
            first_seen.set()
            await trio.sleep_forever()
        return Reply(200)

    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            receiver: Receiver = await nursery.start(run_receiver, hang_once)
            automations_file = write_automations(tmp_path, [webhook_automation(receiver.url())])
            config = write_config(tmp_path, [automations_file], server={"auth_token": TOKEN})
            async with running_daemon(config) as daemon:
                await emit(daemon.url, [_event("pump.alarm", "pump.1", datetime.now(UTC))])
                first = await receiver.next_request()
                await wait_until(
                    "the delivery in flight",
                    lambda: [row[0] for row in outbox_rows(db).values()] == ["in_flight"],
                )
                await kill(daemon)
            async with running_daemon(config) as daemon:
                second = await receiver.next_request()
                await wait_until(
                    "the delivery recorded",
                    lambda: [row[0] for row in outbox_rows(db).values()] == ["delivered"],
                )
                assert await daemon.stop() == 0, daemon.log
            nursery.cancel_scope.cancel()

    (row_id,) = outbox_rows(db)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == row_id
    assert first.body == second.body
    assert len(receiver.requests) == 2
    with read_only(db) as conn:
        attempts = list(
            conn.execute(
                "SELECT status_code, error FROM delivery_attempts WHERE outbox_id = ? ORDER BY id",
                (row_id,),
            )
        )
    assert len(attempts) == 2, attempts
    assert attempts[0][0] is None
    assert "lease expired" in str(attempts[0][1])
    assert attempts[1] == (200, None)


STORM_PUMPS: Final = 40  # one event each
STORM_AUTOMATIONS: Final = 5  # each fires on every event: 200 webhooks


async def test_a_sigkill_mid_storm_loses_no_delivery(tmp_path: Path) -> None:
    """200 webhooks to one fast endpoint, whose results are committed in batches; the
    daemon is SIGKILLed once a random number of them has arrived, results still waiting
    for their commit among them. After a restart every outbox row is delivered and every
    webhook-id arrived at least once; a row counted delivered before the kill is never sent
    again."""
    seed = _seed()
    db = tmp_path / "trigd.db"
    kill_after = random.Random(seed).randrange(20, 150)
    enough = trio.Event()
    received: Counter[str] = Counter()

    async def count(request: Request) -> Reply:
        received[request.headers["webhook-id"]] += 1
        if sum(received.values()) >= kill_after:
            enough.set()
        return Reply(200)

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            receiver: Receiver = await nursery.start(run_receiver, count)
            automations = [
                {**webhook_automation(receiver.url()), "name": f"pump alarm {i}"}
                for i in range(STORM_AUTOMATIONS)
            ]
            automations_file = write_automations(tmp_path, automations)
            config = write_config(tmp_path, [automations_file], server={"auth_token": TOKEN})
            now = datetime.now(UTC)
            lines = [_event("pump.alarm", f"pump.{i}", now) for i in range(STORM_PUMPS)]
            async with running_daemon(config) as daemon:
                await emit(daemon.url, lines)
                await enough.wait()
                await kill(daemon)
            before = {i for i, row in outbox_rows(db).items() if row[0] == "delivered"}
            sent_before = Counter(received)
            async with running_daemon(config) as daemon:
                await wait_until(
                    "every delivery recorded",
                    lambda: {row[0] for row in outbox_rows(db).values()} == {"delivered"},
                    seconds=60,
                )
                assert await daemon.stop() == 0, daemon.log
            nursery.cancel_scope.cancel()
    rows = outbox_rows(db)
    assert len(rows) == STORM_PUMPS * STORM_AUTOMATIONS, f"seed {seed}"
    assert set(received) == set(rows), f"seed {seed}"  # each at least once
    again = {i for i in before if received[i] > sent_before[i]}
    assert not again, f"seed {seed}: delivered before the kill, sent again: {again}"
