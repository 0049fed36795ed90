"""daemon/runtime/upstream.py: the reconnect policy shared by forward and subscribe, under
virtual time (trio's autojump clock); the sockets themselves are exercised against a real
Prefect server in tests/e2e/test_upstream.py."""

from __future__ import annotations

import itertools
import logging
from datetime import timedelta

import pytest
import trio
import trio_websocket

from daemon.core.config import UnusableSetting, UpstreamConfig
from daemon.core.upstream import UpstreamStats
from daemon.runtime.upstream import (
    _Link,
    closed_by_server,
    describe_trouble,
    resolve_credentials,
)

CONFIG = UpstreamConfig(url="http://prefect:4200/api", retry_max=timedelta(seconds=8))


class Bug(Exception):
    pass


async def test_an_outage_is_logged_once_backs_off_and_ends_when_proven(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    stats = UpstreamStats()
    link = _Link("forward", CONFIG, stats)
    started: list[float] = []
    downs: list[float] = []

    async def session() -> None:
        started.append(trio.current_time())
        attempt = len(started)
        if attempt <= 5:  # refused, then accepted but closed before doing any work
            if attempt >= 4:
                link.connected()
                raise trio_websocket.ConnectionClosed(None)
            raise ConnectionRefusedError(111, "Connection refused")
        if attempt == 6:
            link.connected()
            link.proven()
            assert stats.last_error is None
            raise OSError(104, "Connection reset by peer")
        raise Bug

    caplog.set_level(logging.INFO, logger="trigd.upstream")
    with pytest.raises(Bug):  # anything but TROUBLE is a bug and propagates
        await link.run(session, lambda: downs.append(trio.current_time()))
    waits = [b - a for a, b in itertools.pairwise(started)]
    assert waits == [1, 2, 4, 8, 8, 1]  # doubling up to retry_max; reset once proven
    assert len(downs) == 6
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "upstream forward: cannot reach the upstream: Connection refused; retrying with "
        "backoff (at most 8s) until it is back",
        "upstream forward: connected to http://prefect:4200/api again",
        "upstream forward: cannot reach the upstream: Connection reset by peer; retrying "
        "with backoff (at most 8s) until it is back",
    ]
    assert stats.last_error == "forward: cannot reach the upstream: Connection reset by peer"


def test_trouble_is_described_without_the_request() -> None:
    rejected = trio_websocket.ConnectionRejected(403, (), b"")
    assert describe_trouble(rejected) == "the upstream refused the websocket upgrade (HTTP 403)"
    assert describe_trouble(trio.TooSlowError()) == "the upstream did not answer in time"


def test_references_resolve_and_a_broken_one_names_the_key(tmp_path: object) -> None:
    config = UpstreamConfig(url="http://p/api", auth_string="env:PREFECT_AUTH")
    assert resolve_credentials(config, {"PREFECT_AUTH": "u:pw"}).auth_string == "u:pw"
    with pytest.raises(UnusableSetting) as caught:
        resolve_credentials(config, {})
    assert str(caught.value).startswith("[upstream] auth_string (reference): 'env:PREFECT_AUTH'")
    assert resolve_credentials(UpstreamConfig(api_key="literal:env:x"), {}).api_key == "env:x"


def test_only_a_close_by_the_server_may_be_a_refusal() -> None:
    def closed(code: int) -> trio_websocket.ConnectionClosed:
        return trio_websocket.ConnectionClosed(trio_websocket.CloseReason(code, None))

    assert closed_by_server(closed(1006))  # Prefect's handler failed: no close frame
    assert closed_by_server(closed(1011))
    assert closed_by_server(trio_websocket.ConnectionClosed(None))
    for going_away in (1001, 1012, 1013):  # the server stopping or restarting
        assert not closed_by_server(closed(going_away))
    assert not closed_by_server(trio.TooSlowError())  # no answer in time
    assert not closed_by_server(ConnectionRefusedError(111, "Connection refused"))
    assert not closed_by_server(trio_websocket.ConnectionRejected(503, (), b""))
    assert not closed_by_server(None)
