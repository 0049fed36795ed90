"""The websocket connection ingest reads from: trio-websocket's, with a chunked reader.

Theory of operation. trio-websocket runs one reader task per connection that feeds wsproto
and sends each message through a channel, so every frame costs several task switches.
``CheckpointConnection`` keeps trio-websocket for the HTTP upgrade and the close
handshake but replaces that reader: it reads the socket a chunk at a time and, once the
connection is open, passes the chunk through a ``FrameSplitter`` (``daemon.wire.wsframes``),
which decodes the whole text frames itself and hands every other frame to wsproto.
Complete messages and pings (as ``PingMarker``s, not answered here) are collected in
stream order and handed to the connection's ``FrameConsumer`` in one call per chunk, and
before anything else wsproto reports (a close, a protocol error), which trio-websocket then
handles as usual. Messages past ``max_message_size`` characters close the connection with
1009, as trio-websocket does; the close frame it omits when wsproto reports invalid UTF-8
(1007) is sent here. Before either close, the consumer answers the frames it already took
(their acks), so a client learns which of its events made it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Final, Protocol, cast

import attrs
import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from daemon.runtime.read_pacing import ReadPacing
from daemon.wire.wsframes import FrameSplitter

log = logging.getLogger(__name__)

MESSAGE_TOO_BIG: Final = 1009  # close code


@attrs.frozen(slots=True)
class PingMarker:
    """A ping from the client, in its place among the frames."""

    payload: bytes


Frame = str | bytes | PingMarker


class FrameConsumer(Protocol):
    """Where a connection's messages and pings go (the connection's ``_Session``)."""

    async def take(self, conn: CheckpointConnection, frames: list[Frame]) -> None:
        """Handle one chunk's complete messages and pings, in order; may wait on bounds."""

    async def drain(self) -> None:
        """Until the replies to every frame taken so far have been sent (bounded): the
        connection is about to be closed for a protocol error."""


