"""Raw websocket frames as a client sends them, right or wrong, for tests that speak the
protocol below wsproto (opcodes, reserved bits, unmasked frames, lengths that lie)."""

from __future__ import annotations

import os
from typing import Final

CONTINUATION: Final = 0x0
TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length_form: str = "minimal",
    declared: int | None = None,
) -> bytes:
    """One websocket frame as a client would send it, or as a hostile one could."""
    size = len(payload) if declared is None else declared
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask_bit = 0x80 if masked else 0
    if length_form == "minimal" and size <= 125:
        head += bytes([mask_bit | size])
    elif length_form in ("minimal", "16") and size <= 0xFFFF:
        head += bytes([mask_bit | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([mask_bit | 127]) + size.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
