"""``GET /metrics``: what the daemon counts, kept for Prometheus' text format.

Theory of operation. The hot path keeps counting as it always has, in plain attributes
(``IngestStats``, ``EvaluatorStats``, ``HttpStats``); they are read at scrape time, so a
scrape is always live and an event costs nothing more. Counts that live in the store
(parked followers, open buckets, outbox rows per status) are read through the gateway
when a scrape comes (``store.gauges``). The histograms (events per batch, commit time, ack
latency) are observed once per committed batch by the evaluator's ``on_batch`` hook, not
per event; deliveries by the sender's ``on_attempt`` once each is recorded; the sweeper's
pass time by its ``on_pass``. Each daemon has its own ``Metrics``: nothing is global.

What is observed is kept here in plain Python (``Histogram``, ``Counted``); the text is
written by ``daemon.runtime.exposition``, which imports prometheus-client and which the
``/metrics`` route imports when the first scrape comes: about 1.1 MB that a daemon nobody
scrapes does not carry (docs/PERFORMANCE.md#memory).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Sequence
from datetime import datetime
from typing import Final

import attrs

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


class Histogram:
    """One histogram as Prometheus exposes it: observations per bucket (a bucket counts
    the values up to its bound, the last one the rest), their sum, and when it was made."""

    __slots__ = ("bounds", "counts", "created", "documentation", "name", "total")

    def __init__(self, name: str, documentation: str, bounds: Sequence[float]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, not cumulative; last: +Inf
        self.total = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


@attrs.define
class Counted:
    """One labelled counter: its value and creation time per label value."""

    name: str
    documentation: str
    label: str
    values: dict[str, int]
    created: dict[str, float]

    @classmethod
    def of(cls, name: str, documentation: str, label: str, values: Sequence[str]) -> Counted:
        now = time.time()
        return cls(name, documentation, label, dict.fromkeys(values, 0), dict.fromkeys(values, now))


class Metrics:
    """One daemon's counters, read live at scrape time, and its histograms."""

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
        self.ingest, self.evaluator, self.http = ingest, evaluator, http
        self.events_out = events_out
        self.upstream = upstream  # with [upstream] url set
        self._gateway = gateway
        self.batch_events = Histogram(
            "trigd_batch_events", "Events per committed batch", BATCH_BUCKETS
        )
        self.commit_seconds = Histogram(
            "trigd_commit_seconds",
            "Time to commit one batch (its transaction, fsync included)",
            SECONDS_BUCKETS,
        )
        self.ack_latency_seconds = Histogram(
            "trigd_ack_latency_seconds",
            "Per batch: its oldest event's wait from receipt to commit (its ack)",
            SECONDS_BUCKETS,
        )
        self.deliveries = Counted.of(
            "trigd_deliveries",
            "Webhook delivery attempts recorded, by outcome (delivered, retry, dead)",
            "outcome",
            ("delivered", "retry", "dead"),
        )
        self.delivery_seconds = Histogram(
            "trigd_delivery_seconds",
            "Webhook request latency, of the attempts that reached their endpoint",
            SECONDS_BUCKETS,
        )
        self.sweep_seconds = Histogram(
            "trigd_proactive_pass_seconds",
            "One sweeper pass: the proactive and periodic passes and housekeeping",
            SECONDS_BUCKETS,
        )

    @property
    def histograms(self) -> tuple[Histogram, ...]:
        """In the order of the text; the deliveries counter comes after the first three."""
        return (
            self.batch_events,
            self.commit_seconds,
            self.ack_latency_seconds,
            self.delivery_seconds,
            self.sweep_seconds,
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
        self.deliveries.values[outcome] += 1
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

    async def read_store(self) -> StoreGauges | None:
        """The store's counts read just now, None while the store refuses the read: a
        scrape never waits out store trouble."""
        if self._gateway is None:
            return None
        try:
            return await self._gateway.run(read_gauges)
        except STORE_TROUBLE:
            return None
