"""The text ``GET /metrics`` answers: a ``Metrics``' counters and histograms in Prometheus'
text format, written by prometheus-client.

Imported by the ``/metrics`` route on the first scrape, not at start: prometheus-client
and what it imports (its HTTP servers, ``urllib.request``) are about 1.1 MB a daemon that
is never scraped does not carry (docs/PERFORMANCE.md#memory). The output is what
prometheus-client's own ``Histogram`` and ``Counter`` write, ``_created`` samples
included: the values are observed without it (``daemon.runtime.metrics``).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from daemon.core.upstream import UpstreamStats
from daemon.runtime.events_out import EventsOutStats
from daemon.runtime.metrics import Counted, Histogram, Metrics
from store.gauges import StoreGauges


def exposition(metrics: Metrics, store: StoreGauges | None) -> bytes:
    """``metrics`` as they are now, with the store's counts ``store`` (None: left out)."""
    return generate_latest(_Scrape(metrics, store))


class _Scrape(Collector):
    """One scrape: the counters as they are now, then the histograms as observed."""

    def __init__(self, metrics: Metrics, store: StoreGauges | None) -> None:
        self.metrics, self.store = metrics, store

    def collect(self) -> Iterator[Metric]:
        yield from self._live(self.metrics)
        for histogram in self.metrics.histograms[:3]:
            yield _histogram(histogram)
        yield _labelled(self.metrics.deliveries)
        for histogram in self.metrics.histograms[3:]:
            yield _histogram(histogram)

    def _live(self, metrics: Metrics) -> Iterator[Metric]:
        ingest, evaluator = metrics.ingest, metrics.evaluator
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
        for code, count in sorted(metrics.http.by_status.items()):
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
        if metrics.events_out is not None:
            yield from self._events_out(metrics.events_out)
        if metrics.upstream is not None:
            yield from self._upstream(metrics.upstream)

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


def _histogram(histogram: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(histogram.name, histogram.documentation)
    cumulative, buckets = 0, []
    for bound, count in zip((*histogram.bounds, float("inf")), histogram.counts, strict=True):
        cumulative += count
        buckets.append((_le(bound), float(cumulative)))
    family.add_metric([], buckets, histogram.total)
    family.add_sample(f"{histogram.name}_created", {}, histogram.created)
    return family


def _labelled(counted: Counted) -> CounterMetricFamily:
    family = CounterMetricFamily(counted.name, counted.documentation, labels=[counted.label])
    for value, count in counted.values.items():
        family.add_metric([value], count, created=counted.created[value])
    return family


def _le(bound: float) -> str:
    """A bucket's bound as prometheus-client writes it: ``1.0``, ``0.0005``, ``+Inf``."""
    return "+Inf" if bound == float("inf") else repr(float(bound))