class CheckpointConnection(WebSocketConnection):
    """A server connection whose frames go to a consumer a chunk at a time, pings too."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        consumer: FrameConsumer,
        *,
        max_message_size: int,
        receive_buffer_size: int,
    ) -> None:
        super().__init__(
            stream,
            WSConnection(ConnectionType.SERVER),
            message_queue_size=0,  # unused: messages go to the consumer
            max_message_size=max_message_size,
            receive_buffer_size=receive_buffer_size,
        )
        self._consumer = consumer
        self._frames: list[Frame] = []
        # since when the reader waits for the client's next bytes (None: it is busy, or
        # stopped by backpressure): what an idle timeout is measured from
        self.waiting_since: float | None = None
        self._splitter = FrameSplitter(min(max_message_size, receive_buffer_size))
        # set once the connection may submit events: its reader then holds off between
        # small reads while its events wait for the evaluator (``daemon.runtime.read_pacing``)
        self.pacing: ReadPacing | None = None
        self._owed: Callable[[], int] = lambda: 0  # events whose acks the client waits for

    async def _flush(self) -> None:
        """Hand the frames collected so far to the consumer (none once closing)."""
        frames, self._frames = self._frames, []
        if frames and self._close_reason is None:
            await self._consumer.take(self, frames)

    async def _handle_message_event(self, event: TextMessage | BytesMessage) -> None:
        # trio-websocket's, except that a complete message joins the chunk's frames, and
        # what arrives once we are closing is dropped (it would be a second close).
        if self._wsproto.state != ConnectionState.OPEN:
            return
        data = event.data
        self._message_size += len(data)
        self._message_parts.append(data if isinstance(data, str) else bytes(data))
        if self._message_size > self._max_message_size:
            await self._flush()  # what came before this frame is handled as before
            await self._consumer.drain()  # and answered, before the close
            err = f"Exceeded maximum message size: {self._max_message_size} bytes"
            self._message_size = 0
            self._message_parts = []
            self._close_reason = CloseReason(MESSAGE_TOO_BIG, err)
            await self._send(CloseConnection(code=MESSAGE_TOO_BIG, reason=err))
            await self._recv_channel.aclose()
            self._reader_running = False
        elif event.message_finished:
            parts = self._message_parts  # all str or all bytes, as the message is
            if isinstance(event, BytesMessage):
                self._frames.append(b"".join(cast("list[bytes]", parts)))
            else:
                self._frames.append("".join(cast("list[str]", parts)))
            self._message_size = 0
            self._message_parts = []

    async def _handle_ping_event(self, event: Ping) -> None:
        self._frames.append(PingMarker(bytes(event.payload)))

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        # A close event while still OPEN was made up by wsproto for a frame it could not
        # parse (1007 invalid UTF-8, 1002): tell the peer before dropping the stream.
        if self._wsproto.state == ConnectionState.OPEN:
            await self._consumer.drain()  # the frames before the bad one are answered first
            with contextlib.suppress(ConnectionClosed):
                await self._send(CloseConnection(code=event.code, reason=event.reason))
        await super()._handle_close_connection_event(event)

    async def _dispatch(self, event: Event) -> None:
        if isinstance(event, TextMessage | BytesMessage):
            await self._handle_message_event(event)
        elif isinstance(event, Ping):
            await self._handle_ping_event(event)
        else:
            await self._flush()  # frames before a close (or anything else) come first
            if isinstance(event, CloseConnection):
                await self._handle_close_connection_event(event)
            elif isinstance(event, Pong):
                await self._handle_pong_event(event)
            elif isinstance(event, Request):
                await self._handle_request_event(event)
            else:
                log.warning("%s received unexpected event %r", self, event)

    async def _reader_task(self) -> None:
        """trio-websocket's reader task, except that once the connection is open the bytes
        go through a ``FrameSplitter`` first, and the frames collected from each chunk are
        handed to the consumer in one call; and that, with ``pacing``, a chunk that did not
        fill the buffer, with events of the client still unresolved, is followed by a wait
        for the evaluator's next close (its window's end, or its commit's)."""
        held = False  # woken by the pacing: tell it once this read's frames are handed over
        small = True  # the last read did not fill the buffer: no more is waiting in it
        try:
            async with self._send_channel:
                while self._reader_running:
                    try:
                        await self._handle_events()
                        await self._flush()
                    except ConnectionClosed:
                        self._reader_running = False
                    pacing = self.pacing
                    if pacing is not None:
                        if held:
                            pacing.handed_over()
                            held = False
                        if self._reader_running and small and self._owed():
                            held = await pacing.hold()
                    size = await self._read()
                    if size is None:
                        break
                    small = size < (self._receive_buffer_size or 0)
        finally:
            if held and self.pacing is not None:
                self.pacing.handed_over()

    def pace(self, pacing: ReadPacing, owed: Callable[[], int]) -> None:
        """Hold off between small reads until ``pacing``'s next close while ``owed()``
        (events of the client not committed yet): a client waiting for none, whose next
        frame may be a ping, is read at once."""
        self.pacing = pacing
        self._owed = owed

    async def _read(self) -> int | None:
        """Read the next chunk into wsproto or the splitter; its size, or None when the
        stream is over."""
        self.waiting_since = trio.current_time()
        try:
            data = await self._stream.receive_some(self._receive_buffer_size)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self._abort_web_socket()
            return None
        finally:
            self.waiting_since = None
        if len(data) == 0:
            # TCP closed before the websocket did: an abnormal closure.
            if self._wsproto.state != ConnectionState.CLOSED:
                await self._abort_web_socket()
            return None
        if not isinstance(data, bytes):
            data = bytes(data)  # trio's sockets give bytes; other streams might not
        if self._wsproto.state == ConnectionState.OPEN:
            pieces = self._splitter.feed(data)
        else:  # upgrading or closing: all of it is wsproto's
            pieces = [self._splitter.rest() + data]
        try:
            await self._receive(pieces)
        except ConnectionClosed:
            self._reader_running = False
        return len(data)

    async def _receive(self, pieces: list[str | bytes]) -> None:
        last = len(pieces) - 1
        for index, piece in enumerate(pieces):
            if isinstance(piece, str):
                self._frames.append(piece)
            elif self._wsproto.state != ConnectionState.CLOSED:
                try:
                    self._wsproto.receive_data(piece)
                except RemoteProtocolError as err:
                    if err.event_hint:
                        await self._send(err.event_hint)
                    await self._close_stream()
                    return
                if index < last:  # what wsproto makes of it comes before the next messages
                    await self._handle_events()

    async def _handle_events(self) -> None:
        for event in self._wsproto.events():
            await self._dispatch(event)

    async def abort(self) -> None:
        """Drop the connection without a close handshake (a client that takes no data)."""
        await self._abort_web_socket()
        await trio.aclose_forcefully(self._stream)

    async def send_frames(self, frames: list[bytes]) -> None:
        """Several encoded frames (``daemon.wire.wsframes``) in one write; acks come in runs."""
        if self._close_reason or self._wsproto.state != ConnectionState.OPEN:
            raise ConnectionClosed(self._close_reason)
        data = b"".join(frames)
        async with self._stream_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self._abort_web_socket()
                raise ConnectionClosed(self._close_reason) from None
