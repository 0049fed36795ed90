"""The whole daemon under load (issue 5): prints numbers and compares them with the targets.

    .venv/bin/python bench/bench_daemon.py            # full: 100,000 events, 20 s paced
    .venv/bin/python bench/bench_daemon.py --quick    # 10,000 events, 5 s paced

Set-up: the real daemon as a subprocess (``python -m daemon serve --config``) on a temp
dir with ``synchronous = "full"``; 100 reactive automations (``for_each:
[prefect.resource.id]``, threshold 10 within 60 s, each expecting its own event name) and
5 proactive ones (a heartbeat that never comes, threshold 1 within 10 s), all with a
``call-webhook`` action to a local receiver (``bench/peers.py receiver``, its own process)
that answers 200 at once. One websocket client (a raw socket speaking subprotocol
``trigd.v1``: one ack per event after its commit) sends one event per frame in Prefect's
JSON over 1,000 resources. Resources 0-99 always send the same name, so each of them
crosses its threshold at its 10th event and fires; its next window only opens 60 s of
event time later, past the end of a run (events are stamped 0.1 ms apart), so a run fires
about 100 webhooks. The other resources change name every round, so they only open
buckets.

Phases on one connection:

1. sustained: every event as fast as the daemon takes them (TCP backpressure), events/s
   from the first frame sent to the last ack received;
2. paced: 1,000 events/s for a while, ack latency from send to ack (p50, p99).

For each phase, the batches trigd committed (from its ``/metrics``): how many events each
held and how much of the daemon's CPU each cost. Then the daemon's peak RSS (VmHWM), its
RSS idle (read one second after it listens, before the first event) and its CPU, and the
client alone against a trivial server (``bench/peers.py trivial``) to show what the client
itself costs on this machine.

``--set section.key=value`` adds a setting to trigd's config (``--set "store.commit_linger
= '20ms'"``). ``--floor`` then runs the paced phase against ``bench/peers.py trivial-runs``:
a trio server that reads a trickle in runs, as trigd's readers do, and acks each frame
without parsing or storing it: what the transport alone costs at that rate.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, TextIO

import attrs
import trio
import uuid6
from peers import RECEIVE_BYTES, next_ws_event  # this directory, first on sys.path
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

ROOT: Final = Path(__file__).resolve().parent.parent
PEERS: Final = Path(__file__).resolve().parent / "peers.py"

RESOURCES: Final = 1_000
REACTIVE: Final = 100  # automations, one event name each
PROACTIVE: Final = 5  # automations
FIRING_RESOURCES: Final = 100  # resources that keep one event name (and so fire)
THRESHOLD: Final = 10  # events per firing
WITHIN: Final = 60  # seconds
START_TIMEOUT: Final = 30.0  # seconds for a process to start listening
STOP_TIMEOUT: Final = 15.0  # seconds for the daemon to exit after SIGTERM
IDLE_SETTLE: Final = 1.0  # seconds after it listens before its idle RSS is read

TARGET_EVENTS_PER_S: Final = 10_000
TARGET_P99_MS: Final = 25.0
TARGET_RSS_MB: Final = 150.0

LISTENING: Final = re.compile(r"trigd listening on ws://127\.0\.0\.1:(\d+)")
_ACK: Final = '{"type":"ack","id":"'
_ACK_BYTES: Final = _ACK.encode()
CHUNK_FRAMES: Final = 64  # frames per write when sending flat out
_TICKS: Final = os.sysconf("SC_CLK_TCK")


# --- the workload ----------------------------------------------------------------------


def automations(receiver_url: str) -> list[dict[str, object]]:
    action = {"type": "call-webhook", "url": receiver_url}
    out: list[dict[str, object]] = [
        {
            "name": f"bench reactive {k}",
            "trigger": {
                "type": "event",
                "posture": "Reactive",
                "match": {"prefect.resource.id": "bench.res.*"},
                "expect": [f"bench.e{k}"],
                "for_each": ["prefect.resource.id"],
                "threshold": THRESHOLD,
                "within": WITHIN,
            },
            "actions": [action],
        }
        for k in range(REACTIVE)
    ]
    out += [
        {
            "name": f"bench proactive {j}",
            "trigger": {
                "type": "event",
                "posture": "Proactive",
                "expect": [f"bench.heartbeat.{j}"],
                "threshold": 1,
                "within": 10,
            },
            "actions": [action],
        }
        for j in range(PROACTIVE)
    ]
    return out


def event_name(seq: int) -> str:
    r, round_ = seq % RESOURCES, seq // RESOURCES
    k = r % REACTIVE if r < FIRING_RESOURCES else (r + round_) % REACTIVE
    return f"bench.e{k}"


def frames(first: int, count: int, rate: float) -> list[tuple[str, str]]:
    """(id, frame) pairs; the id comes first in each frame (the trivial server slices it).

    `occurred` starts now and grows by 1/rate per event, as if stamped when sent.
    """
    start = datetime.now(UTC)
    step = timedelta(seconds=1 / rate)
    out = []
    for n, seq in enumerate(range(first, first + count)):
        event_id = str(uuid6.uuid7())  # Prefect's client default
        occurred = (start + n * step).isoformat().replace("+00:00", "Z")
        r = seq % RESOURCES
        out.append(
            (
                event_id,
                f'{{"id": "{event_id}", "occurred": "{occurred}", "event": "{event_name(seq)}", '
                f'"resource": {{"prefect.resource.id": "bench.res.{r}", '
                f'"prefect.resource.name": "resource {r}"}}, '
                f'"related": [{{"prefect.resource.id": "bench.site.{r % 10}", '
                f'"prefect.resource.role": "site"}}], '
                f'"payload": {{"seq": {seq}, "value": {seq % 97 / 7:.3f}}}, "follows": null}}',
            )
        )
    return out


# --- processes -------------------------------------------------------------------------


def _cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICKS, int(fields[12]) / _TICKS


def _cpu_seconds(pid: int) -> float:
    return sum(_cpu_split(pid))


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the main thread (trio) and of each other thread, by thread id."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        name = "main" if task.name == str(pid) else f"thread {task.name}"
        out[name] = (int(fields[11]) + int(fields[12])) / _TICKS
    return out


def _status_mb(pid: int, *fields: str) -> list[float]:
    """Fields of ``/proc/<pid>/status`` given in kB (``VmHWM``, ``RssAnon``...), in MiB."""
    found = {
        name: int(rest.split()[0]) / 1024
        for name, _, rest in (
            line.partition(":") for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        if name in fields
    }
    return [found[field] for field in fields]


def _vm_hwm_mb(pid: int) -> float:
    return _status_mb(pid, "VmHWM")[0]


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def start_peer(role: str) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, str(PEERS), role], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("port "):
        process.kill()
        raise RuntimeError(f"peers.py {role} did not start: {line!r}")
    return process, int(line.split()[1])


def start_daemon(
    workdir: Path,
    receiver_port: int,
    settings: Sequence[str] = (),
    cpus: set[int] | None = None,
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """`settings`: more config lines, each ``section.key = value`` (TOML), as ``--set``
    gives them; a key set here replaces the bench's own. `cpus`: the daemon runs on these
    CPUs only (``--cpus``)."""
    rules = workdir / "automations.json"
    rules.write_text(json.dumps(automations(f"http://127.0.0.1:{receiver_port}/hook")))
    sections: dict[str, dict[str, str]] = {
        "server": {"listen": "'127.0.0.1:0'"},
        "store": {"path": f"'{workdir / 'trigd.db'}'", "synchronous": "'full'"},
        "triggers": {"automations": f"['{rules}']"},
    }
    for line in settings:
        name, _, value = line.partition("=")
        section, _, key = name.strip().partition(".")
        sections.setdefault(section, {})[key] = value.strip()
    return launch(
        workdir,
        "".join(
            f"[{section}]\n" + "".join(f"{key} = {value}\n" for key, value in keys.items())
            for section, keys in sections.items()
        ),
        cpus,
    )


def launch(
    workdir: Path, config_text: str, cpus: set[int] | None = None
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """``trigd serve`` on this config (its listen port must be 0), logging to a file in
    ``workdir``, on `cpus` only if given (as systemd's ``CPUAffinity=`` would: set before
    its threads start, which inherit it); returns once it listens: the process, its port
    and its log's path."""
    config = workdir / "trigd.toml"
    config.write_text(config_text)
    log_path = workdir / "trigd.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "daemon", "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=ROOT,
        )
    if cpus:
        os.sched_setaffinity(process.pid, cpus)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        match = LISTENING.search(log_path.read_text(errors="replace"))
        if match:
            return process, int(match.group(1)), log_path
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"trigd did not start:\n{log_path.read_text(errors='replace')}")


