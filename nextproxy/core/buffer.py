"""Received bytes not yet consumed, and the search for the end of a head in them.

A head may arrive a byte at a time (a slow or hostile client, an upstream flushing per line).
Appending to ``bytes`` copies the whole buffer each time and re-searching it from the start
scans it again, so a 32 KiB head sent byte by byte cost a second of CPU. Here appends go to a
bytearray once there is something to append to, and the search for the end of the head (and
for bare CR or LF) resumes where the previous one stopped: linear, like h11's receive buffer.
The common case, a whole head in one read, stays on plain ``bytes`` with no copy.
"""

from __future__ import annotations

from nextproxy.core.codec import head_end


class ByteBuffer:
    """One leg's unconsumed input (a partial head, or bytes that came after a message)."""

    __slots__ = ("_data", "_scanned")

    def __init__(self) -> None:
        self._data: bytes | bytearray = b""
        self._scanned = 0
        """Bytes at the start already searched for the end of a head (and found clean)."""

    def __bool__(self) -> bool:
        return bool(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def add(self, data: bytes) -> None:
        if not self._data:
            self._data = data
            return
        if type(self._data) is bytes:
            self._data = bytearray(self._data)
        self._data += data

    def take_all(self) -> bytes:
        """Everything buffered, as bytes; the buffer is then empty."""
        data = self._data
        self._data, self._scanned = b"", 0
        return data if type(data) is bytes else bytes(data)

    def put_back(self, data: bytes) -> None:
        """``data`` (what followed a message in a read) becomes the buffer; it must be empty."""
        self._data, self._scanned = data, 0

    def take_head(self, limit: int, *, request: bool) -> bytes | None:
        """The head at the start of the buffer if it is all here, else None. Raises ``HttpError``."""
        data = self._data
        if request and data and data[0] == 13:  # CR: empty lines before the request line?
            self.skip_empty_lines()
            data = self._data
        end = head_end(data, limit, request=request, scanned=self._scanned)
        if end < 0:
            self._scanned = len(data)
            return None
        self._scanned = 0
        if end == len(data):
            self._data = b""
            return data if type(data) is bytes else bytes(data)
        self._data = data[end:]
        return bytes(data[:end])

    def skip_empty_lines(self) -> bool:
        """Drop CRLFs before a request line, as RFC 9112 section 2.2 asks of a server (some
        clients send one after a POST body); True if anything is left. A bare CR stays, for
        the head check to refuse."""
        data = self._data
        skip = 0
        while data.startswith(b"\r\n", skip):
            skip += 2
        if skip:
            self._data = data = data[skip:]
            self._scanned = max(0, self._scanned - skip)
        return bool(data)

    def preview(self, size: int = 200) -> bytes:
        """The first ``size`` bytes, for a log line."""
        return bytes(self._data[:size])
