"""Incremental TLS ClientHello reader: records and TCP segments in, SNI/ALPN/versions out.

The proxy reads the ClientHello itself so that one port can serve both passthrough and
termination, and so that the whole TLS context is chosen per SNI before OpenSSL sees a byte.
The reader reassembles one handshake message across any number of records and segments, keeps
every byte it was fed (``raw``) for replay, and checks only what routing needs: the framing
that locates the extensions, and the SNI, ALPN and supported_versions it reads. Everything else
is the TLS library's to judge (design.md: the peek only routes). Each refusal says who answers
(``HelloAnswer``): bytes that look like TLS go to OpenSSL, which answers as a plain server
would; the reader answers by itself only over its cap and for SSLv2-format hellos. The
complete message body is read by ``core/hellobody.py``.

It must never do I/O, never re-parse what it has already consumed (a client sending 1-byte
records would otherwise cost quadratic CPU), never buffer more than ``max_size`` bytes, and never
let anything but ``ClientHelloError`` escape.
"""

from __future__ import annotations

import struct
from typing import NoReturn

from nextproxy.core.hellobody import ClientHello, fail, parse_body
from nextproxy.errors import ClientHelloError, HelloAnswer, TlsAlert

__all__ = ["MAX_CLIENT_HELLO", "OPENSSL_MAX_HELLO_BODY", "ClientHello", "ClientHelloError", "ClientHelloReader"]

KiB = 1024
OPENSSL_MAX_HELLO_BODY = 131_396
"""OpenSSL's CLIENT_HELLO_MAX_LENGTH: every field of a ClientHello at its maximum (65,534 bytes
of cipher suites, 65,535 of extensions). A longer one is refused from its handshake header."""
# Real hellos are 0.2-2 KiB (post-quantum key shares ~1.8), but the cap must not refuse what
# OpenSSL accepts. It counts record headers too, or 1-byte records would make the reader buffer
# six times the hello: the largest hello in full-size records is 131,400 + 9 x 5 bytes, and
# 132 KiB leaves room for some 750 more record headers.
MAX_CLIENT_HELLO = 132 * KiB

_RECORD_HEADER = 5
_HANDSHAKE_HEADER = 4
_MAX_RECORD = 16384  # RFC 8446 section 5.1: TLSPlaintext.length MUST NOT exceed 2^14
_CONTENT_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_SSL2_CLIENT_HELLO = 1
_FIRST_HEADERS = struct.Struct(">BBxHI").unpack_from
"""A record's content type, major version and length, then the handshake message's type and
length in one 32-bit word: the first nine bytes of nearly every connection, in one C call."""

# Sniffed only before the first record, and only to pick a friendlier answer (400 "use https");
# the longest token is 8 bytes, so sniffing waits for at most 8 bytes.
_HTTP_TOKENS = tuple(
    m + b" " for m in (b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH",
                       b"CONNECT", b"TRACE", b"PRI")
)
_SNIFF_MAX = max(len(t) for t in _HTTP_TOKENS)


def _over_cap(reason: str) -> ClientHelloError:
    """The reader's own refusal, with the alert OpenSSL gives a hello over its size limit."""
    return ClientHelloError(TlsAlert.ILLEGAL_PARAMETER, reason, answer=HelloAnswer.ALERT)


def _detached(error: ClientHelloError) -> ClientHelloError:
    """A copy that has never been raised, to keep for the sticky error.

    A raised exception's traceback holds every frame it passed through, and with them this
    reader and its caller (the connection): keeping the raised one would tie them into a
    reference cycle that only a full garbage collection frees.
    """
    return ClientHelloError(error.alert, error.reason, answer=error.answer, record_version=error.record_version)


