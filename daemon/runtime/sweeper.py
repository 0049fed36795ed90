"""The sweeper task: the periodic work of docs/TRIGGERS.md#scheduling-and-the-sweeper.

Every ``proactive_granularity`` (and at once on start, as Prefect's periodic task does): the
proactive pass over due Proactive triggers, the periodic pass (lost followers re-evaluated,
closed buckets swept), expiry of seen ids, event retention (sparing events `[upstream]`
has not forwarded yet, up to its `backlog`) and outbox retention. The
proactive pass runs in steps of at most ``proactive_chunk`` buckets, one gateway call and
one transaction each, so that acks interleave with a pass over many due buckets instead of
waiting for all of it; the step that ends the pass also runs the periodic pass. Firings are
atomic with their bucket changes; their INFO lines are written once the step's transaction
has committed, outside the store thread (a step that rolls back logs none). The
housekeeping deletes run in a last transaction,
bounded per pass so that a huge backlog of expired rows never holds the writer for long.

A failing pass is logged and the loop goes on (scenario 89): a bug in one trigger must not
stop every other automation's proactive evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import attrs
import trio

from daemon.core.clock import to_us
from daemon.core.config import PROACTIVE_CHUNK
from daemon.core.counters import META_KEY as COUNTERS_KEY
from daemon.core.counters import CounterSource
from daemon.core.durations import format_duration
from daemon.core.upstream import UpstreamStats
from daemon.engine.acting import FiringLine, log_firings
from daemon.engine.engine import Engine, ProactivePass
from daemon.runtime.evaluator import engine_transaction
from daemon.runtime.gateway import StoreGateway
from daemon.runtime.store_trouble import STORE_TROUBLE, Backoff
from store import events as events_store
from store import outbox as outbox_store
from store import upstream as upstream_store
from store.connection import Connection
from store.db import write_transaction
from store.upstream import Pruned

log = logging.getLogger(__name__)


@attrs.frozen
class SweepSettings:
    granularity: timedelta  # the sweeper's period
    event_retention: timedelta  # events received longer ago are deleted
    outbox_retention: timedelta  # delivered and dead rows finished longer ago are deleted
    # [upstream] forwarding on: events not yet forwarded outlive event_retention up to this
    forward_backlog: timedelta | None = None
    proactive_chunk: int = PROACTIVE_CHUNK  # buckets per transaction of a proactive pass


@attrs.define
class SweepReport:
    next_proactive: datetime
    swept_buckets: int = 0
    expired_seen: int = 0
    pruned_events: int = 0
    pruned_outbox: int = 0
    dropped_unforwarded: int = 0  # past the forward backlog bound, never forwarded


@attrs.frozen
class StepDone:
    """What one committed step of a pass did."""

    swept: int | None
    """Buckets the periodic pass swept when the step ended the pass, else None."""
    firings: Sequence[FiringLine]
    """The log lines of the step's firings, to write now that it has committed."""


def proactive_step(conn: Connection, engine: Engine, pass_: ProactivePass, limit: int) -> StepDone:
    """One transaction of a pass: up to `limit` buckets of proactive evaluation and, if
    that ends the pass, the periodic pass too."""
    # if the firings of this step roll back, so must the schedule that counted on them
    # (engine_transaction), or an alarm would wait a whole `within` more (an early
    # proactive run is harmless)
    with engine_transaction(conn, engine):
        if not engine.proactive_step(conn, pass_, limit):
            return StepDone(None, pass_.firings)
        periodic = engine.periodic(conn, pass_.now)
        return StepDone(periodic.swept, [*pass_.firings, *periodic.firings])


def housekeeping(
    conn: Connection,
    engine: Engine,
    report: SweepReport,
    settings: SweepSettings,
    now: datetime,
    counters: str | None = None,
) -> None:
    """The deletes of a pass and the counters' snapshot, in one transaction."""
    with write_transaction(conn):
        report.expired_seen = engine.ordering(conn).expire_seen(now)
        pruned = _prune_events(conn, settings, now)
        report.pruned_events = pruned.events
        report.dropped_unforwarded = pruned.unforwarded
        report.pruned_outbox = outbox_store.prune_finished(
            conn, to_us(now - settings.outbox_retention)
        )
        if counters is not None:
            events_store.write_meta(conn, COUNTERS_KEY, counters)


