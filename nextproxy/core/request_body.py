"""RequestBody: how the current request's body ends, and what of it is still to come.

A Content-Length body passes through as it arrives (a slice only where the body ends inside a
read); a chunked body is decoded and re-framed chunk for chunk, and its trailers are dropped:
they could carry fields the edge owns (X-Forwarded-For, Host, Content-Length) past the header
policy, and nginx never forwards them either. What follows the body in a read belongs to the
next request and is handed back. Never accumulates: each read becomes at most a few sends.

Sans-IO; raises only ``HttpError`` (400) for a malformed chunked body.
"""

from __future__ import annotations

from nextproxy.core.chunked import LAST_CHUNK, ChunkedReader, encode_chunk
from nextproxy.core.codec import CHUNKED
from nextproxy.errors import HttpError


class RequestBody:
    """The body of one request, from its head to its end."""

    __slots__ = ("_left", "_chunks")

    def __init__(self, length: int, max_trailer: int) -> None:
        self._left = 0 if length == CHUNKED else length
        self._chunks = ChunkedReader(max_trailer) if length == CHUNKED else None

    @property
    def open(self) -> bool:
        """More body bytes are due from the client."""
        return self._left > 0 or self._chunks is not None

    def take(self, data: bytes) -> tuple[list[bytes], int, bytes]:
        """(What to send upstream, body bytes decoded, what follows the body) for ``data``."""
        reader = self._chunks
        if reader is None:
            left = self._left
            rest = b""
            if len(data) > left:
                data, rest = data[:left], data[left:]
            self._left = left - len(data)
            return ([data] if data else []), len(data), rest
        pieces: list[bytes] = []
        used = reader.feed(data, pieces)
        out = [encode_chunk(piece) for piece in pieces]
        if reader.done:
            self._chunks = None
            out.append(LAST_CHUNK)
        return out, sum(map(len, pieces)), data[used:]

    def skip(self, buffered: bytes) -> bytes | None:
        """Discard the body if it is all in ``buffered``: what follows it, or None if it is not."""
        try:
            _, _, rest = self.take(buffered)
        except HttpError:
            return None
        return None if self.open else rest
