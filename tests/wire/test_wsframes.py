"""daemon.wsframes: reply frames as wsproto reads them (``reply_frame``'s fast acks too),
and the splitter checked against wsproto alone on any stream of client frames, cut into
chunks anywhere."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from daemon.core.events import parse_incoming_event
from daemon.wire.handshake import Nack, encode_reply, reply_frame
from daemon.wire.submission import Submission
from daemon.wire.wsframes import FrameSplitter, text_frame
from tests.support.raw_frames import BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT, frame


def open_pair() -> tuple[WSConnection, WSConnection]:
    """A client and a server wsproto connection, upgraded in memory."""
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="localhost", target="/api/events/in")))
    assert isinstance(next(iter(server.events())), Request)
    client.receive_data(server.send(AcceptConnection()))
    assert isinstance(next(iter(client.events())), AcceptConnection)
    return client, server


def joined(parts: list[str | bytes]) -> str | bytes:
    texts = [p for p in parts if isinstance(p, str)]
    return "".join(texts) if texts else b"".join(p for p in parts if isinstance(p, bytes))


def messages(events: Iterable[Event], parts: list[str | bytes]) -> list[object]:
    """Events as comparable tuples; message parts are joined into whole messages."""
    out: list[object] = []
    for event in events:
        if isinstance(event, TextMessage | BytesMessage):
            data = event.data
            parts.append(data if isinstance(data, str) else bytes(data))
            if event.message_finished:
                out.append(("message", joined(parts)))
                parts.clear()
        elif isinstance(event, Ping | Pong):
            out.append((type(event).__name__, bytes(event.payload)))
        elif isinstance(event, CloseConnection):
            out.append(("close", event.code))
        else:
            out.append(("other", repr(event)))
    return out


def through_wsproto(chunks: list[bytes]) -> list[object]:
    _, server = open_pair()
    out: list[object] = []
    parts: list[str | bytes] = []
    for chunk in chunks:
        server.receive_data(chunk)
        out += messages(server.events(), parts)
    return out


def through_splitter(chunks: list[bytes], max_fast: int) -> list[object]:
    _, server = open_pair()
    splitter = FrameSplitter(max_fast)
    out: list[object] = []
    parts: list[str | bytes] = []
    for chunk in chunks:
        for piece in splitter.feed(chunk):
            if isinstance(piece, str):
                out.append(("message", piece))
            else:
                server.receive_data(piece)
                out += messages(server.events(), parts)
    return out


def until_close(events: list[object]) -> list[object]:
    """After a close nothing is read (and the ingest drops what it still had)."""
    for index, event in enumerate(events):
        if isinstance(event, tuple) and event[0] == "close":
            return events[: index + 1]
    return events


def cut(stream: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(stream), *(p % (len(stream) + 1) for p in points)})
    return [stream[a:b] for a, b in itertools.pairwise(edges)]


# --- replies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
def test_text_frames_read_back_through_a_wsproto_client(size: int) -> None:
    client, _ = open_pair()
    text = ("é" * size)[: max(0, size // 2)] + "x" * (size - 2 * (size // 2))
    client.receive_data(text_frame(text.encode()))
    (event,) = list(client.events())
    assert isinstance(event, TextMessage)
    assert event.data == text
    assert event.message_finished


@pytest.mark.parametrize(
    "event_id",
    [UUID(int=0), UUID(int=2**128 - 1), UUID("0192b1f0-8c7e-7b1a-9f00-123456789abc"), uuid4()],
)
@pytest.mark.parametrize("error", [None, "internal error: boom"])
def test_reply_frames_are_the_encoded_replies_framed(event_id: UUID, error: str | None) -> None:
    event = parse_incoming_event(
        json.dumps({"id": str(event_id), "event": "e", "resource": {"prefect.resource.id": "r"}}),
        datetime(2026, 1, 1, tzinfo=UTC),
    )
    submission = Submission(event, sink=None, done=True, error=error)  # type: ignore[arg-type]
    frame = reply_frame(submission)
    assert frame == text_frame(encode_reply(submission))
    client, _ = open_pair()
    client.receive_data(frame)
    (message,) = list(client.events())
    assert isinstance(message, TextMessage)
    expected = {"type": "ack", "id": str(event_id)}
    if error is not None:
        expected = {"type": "nack", "id": str(event_id), "error": error}
    assert json.loads(message.data) == expected


def test_nack_frames_are_the_encoded_nacks_framed() -> None:
    nack = Nack(None, "frame: not valid JSON")
    assert reply_frame(nack) == text_frame(encode_reply(nack))


# --- the splitter against wsproto -------------------------------------------------------------

texts = st.text(max_size=80)
small = st.binary(max_size=60)
frames_strategy = st.one_of(
    texts.map(lambda t: frame(TEXT, t.encode())),
    texts.map(lambda t: frame(TEXT, t.encode(), length_form="16")),
    small.map(lambda b: frame(BINARY, b)),
    small.map(lambda b: frame(PING, b)),
    small.map(lambda b: frame(PONG, b)),
    st.tuples(texts, texts, small).map(
        lambda t: (
            frame(TEXT, t[0].encode(), fin=False)
            + frame(PING, t[2])
            + frame(CONTINUATION, t[1].encode())
        )
    ),
    st.just(frame(TEXT, b'{"event": "\xc3\x28"}')),  # invalid UTF-8: 1007
    st.just(frame(TEXT, "é".encode()[:1])),  # truncated UTF-8
    st.just(frame(TEXT, b"{}", rsv=4)),  # a reserved bit
    st.just(frame(TEXT, b"{}", masked=False)),
    st.just(frame(CONTINUATION, b"{}")),  # nothing to continue
    st.just(frame(TEXT, b"x", fin=False) + frame(TEXT, b"y")),  # a new message too early
    st.just(frame(PING, b"", fin=False)),
    st.just(frame(CLOSE, (1000).to_bytes(2, "big") + b"bye")),
)


@settings(deadline=None, max_examples=400)
@given(
    st.lists(frames_strategy, max_size=12),
    st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
    st.sampled_from([0, 5, 40, 4096]),
)
def test_the_splitter_and_wsproto_see_the_same_stream_as_wsproto_alone(
    frames: list[bytes], points: list[int], max_fast: int
) -> None:
    stream = b"".join(frames)
    chunks = cut(stream, points)
    assert until_close(through_splitter(chunks, max_fast)) == until_close(through_wsproto(chunks))


def test_big_frames_and_fragments_are_left_to_wsproto() -> None:
    splitter = FrameSplitter(max_fast=10)
    big = frame(TEXT, b"y" * 300)
    first = frame(TEXT, b"a", fin=False)
    last = frame(CONTINUATION, b"b")
    pieces = splitter.feed(frame(TEXT, b"ok") + big[:100])
    assert pieces == ["ok", big[:100]]
    assert splitter.feed(big[100:] + first + frame(TEXT, b"!")[:3]) == [big[100:], first]
    # the frame split across feeds is kept whole, then passed on: a message is open
    assert splitter.feed(frame(TEXT, b"!")[3:] + last)[1:] == [last]
    assert splitter.feed(frame(TEXT, b"after")) == ["after"]


def test_a_partial_frame_waits_for_the_rest() -> None:
    splitter = FrameSplitter(max_fast=1000)
    whole = frame(TEXT, "ünïcode".encode())
    for at in range(len(whole) - 1):
        assert splitter.feed(whole[at : at + 1]) == []
    assert splitter.feed(whole[-1:]) == ["ünïcode"]
    assert splitter.rest() == b""
    splitter.feed(whole[:5])
    assert splitter.rest() == whole[:5]
