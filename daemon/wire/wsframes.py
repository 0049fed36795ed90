"""Websocket framing on the hot path (RFC 6455 §5), without I/O.

wsproto is the reference for everything a websocket can carry, and trio-websocket drives
it for the upgrade and the close handshake. Two things happen once per event, though, and
are cheap to do exactly here:

* ``text_frame``: the server's replies are unmasked, unfragmented text frames with no
  extension (trigd never negotiates one), so a header of two to ten bytes
  (``text_header``) is all they need.
* ``FrameSplitter``: what a client sends is nearly always one event per frame, each a
  complete, masked text frame. The splitter cuts the byte stream at frame boundaries and
  decodes those frames itself (unmask, strict UTF-8); every other frame (control frames,
  binary, fragments, reserved bits, non-minimal lengths, frames longer than ``max_fast``
  bytes, invalid UTF-8) is handed to wsproto as raw bytes, whole and in order, so wsproto
  judges it exactly as if it had seen the whole stream: its buffer is only ever given
  bytes that start at a frame boundary. A frame is decoded here only once all of it has
  arrived and while no fragmented message is open, so wsproto's message state never
  interleaves with ours; a frame of at most ``max_fast`` bytes decodes to at most that
  many characters, so the message-size bound needs no check here.
"""

from __future__ import annotations

from typing import Final

FIN_TEXT: Final = 0x81  # FIN set, no RSV bits, opcode 1 (text)
SHORT_LENGTH: Final = 125  # largest length that fits the second header byte
MEDIUM_LENGTH: Final = 0xFFFF  # largest length of the 16-bit extended form
MASKED: Final = 0x80  # second header byte: the payload is masked
LENGTH_BITS: Final = 0x7F
FIN: Final = 0x80
OPCODE_BITS: Final = 0x0F
CONTROL_OPCODES: Final = 0x08  # opcodes from here on are control frames

_XOR: Final = tuple(bytes(a ^ b for a in range(256)) for b in range(256))
"""translate() tables: _XOR[k] maps each byte to itself XOR k."""


_SHORT_HEADERS: Final = tuple(bytes((FIN_TEXT, size)) for size in range(SHORT_LENGTH + 1))


def text_header(size: int) -> bytes:
    """The header of a final, unmasked text frame of ``size`` payload bytes."""
    if size <= SHORT_LENGTH:
        return _SHORT_HEADERS[size]
    if size <= MEDIUM_LENGTH:
        return bytes((FIN_TEXT, 126)) + size.to_bytes(2, "big")
    return bytes((FIN_TEXT, 127)) + size.to_bytes(8, "big")


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked text frame carrying ``payload`` (UTF-8), as a server sends it."""
    return text_header(len(payload)) + payload


def unmask(key: bytes, payload: bytes) -> bytearray:
    """XOR ``payload`` with the repeated 4-byte ``key`` (RFC 6455 §5.3)."""
    data = bytearray(payload)
    data[0::4] = data[0::4].translate(_XOR[key[0]])
    data[1::4] = data[1::4].translate(_XOR[key[1]])
    data[2::4] = data[2::4].translate(_XOR[key[2]])
    data[3::4] = data[3::4].translate(_XOR[key[3]])
    return data


class FrameSplitter:
    """A server's incoming bytes, as decoded text messages (``str``) and raw bytes for
    wsproto, in stream order. Feed it from the moment the connection is open."""

    def __init__(self, max_fast: int) -> None:
        self.max_fast = max_fast
        self._pending = b""  # the start of a frame not complete yet
        self._passing = 0  # bytes of the frame being handed to wsproto still to come
        self._fragmented = False  # wsproto has a message open

    def feed(self, data: bytes) -> list[str | bytes]:
        """The messages complete in ``data`` (after what came before) and the raw bytes
        between them, in order; a partial frame is kept for the next call."""
        out: list[str | bytes] = []
        buf = self._pending + data if self._pending else data
        end = len(buf)
        pos = 0
        if self._passing:
            pos = min(self._passing, end)
            self._passing -= pos
            out.append(buf[:pos])
        max_fast = self.max_fast
        while end - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            size = second & LENGTH_BITS
            head = pos + 2
            minimal = True
            if size == 126:
                head += 2
                if head > end:
                    break
                size = int.from_bytes(buf[pos + 2 : head], "big")
                minimal = size > SHORT_LENGTH
            elif size == 127:
                head += 8
                if head > end:
                    break
                size = int.from_bytes(buf[pos + 2 : head], "big")
                minimal = size > MEDIUM_LENGTH
            masked = second & MASKED
            if masked:
                head += 4
                if head > end:
                    break
            frame_end = head + size
            if (
                first == FIN_TEXT
                and masked
                and minimal
                and size <= max_fast
                and not self._fragmented
            ):
                if frame_end > end:
                    break  # decoded once whole
                try:
                    out.append(unmask(buf[head - 4 : head], buf[head:frame_end]).decode())
                except UnicodeDecodeError:
                    out.append(buf[pos:frame_end])  # wsproto closes with 1007
                pos = frame_end
                continue
            if (first & OPCODE_BITS) < CONTROL_OPCODES:
                self._fragmented = not first & FIN
            passed = min(frame_end, end)
            out.append(buf[pos:passed])
            self._passing = frame_end - passed
            pos = passed
        self._pending = buf[pos:] if pos < end else b""
        return out

    def rest(self) -> bytes:
        """What is kept of a partial frame, for wsproto once the splitter is left."""
        pending, self._pending = self._pending, b""
        return pending
