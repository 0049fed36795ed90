"""``GET /metrics``: the daemon's counters in Prometheus' text format (prometheus-client).

Theory of operation. The hot path keeps counting as it always has, in plain attributes
(``IngestStats``, ``EvaluatorStats``, ``HttpStats``); a custom collector reads them at
scrape time, so a scrape is always live and an event costs nothing more. Counts that live
in the store (parked followers, open buckets, outbox rows per status) are read through the
gateway when a scrape comes (``store.gauges``). The histograms (events per batch, commit
time, ack latency) are observed once per committed batch by the evaluator's ``on_batch``
hook, not per event; deliveries by the sender's ``on_attempt`` once each is recorded;
the sweeper's pass time by its ``on_pass``. Each daemon has its own registry: nothing
is registered globally.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Final

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.core.delivery import Decision, Delivered, RetryAt
from daemon.core.upstream import UpstreamStats
from daemon.runtime.evaluator import EvaluatorStats
from daemon.runtime.events_out import EventsOutStats
from daemon.runtime.gateway import StoreGateway
from daemon.runtime.http_server import HttpStats
from daemon.runtime.ingest import IngestStats
from daemon.runtime.store_trouble import STORE_TROUBLE
from daemon.wire.submission import Submission
from store.gauges import StoreGauges, read_gauges

CONTENT_TYPE: Final = b"text/plain; version=0.0.4; charset=utf-8"

BATCH_BUCKETS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
SECONDS_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@attrs.define(eq=False)  # registered in a set: hashed by identity
class _Live(Collector):
    """Reads the counters as they are now, and the store's counts of the last scrape."""

    ingest: IngestStats
    evaluator: EvaluatorStats
    http: HttpStats
    events_out: EventsOutStats | None = None
    upstream: UpstreamStats | None = None  # with [upstream] url set
    store: StoreGauges | None = None

    def collect(self) -> Iterator[Metric]:
        ingest, evaluator = self.ingest, self.evaluator
        yield _counter(
            "trigd_events_received", "Events received (websocket and HTTP)", ingest.events
        )
        rejected = CounterMetricFamily(
            "trigd_events_rejected", "Events refused, by reason", labels=["reason"]
        )
        for reason in ("invalid", "too_large", "binary"):
            rejected.add_metric([reason], ingest.rejected_by.get(reason, 0))
        rejected.add_metric(["internal_error"], evaluator.internal_errors)
        yield rejected
        yield _counter(
            "trigd_events_duplicate", "Events already stored (by id)", evaluator.duplicates
        )
        yield _counter("trigd_events_committed", "Events committed", evaluator.events)
        firings = CounterMetricFamily(
            "trigd_firings", "Automation firings committed, by automation", labels=["automation"]
        )
        for name, count in sorted(evaluator.firings.items()):
            firings.add_metric([name], count)
        yield firings
        yield _counter(
            "trigd_batches", "Transactions committing received events", evaluator.batches
        )
        yield _counter(
            "trigd_events_parked", "Events parked to wait for their leader", evaluator.parked
        )
        yield _counter(
            "trigd_store_retries",
            "Commits the store refused and were retried",
            evaluator.store_retries,
        )
        yield _gauge("trigd_connections", "Established websockets", ingest.connections)
        yield _gauge(
            "trigd_connections_pending",
            "Sockets in their handshake, or serving plain HTTP",
            ingest.handshakes,
        )
        yield _counter("trigd_connections_accepted", "Sockets accepted", ingest.connections_total)
        refused = CounterMetricFamily(
            "trigd_connections_refused",
            "Sockets or handshakes refused, by reason",
            labels=["reason"],
        )
        refused.add_metric(["per_peer"], ingest.refused_per_peer)
        refused.add_metric(["busy"], ingest.refused_busy)
        refused.add_metric(
            ["handshake"],
            ingest.handshakes_refused - ingest.refused_per_peer - ingest.refused_busy,
        )
        yield refused
        yield _counter(
            "trigd_connections_idle_closed",
            "Websockets closed after idle_timeout",
            ingest.idle_closed,
        )
        yield _counter("trigd_pings", "Websocket pings answered after commit", ingest.pings)
        requests = CounterMetricFamily(
            "trigd_http_requests", "Plain HTTP requests answered, by status", labels=["code"]
        )
        for code, count in sorted(self.http.by_status.items()):
            requests.add_metric([str(code)], count)
        yield requests
        store = self.store
        if store is not None:
            yield _gauge(
                "trigd_parked_followers",
                "Events waiting for the event they follow",
                store.parked_followers,
            )
            yield _gauge("trigd_open_buckets", "Trigger buckets open", store.open_buckets)
            outbox = GaugeMetricFamily(
                "trigd_outbox_rows", "Outbox rows kept, by status", labels=["status"]
            )
            for status in ("pending", "delivered", "dead", "cancelled"):
                outbox.add_metric([status], store.outbox.get(status, 0))
            yield outbox
            yield _gauge(
                "trigd_outbox_pending", "Webhook deliveries waiting", store.outbox.get("pending", 0)
            )
            yield _gauge(
                "trigd_outbox_dead", "Webhook deliveries given up", store.outbox.get("dead", 0)
            )
        if self.events_out is not None:
            yield from self._events_out(self.events_out)
        if self.upstream is not None:
            yield from self._upstream(self.upstream)

    def _events_out(self, stats: EventsOutStats) -> Iterator[Metric]:
        yield _gauge(
            "trigd_events_out_subscribers", "Subscribers of /events/out", stats.subscribers
        )
        yield _counter("trigd_events_out_sent", "Events sent to subscribers", stats.sent)
        closed = CounterMetricFamily(
            "trigd_events_out_closed", "Subscribers closed for falling behind", labels=["why"]
        )
        closed.add_metric(["queue_full"], stats.slow_closed)
        closed.add_metric(["send_timeout"], stats.stalled)
        yield closed

    def _upstream(self, stats: UpstreamStats) -> Iterator[Metric]:
        connected = GaugeMetricFamily(
            "trigd_upstream_connected",
            "1 while the connection to the upstream Prefect server is up",
            labels=["direction"],
        )
        connected.add_metric(["forward"], int(stats.forward_connected))
        connected.add_metric(["subscribe"], int(stats.subscribe_connected))
        yield connected
        yield _gauge(
            "trigd_upstream_backlog_events", "Committed events not yet forwarded", stats.backlog
        )
        yield _gauge(
            "trigd_upstream_backlog_age_seconds",
            "How long the oldest event not yet forwarded has waited",
            stats.backlog_age_seconds,
        )
        yield _gauge(
            "trigd_upstream_lag_seconds",
            "Now minus the occurred time of the latest event taken from the upstream",
            stats.lag_seconds,
        )
        yield _counter("trigd_upstream_forwarded", "Events the upstream confirmed", stats.forwarded)
        yield _counter(
            "trigd_upstream_refused",
            "Events the upstream refused, skipped and never forwarded",
            stats.refused,
        )
        yield _counter("trigd_upstream_taken", "Events taken from the upstream", stats.taken)
        yield _counter(
            "trigd_upstream_rejected", "Events from the upstream trigd refused", stats.rejected
        )
        yield _counter(
            "trigd_upstream_dropped",
            "Unforwarded events deleted past [upstream] backlog",
            stats.dropped,
        )


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class Metrics:
    """One daemon's registry: the live collector and the per-batch histograms."""

    def __init__(
        self,
        ingest: IngestStats,
        evaluator: EvaluatorStats,
        http: HttpStats,
        gateway: StoreGateway | None = None,
        *,
        events_out: EventsOutStats | None = None,
        upstream: UpstreamStats | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._live = _Live(ingest, evaluator, http, events_out, upstream)
        self._gateway = gateway
        self.registry.register(self._live)
        self.batch_events = Histogram(
            "trigd_batch_events",
            "Events per committed batch",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "trigd_commit_seconds",
            "Time to commit one batch (its transaction, fsync included)",
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.ack_latency_seconds = Histogram(
            "trigd_ack_latency_seconds",
            "Per batch: its oldest event's wait from receipt to commit (its ack)",
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.deliveries = Counter(
            "trigd_deliveries",
            "Webhook delivery attempts recorded, by outcome (delivered, retry, dead)",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("delivered", "retry", "dead"):
            self.deliveries.labels(outcome)
        self.delivery_seconds = Histogram(
            "trigd_delivery_seconds",
            "Webhook request latency, of the attempts that reached their endpoint",
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.sweep_seconds = Histogram(
            "trigd_proactive_pass_seconds",
            "One sweeper pass: the proactive and periodic passes and housekeeping",
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )

    def observe_attempt(self, decision: Decision, latency_us: int | None) -> None:
        """The sender recorded a delivery attempt; ``latency_us`` when the request went
        out (None: it never reached the endpoint)."""
        outcome = (
            "delivered"
            if isinstance(decision, Delivered)
            else "retry"
            if isinstance(decision, RetryAt)
            else "dead"
        )
        self.deliveries.labels(outcome).inc()
        if latency_us is not None:
            self.delivery_seconds.observe(latency_us / 1e6)

    def observe_batch(self, batch: Sequence[Submission], seconds: float, now: datetime) -> None:
        """The evaluator settled ``batch`` in ``seconds``, at ``now`` (the wall clock its
        events' ``received`` stamps were read from)."""
        self.batch_events.observe(len(batch))
        self.commit_seconds.observe(seconds)
        if batch:
            waited = (now - batch[0].event.received).total_seconds()
            self.ack_latency_seconds.observe(max(0.0, waited))

    def observe_sweep(self, seconds: float) -> None:
        self.sweep_seconds.observe(seconds)

    async def render(self) -> bytes:
        """The exposition text, the store's counts read just now (left out while the
        store refuses the read: a scrape never waits out store trouble)."""
        if self._gateway is not None:
            try:
                self._live.store = await self._gateway.run(read_gauges)
            except STORE_TROUBLE:
                self._live.store = None
        return generate_latest(self.registry)
