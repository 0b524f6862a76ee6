"""The frame relay's fast path: whole, final data frames relayed without wsproto.

Measured in benchmarks/ (32-byte messages): wsproto spends ~13 µs per relayed message parsing
the frame into an event and serializing it again, most of the relay's cost. Nearly every
message on a busy session is one complete frame per read, so ``simple_frame`` recognizes
exactly that case (FIN set, RSV clear, binary or text, length in its shortest form,
masked exactly when the peer is the client, text valid UTF-8) and ``encode_frame``
writes it for the other leg; a binary frame cut by a read is streamed by core/wsstream.py.
Anything else (control frames, fragments, a text frame split across reads, anything
malformed) goes to wsproto as before, which answers it with the right close code: the fast
path never judges, it only recognizes what wsproto would accept.

``FrameScanner`` follows the frame boundaries of what went to wsproto, so the relay knows when
wsproto has no partial frame or message buffered and the fast path may resume.

Sans-IO; the masking keys come from the caller (os.urandom, batched).
"""

from __future__ import annotations

# RFC 6455 section 5.2, the bytes both fast paths (here and ``wsstream``) read: a final binary or
# text frame's first byte, the mask bit, and the payload lengths that mean "16-bit" / "64-bit".
FIN_BINARY = 0x82
FIN_TEXT = 0x81
MASK_BIT = 0x80
LEN16 = 126
LEN64 = 127


def frame_head(data: bytes, pos: int, masked: bool) -> tuple[int, int, int, bytes | None] | None:
    """(first byte, payload start, payload length, masking key) of the final binary or text
    frame whose header is whole at ``pos``; None unless the fast path may take it: FIN set, RSV
    clear, masked exactly when ``masked``, the length in its shortest form (wsproto refuses any
    other, so it must see it). The one reading of these rules: ``simple_frame`` and the
    streaming relay (core/wsstream.py) both go through it."""
    end = len(data)
    if end - pos < 2:
        return None
    first = data[pos]
    if first != FIN_BINARY and first != FIN_TEXT:
        return None
    second = data[pos + 1]
    if bool(second & MASK_BIT) is not masked:
        return None
    length = second & 0x7F
    start = pos + 2
    if length == LEN16:
        if end - start < 2:
            return None
        length = data[start] << 8 | data[start + 1]
        if length < LEN16:  # not the shortest form: wsproto refuses it, so it must see it
            return None
        start += 2
    elif length == LEN64:
        if end - start < 8:
            return None
        length = int.from_bytes(data[start : start + 8], "big")
        # wsproto refuses a length that 16 bits would hold, and one with the top bit set.
        if length < 65536 or length >> 63:
            return None
        start += 8
    key = None
    if masked:
        if end - start < 4:
            return None
        key = data[start : start + 4]
        start += 4
    return first, start, length, key


def simple_frame(data: bytes, pos: int, masked: bool) -> tuple[int, int, bytes] | None:
    """The complete data frame at ``pos``: (end, first byte, unmasked payload); None if there
    is none there that the fast path may relay (the caller then hands the rest to wsproto)."""
    head = frame_head(data, pos, masked)
    if head is None:
        return None
    first, start, length, key = head
    end = len(data)
    stop = start + length
    if stop > end:
        return None
    payload = data[start:stop]
    if key is not None and length:
        payload = mask(payload, key)
    if first == FIN_TEXT and not payload.isascii():
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return None  # wsproto closes with 1007
    return stop, first, payload


_TRANSLATE_FROM = 16 * 1024
"""From this size on ``mask`` XORs with four byte tables instead of one big int: measured here,
1.6 µs per KiB at any size, where the big int's conversions grow faster than the size
(30 µs at 16 KiB, 210 µs at 64 KiB) and win only below it (0.8 vs 1.6 µs at 256 bytes)."""
_XOR_TABLES: list[bytes | None] = [None] * 256


def mask(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``key`` repeated (RFC 6455 section 5.3); its own inverse."""
    n = len(payload)
    if n >= _TRANSLATE_FROM:
        out = bytearray(payload)
        for i in range(4):
            out[i::4] = payload[i::4].translate(_XOR_TABLES[key[i]] or _xor_table(key[i]))
        return bytes(out)
    keys = key * (n // 4 + 1)
    return (int.from_bytes(payload, "little") ^ int.from_bytes(keys[:n], "little")).to_bytes(n, "little")


def _xor_table(byte: int) -> bytes:
    """The translation table XORing every byte with ``byte``, built on first use."""
    table = _XOR_TABLES[byte] = bytes(i ^ byte for i in range(256))
    return table


def encode_head(first: int, length: int, key: bytes | None) -> bytes:
    """The header of a final frame of ``length`` payload bytes; ``key`` (4 bytes) for the client role."""
    bit = MASK_BIT if key is not None else 0
    if length < LEN16:
        head = bytes((first, bit | length))
    elif length < 65536:
        head = bytes((first, bit | LEN16, length >> 8, length & 0xFF))
    else:
        head = bytes((first, bit | LEN64)) + length.to_bytes(8, "big")
    return head if key is None else head + key


def encode_frame(first: int, payload: bytes, key: bytes | None) -> bytes:
    """One final data frame; ``key`` (4 bytes) masks it, as the client role must."""
    head = encode_head(first, len(payload), key)
    return head + payload if key is None else head + mask(payload, key)


class FrameScanner:
    """Frame boundaries of the bytes fed to wsproto, read from the headers alone.

    ``clean`` is True when those bytes end at a frame boundary outside a fragmented message:
    then wsproto holds nothing partial and the next bytes may take the fast path.
    """

    __slots__ = ("_left", "_header", "_in_message")

    def __init__(self) -> None:
        self._left = 0  # bytes of the current frame (header or payload) still to come
        self._header = b""  # a header split across feeds
        self._in_message = False  # a data frame without FIN was seen, and no final fragment yet

    @property
    def clean(self) -> bool:
        return self._left == 0 and not self._header and not self._in_message

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        if self._header:
            data, pos, end = self._header + data, 0, len(self._header) + end
            self._header = b""
        while pos < end:
            if self._left:
                step = min(self._left, end - pos)
                self._left -= step
                pos += step
                continue
            size = _header_size(data, pos)
            if size < 0:
                self._header = bytes(data[pos:])
                return
            first, length = data[pos], _payload_length(data, pos)
            opcode = first & 0x0F
            if opcode < 8:  # data or continuation: FIN ends the message
                self._in_message = not first & 0x80
            self._left = size + length
        return


def _header_size(data: bytes, pos: int) -> int:
    """Bytes of the frame header at ``pos``, or -1 if it is not all there yet."""
    if len(data) - pos < 2:
        return -1
    second = data[pos + 1]
    length = second & 0x7F
    size = 2 + (2 if length == LEN16 else 8 if length == LEN64 else 0) + (4 if second & MASK_BIT else 0)
    return size if len(data) - pos >= size else -1


def _payload_length(data: bytes, pos: int) -> int:
    length = data[pos + 1] & 0x7F
    if length == LEN16:
        return data[pos + 2] << 8 | data[pos + 3]
    if length == LEN64:
        return int.from_bytes(data[pos + 2 : pos + 10], "big")
    return length
