"""UpstreamLeg: the upstream half of an exchange, pooled with its TCP connection.

It holds what the session needs to read one response at a time from a connection that may
serve many: the bytes not yet parsed, how the current body ends (a length, chunks, or the
connection's close), and whether the connection may be reused when the response is done.
A response that leaves anything unexplained (bytes past its end, ``Connection: close``, a body
that ends at close, a request body we never finished sending) makes the connection single-use.

Sans-IO: the session feeds it bytes; it never reads a socket. Raises only ``HttpError``.
"""

from __future__ import annotations

from nextproxy.core.chunked import ChunkedReader
from nextproxy.core.buffer import ByteBuffer
from nextproxy.core.codec import CHUNKED, UNTIL_CLOSE, ResponseHead, parse_response
from nextproxy.errors import HttpError


class UpstreamLeg:
    """Response-side state of one upstream connection, kept across pooled exchanges."""

    __slots__ = (
        "authority", "max_header_size", "exchanges", "buffer", "in_body", "finished",
        "length", "keep_alive", "_left", "_chunks", "_extra",
    )  # fmt: skip

    def __init__(self, authority: str, max_header_size: int) -> None:
        self.authority = authority
        """``host:port``; the Host header for HTTP/1.0 clients that sent none."""
        self.max_header_size = max_header_size
        """Bytes of a response head before the upstream is judged broken (502)."""
        self.exchanges = 0
        """Completed exchanges; above zero means a reused (pooled) connection."""
        self.buffer = ByteBuffer()
        """Response bytes not yet parsed (a partial head, or what followed one)."""
        self.in_body = False
        self.finished = False
        self.length = 0
        self.keep_alive = True
        self._left = 0
        self._chunks: ChunkedReader | None = None
        self._extra = False

    @property
    def reusable(self) -> bool:
        """Between exchanges with nothing unexplained: safe to pool."""
        return not self.in_body and not self.buffer and self.keep_alive and not self._extra

    def start(self) -> None:
        """A new exchange begins on this connection."""
        self.in_body = self.finished = False

    def next_head(self) -> ResponseHead | None:
        """The next response head in the buffer (1xx ones too), or None until it is all here."""
        raw: bytes | None = None
        try:
            raw = self.buffer.take_head(self.max_header_size, request=False)
            return None if raw is None else parse_response(raw)
        except HttpError as exc:  # the detail (for the log only) quotes what the upstream sent
            sample = raw[:200] if raw is not None else self.buffer.preview()
            raise HttpError(exc.status, f"{exc.reason}: {sample!r}") from None

    def begin_body(self, length: int, max_trailer: int) -> None:
        """The response head said how the body ends (``length`` already 0 for HEAD/204/304)."""
        self.in_body = True
        self.length = length
        self._chunks = None
        if length == CHUNKED:
            self._chunks = ChunkedReader(max_trailer)
        elif length == UNTIL_CLOSE:
            self.keep_alive = False
        else:
            self._left = length
            self.finished = length == 0

    def body(self, data: bytes) -> list[bytes]:
        """The body bytes in ``data``; sets ``finished`` at the end. Raises ``HttpError``."""
        reader = self._chunks
        if reader is not None:
            pieces: list[bytes] = []
            used = reader.feed(data, pieces)
            if reader.done:
                self.finished = True
                if used < len(data):
                    self._extra = True  # bytes past the response: never reuse this connection
            return pieces
        if self.length == UNTIL_CLOSE:
            return [data]
        left = self._left
        if len(data) >= left:
            self.finished = True
            if len(data) > left:
                self._extra = True
                data = data[:left]
        self._left = left - len(data)
        return [data] if data else []

    def end_at_close(self) -> None:
        self.finished = True

    @property
    def trailer(self) -> bytes:
        """The chunked body's trailer section as received (b"" if none or not chunked)."""
        return self._chunks.trailer if self._chunks is not None else b""

    def recycle(self) -> bool:
        """The exchange is over: True (and ready for the next) if the connection may be pooled."""
        reusable = self.finished and self.keep_alive and not self._extra and not self.buffer
        self.in_body = False
        self._chunks = None
        if reusable:
            self.exchanges += 1
        return reusable


def new_upstream_leg(authority: str, max_header_size: int) -> UpstreamLeg:
    """The upstream half kept with each pooled connection: the shell's pool holds it without
    looking inside, so only the core builds it."""
    return UpstreamLeg(authority, max_header_size)
