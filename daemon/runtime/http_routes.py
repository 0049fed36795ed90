"""The daemon's HTTP routes (docs/PROTOCOL.md#http): the table, and the handlers that need
the running daemon (the evaluator's channel, readiness, metrics).

A route is one line of ``HttpApp.routes``; a handler is an async function of a parsed
``HttpRequest`` returning an ``HttpReply`` (``daemon.wire.http``).

``POST /api/events`` takes the websocket's path into the store: every event of the body
is validated first (one invalid: 422, none sent on), then each becomes a ``Submission``
into the evaluator's channel, and the reply (204) waits until the evaluator has resolved
them all, i.e. committed; duplicates are committed as on the websocket (a no-op).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import apsw
import attrs
import trio

from daemon import __version__
from daemon.core.config import InsightConfig, ServerConfig
from daemon.core.explanation import parse_key
from daemon.runtime.events_query import Reply, read_events_from, read_next_page_from
from daemon.runtime.ingest import IngestStats
from daemon.runtime.metrics import CONTENT_TYPE, Metrics
from daemon.runtime.readiness import Readiness
from daemon.wire.http import (
    HttpReply,
    HttpRequest,
    Route,
    error_reply,
    json_reply,
    parse_events_body,
    path_params,
    query_params,
)
from daemon.wire.submission import Submission
from store.db import Store, StoreError

EXPLAIN_PATH: Final = "/api/automations/{id}/explain"

VERSION: Final = f"trigd {__version__}"
"""What ``GET /api/admin/version`` answers: not a bare version number on purpose. Prefect's
clients (its events client, the subscriber) read this route and compare a version they can
parse with their own: another major version is refused, an older one warned about. One
they cannot parse they skip, which is right: trigd is not a Prefect server release."""


class _Committed:
    """A ``ReplySink`` for one request's submissions: done once all are resolved."""

    def __init__(self, count: int) -> None:
        self.left = count
        self.errors: list[str] = []
        self.done = trio.Event()
        if count == 0:
            self.done.set()

    def resolved(self, submission: Submission, error: str | None) -> None:
        submission.error = error
        submission.done = True
        if error is not None:
            self.errors.append(f"{submission.event.id}: {error}")
        self.left -= 1
        if self.left == 0:
            self.done.set()


