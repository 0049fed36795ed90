"""The /metrics text of histograms and labelled counters observed without prometheus-client
is what prometheus-client's own `Histogram` and `Counter` write for the same observations
(daemon/runtime/exposition.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client import Histogram as PromHistogram

from daemon.core.delivery import Dead, Delivered, RetryAt
from daemon.runtime.evaluator import EvaluatorStats
from daemon.runtime.exposition import exposition
from daemon.runtime.http_server import HttpStats
from daemon.runtime.ingest import IngestStats
from daemon.runtime.metrics import BATCH_BUCKETS, SECONDS_BUCKETS, Metrics


def _without_created(text: bytes) -> list[str]:
    """The lines, `_created` samples cut to their names (they hold creation times)."""
    return [
        line.split(" ")[0] if "_created" in line and not line.startswith("#") else line
        for line in text.decode().splitlines()
    ]


def test_histograms_and_deliveries_as_prometheus_client_writes_them() -> None:
    metrics = Metrics(IngestStats(), EvaluatorStats(), HttpStats())
    registry = CollectorRegistry(auto_describe=False)
    reference = {
        name: PromHistogram(name, doc, buckets=buckets, registry=registry)
        for name, doc, buckets in (
            ("trigd_batch_events", metrics.batch_events.documentation, BATCH_BUCKETS),
            ("trigd_commit_seconds", metrics.commit_seconds.documentation, SECONDS_BUCKETS),
        )
    }
    deliveries = Counter(
        "trigd_deliveries", metrics.deliveries.documentation, ["outcome"], registry=registry
    )
    for outcome in ("delivered", "retry", "dead"):
        deliveries.labels(outcome)
    # on a bound, between bounds, past the last one, zero
    for count in (1, 1, 3, 500, 501, 10_000, 0):
        metrics.batch_events.observe(count)
        reference["trigd_batch_events"].observe(count)
    for seconds in (0.0005, 0.0007, 10.0, 11.5):
        metrics.commit_seconds.observe(seconds)
        reference["trigd_commit_seconds"].observe(seconds)
    decisions = (
        Delivered(),
        Delivered(),
        RetryAt(datetime(2026, 1, 1, tzinfo=UTC), "503"),
        Dead("gone"),
    )
    for decision in decisions:
        metrics.observe_attempt(decision, None)
    for outcome in ("delivered", "delivered", "retry", "dead"):
        deliveries.labels(outcome).inc()

    ours = _without_created(exposition(metrics, None))
    theirs = _without_created(generate_latest(registry))
    counter = 10  # HELP, TYPE, three values; HELP, TYPE, three _created
    histograms = len(theirs) - counter
    batch = ours.index("# HELP trigd_batch_events Events per committed batch")
    assert ours[batch : batch + histograms] == theirs[:histograms]
    start = ours.index(theirs[histograms])
    assert ours[start : start + counter] == theirs[histograms:]
