"""A standing campaign against the running daemon: hypothesis-generated hostile websocket
traffic must never end the process nor delay the connections that behave.

One `trigd serve` subprocess serves the whole module. A canary connection (``trigd.v1``)
sends a valid event every few milliseconds from a thread and must get an ack for each,
throughout. Each example opens its own connection over a raw TCP socket (after a real
upgrade, or instead of one) and sends frames built byte by byte: deep nesting, odd and
oversized lengths, invalid UTF-8, NaN, every opcode, reserved bits, masked or not,
fragments, truncated frames, all in one write or one frame per write. It then sends a
ping and reads until the pong or the server's close; a close must carry a code a client
can act on, never an internal error. Bounded: ``EXAMPLES`` sessions, each read at most
``READ_TIMEOUT`` seconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Final
from uuid import uuid4

import attrs
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)

from tests.support.daemon_process import LISTENING, write_config
from tests.support.raw_frames import BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT, frame

EXAMPLES: Final = int(os.environ.get("HOSTILE_EXAMPLES", "200"))  # sessions per run
MAX_EVENT_BYTES: Final = 4096  # frames past 2 x this close 1009: large inputs stay cheap
READ_TIMEOUT: Final = 3.0  # seconds to wait for the pong or the close of one session
CANARY_ACK_TIMEOUT: Final = 10.0  # seconds the canary waits for one ack at most
CLOSE_CODES: Final = frozenset({1000, 1002, 1007, 1008, 1009})
"""What trigd may close a misbehaving connection with: normal, protocol error, bad
payload, policy (auth), too big. Never 1011 (internal error)."""
INTERNAL_ERROR: Final = 1011


# --- the daemon, as a subprocess for the whole module --------------------------------------


@attrs.define
class Served:
    process: subprocess.Popen[bytes]
    port: int
    log: bytearray
    sessions: int = 0

    def connect(self) -> socket.socket:
        """A socket from the next of 250 loopback addresses: the attacker has many, as the
        daemon's per-peer bound assumes, so the frames are what each session tests."""
        self.sessions += 1
        source = (f"127.0.0.{2 + self.sessions % 250}", 0)
        return socket.create_connection(
            ("127.0.0.1", self.port), timeout=READ_TIMEOUT, source_address=source
        )

    def alive(self) -> bool:
        return self.process.poll() is None


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("hostile")
    config = write_config(
        directory,
        server={
            "max_event_bytes": MAX_EVENT_BYTES,
            "handshake_timeout": "2s",
            # sessions come faster than 16 pending slots turn over (a refused session
            # holds its slot through the close handshake, up to a second): the pool is
            # test_connection_limits' subject, the frames are this one's
            "max_pending_handshakes": 256,
        },
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "daemon", "serve", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )
    log = bytearray()
    listening = threading.Event()

    def read_log() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            log.extend(line)
            if LISTENING.search(log):
                listening.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        if not listening.wait(30):
            raise RuntimeError(f"trigd did not start:\n{log.decode(errors='replace')}")
        match = LISTENING.search(log)
        assert match is not None
        yield Served(process, int(match.group(3)), log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        reader.join(5)
        if process.stderr is not None:
            process.stderr.close()


# --- a raw client ---------------------------------------------------------------------------


def receive_until(
    sock: socket.socket, client: WSConnection, kinds: tuple[type[Event], ...], timeout: float
) -> Event | None:
    """The first event of one of ``kinds``; None when the server hung up or time ran out."""
    deadline = time.monotonic() + timeout
    while True:
        for event in client.events():
            if isinstance(event, kinds):
                return event
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except (TimeoutError, ConnectionError):
            return None
        if not data:
            return None
        client.receive_data(data)


def upgrade(sock: socket.socket, subprotocols: list[str]) -> tuple[socket.socket, WSConnection]:
    client = WSConnection(ConnectionType.CLIENT)
    request = Request(host="127.0.0.1", target="/api/events/in", subprotocols=subprotocols)
    sock.sendall(client.send(request))
    answer = receive_until(sock, client, (AcceptConnection, RejectConnection), READ_TIMEOUT)
    assert isinstance(answer, AcceptConnection), answer
    return sock, client


def event_text(**overrides: Any) -> str:
    event = {
        "id": str(uuid4()),
        "event": "canary.sang",
        "resource": {"prefect.resource.id": "canary.1"},
        "payload": {"n": 1},
    }
    return json.dumps(event | overrides)


# --- the canary -----------------------------------------------------------------------------


@attrs.define
class Canary:
    """Sends a valid event, waits for its ack, and again, until stopped."""

    port: int
    acks: int = 0
    slowest: float = 0.0
    problems: list[str] = attrs.Factory(list)
    stop: threading.Event = attrs.Factory(threading.Event)

    def run(self) -> None:
        try:
            connection = socket.create_connection(("127.0.0.1", self.port), timeout=READ_TIMEOUT)
            sock, client = upgrade(connection, ["trigd.v1"])
            with sock:
                sock.sendall(client.send(TextMessage(data='{"type":"auth"}')))
                reply = receive_until(sock, client, (TextMessage,), CANARY_ACK_TIMEOUT)
                assert isinstance(reply, TextMessage), reply
                while not self.stop.is_set():
                    text = event_text()
                    sent = time.monotonic()
                    sock.sendall(client.send(TextMessage(data=text)))
                    got = receive_until(sock, client, (TextMessage,), CANARY_ACK_TIMEOUT)
                    if not isinstance(got, TextMessage):
                        self.problems.append(f"no ack within {CANARY_ACK_TIMEOUT}s: {got}")
                        return
                    assert isinstance(got.data, str)
                    expected = {"type": "ack", "id": json.loads(text)["id"]}
                    if json.loads(got.data) != expected:
                        self.problems.append(f"not an ack: {got.data}")
                        return
                    self.acks += 1
                    self.slowest = max(self.slowest, time.monotonic() - sent)
                    self.stop.wait(0.01)
        except Exception as exc:  # reported by the test, not lost in the thread
            self.problems.append(repr(exc))


@pytest.fixture(scope="module")
def canary(served: Served) -> Iterator[Canary]:
    singer = Canary(served.port)
    thread = threading.Thread(target=singer.run, daemon=True)
    thread.start()
    yield singer
    singer.stop.set()
    thread.join(CANARY_ACK_TIMEOUT + 5)


# --- hostile sessions -------------------------------------------------------------------------


@attrs.frozen
class Frame:
    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0
    masked: bool = True
    length_form: str = "minimal"
    short_by: int = 0  # declares this many bytes more than it sends: the session ends there

    def wire(self) -> bytes:
        declared = len(self.payload) + self.short_by if self.short_by else None
        return frame(
            self.opcode,
            self.payload,
            fin=self.fin,
            rsv=self.rsv,
            masked=self.masked,
            length_form=self.length_form,
            declared=declared,
        )


def _nested(opener: str, levels: int) -> bytes:
    return (opener * levels).encode()


texts = st.one_of(
    st.builds(
        _nested, st.sampled_from(["[", '{"a":', '{"type":"auth","x":[']), st.integers(1, 2000)
    ),
    st.builds(
        lambda levels: event_text(payload={"x": "@"}).replace('"@"', "[" * levels + "]" * levels),
        st.integers(1, 300),
    ).map(str.encode),
    st.sampled_from(
        [
            b"[]",
            b"",
            b'{"type":"auth"}',
            event_text(payload={"x": "@"}).replace('"@"', "NaN").encode(),
            event_text(payload={"x": "@"}).replace('"@"', "-Infinity").encode(),
            event_text(payload={"x": "@"}).replace('"@"', "1e999").encode(),
            event_text(occurred="0001-01-01T00:00:00Z").encode(),
            event_text(occurred="9999-12-31T23:59:59-05:00").encode(),
            event_text(event="@").replace('"@"', '"\\ud800"').encode(),
            event_text().encode(),
            ("[" + event_text() + "," * 3 + "]").encode(),
        ]
    ),
    st.text(max_size=200).map(str.encode),
    st.binary(max_size=200),  # invalid UTF-8 as often as not
    st.integers(2 * MAX_EVENT_BYTES - 10, 2 * MAX_EVENT_BYTES + 10).map(lambda n: b"x" * n),
)
frames = st.builds(
    Frame,
    opcode=st.sampled_from([TEXT] * 6 + [BINARY, CONTINUATION, CLOSE, PING, PONG] + [3, 7, 11, 15]),
    payload=texts,
    fin=st.booleans() | st.just(True),
    rsv=st.sampled_from([0] * 8 + [1, 2, 4, 7]),
    masked=st.sampled_from([True] * 8 + [False]),
    length_form=st.sampled_from(["minimal"] * 6 + ["16", "64"]),
    short_by=st.sampled_from([0] * 12 + [1, 2**20, 2**62]),
)


@attrs.frozen
class Session:
    subprotocol: str | None  # None: a legacy client, events without an auth message
    authenticate: bool
    frames: tuple[Frame, ...]
    one_write: bool
    garbage: bytes | None = None  # sent instead of the upgrade request


sessions = st.builds(
    Session,
    subprotocol=st.sampled_from([None, "prefect", "trigd.v1", "trigd.v1"]),
    authenticate=st.booleans() | st.just(True),
    frames=st.lists(frames, min_size=1, max_size=4).map(tuple),
    one_write=st.booleans(),
    garbage=st.sampled_from([None] * 15) | st.binary(min_size=1, max_size=300),
)


def play(session: Session, served: Served) -> int | None:
    """Run one session; the close code the server sent, if it sent one."""
    if session.garbage is not None:
        with served.connect() as sock:
            sock.sendall(session.garbage)
            sock.shutdown(socket.SHUT_WR)
            try:
                while sock.recv(65536):
                    pass
            except (TimeoutError, ConnectionError):
                pass
        return None
    subprotocols = [] if session.subprotocol is None else [session.subprotocol]
    sock, client = upgrade(served.connect(), subprotocols)
    with sock:
        if session.subprotocol is not None and session.authenticate:
            sock.sendall(frame(TEXT, b'{"type":"auth"}'))
        wires = [f.wire() for f in session.frames]
        truncated = any(f.short_by for f in session.frames)
        try:
            for wire in [b"".join(wires)] if session.one_write else wires:
                sock.sendall(wire)
            if truncated:  # the server waits for the rest: nothing more to learn
                return None
            sock.sendall(frame(PING, b"probe"))
        except ConnectionError:
            pass  # closed on us while sending: what it said is still readable
        answer = receive_until(sock, client, (CloseConnection, Pong), READ_TIMEOUT)
    if isinstance(answer, CloseConnection):
        return int(answer.code)
    return None


M = b"\0\0\0\0"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(session=sessions)
@example(Session("trigd.v1", False, (Frame(TEXT, b"[" * 1000),), True))  # as the auth message
@example(Session("trigd.v1", True, (Frame(TEXT, b"[" * 1000),), True))  # as an event frame
@example(Session("trigd.v1", True, (Frame(TEXT, _nested('{"a":', 1000)),), True))
@example(Session("prefect", False, (Frame(BINARY, b'{"type":"auth"}'),), True))
@example(Session("trigd.v1", True, (Frame(TEXT, b"[]"),), True))
@example(Session("trigd.v1", True, (Frame(CONTINUATION, b"{}"),), True))
def test_hostile_frames_never_end_the_daemon_nor_stop_the_canary(
    served: Served, canary: Canary, session: Session
) -> None:
    try:
        code = play(session, served)
    finally:  # a daemon that died is the finding, whatever the client saw of it
        assert served.alive(), served.log.decode(errors="replace")[-8000:]
    if any(f.opcode == CLOSE for f in session.frames):
        assert code != INTERNAL_ERROR  # a client's own close is echoed, whatever its code
    else:
        assert code is None or code in CLOSE_CODES, code
    first = session.frames[0]
    authenticated = session.subprotocol is None or session.authenticate
    if (
        session.garbage is None
        and not any(f.short_by for f in session.frames)  # not read: see play
        and authenticated
        and first.opcode == CONTINUATION
        and (first.rsv, first.masked, first.short_by) == (0, True, 0)
    ):
        assert code == 1002, f"a continuation with nothing to continue closed {code}"
    assert not canary.problems, canary.problems


def test_the_canary_sang_throughout(served: Served, canary: Canary) -> None:
    """Runs after the campaign (pytest keeps file order): the canary got every ack."""
    assert served.alive()
    assert not canary.problems, canary.problems
    assert canary.acks > 0
    assert canary.slowest < CANARY_ACK_TIMEOUT
    print(f"canary: {canary.acks} acks, slowest {canary.slowest * 1000:.0f} ms")
    # every session gave its slot back: with 250 of them leaked, a newcomer would be refused
    for _ in range(3):
        sock, client = upgrade(served.connect(), ["trigd.v1"])
        with sock:
            sock.sendall(client.send(TextMessage(data='{"type":"auth"}')))
            sock.sendall(client.send(TextMessage(data=(text := event_text()))))
            replies = [receive_until(sock, client, (TextMessage,), READ_TIMEOUT) for _ in "ab"]
        assert [json.loads(str(r.data)) for r in replies if isinstance(r, TextMessage)] == [
            {"type": "auth_success"},
            {"type": "ack", "id": json.loads(text)["id"]},
        ]
