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

from nextproxy.core.wsframing import FIN_BINARY, LEN16, LEN64, MASK_BIT, encode_head, frame_head, mask


def stream_head(data: bytes, pos: int, masked: bool) -> tuple[int, int, int, bytes | None] | None:
    """(first byte, payload start, payload length, masking key) of the final binary frame whose
    header is whole at ``pos``; None unless ``simple_frame``'s rules (``frame_head``) accept it.
    Text frames are not streamed: invalid UTF-8 found midway could only be cut without a Close."""
    head = frame_head(data, pos, masked)
    return head if head is not None and head[0] == FIN_BINARY else None


def partial_head(data: bytes, pos: int, masked: bool) -> bool:
    """``data[pos:]`` is shorter than the header it begins, and that header may yet pass
    ``stream_head``: the relay holds these few bytes (at most 13) for the next read."""
    rest = len(data) - pos
    if rest < 1 or data[pos] != FIN_BINARY:
        return False
    if rest == 1:
        return True
    second = data[pos + 1]
    if bool(second & MASK_BIT) is not masked:
        return False
    length = second & 0x7F
    extra = 2 if length == LEN16 else 8 if length == LEN64 else 0
    if rest < 2 + extra:
        return True
    # The length is all there: wsproto judges it now, so hold only what it would accept.
    return rest < 2 + extra + (4 if masked else 0) and stream_head(data[pos:] + bytes(4), 0, masked) is not None


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
