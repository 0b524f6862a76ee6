"""Plaintext out of a terminated connection: sealed into TLS records and written, batch by batch.

Why batches: the actions of one core call (a response head, its body, its end) are gathered and
encrypted with one SSL_write, so a small response is one TLS record instead of three (less CPU
here and in the client). Why pieces: OpenSSL's memory BIO keeps the capacity of its largest fill
for the connection's lifetime, so a large batch (a WebSocket message, a burst of upstream reads)
is sealed ``SEAL_PIECE`` at a time and the pieces' records handed to the transport together; one
256 KiB SSL_write left ~350 KiB allocated per connection that had once sent a large response.
"""

from __future__ import annotations

import asyncio

from nextproxy.core.tls import TlsEngine
from nextproxy.edge.writes import TurnWrites

LINGER = 0.5
"""After a refusal or a failed handshake, keep reading (and dropping) this long before closing:
closing at once makes the kernel reset in-flight client bytes, and the answer is lost."""
LINGER_QUIET = 5.0
LINGER_MOST = 30.0
"""A ``Linger``'s bounds: nginx's ``lingering_timeout`` and ``lingering_time`` defaults."""
SEAL_PIECE = 32 * 1024
"""Largest plaintext given to one SSL_write: two full TLS records."""


def joined(pending: list[bytes]) -> bytes:
    """The batch as one bytes object (no copy for a batch of one), and the list emptied."""
    data = pending[0] if len(pending) == 1 else b"".join(pending)
    pending.clear()
    return data


def seal(engine: TlsEngine, pending: list[bytes]) -> None:
    """Encrypt the batch in one SSL_write; the records wait in the engine (closing sends them
    together with our close_notify)."""
    if pending:
        engine.send(joined(pending))


def write_records(engine: TlsEngine, transport: asyncio.Transport, pending: list[bytes], writes: TurnWrites) -> None:
    """Seal the batch and write every record the engine holds (handshake flights, tickets, alerts
    and OpenSSL's own answers included) at the end of the loop's turn."""
    if pending:
        data = joined(pending)
        if len(data) > SEAL_PIECE:
            _write_in_pieces(engine, transport, data, writes)
            return
        engine.send(data)
    out = engine.data_to_send()
    if out:
        writes.write(transport, out)


def _write_in_pieces(engine: TlsEngine, transport: asyncio.Transport, data: bytes, writes: TurnWrites) -> None:
    """Seal ``SEAL_PIECE`` at a time (OpenSSL's BIO stays small) and hand every piece's records
    to the transport in one ``writelines``: uvloop sends them with one writev, where a write per
    piece cost a syscall each (two or three for a 64 KiB response)."""
    view = memoryview(data)
    out = [engine.data_to_send()]  # anything already pending goes first
    for start in range(0, len(view), SEAL_PIECE):
        engine.send(view[start : start + SEAL_PIECE])
        out.append(engine.data_to_send())
    writes.write(transport, [records for records in out if records])


def write_goodbye(
    engine: TlsEngine, transport: asyncio.Transport, pending: list[bytes], writes: TurnWrites, *, established: bool,
    close: bool = True,
) -> None:  # fmt: skip
    """The last records and, after a finished handshake, our close_notify: one write, then the
    close (unless ``close`` is False: a ``Linger`` closes), both at the end of the turn."""
    if established:
        seal(engine, pending)
        engine.close()
    out = engine.data_to_send()
    if out and not transport.is_closing():
        writes.write(transport, out)
    if close:
        writes.close(transport)


def peer_port(transport: asyncio.Transport | None) -> int | None:
    peername = transport.get_extra_info("peername") if transport is not None else None
    return peername[1] if isinstance(peername, tuple) and len(peername) >= 2 else None


def linger_close(transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
    """Half-close after the last answer (alert, 400), then close once ``LINGER`` has passed: a
    ``Linger`` of that fixed length (nobody tells it what still comes)."""
    if transport.can_write_eof():
        Linger(transport, loop, quiet=LINGER, most=LINGER)
    else:
        transport.close()


class Linger:
    """nginx's lingering close, for a client still sending when we are done (a body answered
    before it ended): half-close after the answer, drop what still comes, and close once the
    client hangs up, falls quiet for ``quiet`` seconds, or ``most`` seconds have passed.

    Closing at once with the client's bytes unread makes the kernel reset the connection, and
    the client, still writing its body, loses the answer already on its way (Python's
    http.client, Java's HttpClient and curl were seen to). The connection keeps its slot until
    the socket closes: lingering sockets count against ``max_connections`` as nginx's do."""

    __slots__ = ("_transport", "_loop", "_quiet", "_end", "_heard", "_timer")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, quiet: float = LINGER_QUIET, most: float = LINGER_MOST) -> None:
        self._transport = transport
        self._loop = loop
        self._quiet = quiet
        self._end = loop.time() + most
        self._heard = False
        if transport.can_write_eof():
            transport.write_eof()  # after what is buffered: the answer and our close_notify
        self._timer = loop.call_later(min(quiet, most), self._check)

    def heard(self) -> None:
        """Bytes came (and were dropped): the client is still sending."""
        self._heard = True

    def _check(self) -> None:
        now = self._loop.time()
        if self._heard and now < self._end and not self._transport.is_closing():
            self._heard = False
            self._timer = self._loop.call_later(min(self._quiet, self._end - now), self._check)
        else:
            self._transport.close()

    def close(self) -> None:
        """The client hung up (its EOF), or the connection is being cut: close now."""
        self._timer.cancel()
        self._transport.close()

    def abort(self) -> None:
        self._timer.cancel()
        self._transport.abort()
