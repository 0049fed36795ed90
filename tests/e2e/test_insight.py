"""`trigd explain` and `trigd backtest` as real processes beside a serving daemon: they read
its database while it writes, and the daemon goes on serving (docs/INSIGHT.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.support.daemon_process import (
    pressure,
    run_trigd,
    running_daemon,
    write_automations,
    write_config,
)

pytestmark = pytest.mark.slow

SECRET_URL = "http://127.0.0.1:9/hooks?token=t0p-s3cret"
TOKEN = "insight-token"


def burst(threshold: int) -> dict[str, Any]:
    return {
        "name": "pump pressure burst",
        "trigger": {
            "posture": "Reactive",
            "expect": ["pump.pressure.high"],
            "for_each": ["prefect.resource.id"],
            "threshold": threshold,
            "within": 60,
        },
        "actions": [{"type": "call-webhook", "url": SECRET_URL}],
    }


async def explain(config: Path) -> dict[str, Any]:
    result = await run_trigd("explain", "pump pressure burst", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    assert b"t0p-s3cret" not in result.stdout
    document: dict[str, Any] = json.loads(result.stdout)
    return document


async def test_explain_and_backtest_beside_the_running_daemon(tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    config = write_config(tmp_path, [write_automations(live, [burst(3)])])
    with trio.fail_after(90):
        async with running_daemon(config) as daemon:
            two = "\n".join([pressure("pump.7"), pressure("pump.7")]) + "\n"
            assert (await run_trigd("emit", "--url", daemon.url, stdin=two)).returncode == 0
            node = (await explain(config))["trigger"]
            [bucket] = node["buckets"]
            assert (bucket["key"], bucket["count"], bucket["threshold"]) == (["pump.7"], 2, 3)
            assert node["can_fire"] is True

            one = pressure("pump.7") + "\n"
            assert (await run_trigd("emit", "--url", daemon.url, stdin=one)).returncode == 0
            # acknowledged after its commit, with the firing (its event in the inbox yet)
            [firing] = (await explain(config))["firings"]
            assert firing["labels"] == {"prefect.resource.id": "pump.7"}
            assert firing["triggering_event"]["event"] == "pump.pressure.high"

            changed = tmp_path / "changed"
            changed.mkdir()
            file = write_automations(changed, [burst(2)])
            result = await run_trigd("backtest", str(file), "--config", str(config), "--json")
            assert result.returncode == 0, result.stderr
            [entry] = json.loads(result.stdout)["automations"]
            assert entry["loaded"] is True
            assert [f["diff"] for f in entry["firings"]] == ["backtest only", "live only"]

            # the daemon still serves and stores beside them
            more = pressure("pump.8") + "\n"
            assert (await run_trigd("emit", "--url", daemon.url, stdin=more)).returncode == 0
            status = await run_trigd("status", "--config", str(config), "--json")
            assert json.loads(status.stdout)["events_stored"] >= 4


async def test_explain_over_http_is_the_json_document(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, [write_automations(tmp_path, [burst(3)])], server={"auth_token": TOKEN}
    )
    env = {"TRIGD_TOKEN": TOKEN}
    with trio.fail_after(90):
        async with running_daemon(config) as daemon:
            two = "\n".join([pressure("pump.7"), pressure("pump.8")]) + "\n"
            sent = await run_trigd("emit", "--url", daemon.url, stdin=two, env=env)
            assert sent.returncode == 0, sent.stderr
            base = f"http://127.0.0.1:{daemon.port}"
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                refused = await client.get("/api/automations/pump pressure burst/explain")
                assert refused.status_code == 401
                reply = await client.get(
                    "/api/automations/pump%20pressure%20burst/explain", headers=bearer
                )
                assert reply.status_code == 200, reply.text
                assert "t0p-s3cret" not in reply.text
                document = reply.json()
                by_id = await client.get(
                    f"/api/automations/{document['automation']['id']}/explain",
                    params={"key": "pump.8"},
                    headers=bearer,
                )
                unknown = await client.get("/api/automations/nope/explain", headers=bearer)
                bad_key = await client.get(
                    "/api/automations/nope/explain", params={"key": "[1"}, headers=bearer
                )
            cli = await explain(config)
            # the same document, but for what is read off the wall clock at each read
            for served in (document, cli):
                served.pop("as_of")
                served.pop("events_clock")
                served.pop("now")
            assert document == cli
            keys = [b["key"] for b in document["trigger"]["buckets"]]
            assert sorted(keys) == [["pump.7"], ["pump.8"]]
            assert by_id.status_code == 200
            assert [b["key"] for b in by_id.json()["trigger"]["buckets"]] == [["pump.8"]]
            assert unknown.status_code == 404
            assert "nope" in unknown.json()["detail"]
            assert bad_key.status_code == 422
            assert bad_key.json()["detail"].startswith("key: ")