@attrs.define
class HttpApp:
    settings: ServerConfig
    submit: trio.MemorySendChannel[Submission]
    clock: Callable[[], datetime]
    stats: IngestStats
    readiness: Readiness = attrs.Factory(Readiness)
    metrics: Metrics | None = None
    database: Path | None = None  # read by the explain route, on a connection of its own
    insight: InsightConfig = attrs.Factory(InsightConfig)
    _readers: trio.CapacityLimiter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._readers = trio.CapacityLimiter(self.settings.http_readers)

    def routes(self) -> tuple[Route, ...]:
        """The route table: method, path, handler, public (no token needed)."""
        return (
            Route("GET", "/api/health", self.health, public=True),
            Route("GET", "/api/ready", self.ready, public=True),
            Route("GET", "/metrics", self.metrics_text, public=True),
            Route("GET", "/api/admin/version", self.version),
            Route("POST", "/api/events", self.post_events),
            Route("POST", "/api/events/filter", self.filter_events),
            Route("GET", "/api/events/filter/next", self.next_events_page),
            Route("GET", EXPLAIN_PATH, self.explain_automation),
        )

    async def health(self, request: HttpRequest) -> HttpReply:
        return json_reply(200, True)

    async def version(self, request: HttpRequest) -> HttpReply:
        return json_reply(200, VERSION)

    async def ready(self, request: HttpRequest) -> HttpReply:
        reasons, notes = self.readiness.reasons(), self.readiness.notes()
        if reasons:
            return error_reply(503, "not ready: " + "; ".join(reasons), reasons=reasons + notes)
        return json_reply(200, {"ready": True, "reasons": notes})

    async def metrics_text(self, request: HttpRequest) -> HttpReply:
        if self.metrics is None:
            return error_reply(404, "no metrics in this server")
        from daemon.runtime.exposition import exposition  # prometheus-client: first scrape

        text = exposition(self.metrics, await self.metrics.read_store())
        return HttpReply(200, text, content_type=CONTENT_TYPE)

    async def post_events(self, request: HttpRequest) -> HttpReply:
        settings = self.settings
        parsed = parse_events_body(
            request.body, self.clock(), settings.max_event_bytes, settings.max_json_depth
        )
        if isinstance(parsed, HttpReply):
            self.stats.reject(parsed.reason or "invalid")
            return parsed
        sink = _Committed(len(parsed))
        for event in parsed:
            self.stats.events += 1
            await self.submit.send(Submission(event, sink))
        await sink.done.wait()
        if sink.errors:
            return error_reply(500, "not all events were committed", errors=sink.errors)
        return HttpReply(204)

    async def explain_automation(self, request: HttpRequest) -> HttpReply:
        """``trigd explain`` over HTTP: the same document as ``--json``. It reads on a
        read-only connection in a worker thread (at most ``[server] http_readers`` reads
        at once), never through the store gateway, so a large explanation does not hold up
        the evaluator's commits."""
        if self.database is None:
            return error_reply(404, "no database to explain from in this server")
        params = path_params(EXPLAIN_PATH, request.path) or {}
        automation = params.get("id", "")
        query = query_params(request.target)
        try:
            key = parse_key(query["key"], "key") if "key" in query else None
        except ValueError as exc:
            return error_reply(422, str(exc))
        now = self.clock()
        from daemon.engine.explain import UnknownAutomation, UnreadableAutomation  # (_explain)

        try:
            document = await trio.to_thread.run_sync(
                self._explain, automation, key, now, limiter=self._readers
            )
        except UnknownAutomation as exc:
            return error_reply(404, str(exc))
        except UnreadableAutomation as exc:
            return error_reply(409, str(exc))
        except (StoreError, apsw.Error) as exc:
            return error_reply(503, f"the store cannot be read: {exc}")
        return json_reply(200, document)

    async def filter_events(self, request: HttpRequest) -> HttpReply:
        """Prefect's events query: stored events, newest first, a page at a time
        (``daemon/runtime/events_query.py``), read as the explain route reads."""
        if self.database is None:
            return error_reply(404, "no database to query in this server")
        status, body = await self._read(
            read_events_from, self.database, request.body, self.clock(), self._base_url(request)
        )
        return HttpReply(status, body)

    async def next_events_page(self, request: HttpRequest) -> HttpReply:
        if self.database is None:
            return error_reply(404, "no database to query in this server")
        token = query_params(request.target).get("page-token")
        if token is None:
            return error_reply(422, "page-token: missing (the next_page URL of a query)")
        status, body = await self._read(
            read_next_page_from, self.database, token, self._base_url(request)
        )
        return HttpReply(status, body)

    async def _read(self, read: Callable[..., Reply], *args: Any) -> Reply:
        try:
            return await trio.to_thread.run_sync(read, *args, limiter=self._readers)
        except (StoreError, apsw.Error) as exc:
            return 503, json.dumps({"detail": f"the store cannot be read: {exc}"}).encode()

    def _base_url(self, request: HttpRequest) -> str:
        """Where this server is, as the client named it: the root of ``next_page`` URLs."""
        scheme = "https" if self.settings.tls_cert is not None else "http"
        host = (request.header(b"host") or self.settings.listen.encode()).decode("latin-1")
        return f"{scheme}://{host}"

    def _explain(self, automation: str, key: tuple[str, ...] | None, now: datetime) -> Any:
        # imported on the first request: a daemon nobody asks for explanations is smaller
        from daemon.engine.explain import Limits, explain

        assert self.database is not None
        limits = Limits(self.insight.recent_events, self.insight.listed)
        store = Store.open_readonly(self.database)
        try:
            with store.conn:  # one snapshot, as trigd explain reads it
                return explain(store.conn, automation, now, key=key, limits=limits)
        finally:
            store.close()
