"""One final binary frame relayed across reads: the fast path for frames larger than a read.

Client reads are capped at 64 KiB (edge/reads.py), so a 64 KiB message (65,546 bytes with its
header) never arrives whole; wsproto would parse it (and re-serialize it as several fragments
toward the other leg) at ~4x the fast path's CPU. When a read ends inside a frame whose header
``simple_frame`` would accept, the relay sends the header at once (re-encoded for the other leg),
then the payload as it arrives: one frame, same length, no re-fragmentation. Every byte up to
the payload's end belongs to that frame (control frames cannot interrupt a frame's payload).

Only binary frames are streamed: a text frame that turns out invalid UTF-8 midway would have
to be cut on the other leg without a Close frame, where wsproto's path sends 1001 after whole
fragments; text keeps that path (whole text frames in one read still take ``simple_frame``).

Sans-IO; masking keys come from the caller.
"""

from __future__ import annotations

from nextproxy.core.wsframing import mask

_FIN_BINARY = 0x82
_MASK_BIT = 0x80
_LEN16 = 126
_LEN64 = 127


def stream_head(data: bytes, pos: int, masked: bool) -> tuple[int, int, int, bytes | None] | None:
    """(first byte, payload start, payload length, masking key) of the final binary frame whose
    header is whole at ``pos``; None unless ``simple_frame``'s rules would accept that header."""
    end = len(data)
    if end - pos < 2 or data[pos] != _FIN_BINARY:
        return None
    second = data[pos + 1]
    if bool(second & _MASK_BIT) is not masked:
        return None
    length = second & 0x7F
    start = pos + 2
    if length == _LEN16:
        if end - start < 2:
            return None
        length = data[start] << 8 | data[start + 1]
        if length < _LEN16:  # not the shortest form: wsproto's to refuse
            return None
        start += 2
    elif length == _LEN64:
        if end - start < 8:
            return None
        length = int.from_bytes(data[start : start + 8], "big")
        if length < 65536 or length >> 63:
            return None
        start += 8
    key = None
    if masked:
        if end - start < 4:
            return None
        key = data[start : start + 4]
        start += 4
    return _FIN_BINARY, start, length, key


def partial_head(data: bytes, pos: int, masked: bool) -> bool:
    """``data[pos:]`` is shorter than the header it begins, and that header may yet pass
    ``stream_head``: the relay holds these few bytes (at most 13) for the next read."""
    rest = len(data) - pos
    if rest < 1 or data[pos] != _FIN_BINARY:
        return False
    if rest == 1:
        return True
    second = data[pos + 1]
    if bool(second & _MASK_BIT) is not masked:
        return False
    length = second & 0x7F
    extra = 2 if length == _LEN16 else 8 if length == _LEN64 else 0
    if rest < 2 + extra:
        return True
    # The length is all there: wsproto judges it now, so hold only what it would accept.
    return rest < 2 + extra + (4 if masked else 0) and stream_head(data[pos:] + bytes(4), 0, masked) is not None


def encode_head(first: int, length: int, key: bytes | None) -> bytes:
    """The header of a final frame of ``length`` payload bytes; ``key`` (4 bytes) for the client role."""
    bit = _MASK_BIT if key is not None else 0
    if length < _LEN16:
        head = bytes((first, bit | length))
    elif length < 65536:
        head = bytes((first, bit | _LEN16, length >> 8, length & 0xFF))
    else:
        head = bytes((first, bit | _LEN64)) + length.to_bytes(8, "big")
    return head if key is None else head + key


class FrameStream:
    """The payload still to come of one streamed frame, and how to re-mask it.

    Unmasking with the sender's key and masking with ours at the same offset is one XOR with
    the two keys combined, rotated to where this piece starts in the payload (RFC 6455 5.3).
    """

    __slots__ = ("size", "left", "_key", "_offset")

    def __init__(self, size: int, theirs: bytes | None, ours: bytes | None) -> None:
        self.size = size
        self.left = size
        key = None
        if theirs is not None or ours is not None:
            key = mask(theirs or bytes(4), ours or bytes(4))
            key = None if key == bytes(4) else key
        self._key = key
        self._offset = 0

    def take(self, data: bytes, pos: int) -> tuple[int, bytes | memoryview]:
        """The frame's bytes in ``data`` from ``pos``: (where they end, the same bytes for the
        other leg)."""
        n = min(self.left, len(data) - pos)
        self.left -= n
        key = self._key
        if key is None:
            return pos + n, (data if pos == 0 and n == len(data) else memoryview(data)[pos : pos + n])
        offset = self._offset
        self._offset = (offset + n) & 3
        if offset:
            key = key[offset:] + key[:offset]
        return pos + n, mask(data[pos : pos + n], key)