def stop(process: subprocess.Popen[bytes] | subprocess.Popen[str]) -> int | None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


# --- the client ------------------------------------------------------------------------


@attrs.define
class Phase:
    events: int
    seconds: float
    latencies_ms: list[float]
    sent_at: list[float]  # wall-clock time (epoch seconds) each event was sent
    nacks: int
    client_cpu: float
    peer_cpu: float
    peer_threads: dict[str, float]
    batches: int = 0  # trigd's committed batches in the phase (0: not known)

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    def percentile(self, p: float) -> float:
        return _percentile(self.latencies_ms, p)

    def without_slowest_second(self) -> tuple[int, float, float]:
        """The second of the phase (from its first send) holding the slowest ack, that
        second's p99, and the p99 of the other acks: when paced, the slowest second is the
        one in which resources 0-99 fire, and the rest is the trickle's own latency."""
        start = self.sent_at[0]
        seconds = [int(at - start) for at in self.sent_at]
        slowest = seconds[max(range(len(seconds)), key=self.latencies_ms.__getitem__)]
        inside = [ms for s, ms in zip(seconds, self.latencies_ms, strict=True) if s == slowest]
        rest = [ms for s, ms in zip(seconds, self.latencies_ms, strict=True) if s != slowest]
        return slowest, _percentile(inside, 99), _percentile(rest or inside, 99)


