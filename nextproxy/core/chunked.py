"""Chunked transfer coding (RFC 9112 section 7.1): a strict incremental decoder and the encoder.

The decoder takes bytes as they arrive and hands back the chunk data, never the whole body:
bodies stream. Its strictness is where request smuggling lives, so the grammar is narrow on
purpose: a size is 1-16 hex digits with nothing around it (a 17th digit would overflow 2^64,
and h11 would then wait for that many bytes), extensions follow their grammar with no bad
whitespace (senders must not generate BWS, and "5 ;x" is read differently by different
parsers), every line ends in CRLF, and a size line may not run past 4 KiB.

It never does I/O and raises only ``HttpError`` (status 400; the upstream leg turns it into 502).
"""

from __future__ import annotations

import re

from nextproxy.errors import HttpError

MAX_CHUNK_LINE = 4 * 1024
"""Bytes of a chunk-size line, extensions included, before the body is refused."""

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;" + _TOKEN + rb"(?:=(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*\r\n")
_FIELDS = re.compile(rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*\r\n")
"""A trailer section: field lines, then the empty line (the same field grammar as a head)."""

# Decoder states.
_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)
LAST_CHUNK = b"0\r\n\r\n"


def encode_chunk(data: bytes) -> bytes:
    """One chunk of ``data`` (which must not be empty: an empty chunk ends the body)."""
    return b"%x\r\n" % len(data) + data + b"\r\n"


class ChunkedReader:
    """Decodes one chunked body incrementally; ``feed`` returns how many bytes it consumed."""

    __slots__ = ("_state", "_remaining", "_line", "_crlf", "_max_trailer", "trailer")

    def __init__(self, max_trailer: int) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._line: bytes | bytearray = b""
        self._crlf = 0
        self._max_trailer = max_trailer
        self.trailer = b""
        """The trailer section as received (field lines and the final CRLF), once ``done``."""

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes, out: list[bytes]) -> int:
        """Append the chunk data found in ``data`` to ``out``; stop at the end of the body.

        Returns the bytes consumed: what follows the body (a pipelined request, or bytes an
        upstream sent past its response) is the caller's.
        """
        pos, size = 0, len(data)
        while pos < size:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, size - pos)
                out.append(data[pos : pos + take] if take < size else data)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state, self._crlf = _DATA_END, 0
            elif state == _SIZE:
                pos = self._size_line(data, pos)
            elif state == _DATA_END:
                # The CRLF after the data, possibly split across reads.
                expected = b"\r\n"[self._crlf]
                if data[pos] != expected:
                    raise HttpError(400, "chunk data not followed by CRLF")
                pos += 1
                self._crlf += 1
                if self._crlf == 2:
                    self._state = _SIZE
            elif state == _TRAILER:
                pos = self._trailer_line(data, pos)
            else:
                break
        return pos

    def _size_line(self, data: bytes, pos: int) -> int:
        end = data.find(b"\n", pos)
        if end < 0:
            self._line += data[pos:]
            if len(self._line) > MAX_CHUNK_LINE:
                raise HttpError(400, "chunk line too long")
            return len(data)
        line = self._line + data[pos : end + 1]
        self._line = b""
        if len(line) > MAX_CHUNK_LINE:
            raise HttpError(400, "chunk line too long")
        match = _CHUNK_LINE.fullmatch(line)
        if match is None:
            raise HttpError(400, "invalid chunk line")
        self._remaining = int(match.group(1), 16)
        self._state = _DATA if self._remaining else _TRAILER
        return end + 1

    def _trailer_line(self, data: bytes, pos: int) -> int:
        # A bytearray: a trailer section sent a byte at a time must not cost a copy per byte.
        if type(self._line) is bytes:
            self._line = bytearray(self._line)
        end = data.find(b"\n", pos)
        self._line += data[pos:] if end < 0 else data[pos : end + 1]
        line = self._line
        if len(line) > self._max_trailer:
            raise HttpError(400, "trailer section too large")
        if end < 0:
            return len(data)
        if not line.endswith(b"\r\n"):
            raise HttpError(400, "bare LF in trailer section")
        if line.endswith(b"\r\n\r\n") or line == b"\r\n":
            if _FIELDS.fullmatch(line) is None:
                raise HttpError(400, "invalid trailer section")
            self.trailer, self._line, self._state = bytes(line), b"", _DONE
        return end + 1