def sweep(
    conn: Connection,
    engine: Engine,
    settings: SweepSettings,
    now: datetime,
    counters: str | None = None,
) -> SweepReport:
    """One whole pass, step after step (each step's firings logged once it commits),
    then housekeeping; `now` is the wall clock; `counters` is a snapshot of the daemon's
    counters to store (``daemon.core.counters``)."""
    pass_ = engine.begin_proactive(now)
    swept = None
    while swept is None:
        step = proactive_step(conn, engine, pass_, settings.proactive_chunk)
        log_firings(step.firings)
        swept = step.swept
    assert pass_.next_run is not None
    report = SweepReport(pass_.next_run, swept_buckets=swept)
    housekeeping(conn, engine, report, settings, now, counters)
    return report


async def _sweep_in_steps(
    gateway: StoreGateway,
    engine: Engine,
    settings: SweepSettings,
    now: datetime,
    counters: str | None,
) -> SweepReport:
    """`sweep` as one gateway call per step, so other store work runs in between; each
    step's firings are logged here, on the trio thread, once the step has committed."""
    pass_ = engine.begin_proactive(now)
    swept = None
    while swept is None:
        step = await gateway.run(proactive_step, engine, pass_, settings.proactive_chunk)
        log_firings(step.firings)
        swept = step.swept
    assert pass_.next_run is not None
    report = SweepReport(pass_.next_run, swept_buckets=swept)
    await gateway.run(housekeeping, engine, report, settings, now, counters)
    return report


def _prune_events(conn: Connection, settings: SweepSettings, now: datetime) -> Pruned:
    """Event retention; with forwarding on, sparing what the upstream has not confirmed
    until it is older than the backlog bound (store/upstream.py)."""
    cutoff = to_us(now - settings.event_retention)
    if settings.forward_backlog is None:
        return upstream_store.prune_events_sparing(conn, cutoff)
    return upstream_store.prune_events_sparing(
        conn,
        cutoff,
        cursor=upstream_store.forward_cursor(conn),
        backlog_before_us=to_us(now - settings.forward_backlog),
    )


async def run_sweeper(
    gateway: StoreGateway,
    engine: Engine,
    settings: SweepSettings,
    *,
    clock: Callable[[], datetime],
    on_commit: Callable[[], None] = lambda: None,
    counters: CounterSource | None = None,
    on_pass: Callable[[float], None] = lambda seconds: None,
    upstream: UpstreamStats | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the passes forever; `on_commit` wakes the sender after firings were written;
    each pass stores a snapshot of `counters`; `on_pass` gets each pass's seconds
    (``/metrics``); unforwarded events dropped past the backlog bound are logged and
    counted in `upstream`. Store trouble is waited out with a
    backoff (logged once); any other failure is logged and the next pass comes on time."""
    task_status.started()
    period = settings.granularity.total_seconds()
    trouble = Backoff(log, "running the periodic pass")
    while True:
        now = clock()
        snapshot = None if counters is None else counters.snapshot(now)
        started = trio.current_time()
        try:
            report = await _sweep_in_steps(gateway, engine, settings, now, snapshot)
        except STORE_TROUBLE as exc:
            await trouble.wait(exc)
            continue
        except Exception:
            log.exception("periodic pass failed; trying again in %.3gs", period)
        else:
            on_pass(trio.current_time() - started)
            trouble.cleared()
            if counters is not None:
                counters.stored()
            on_commit()
            if report.dropped_unforwarded:
                log.warning(
                    "upstream backlog: dropped %d events never forwarded, received more "
                    "than [upstream] backlog (%s) ago",
                    report.dropped_unforwarded,
                    format_duration(settings.forward_backlog or timedelta(0)),
                )
                if upstream is not None:
                    upstream.dropped += report.dropped_unforwarded
            if report.swept_buckets or report.pruned_events or report.pruned_outbox:
                log.debug("periodic pass: %s", report)
        await trio.sleep(period)