def _percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


class Client:
    """One trigd.v1 connection on a plain socket, so the client costs little next to trigd.

    wsproto does the opening handshake and masks every frame before the clock starts; the
    frames are then written in runs of up to ``CHUNK_FRAMES`` per ``send_all`` when sending
    flat out (one per write when paced), and the server's unmasked ack frames are sliced
    by hand. trigd acks in frame order, so each ack is checked against the next id sent.
    """

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self._ws = ws
        self.pending: deque[tuple[str, float]] = deque()
        self.latencies: list[float] = []
        self.sent: list[float] = []  # perf_counter when each acked event was sent
        self.nacks = 0
        self.last_ack = 0.0
        self._buffer = bytearray()
        self._expected = 0
        self._all_acked = trio.Event()
        self.wall_offset = time.perf_counter() - time.time()  # perf_counter - epoch

    @classmethod
    async def connect(cls, port: int, nursery: trio.Nursery) -> Client:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(
            ws.send(Request(host="127.0.0.1", target="/api/events/in", subprotocols=["trigd.v1"]))
        )
        await next_ws_event(stream, ws, AcceptConnection)
        await stream.send_all(ws.send(TextMessage(data='{"type":"auth","token":""}')))
        reply = await next_ws_event(stream, ws, TextMessage)
        if "auth_success" not in reply.data:
            raise RuntimeError(f"auth refused: {reply.data!r}")
        client = cls(stream, ws)
        nursery.start_soon(client._read)
        return client

    def encode(self, batch: Sequence[tuple[str, str]]) -> list[tuple[str, bytes]]:
        """Each frame masked and framed ahead of time (wsproto picks a fresh mask each)."""
        send = self._ws.send
        return [(event_id, send(TextMessage(data=frame))) for event_id, frame in batch]

    async def _read(self) -> None:
        buffer, pending, latencies, sent = self._buffer, self.pending, self.latencies, self.sent
        clock = time.perf_counter
        ack_len = len(_ACK)
        while True:
            data = await self.stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise RuntimeError("trigd closed the connection")
            now = clock()
            buffer += data
            at = 0
            while len(buffer) - at >= 2:
                opcode, size = buffer[at] & 0x0F, buffer[at + 1] & 0x7F
                head = 2
                if size == 126:
                    head, size = 4, int.from_bytes(buffer[at + 2 : at + 4], "big")
                elif size == 127:
                    head, size = 10, int.from_bytes(buffer[at + 2 : at + 10], "big")
                if len(buffer) - at < head + size:
                    break
                body = bytes(buffer[at + head : at + head + size])
                at += head + size
                if opcode != 0x1:
                    raise RuntimeError(f"unexpected frame opcode {opcode}: {body!r}")
                event_id, started = pending.popleft()
                if body.startswith(_ACK_BYTES):
                    acked = body[ack_len : ack_len + 36].decode()
                else:
                    self.nacks += 1
                    acked = json.loads(body)["id"]
                if acked != event_id:
                    raise RuntimeError(f"reply for {acked} while {event_id} was next")
                latencies.append((now - started) * 1000)
                sent.append(started)
            del buffer[:at]
            self.last_ack = now
            if not pending and len(latencies) >= self._expected:
                self._all_acked.set()

    async def run(self, batch: Sequence[tuple[str, bytes]], rate: float | None, peer: int) -> Phase:
        """Send every frame (paced at `rate` per second, or flat out); wait for every ack."""
        self.latencies.clear()
        self.sent.clear()
        self.nacks = 0
        self._expected = len(batch)
        self._all_acked = trio.Event()
        send, pending, clock = self.stream.send_all, self.pending, time.perf_counter
        step = 1 if rate is not None else CHUNK_FRAMES
        cpu0, peer0, threads0 = _self_cpu(), _cpu_seconds(peer), _thread_cpu(peer)
        start = clock()
        for n in range(0, len(batch), step):
            if rate is not None:
                wait = start + n / rate - clock()
                if wait > 0:
                    await trio.sleep(wait)
            run = batch[n : n + step]
            sent = clock()
            pending.extend((event_id, sent) for event_id, _ in run)
            await send(b"".join(frame for _, frame in run))
        await self._all_acked.wait()
        return Phase(
            len(batch),
            self.last_ack - start,
            list(self.latencies),
            [at - self.wall_offset for at in self.sent],
            self.nacks,
            _self_cpu() - cpu0,
            _cpu_seconds(peer) - peer0,
            {
                name: seconds - threads0.get(name, 0.0)
                for name, seconds in _thread_cpu(peer).items()
            },
        )


