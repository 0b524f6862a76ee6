"""Minimal RFC 6455 framing shared by the benchmark's echo upstream and load client.

Only what a benchmark needs: single-frame text/binary messages, ping/close, 7/16/64-bit
lengths, masking. It is fast because it does little (one XOR over an int for the mask), not
because it is complete: never use it outside benchmarks/.
"""

from __future__ import annotations

import base64
import hashlib
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def unmask(mask: bytes, payload: bytes) -> bytes:
    if mask == b"\0\0\0\0" or not payload:
        return payload
    n = len(payload)
    # One big-int XOR: ~100x faster than a Python loop for 64 KiB payloads.
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final frame; ``mask`` (4 bytes) for the client role."""
    n = len(payload)
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, bit | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, bit | 127, n)
    if mask is None:
        return head + payload
    return head + mask + unmask(mask, payload)


class FrameReader:
    """Incremental parser: feed bytes, get (fin, opcode, payload) tuples."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bool, int, bytes]]:
        self.buf += data
        out: list[tuple[bool, int, bytes]] = []
        buf = self.buf
        pos = 0
        while True:
            if len(buf) - pos < 2:
                break
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n = struct.unpack_from("!H", buf, pos + 2)[0]
                head = 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n = struct.unpack_from("!Q", buf, pos + 2)[0]
                head = 10
            masked = b1 & 0x80
            mask = b""
            if masked:
                if len(buf) - pos < head + 4:
                    break
                mask = bytes(buf[pos + head : pos + head + 4])
                head += 4
            if len(buf) - pos < head + n:
                break
            payload = bytes(buf[pos + head : pos + head + n])
            if masked:
                payload = unmask(mask, payload)
            out.append((bool(b0 & 0x80), b0 & 0x0F, payload))
            pos += head + n
        if pos:
            del buf[:pos]
        return out
