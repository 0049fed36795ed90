"""`trigd serve` as a real process: lifecycle, signals, the CLI around it, a webhook fired
end to end. Network on 127.0.0.1 only; every wait bounded."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio
from standardwebhooks import Webhook

from tests.support.daemon_process import (
    SECRET,
    burst_automation,
    pressure,
    run_trigd,
    running_daemon,
    write_automations,
    write_config,
)
from tests.support.paths import REPO
from tests.support.webhook_receiver import Receiver, answer, run_receiver

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_serve_logs_listening_and_stops_cleanly(tmp_path: Path, signum: int) -> None:
    config = write_config(tmp_path)
    with trio.fail_after(60):
        async with running_daemon(config) as daemon:
            assert daemon.port > 0
            assert f"trigd listening on ws://127.0.0.1:{daemon.port}" in daemon.log
            assert await daemon.stop(signum) == 0
            assert "trigd stopped" in daemon.log


async def test_second_daemon_on_the_same_database_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with trio.fail_after(60):
        async with running_daemon(config) as daemon:
            result = await run_trigd("serve", "--config", str(config))
            assert result.returncode == 1
            assert b"in use by another trigd" in result.stderr
            assert await daemon.stop() == 0


async def test_bad_configuration_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "trigd.toml"
    config.write_text('[server]\nlissen = "127.0.0.1:0"\n')
    with trio.fail_after(30):
        result = await run_trigd("serve", "--config", str(config))
    assert result.returncode == 2
    assert b"lissen" in result.stderr


async def test_invalid_automation_file_exits_2_naming_the_field(tmp_path: Path) -> None:
    automations = write_automations(tmp_path, [burst_automation("http://127.0.0.1:9/x")])
    broken = json.loads(automations.read_text())
    broken[0]["trigger"]["within"] = -5
    automations.write_text(json.dumps(broken))
    with trio.fail_after(30):
        result = await run_trigd("serve", "--config", str(write_config(tmp_path, [automations])))
    assert result.returncode == 2
    assert b"pump pressure burst" in result.stderr
    assert b"trigger.within" in result.stderr


async def test_emitted_events_fire_a_signed_webhook(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            receiver: Receiver = await nursery.start(run_receiver, answer(200))
            automations = write_automations(tmp_path, [burst_automation(receiver.url())])
            async with running_daemon(write_config(tmp_path, [automations])) as daemon:
                emitted = await run_trigd(
                    "emit", "--url", daemon.url, stdin="\n".join([pressure()] * 3) + "\n"
                )
                assert emitted.returncode == 0, emitted.stderr
                assert b"3 acknowledged, 0 rejected" in emitted.stdout
                request = await receiver.next_request()
                assert json.loads(request.body) == {"text": "pump pressure burst: pump.7"}
                assert request.headers["user-agent"].startswith("trigd/")
                Webhook(SECRET).verify(request.body, request.headers)
                status = await run_trigd("status", "--db", str(tmp_path / "trigd.db"))
                assert status.returncode == 0
                assert b"pump pressure burst" in status.stdout
                assert await daemon.stop() == 0
            nursery.cancel_scope.cancel()


async def test_one_token_variable_serves_both_serve_and_emit(tmp_path: Path) -> None:
    """TRIGD_SERVER_AUTH_TOKEN is the token `serve` requires and the one `emit` presents."""
    token = {"TRIGD_SERVER_AUTH_TOKEN": "shared-7c1e"}
    with trio.fail_after(60):
        async with running_daemon(write_config(tmp_path), env=token) as daemon:
            emitted = await run_trigd("emit", "--url", daemon.url, stdin=pressure(), env=token)
            assert emitted.returncode == 0, emitted.stderr
            assert b"1 acknowledged, 0 rejected" in emitted.stdout
            wrong = {"TRIGD_SERVER_AUTH_TOKEN": "", "TRIGD_TOKEN": "not-it"}
            refused = await run_trigd("emit", "--url", daemon.url, stdin=pressure(), env=wrong)
            assert refused.returncode == 1
            assert b"Invalid token" in refused.stderr
            assert await daemon.stop() == 0


async def test_emit_reports_rejected_events_and_exits_1(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_daemon(write_config(tmp_path)) as daemon:
            lines = [pressure(), '{"event": "x", "resource": {}}', "not json"]
            emitted = await run_trigd("emit", "--url", daemon.url, stdin="\n".join(lines) + "\n")
            assert emitted.returncode == 1
            assert b"1 acknowledged, 2 rejected" in emitted.stdout
            assert b"line 2: resource" in emitted.stderr
            assert b"line 3: not JSON" in emitted.stderr
            assert await daemon.stop() == 0


async def test_emit_lists_what_was_not_acknowledged_when_trigd_closes_the_connection(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, server={"max_event_bytes": 2000})
    huge = json.dumps(
        {"event": "x", "resource": {"prefect.resource.id": "r"}, "payload": {"b": "x" * 5000}}
    )
    lines = [pressure("pump.1"), pressure("pump.2"), huge, pressure("pump.3"), pressure("pump.4")]
    with trio.fail_after(60):
        async with running_daemon(config) as daemon:
            emitted = await run_trigd("emit", "--url", daemon.url, stdin="\n".join(lines) + "\n")
            assert await daemon.stop() == 0
    assert emitted.returncode == 1
    assert b"2 acknowledged, 3 rejected" in emitted.stdout, emitted
    errors = emitted.stderr.decode().splitlines()
    assert [line.split(":")[0] for line in errors] == [
        "rejected line 3",
        "rejected line 4",
        "rejected line 5",
    ], errors
    assert all("not acknowledged: the server closed the connection: 1009" in e for e in errors)


async def test_status_shows_the_running_daemons_counters(tmp_path: Path) -> None:
    db = str(tmp_path / "trigd.db")
    with trio.fail_after(60):
        async with running_daemon(write_config(tmp_path)) as daemon:
            lines = [pressure(), pressure("pump.8"), '{"event": "x", "resource": {}}']
            emitted = await run_trigd("emit", "--url", daemon.url, stdin="\n".join(lines) + "\n")
            assert b"2 acknowledged, 1 rejected" in emitted.stdout
            while True:  # the sweeper stores a snapshot every pass (1 s here)
                status = await run_trigd("status", "--db", db, "--json")
                counters = json.loads(status.stdout)["daemon"]
                ingest = counters["ingest"] if counters else {}
                if ingest.get("connections_total") == 1 and ingest.get("connections") == 0:
                    break  # a snapshot from after emit hung up: all of its events counted
                await trio.sleep(0.2)
            assert counters["pid"] == daemon.process.pid
            assert counters["ingest"]["events"] == 2
            assert counters["ingest"]["rejected"] == 1
            assert counters["evaluator"]["events"] == 2
            text = await run_trigd("status", "--db", db)
            assert f"daemon: pid {daemon.process.pid}".encode() in text.stdout
            assert b"2 events, 1 rejected frames" in text.stdout
            assert await daemon.stop() == 0


async def test_sighup_swaps_valid_automations_and_keeps_them_when_invalid(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            receiver: Receiver = await nursery.start(run_receiver, answer(200))
            automations = write_automations(
                tmp_path, [burst_automation(receiver.url("/first"), threshold=1)]
            )
            async with running_daemon(write_config(tmp_path, [automations])) as daemon:
                good = [burst_automation(receiver.url("/second"), name="second", threshold=1)]
                automations.write_text(json.dumps(good))
                daemon.send(signal.SIGHUP)
                await daemon.wait_for_log("reloaded 1 automations")
                automations.write_text("[{")
                daemon.send(signal.SIGHUP)
                await daemon.wait_for_log("reload refused")
                emitted = await run_trigd("emit", "--url", daemon.url, stdin=pressure() + "\n")
                assert emitted.returncode == 0, emitted.stderr
                request = await receiver.next_request()
                assert request.target == "/second"
                assert await daemon.stop() == 0
            assert [r.target for r in receiver.requests] == ["/second"]
            nursery.cancel_scope.cancel()


def test_start_up_tunes_the_garbage_collector() -> None:
    """What `serve` does after start-up (in a child: it changes the whole interpreter)."""
    script = (
        "import gc\n"
        "from daemon.runtime.service import YOUNG_COLLECTION_THRESHOLD, tune_garbage_collector\n"
        "_, middle, old = gc.get_threshold()\n"
        "tune_garbage_collector()\n"
        "assert gc.get_threshold() == (YOUNG_COLLECTION_THRESHOLD, middle, old)\n"
        "assert gc.get_freeze_count() > 0\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


async def test_the_wal_is_checkpointed_while_serving_and_stays_bounded(tmp_path: Path) -> None:
    """[store] wal_checkpoint_pages: the daemon's checkpoints keep the WAL small while
    events come in (without them it would hold every frame written here)."""
    config = write_config(tmp_path, store={"wal_checkpoint_pages": 32, "wal_max_pages": 100_000})
    lines = [
        json.dumps(
            {
                "occurred": "2026-01-01T00:00:00Z",
                "event": "pump.pressure",
                "resource": {"prefect.resource.id": f"pump.{n}", "note": "x" * 400},
                "id": str(uuid.uuid4()),
            }
        )
        for n in range(4_000)
    ]
    with trio.fail_after(60):
        async with running_daemon(config) as daemon:
            for part in range(0, len(lines), 1_000):
                emitted = await run_trigd(
                    "emit", "--url", daemon.url, stdin="\n".join(lines[part : part + 1_000])
                )
                assert emitted.returncode == 0, emitted.stderr
            # the most frames the WAL held (SQLite does not shrink the file); SQLite's own
            # autocheckpoint, at 4,000, would have let it hold all of them (over 4,000)
            assert (tmp_path / "trigd.db-wal").stat().st_size // 4096 < 1_000
            assert await daemon.stop() == 0
