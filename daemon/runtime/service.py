"""``trigd serve``: the daemon's nursery and lifecycle (docs/OPERATIONS.md#starting-and-stopping,
#signals, #durability).

Theory of operation. Start-up opens the store (taking its lock), loads the automation
files, and starts the tasks in dependency order with ``nursery.start``: sender, the
upstream forwarder (with ``[upstream]`` forwarding), sweeper, inbox pump, evaluator, the
ingest server, whose start logs ``trigd listening on ws://HOST:PORT``, and the upstream
subscriber (with ``[upstream] subscribe``), which feeds the evaluator as ingest does. Only
then is ``READY=1`` sent to systemd. The subscriber is stopped with ingest.

Signals: SIGHUP reloads the automation files (all valid: swapped in; any invalid, or a
store that refuses the new set: the old set stays and the error is logged). SIGTERM and
SIGINT stop gracefully: the ingest server is cancelled first (no new connections or
frames; its end of the channel closes), the evaluator drains and commits what was queued
and returns, then everything else is cancelled. ``server.shutdown_timeout`` bounds the
drain.

Store trouble (docs/OPERATIONS.md#store-trouble) ends no task: each one that writes waits it out
(``daemon.runtime.store_trouble``), and a reload the store refused is simply not applied.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Final
from uuid import UUID

import apsw
import trio

from daemon.core.automations import Automation, AutomationFileError, load_automation_files
from daemon.core.clock import wall_clock
from daemon.core.config import Config, ConfigError, StoreConfig, UnusableSetting, load_config
from daemon.core.counters import CounterSource
from daemon.core.exit_codes import ExitCode
from daemon.core.firings import count_firings
from daemon.core.lints import lint_automation
from daemon.core.upstream import UpstreamStats
from daemon.engine.acting import log_firings
from daemon.engine.engine import BatchOutcome, Engine
from daemon.runtime.checkpointer import Checkpointer
from daemon.runtime.evaluator import (
    BatchEngine,
    BatchProgress,
    EvaluatorStats,
    process_in_transaction,
    run_evaluator,
)
from daemon.runtime.events_hub import EventsHub
from daemon.runtime.events_out import events_out_service
from daemon.runtime.gateway import StoreGateway
from daemon.runtime.http_routes import HttpApp
from daemon.runtime.http_server import HttpStats
from daemon.runtime.ingest import IngestStats, run_ingest, tls_context
from daemon.runtime.logs import configure_logging
from daemon.runtime.metrics import Metrics
from daemon.runtime.read_pacing import ReadPacing
from daemon.runtime.readiness import Readiness
from daemon.runtime.sender import Sender, run_sender
from daemon.runtime.store_trouble import CURRENT_BOARD, STORE_TROUBLE, Backoff, TroubleBoard
from daemon.runtime.sweeper import SweepSettings, run_sweeper
from daemon.runtime.systemd import Notifier
from daemon.wire.submission import Submission
from store.connection import Connection
from store.db import Store, StoreError, StoreUnavailable, UnusableDatabase
from store.events import inbox_size

log = logging.getLogger("trigd")


def loaded_automation(engine: Engine, automation_id: str) -> Automation | None:
    """The automation the daemon has loaded now under this id, if any (the sender's
    `current`: a revived delivery is made again from it)."""
    try:
        return engine.automations.get(UUID(automation_id))
    except ValueError:
        return None


class InboxPump:
    """Evaluates events trigd made itself (action results, state changes) when no client
    event arrives to carry them: each wake-up drains the inbox in bounded transactions.
    Store trouble is waited out with backoff; a bug is logged and retried a second later.

    Every evaluator batch drains the inbox too. So while clients send events, a wake-up
    first waits up to ``delay`` for an evaluator batch begun after it (``progress``) to
    commit, and drains by itself only if none does: the pump's own transactions, each a
    COMMIT and an fsync in the store thread, would otherwise sit between the batches whose
    acks clients wait on (a second in which many automations fire and their webhooks
    answer makes dozens)."""

    def __init__(
        self,
        gateway: StoreGateway,
        engine: BatchEngine,
        clock: Callable[[], datetime],
        hub: EventsHub | None = None,
        firings: dict[str, int] | None = None,
        *,
        progress: BatchProgress | None = None,
        delay: timedelta = timedelta(0),
    ) -> None:
        self._progress = progress
        self._delay = delay.total_seconds()
        self._gateway = gateway
        self._engine = engine
        self._clock = clock
        self._hub = hub  # events out: the events it commits go to its subscribers
        self._firings = firings if firings is not None else {}  # by automation (/metrics)
        self._wake = trio.Event()
        self._backoff = Backoff(log, "evaluating trigd's own events")

    def wake(self) -> None:
        self._wake.set()

    def _drain(self, conn: Connection) -> tuple[int, BatchOutcome]:
        done = process_in_transaction(conn, self._engine, [], self._clock())
        return inbox_size(conn), done

    async def _drain_once(self) -> int:
        left, done = await self._backoff.call(lambda: self._gateway.run(self._drain))
        committed = done.own_events
        if self._hub:
            self._hub.publish(committed)
        count_firings(self._firings, committed)
        log_firings(done.firings)  # committed: the store thread is done with them
        return left

    async def _evaluator_drained(self) -> bool:
        """Whether an evaluator batch begun after now committed within the delay (it drained
        the inbox, or woke the pump again for what it left)."""
        progress = self._progress
        if progress is None or self._delay <= 0:
            return False
        mark = progress.begun
        with trio.move_on_after(self._delay):
            await progress.wait_committed_after(mark)
            return True
        return False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if await self._evaluator_drained():
                continue
            try:
                while await self._drain_once() > 0:
                    await trio.lowlevel.checkpoint()
            except Exception:
                log.exception("evaluating trigd's own events failed; will retry")
                await trio.sleep(1)
                self._wake.set()


async def reload_automations(
    gateway: StoreGateway, engine: Engine, paths: Sequence[str], clock: Callable[[], datetime]
) -> bool:
    """SIGHUP: swap in the new set only when every file is valid and the store takes it.
    A refusing store is not waited out (the signal loop would stop answering SIGTERM);
    the engine swaps in memory only after its transaction commits, so the old set stays
    whole, and the next SIGHUP tries again."""
    try:
        automations = await trio.to_thread.run_sync(load_automation_files, list(paths))
    except AutomationFileError as exc:
        log.error("reload refused, keeping the automations loaded before: %s", exc)
        return False
    try:
        report = await gateway.run(engine.load_automations, automations, clock())
    except STORE_TROUBLE as exc:
        log.error(
            "reload failed, keeping the automations loaded before: the store refused the "
            "new set (%s: %s); send SIGHUP again once it clears",
            type(exc).__name__,
            exc,
        )
        return False
    log_lints(automations)
    log.info("reloaded %d automations", report.automations)
    return True


def log_lints(automations: Sequence[Automation]) -> None:
    """Each lint (docs/TRIGGERS.md#lints) at WARNING; a warning never refuses a load."""
    for automation in automations:
        for lint in lint_automation(automation):
            log.warning("automation %r: %s: %s", automation.name, lint.field, lint.message)


async def serve(
    config: Config,
    automations: Sequence[Automation],
    *,
    clock: Callable[[], datetime] = wall_clock,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run the daemon until SIGTERM/SIGINT. A setting that fails as start-up uses it (the
    TLS files and the database here, the listen address when ingest starts) raises
    UnusableSetting."""
    tls = tls_context(config.server)
    notifier = Notifier(env)
    store = await _open_store_once_unlocked(config.store, notifier)
    try:
        gateway = StoreGateway(store)
        engine = Engine.configured(config)
        # the store may be locked by another process for a while (`trigd outbox retry`),
        # or the disk full: wait, as every writing task does, rather than fail to start
        await _start_up_backoff("loading the automations", notifier).call(
            lambda: gateway.run(engine.load_automations, automations, clock())
        )
        await _run(config, gateway, engine, notifier, clock, tls)
    finally:
        store.close()


def open_store(settings: StoreConfig) -> Store:
    """The writer store; a path that cannot hold a database is the ``[store] path`` setting
    at fault. (A database in use by another trigd, or too new, stays a StoreError.)"""
    try:
        return Store.open(
            settings.path,
            synchronous=settings.synchronous,
            cache_kib=settings.page_cache_mib * 1024,
        )
    except UnusableDatabase as exc:
        raise UnusableSetting("store", "path", exc.path, exc.why) from exc


OPEN_TROUBLE: Final = (
    apsw.BusyError,
    apsw.LockedError,
    apsw.FullError,
    apsw.IOError,
    StoreUnavailable,
)
"""What opening the store waits out: another process (not a trigd: that one is refused
at once) holding the write lock, a full or failing disk. Every other failure at open is
for an operator to fix and ends start-up."""


START_UP_TRY: Final = 30.0
"""Seconds systemd is asked to allow for one more try of a start-up step that waits out
store trouble, beyond the wait before it (SQLite's busy timeout is 5 s)."""


def _start_up_backoff(what: str, notifier: Notifier) -> Backoff:
    """A Backoff for start-up, before READY=1: systemd ends a start that takes longer than
    TimeoutStartSec and restarts it, so each wait extends that time past the next try."""

    async def extend(delay: float) -> None:
        await notifier.notify(f"EXTEND_TIMEOUT_USEC={int((delay + START_UP_TRY) * 1e6):d}")

    return Backoff(log, what, on_wait=extend)


async def _open_store_once_unlocked(settings: StoreConfig, notifier: Notifier) -> Store:
    """`open_store`, waiting while the store cannot be opened for now (`OPEN_TROUBLE`),
    as the writing tasks wait later on: a full disk at boot must not end in a restart
    loop, and the cause is logged once."""

    async def attempt() -> Store:
        return open_store(settings)

    backoff = _start_up_backoff("opening the database", notifier)
    return await backoff.call(attempt, retry_on=OPEN_TROUBLE)


async def _run(
    config: Config,
    gateway: StoreGateway,
    engine: Engine,
    notifier: Notifier,
    clock: Callable[[], datetime],
    tls: ssl.SSLContext | None,
) -> None:
    send, receive = trio.open_memory_channel[Submission](config.server.queue_depth)
    ingest_stats, evaluator_stats = IngestStats(), EvaluatorStats()
    # HTTP on the listen port: /metrics reads the counters live, /api/ready the registry
    http_stats, trouble = HttpStats(), TroubleBoard()
    CURRENT_BOARD.set(trouble)  # every Backoff of the tasks started below reports to it
    events_out = events_out_service(config.store.path, config.events_out, clock)
    upstream_stats = UpstreamStats()
    metrics = Metrics(
        ingest_stats,
        evaluator_stats,
        http_stats,
        gateway,
        events_out=events_out.stats,
        upstream=upstream_stats if config.upstream.url else None,
    )
    readiness = Readiness()
    readiness.add("store", trouble.reasons)
    readiness.add(  # reported, not failing: local work goes on while the upstream is away
        "upstream",
        partial(
            upstream_stats.ready_reasons,
            forwarding=config.upstream.forwarding,
            subscribing=config.upstream.subscribing,
        ),
        failing=False,
    )
    http = HttpApp(
        config.server,
        send,
        clock,
        ingest_stats,
        readiness,
        metrics,
        database=Path(config.store.path),
        insight=config.insight,
    )
    groups = {"ingest": ingest_stats, "evaluator": evaluator_stats, "events_out": events_out.stats}
    counters = CounterSource(
        os.getpid(), clock(), groups | ({"upstream": upstream_stats} if config.upstream.url else {})
    )
    if config.upstream.url:  # imported only then: a daemon without [upstream] is smaller
        from daemon.runtime import upstream

        credentials = upstream.resolve_credentials(config.upstream, os.environ)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            # WAL checkpoints beside the writer's commits, not inside them
            checkpointer = Checkpointer(
                gateway,
                request_at=config.store.wal_checkpoint_pages,
                inline_at=config.store.wal_max_pages,
            )
            await nursery.start(checkpointer.run)
            progress = BatchProgress()  # the pump leaves the inbox to the evaluator's batches
            pump = InboxPump(
                gateway,
                engine,
                clock,
                events_out.hub,
                evaluator_stats.firings,
                progress=progress,
                delay=config.store.inbox_pump_delay,
            )
            sender: Sender = await nursery.start(
                lambda *, task_status: run_sender(
                    gateway,
                    config.delivery,
                    clock=clock,
                    emit=lambda events: pump.wake(),
                    current=partial(loaded_automation, engine),
                    on_attempt=metrics.observe_attempt,
                    ingest=progress,  # deliveries give way while clients send events
                    task_status=task_status,
                )
            )

            wakes = [sender.notify, pump.wake]
            if config.upstream.forwarding:
                forwarder = upstream.Forwarder(
                    config.upstream,
                    credentials,
                    gateway,
                    upstream_stats,
                    clock=clock,
                )
                await nursery.start(forwarder.run)
                wakes.append(forwarder.notify)

            def committed() -> None:
                for wake in wakes:
                    wake()

            settings = SweepSettings(
                config.triggers.proactive_granularity,
                config.store.event_retention,
                config.store.outbox_retention,
                forward_backlog=config.upstream.backlog if config.upstream.forwarding else None,
                proactive_chunk=config.triggers.proactive_chunk,
            )
            await nursery.start(
                lambda *, task_status: run_sweeper(
                    gateway,
                    engine,
                    settings,
                    clock=clock,
                    on_commit=committed,
                    counters=counters,
                    on_pass=metrics.observe_sweep,
                    upstream=upstream_stats,
                    task_status=task_status,
                )
            )
            await nursery.start(pump.run)
            evaluator_done = trio.Event()
            pacing = ReadPacing()  # readers hold off while the evaluator lingers

            async def evaluate(*, task_status: trio.TaskStatus[None]) -> None:
                try:
                    await run_evaluator(
                        gateway,
                        engine,
                        receive,
                        clock=clock,
                        batch_max=config.server.batch_max_events,
                        linger=config.store.commit_linger,
                        linger_events=config.store.commit_linger_events,
                        stats=evaluator_stats,
                        on_commit=committed,
                        log_limits=config.log.limits,
                        on_batch=lambda batch, seconds: metrics.observe_batch(
                            batch, seconds, clock()
                        ),
                        hub=events_out.hub,
                        pacing=pacing,
                        progress=progress,
                        task_status=task_status,
                    )
                finally:
                    evaluator_done.set()

            await nursery.start(evaluate)
            readiness.add(
                "tasks", lambda: ["the evaluator has stopped"] if evaluator_done.is_set() else []
            )
            ingest_scope = trio.CancelScope()

            async def ingest(*, task_status: trio.TaskStatus[int]) -> None:
                with ingest_scope:
                    await run_ingest(
                        config.server,
                        send,
                        clock=clock,
                        tls=tls,
                        stats=ingest_stats,
                        log_limits=config.log.limits,
                        routes=http.routes(),
                        http_stats=http_stats,
                        events_out=events_out,
                        pacing=pacing,
                        task_status=task_status,
                    )

            await nursery.start(ingest)
            upstream_scope = trio.CancelScope()
            if config.upstream.subscribing:
                subscriber = upstream.Subscriber(
                    config.upstream,
                    credentials,
                    gateway,
                    send.clone(),
                    upstream_stats,
                    clock=clock,
                    max_event_bytes=config.server.max_event_bytes,
                    max_json_depth=config.server.max_json_depth,
                    log_limits=config.log.limits,
                )

                async def subscribe(*, task_status: trio.TaskStatus[None]) -> None:
                    with upstream_scope:
                        await subscriber.run(task_status=task_status)

                await nursery.start(subscribe)
            await notifier.notify("READY=1")
            nursery.start_soon(notifier.run_watchdog, partial(gateway.run, _store_alive))

            async for signum in signals:
                if signum == signal.SIGHUP:
                    await reload_automations(gateway, engine, config.triggers.automations, clock)
                    continue
                log.info("received %s: stopping", signal.Signals(signum).name)
                break
            await notifier.notify("STOPPING=1")
            ingest_scope.cancel()
            upstream_scope.cancel()
            with trio.move_on_after(config.server.shutdown_timeout.total_seconds()):
                await evaluator_done.wait()
            nursery.cancel_scope.cancel()
    log.info("trigd stopped")


def _store_alive(conn: apsw.Connection) -> None:
    conn.execute("SELECT 1").fetchall()


YOUNG_COLLECTION_THRESHOLD: Final = 10_000
"""Net new container objects between young collections (CPython's default is 700). At
thousands of events a second the objects in flight (events, batches, replies) pass 700
every few dozen events, and each collection walks them all again: about 7% of the daemon's
CPU under load. Refcounting frees nearly everything here; what it cannot free (a few
reference cycles per batch) waits for the next young collection, so this is also how much
garbage a flood carries: at 20,000 the flood's peak RSS was 0.2-0.9 MB higher than at
10,000, for no CPU per event that could be measured (docs/PERFORMANCE.md#memory)."""


def tune_garbage_collector() -> None:
    """After start-up: what it built (modules, pydantic schemas, automations) lives as long
    as the process, so it is frozen and no later collection walks it again (a quarter of
    ingest's CPU otherwise); and young collections come less often."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)


def serve_command(args: argparse.Namespace) -> int:
    configure_logging(args.log_level or "INFO")  # until the config says otherwise
    overrides = {"listen": args.listen, "db": args.db, "automations": args.automations}
    try:
        config = load_config(Path(args.config) if args.config else None, os.environ, overrides)
        automations = load_automation_files(list(config.triggers.automations))
    except (ConfigError, AutomationFileError) as exc:
        print(f"trigd serve: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    configure_logging(args.log_level or config.log.level, config.log.format)
    log_lints(automations)
    tune_garbage_collector()
    try:
        trio.run(serve, config, automations)
    except (UnusableSetting, BaseExceptionGroup) as exc:
        unusable = _start_up_failure(exc)
        if unusable is None:
            raise  # a bug: its traceback is the report
        print(f"trigd serve: {unusable}", file=sys.stderr)
        return ExitCode.USAGE if unusable.lasting else ExitCode.FAILURE
    except StoreError as exc:
        print(f"trigd serve: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return ExitCode.INTERRUPTED
    return ExitCode.OK


def _start_up_failure(exc: BaseException) -> UnusableSetting | None:
    """The setting that stopped start-up when nothing else went wrong: raised before the
    nursery starts (TLS files, database), or alone out of it (the listen address, with the
    tasks started before it cancelled)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, UnusableSetting) else None