BATCHES: Final = re.compile(rb"^trigd_batch_events_count (\S+)$", re.MULTILINE)


def _batches(port: int) -> int | None:
    """trigd's committed batches so far, from its /metrics (None: not to be had)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            found = BATCHES.search(reply.read())
    except OSError:
        return None
    return int(float(found.group(1))) if found else None


async def _measured(
    client: Client,
    frames: Sequence[tuple[str, bytes]],
    rate: float | None,
    peer: int,
    metrics: int | None,
) -> Phase:
    """`client.run`, with the batches trigd committed meanwhile when `metrics` is its port
    (None: a peer that is not trigd)."""
    if metrics is None:
        return await client.run(frames, rate, peer)
    before = _batches(metrics)
    phase = await client.run(frames, rate, peer)
    after = _batches(metrics)
    if before is None or after is None:
        return phase  # unknown, rather than a count from one end only
    return attrs.evolve(phase, batches=after - before)


async def drive(
    port: int,
    peer: int,
    sustained: Sequence[tuple[str, str]],
    paced: Sequence[tuple[str, str]],
    rate: float,
    trigd: bool = True,
) -> tuple[Phase, Phase | None]:
    metrics = port if trigd else None
    async with trio.open_nursery() as nursery:
        client = await Client.connect(port, nursery)
        flat_frames, paced_frames = client.encode(sustained), client.encode(paced)
        flat_out = await _measured(client, flat_frames, None, peer, metrics)
        steady = await _measured(client, paced_frames, rate, peer, metrics) if paced else None
        nursery.cancel_scope.cancel()
    return flat_out, steady


PACED_RATE: Final = 1_000.0  # events per second in the latency phase


# --- the report ------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(out: TextIO, lines: Iterator[str]) -> None:
    for line in lines:
        print(line, file=out, flush=True)


def describe(label: str, phase: Phase, peer_name: str) -> Iterator[str]:
    per_event = 1e6 / phase.events
    yield (
        f"{label}: {phase.events:,} events in {phase.seconds:.2f} s = {phase.rate:,.0f} events/s; "
        f"ack latency p50 {phase.percentile(50):.1f} ms, p99 {phase.percentile(99):.1f} ms, "
        f"max {max(phase.latencies_ms):.1f} ms; nacks {phase.nacks}"
    )
    if phase.batches:
        yield (
            f"  batches: {phase.batches:,} committed, {phase.events / phase.batches:.1f} events "
            f"and {phase.peer_cpu * 1e6 / phase.batches:,.0f} µs of {peer_name} CPU each"
        )
    if phase.seconds >= 2:
        second, inside, rest = phase.without_slowest_second()
        yield (
            f"  slowest second ({second} s in, the firings' when paced): p99 {inside:.1f} ms; "
            f"p99 of the other seconds {rest:.1f} ms"
        )
    yield (
        f"  CPU: client {phase.client_cpu:.2f} s ({phase.client_cpu * per_event:.0f} µs/event), "
        f"{peer_name} {phase.peer_cpu:.2f} s ({phase.peer_cpu * per_event:.0f} µs/event)"
    )
    busy = sorted(phase.peer_threads.items(), key=lambda item: -item[1])
    yield (
        "  "
        + peer_name
        + " threads: "
        + ", ".join(
            f"{name} {seconds * per_event:.0f} µs/event" for name, seconds in busy if seconds > 0
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 events, 5 s paced")
    parser.add_argument("--events", type=int, help="events in the sustained phase")
    parser.add_argument("--paced-seconds", type=float, help="length of the 1,000/s phase")
    parser.add_argument(
        "--rate", type=float, default=PACED_RATE, help="events/s of the paced phase"
    )
    parser.add_argument("--no-client-baseline", action="store_true")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="after the daemon, the paced phase against peers.py trivial-runs: a server that "
        "reads a trickle in runs and acks, parsing and storing nothing",
    )
    parser.add_argument(
        "--cpus",
        type=lambda text: {int(cpu) for cpu in text.split(",")},
        metavar="N[,N...]",
        help="run the daemon on these CPUs only (its threads share their caches), and the "
        "client on the others",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (db, log)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="one more config setting for trigd, in TOML, e.g. \"store.commit_linger = '2ms'\" "
        "(repeatable)",
    )
    parser.add_argument(
        "--latencies",
        metavar="OUT",
        help="write the paced phase's acks to OUT: send time (epoch s) and latency (ms) a line",
    )
    parser.add_argument(
        "--profile", metavar="OUT", help="record the daemon with py-spy (collapsed stacks) to OUT"
    )
    args = parser.parse_args()
    py_spy = Path(sys.executable).parent / "py-spy"
    if args.profile and not py_spy.exists():
        parser.error(
            f"--profile needs py-spy beside this Python: {py_spy.parent}/pip install py-spy"
        )
    count = args.events or (10_000 if args.quick else 100_000)
    paced_seconds = (
        args.paced_seconds if args.paced_seconds is not None else (5.0 if args.quick else 20.0)
    )
    paced_count = int(paced_seconds * args.rate)
    sustained = frames(0, count, TARGET_EVENTS_PER_S)
    paced = frames(count, paced_count, args.rate)
    gc.freeze()  # the client's collector need not walk the pre-built frames again and again
    out = sys.stdout

    if args.cpus and (others := os.sched_getaffinity(0) - args.cpus):
        os.sched_setaffinity(0, others)  # the client, off the daemon's CPUs
    workdir = Path(tempfile.mkdtemp(prefix="trigd-bench-"))
    receiver, receiver_port = start_peer("receiver")
    try:
        daemon, port, log_path = start_daemon(workdir, receiver_port, args.set, args.cpus)
        try:
            time.sleep(IDLE_SETTLE)  # the tasks started after the listener, then idle
            idle = _status_mb(daemon.pid, "VmRSS", "RssAnon", "RssFile")
            spy = None
            if args.profile:
                spy = subprocess.Popen(
                    [
                        str(py_spy),
                        "record",
                        "--pid",
                        str(daemon.pid),
                        "--rate",
                        "200",
                        "--format",
                        "raw",
                        "--threads",
                        "--nonblocking",
                        "-o",
                        args.profile,
                    ],
                    stdout=subprocess.DEVNULL,
                )
                time.sleep(1.0)
            user0, system0 = _cpu_split(daemon.pid)
            flat_out, steady = trio.run(drive, port, daemon.pid, sustained, paced, args.rate)
            hwm = _vm_hwm_mb(daemon.pid)
            user1, system1 = _cpu_split(daemon.pid)
            daemon_user, daemon_system = user1 - user0, system1 - system0
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(STOP_TIMEOUT)
            code = stop(daemon)
        errors = [
            line
            for line in log_path.read_text(errors="replace").splitlines()
            if " ERROR " in line or "Traceback" in line
        ]
    finally:
        stop(receiver)

    report(out, describe("sustained", flat_out, "daemon"))
    if steady is not None:
        report(out, describe(f"paced {args.rate:,.0f}/s", steady, "daemon"))
    report(
        out,
        iter(
            [
                f"daemon: peak RSS (VmHWM) {hwm:.1f} MB, CPU {daemon_user + daemon_system:.1f} s "
                f"in total ({daemon_user:.1f} s user, {daemon_system:.1f} s system), "
                f"exit code {code}, {len(errors)} error lines in its log",
                f"daemon idle before the first event: RSS {idle[0]:.1f} MB "
                f"({idle[1]:.1f} anonymous, {idle[2]:.1f} file-backed)",
            ]
        ),
    )

    if not args.no_client_baseline:
        trivial, trivial_port = start_peer("trivial")
        try:
            alone, _ = trio.run(
                drive,
                trivial_port,
                trivial.pid,
                frames(0, count, TARGET_EVENTS_PER_S),
                [],
                0.0,
                False,
            )
        finally:
            stop(trivial)
        report(out, describe("client alone vs trivial server", alone, "server"))

    if args.floor and paced:
        runs, runs_port = start_peer("trivial-runs")
        try:
            warm_up = frames(0, 200, TARGET_EVENTS_PER_S)
            _, floor = trio.run(drive, runs_port, runs.pid, warm_up, paced, args.rate, False)
        finally:
            stop(runs)
        assert floor is not None
        report(out, describe("floor: trivial server reading in runs", floor, "server"))

    summary = [
        f"target sustained ≥ {TARGET_EVENTS_PER_S:,}/s: {flat_out.rate:,.0f} "
        f"{_verdict(flat_out.rate >= TARGET_EVENTS_PER_S)}",
        f"target RSS ≤ {TARGET_RSS_MB:.0f} MB: {hwm:.1f} {_verdict(hwm <= TARGET_RSS_MB)}",
    ]
    if steady is not None:
        p99 = steady.percentile(99)
        summary.insert(
            1,
            f"target p99 ≤ {TARGET_P99_MS:.0f} ms at {args.rate:,.0f}/s: {p99:.1f} "
            f"{_verdict(p99 <= TARGET_P99_MS)}",
        )
    report(out, iter(summary))
    if args.latencies and steady is not None:
        Path(args.latencies).write_text(
            "".join(
                f"{at:.6f} {ms:.3f}\n"
                for at, ms in zip(steady.sent_at, steady.latencies_ms, strict=True)
            )
        )
    if args.keep:
        print(f"kept {workdir}", file=out)
    else:
        for path in sorted(workdir.iterdir()):
            path.unlink()
        workdir.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
