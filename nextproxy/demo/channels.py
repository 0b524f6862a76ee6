"""Byte channels for the stand-in upstreams: plain TCP, or TLS done over ssl.MemoryBIO.

The stand-ins do TLS themselves rather than with ``start_server(ssl=...)`` because asyncio and
uvloop both drop the alert when a server-side handshake fails (a client refused for a missing
certificate would see a bare EOF, not certificate_required). Also here: the TLS facts a TLS API
stand-in reports (client certificate, SNI, version), including the SNI its callback recorded.
Test and demo support only; never on the proxy's data path.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import weakref
from typing import Any

from cryptography import x509

KiB = 1024
READ_SIZE = 64 * KiB
CLOSE_TIMEOUT = 5.0

# --------------------------------------------------------------------------- TLS facts

# SNI is only visible to a server through the context's callback; remember it per TLS object.
_server_names: weakref.WeakKeyDictionary[ssl.SSLObject, str] = weakref.WeakKeyDictionary()


_recording: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()


def record_server_names(context: ssl.SSLContext) -> None:
    """Install an SNI callback on ``context`` that records the name (chaining any existing one)."""
    if context in _recording:
        return  # one context may serve several stand-ins (ns-api and mc-api in the demo)
    _recording.add(context)
    previous = context.sni_callback

    def callback(tls: ssl.SSLObject, name: str, ctx: ssl.SSLContext) -> int | None:
        if name:  # None at run time when the client sent no SNI
            _server_names[tls] = name
        return previous(tls, name, ctx) if previous is not None else None

    context.sni_callback = callback


def tls_facts(tls: ssl.SSLObject) -> dict[str, Any]:
    """What the TLS API reports about its connection, including the client's certificate."""
    der = tls.getpeercert(binary_form=True)
    subject = x509.load_der_x509_certificate(der).subject.rfc4514_string() if der else None
    cipher = tls.cipher()
    return {
        "client_cert_subject": subject,
        "client_cert_sha256": hashlib.sha256(der).hexdigest() if der else None,
        "server_name": _server_names.get(tls),
        "version": tls.version(),
        "alpn": tls.selected_alpn_protocol(),
        "cipher": cipher[0] if cipher else None,
        "resumed": tls.session_reused,
    }


# --------------------------------------------------------------------------- byte channels


class Channel:
    """Plain TCP: what the HTTP and WebSocket code reads from and writes to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self) -> bytes:
        """Some bytes, or b"" at end of stream."""
        return await self.reader.read(READ_SIZE)

    async def write(self, data: bytes) -> None:
        if data:
            if self.writer.is_closing():
                # uvloop raises RuntimeError on a closed transport, asyncio drops the bytes.
                raise ConnectionResetError("the connection is closed")
            self.writer.write(data)
            await self.writer.drain()

    async def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), CLOSE_TIMEOUT)
        except (OSError, TimeoutError, asyncio.TimeoutError):
            pass


class TlsChannel(Channel):
    """TLS over memory BIOs.

    asyncio's own server TLS (and uvloop's) drops the fatal alert when a handshake fails, so a
    client refused for its certificate sees a bare EOF. Driving the SSLObject ourselves lets the
    alert reach the client, which passthrough tests need to see through the proxy.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext) -> None:
        super().__init__(reader, writer)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)

    async def _flush(self) -> None:
        await super().write(self.outgoing.read())

    async def _pull(self) -> None:
        data = await self.reader.read(READ_SIZE)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._pull()
            except ssl.SSLError:
                await self._refuse()
                raise
        await self._flush()

    async def _refuse(self) -> None:
        # The alert is in the out-BIO: send it, half-close, and read briefly until the peer
        # closes; closing at once would answer its in-flight bytes with a reset that can
        # overtake the alert.
        try:
            await self._flush()
            if self.writer.can_write_eof():
                self.writer.write_eof()
            async with asyncio.timeout(1.0):
                while await self.reader.read(READ_SIZE):
                    pass
        except (OSError, TimeoutError):
            pass

    async def read(self) -> bytes:
        while True:
            try:
                return self.tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                await self._flush()  # post-handshake messages (TLS 1.3 tickets, key updates)
                await self._pull()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""  # EOF without close_notify is common (curl does it): still just EOF
            except ssl.SSLError:
                # In TLS 1.3 the client's certificate is judged after the client thinks the
                # handshake is done, so a refusal happens here, on the first read.
                await self._refuse()
                raise

    async def write(self, data: bytes) -> None:
        if data:
            self.tls.write(data)
            await self._flush()

    async def close(self) -> None:
        try:
            self.tls.unwrap()
        except ssl.SSLError:
            pass  # no close_notify back from the peer yet: ours is in the out-BIO anyway
        try:
            await self._flush()
        except OSError:
            pass
        await super().close()