class ClientHelloReader:
    """Feed bytes as they arrive; ``feed`` returns the ClientHello once it is complete.

    After an error every later ``feed`` raises the same error (alert and reason). After a hello
    has been returned, a later ``feed`` returns it again with the new bytes appended to ``raw``.
    ``feed(b"")`` is the client's end of stream (the core's EOF convention).
    """

    def __init__(self, max_size: int = MAX_CLIENT_HELLO) -> None:
        self._max_size = max_size
        # Chunks, not one growing bytes object: concatenating per feed is quadratic.
        self._chunks: list[bytes] = []
        self._consumed = 0  # bytes read up to the end of the hello (the capped quantity)
        self._header = bytearray()  # a record header split across feeds (< 5 bytes)
        self._record_left = 0  # body bytes of the current record not yet read
        self._records = 0
        self._message = bytearray()  # the handshake message being reassembled
        self._message_size = -1  # 4 + handshake length, once the header is known
        self._hello: ClientHello | None = None
        self._error: ClientHelloError | None = None

    def feed(self, data: bytes) -> ClientHello | None:
        """Consume ``data``; return the hello when complete, None if more bytes are needed."""
        if self._error is not None:
            raise _detached(self._error)
        chunk = bytes(data)
        if chunk:
            self._chunks.append(chunk)
        if self._hello is not None:
            self._hello = self._with_raw(self._hello)
            return self._hello
        try:
            if not chunk:
                raise self._end_of_stream()
            body = self._whole_hello(chunk) if self._records == 0 and len(self._chunks) == 1 else None
            if body is not None:
                return self._parsed(parse_body(body, chunk))  # the one chunk is all of raw
            done = self._consume(chunk)
            if not done:
                if self._consumed > self._max_size:
                    raise _over_cap(f"no complete ClientHello within {self._max_size} bytes")
                return None
            if self._consumed > self._max_size:
                raise _over_cap(f"ClientHello records exceed {self._max_size} bytes")
            hello = parse_body(bytes(self._message[_HANDSHAKE_HEADER:]), self.received())
        except ClientHelloError as exc:
            self._error = _detached(exc)
            raise
        except (IndexError, ValueError) as exc:  # ValueError includes UnicodeDecodeError
            # Every length is checked above, so this is a bug; the shell still gets our type.
            error = fail(TlsAlert.DECODE_ERROR, f"malformed ClientHello: {exc!r}")
            self._error = _detached(error)
            raise error from exc
        return self._parsed(hello)

    def _parsed(self, hello: ClientHello) -> ClientHello:
        self._message = bytearray()
        self._hello = hello
        return hello

    def _whole_hello(self, data: bytes) -> bytes | None:
        """The ClientHello body when ``data`` starts with one whole handshake record holding
        the whole message (nearly every client): parsed at once, without the reassembly
        walk. None for anything else, which takes the general path and its checks."""
        if len(data) < _RECORD_HEADER + _HANDSHAKE_HEADER:
            return None
        content_type, major, record, message = _FIRST_HEADERS(data)
        size = _HANDSHAKE_HEADER + (message & 0xFFFFFF)
        end = _RECORD_HEADER + size
        if content_type != _CONTENT_HANDSHAKE or major != 3 or message >> 24 != _HANDSHAKE_CLIENT_HELLO:
            return None
        if size > record or record > _MAX_RECORD or end > len(data) or end > self._max_size:
            return None
        self._records, self._consumed = 1, end
        return data[_RECORD_HEADER + _HANDSHAKE_HEADER : end]

    def received(self) -> bytes:
        """Every byte fed so far: what OpenSSL gets when the reader cannot route by it."""
        if len(self._chunks) > 1:
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0] if self._chunks else b""

    def _with_raw(self, hello: ClientHello) -> ClientHello:
        return ClientHello(hello.server_name, hello.alpn, hello.offers_tls13, self.received())

    def _end_of_stream(self) -> ClientHelloError:
        """The client stopped before a complete hello: who answers depends on what came."""
        if not self._chunks or self._chunks[0][0] != _CONTENT_HANDSHAKE:
            # Nothing, or the start of something that is not TLS (a port scan, half a request
            # line): closed. OpenSSL would send decode_error even to a silent connection.
            return ClientHelloError(TlsAlert.DECODE_ERROR, "end of stream before any TLS record",
                                    answer=HelloAnswer.CLOSE)
        # OpenSSL answers a truncated hello with decode_error once it sees the end of stream.
        return fail(TlsAlert.DECODE_ERROR, "end of stream inside the ClientHello")

    def _consume(self, data: bytes) -> bool:
        """Walk ``data`` once; return True when the handshake message is complete.

        Hot for hostile input (a record per byte), so the loop works on locals and writes
        the state back on the way out; after an exception the state no longer matters.
        """
        pos, end = 0, len(data)
        if self._records == 0 and pos < end and (self._header or data[0] != _CONTENT_HANDSHAKE):
            if not self._sniff_first_bytes(data):
                return False
        message, left, consumed = self._message, self._record_left, self._consumed
        limit, size = self._max_size, self._message_size
        done = False
        while pos < end:
            if left == 0:
                if self._header or end - pos < _RECORD_HEADER:
                    taken = min(_RECORD_HEADER - len(self._header), end - pos)
                    header = self._gather_header(data[pos:pos + taken])
                    pos += taken
                    if header is None:
                        break
                else:
                    header = data[pos:pos + _RECORD_HEADER]
                    pos += _RECORD_HEADER
                left = header[3] << 8 | header[4]
                # An empty handshake record is skipped (left stays 0), as OpenSSL does.
                if header[0] != _CONTENT_HANDSHAKE or header[1] != 3 or left > _MAX_RECORD:
                    _refuse_record(header[0], header[1], left, first=self._records == 0)
                consumed += _RECORD_HEADER
                if consumed > limit:
                    raise _over_cap(f"no complete ClientHello within {limit} bytes")
                self._records += 1
                continue
            take = left if left < end - pos else end - pos
            if size >= 0 and take > size - len(message):
                take = size - len(message)
            message += data[pos:pos + take]
            pos += take
            left -= take
            consumed += take
            if size < 0:
                size = self._check_message_header()
                if size < 0:
                    continue
                # Bytes past the message in this record are not part of the hello (they stay
                # in ``raw``); drop them here so the body parse sees exactly one message.
                excess = len(message) - size
                if excess > 0:
                    del message[size:]
                    consumed -= excess
            if len(message) >= size:
                done = True
                break
        self._record_left, self._consumed, self._message_size = left, consumed, size
        return done

    def _gather_header(self, piece: bytes) -> bytes | None:
        """Collect a record header split across feeds; None until all 5 bytes are here."""
        self._header += piece
        if self._header[0] != _CONTENT_HANDSHAKE:
            # Refuse now rather than wait for a length we would not use.
            _refuse_record(self._header[0], 3, 1, first=False)
        if len(self._header) < _RECORD_HEADER:
            return None
        header = bytes(self._header)
        self._header.clear()
        return header

    def _sniff_first_bytes(self, data: bytes) -> bool:
        """Decide what a stream that does not start with a handshake record is.

        Returns False while it could still be an HTTP request line or an SSLv2 hello (wait for
        more bytes); otherwise raises. Only called before any record is complete.
        """
        first = bytes(self._header) + data[:_SNIFF_MAX]
        if first[0] == _CONTENT_HANDSHAKE:
            return True
        head = first[:_SNIFF_MAX]
        if any(head.startswith(token) for token in _HTTP_TOKENS):
            raise ClientHelloError(TlsAlert.UNEXPECTED_MESSAGE, "clear-text HTTP on a TLS port",
                                   answer=HelloAnswer.USE_HTTPS)
        if head[0] & 0x80:
            # An SSLv2 record header: 15-bit length, then msg_type and version. OpenSSL 4
            # closes on these without an alert; OpenSSL 3 answered protocol_version, in a
            # record carrying the client's version, and so do we.
            if len(head) < 5:
                self._header = bytearray(head)
                return False
            if head[2] == _SSL2_CLIENT_HELLO:
                version = head[3] << 8 | head[4]
                raise ClientHelloError(TlsAlert.PROTOCOL_VERSION, "SSLv2-format ClientHello",
                                       answer=HelloAnswer.ALERT,
                                       record_version=version if 0x0301 <= version <= 0x0303 else 0x0303)
        elif any(token.startswith(head) for token in _HTTP_TOKENS):
            # Kept in the header buffer (at most 7 bytes) until the token is complete.
            self._header = bytearray(head)
            return False
        # OpenSSL sends no alert either to what "doesn't look like TLS".
        raise ClientHelloError(TlsAlert.UNEXPECTED_MESSAGE, f"first byte {first[0]} is not a TLS record",
                               answer=HelloAnswer.CLOSE)

    def _check_message_header(self) -> int:
        """Check type and length as soon as they arrive; the message size once known, else -1."""
        if self._message[0] != _HANDSHAKE_CLIENT_HELLO:
            raise fail(TlsAlert.UNEXPECTED_MESSAGE,
                        f"handshake message type {self._message[0]}, not ClientHello")
        if len(self._message) < _HANDSHAKE_HEADER:
            return -1
        body = int.from_bytes(self._message[1:4], "big")
        if body > OPENSSL_MAX_HELLO_BODY:
            # OpenSSL refuses this from the header alone; let it say so in its own words.
            raise fail(TlsAlert.ILLEGAL_PARAMETER, f"ClientHello of {body} bytes exceeds OpenSSL's limit")
        size = _HANDSHAKE_HEADER + body
        # Fail early on a hello that cannot fit, counting the record headers it needs:
        # never wait for (and buffer) bytes we are going to refuse anyway.
        records = -(-size // _MAX_RECORD)
        if size + records * _RECORD_HEADER > self._max_size:
            raise _over_cap(f"ClientHello of {size} bytes exceeds the {self._max_size}-byte cap")
        return size


def _refuse_record(content_type: int, major: int, length: int, *, first: bool) -> NoReturn:
    """Raise the error for a record header that cannot carry (part of) a ClientHello."""
    if content_type != _CONTENT_HANDSHAKE:
        raise fail(TlsAlert.UNEXPECTED_MESSAGE,
                    f"record content type {content_type} before the ClientHello")
    # legacy_record_version "MUST be ignored" (RFC 8446 5.1) beyond being SSL3/TLS at all.
    if major != 3:
        # A first record of another major "doesn't look like TLS": OpenSSL closes silently.
        raise ClientHelloError(TlsAlert.PROTOCOL_VERSION, f"record version major {major} is not TLS",
                               answer=HelloAnswer.CLOSE if first else HelloAnswer.TLS_LIBRARY)
    raise fail(TlsAlert.RECORD_OVERFLOW, f"record of {length} bytes exceeds 2^14")
