"""Our strict HTTP/1.1 head codec for both legs: one regular expression, then one loop.

A head (request or response) is validated whole by one linear regular expression: CRLF line
ends only, no obs-fold, no whitespace before a colon, token names, no CTL or DEL in values (obs-text
is allowed). Then one loop over the lines lower-cases the names, checks the framing headers,
drops hop-by-hop and Connection-named headers, applies the forwarding policy of
``core/headers.py`` (X-Forwarded-*, client-certificate headers, Host/SNI 421) and keeps the
original lines that may cross, so the outgoing head is a join, not a re-serialization.

Why not h11 here: it costs most of the 100 µs budget per proxied request on four heads, and it
lets through what an edge must refuse (CTL bytes in values, Transfer-Encoding on HTTP/1.0,
bare LF, obs-fold, HTTP/1.2 request lines). h11 stays the oracle in the tests: whatever this
accepts, h11 plus ``core/headers.py`` accepts with the same fields (tests/core/test_codec_fuzz.py).

Sans-IO: no sockets, clocks or logs. Raises only ``HttpError`` with the status to answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nextproxy.core.headers import (
    EDGE_OWNED,
    FRAMING,
    HOP_BY_HOP,
    PLAIN_TOKENS,
    ClientInfo,
    client_cert_fields,
    normalize_host,
    tokens,
)
from nextproxy.errors import HttpError

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_FIELD = _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n"
_VERSION = rb"HTTP/([0-9]+(?:\.[0-9]+)?)"
# Linear by construction: a field line starts with a token character and its value cannot hold
# CR, so the engine never has two ways to match a byte.
_REQUEST_HEAD = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) " + _VERSION + rb"\r\n(?:" + _FIELD + rb")*\r\n")
_RESPONSE_HEAD = re.compile(_VERSION + rb" ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?\r\n(?:" + _FIELD + rb")*\r\n")
_REQUEST_LINE = re.compile(_TOKEN + rb" [\x21-\x7e]+ " + _VERSION)
_STATUS_LINE = re.compile(_VERSION + rb" [0-9]{3}(?: [\t\x20-\x7e\x80-\xff]*)?")
_NAME = re.compile(_TOKEN)
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_SUPPORTED = (b"1.1", b"1.0")
MAX_LENGTH_DIGITS = 18
"""Content-Length digits: 10^18 fits in 63 bits, so no parser on either side can overflow."""

# What each field name means to the loop; a name not listed is kept as it came.
_DROP, _HOST, _LENGTH, _CODING, _CONNECTION, _UPGRADE, _EXPECT, _KEY, _EXTENSIONS, _ACCEPT, _PROTOCOL = range(11)
_WS_EXTENSIONS = b"sec-websocket-extensions"
_REQUEST_ROLES = {name: _DROP for name in HOP_BY_HOP | EDGE_OWNED} | {
    b"host": _HOST,
    b"content-length": _LENGTH,
    b"transfer-encoding": _CODING,
    b"connection": _CONNECTION,
    b"upgrade": _UPGRADE,
    b"expect": _EXPECT,
    b"sec-websocket-key": _KEY,
    _WS_EXTENSIONS: _EXTENSIONS,
}
_RESPONSE_ROLES = {name: _DROP for name in HOP_BY_HOP} | {
    b"content-length": _LENGTH,
    b"transfer-encoding": _CODING,
    b"connection": _CONNECTION,
    b"sec-websocket-accept": _ACCEPT,
    b"sec-websocket-protocol": _PROTOCOL,
    _WS_EXTENSIONS: _EXTENSIONS,
}
# An underscore alias (X_Forwarded_For, content_length) of a name the edge owns or frames by:
# CGI-style upstreams map '_' and '-' to one variable, so the alias would pose as the real one.
_REQUEST_ALIASES = HOP_BY_HOP | EDGE_OWNED | FRAMING
_RESPONSE_ALIASES = HOP_BY_HOP | FRAMING

CHUNKED = -1
"""``length`` of a chunked body."""
UNTIL_CLOSE = -2
"""``length`` of a response without framing headers: its body ends when the upstream closes."""
_UPGRADE_LINES = b"connection: upgrade\r\nupgrade: websocket\r\n"


# Plain slotted dataclasses, not frozen: one is built per head on the hot path, and a frozen
# dataclass pays an object.__setattr__ per field (about 1 µs for these).
@dataclass(slots=True)
class RequestHead:
    """A validated request head and the head to send upstream (minus the request line)."""

    method: bytes
    target: bytes
    version: bytes
    """b"1.1" or b"1.0"."""
    head_lines: list[bytes]
    """The head as received, split at CRLF; the first line is the request line."""
    length: int
    """Body length, or ``CHUNKED``; 0 for none."""
    keep_alive: bool
    expect_continue: bool
    upgrade: bool
    websocket_key: bytes
    has_host: bool
    misdirected: bool
    """Host names another server than SNI did: 421 (RFC 9110 section 15.5.20), refused by the
    session once it knows the body's framing, so a kept connection can skip the body."""
    forward: bytes
    """Header lines for the upstream, ending with the empty line."""

    @property
    def fields(self) -> list[tuple[bytes, bytes]]:
        """As received: lower-cased names, values without surrounding whitespace (for tests
        and logs; the hot path never builds this list)."""
        return _fields(self.head_lines)


@dataclass(slots=True)
class ResponseHead:
    """A validated response head and the header lines that may reach the client."""

    status: int
    reason: bytes
    version: bytes
    head_lines: list[bytes]
    """The head as received, split at CRLF; the first line is the status line."""
    length: int
    """Content-Length, ``CHUNKED`` or ``UNTIL_CLOSE`` (framing as sent, before HEAD/204/304 rules)."""
    keep_alive: bool
    lines: bytes
    """Forwardable field lines, each ending in CRLF, without the empty line."""
    accept: bytes
    protocol: str | None

    @property
    def fields(self) -> list[tuple[bytes, bytes]]:
        """As received: lower-cased names, values without surrounding whitespace."""
        return _fields(self.head_lines)


def _fields(head_lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    pairs = [line.partition(b":") for line in head_lines[1:]]
    return [(name.lower(), value.strip(b" \t")) for name, _, value in pairs]


class RequestParser:
    """Parses request heads for one client connection; the edge's fields are built once."""

    __slots__ = ("_client", "_edge", "_cert")

    def __init__(self, client: ClientInfo) -> None:
        self._client = client
        self._edge = b"x-forwarded-for: " + client.address.encode("ascii", "replace") + b"\r\nx-forwarded-proto: https\r\n"
        self._cert = b"".join(name + b": " + value + b"\r\n" for name, value in client_cert_fields(client))

    def parse(self, head: bytes) -> RequestHead:
        """``head`` runs from the request line through the empty line."""
        match = _REQUEST_HEAD.fullmatch(head)
        if match is None:
            raise HttpError(400, diagnose(head, request=True))
        method, target, version = match.groups()
        if version not in _SUPPORTED:
            raise HttpError(505, "http version not supported")
        lines = head[:-4].split(b"\r\n")
        out: list[bytes] = []
        host: bytes | None = None
        length: bytes | None = None
        hosts = 0
        codings: list[bytes] = []
        connection: list[bytes] = []
        upgrade: list[bytes] = []
        extensions: list[bytes] = []
        expect = False
        key = b""
        for index in range(1, len(lines)):
            line = lines[index]
            colon = line.find(b":")
            lname = line[:colon].lower()
            role = _REQUEST_ROLES.get(lname)
            if role is None:
                if b"_" in lname:
                    alias = lname.replace(b"_", b"-")
                    if alias in _REQUEST_ALIASES:
                        continue
                    if alias == _WS_EXTENSIONS:
                        extensions.append(line)
                out.append(line)
                continue
            value = line[colon + 1 :].strip(b" \t")
            if role == _HOST:
                hosts += 1
                host = value
                out.append(line)
            elif role == _LENGTH:
                if length is not None:
                    raise HttpError(400, "repeated content-length")
                if not (0 < len(value) <= MAX_LENGTH_DIGITS and value.isdigit()):
                    raise HttpError(400, "invalid content-length")
                length = value
                out.append(line)
            elif role == _CODING:
                if not codings:
                    out.append(b"transfer-encoding: chunked")  # re-declared once, in its place
                codings.append(value)
            elif role == _CONNECTION:
                connection.append(value)
            elif role == _UPGRADE:
                upgrade.append(value)
            elif role == _EXPECT:
                expect = value.lower() == b"100-continue"
                out.append(line)
            elif role == _KEY:
                key = value
                out.append(line)
            elif role == _EXTENSIONS:
                extensions.append(line)
                out.append(line)
        body = _request_body(version, length, codings)
        if hosts > 1 or (hosts == 0 and version == b"1.1"):
            raise HttpError(400, "several host headers" if hosts else "missing host header")
        # A connection authenticated for one name must not serve another: the certificate
        # and the client-auth policy were chosen by SNI.
        sni = self._client.server_name
        misdirected = sni is not None and host is not None and normalize_host(host) != sni
        keep_alive = version == b"1.1"
        is_upgrade = False
        if connection:
            named = set(tokens(connection))
            keep_alive = keep_alive and b"close" not in named
            is_upgrade = method == b"GET" and b"upgrade" in named and b"websocket" in set(tokens(upgrade))
            named -= PLAIN_TOKENS
            named -= FRAMING
            if named:
                out = [line for line in out if _alias(line) not in named]
        if is_upgrade and extensions:
            # The frame relay re-frames messages: an extension negotiated end to end would be
            # applied to frames it never sees, so permessage-deflate is stripped both ways.
            out = [line for line in out if line not in extensions]
        forward = b"\r\n".join(out) + b"\r\n" if out else b""
        if is_upgrade:
            forward += _UPGRADE_LINES
        forward += self._edge
        if host is not None:
            forward += b"x-forwarded-host: " + host + b"\r\n"
        forward += self._cert + b"\r\n"
        return RequestHead(
            method, target, version, lines, body, keep_alive, expect and version == b"1.1", is_upgrade, key,
            hosts == 1, misdirected, forward,
        )  # fmt: skip


def _request_body(version: bytes, length: bytes | None, codings: list[bytes]) -> int:
    """RFC 9112 section 6: the request's framing, refusing every ambiguous form."""
    if not codings:
        return int(length) if length is not None else 0
    if version == b"1.0":
        raise HttpError(400, "transfer-encoding on HTTP/1.0")
    if length is not None:
        # RFC 9112 section 6.3: the classic desync. Refused, never "fixed" and forwarded.
        raise HttpError(400, "content-length with transfer-encoding")
    if len(codings) > 1 or b"," in codings[0]:
        raise HttpError(400, "transfer-encoding combination")
    if codings[0].lower() != b"chunked":
        raise HttpError(501, "unsupported transfer-encoding")
    return CHUNKED


def _alias(line: bytes) -> bytes:
    return line.partition(b":")[0].lower().replace(b"_", b"-")


def parse_response(head: bytes) -> ResponseHead:
    """An upstream response head; ``HttpError`` (the session answers 502) if it is malformed."""
    match = _RESPONSE_HEAD.fullmatch(head)
    if match is None:
        raise HttpError(502, diagnose(head, request=False))
    version, status_text, reason = match.groups()
    if version not in _SUPPORTED:
        raise HttpError(502, "unsupported HTTP version")
    status = int(status_text)
    if status < 100:
        raise HttpError(502, "invalid status code")
    lines = head[:-4].split(b"\r\n")
    out: list[bytes] = []
    length: bytes | None = None
    codings: list[bytes] = []
    connection: list[bytes] = []
    accept = b""
    protocol: str | None = None
    for index in range(1, len(lines)):
        line = lines[index]
        colon = line.find(b":")
        lname = line[:colon].lower()
        role = _RESPONSE_ROLES.get(lname)
        if role is None:
            if b"_" in lname:
                alias = lname.replace(b"_", b"-")
                if alias in _RESPONSE_ALIASES or (alias == _WS_EXTENSIONS and status == 101):
                    continue
            out.append(line)
            continue
        value = line[colon + 1 :].strip(b" \t")
        if role == _LENGTH:
            if length is not None:
                raise HttpError(502, "repeated content-length")
            if not (0 < len(value) <= MAX_LENGTH_DIGITS and value.isdigit()):
                raise HttpError(502, "invalid content-length")
            length = value
            out.append(line)
        elif role == _CODING:
            codings.append(value)
        elif role == _CONNECTION:
            connection.append(value)
        elif role == _ACCEPT:
            accept = value
            out.append(line)
        elif role == _PROTOCOL:
            protocol = value.decode("latin-1")
            out.append(line)
        elif role == _EXTENSIONS and status != 101:
            out.append(line)
    body = UNTIL_CLOSE
    if codings:
        if length is not None:
            raise HttpError(502, "content-length with transfer-encoding")
        if len(codings) > 1 or b"," in codings[0] or codings[0].lower() != b"chunked":
            raise HttpError(502, "unsupported transfer-encoding")
        body = CHUNKED
    elif length is not None:
        body = int(length)
    keep_alive = version == b"1.1"
    if connection:
        named = set(tokens(connection))
        keep_alive = keep_alive and b"close" not in named
        named -= PLAIN_TOKENS
        named -= FRAMING
        if named:
            out = [line for line in out if _alias(line) not in named]
    lines_out = b"\r\n".join(out) + b"\r\n" if out else b""
    return ResponseHead(status, reason or b"", version, lines, body, keep_alive, lines_out, accept, protocol)


def head_end(buffer: bytes | bytearray, limit: int, *, request: bool, scanned: int = 0) -> int:
    """Where the head at the start of ``buffer`` ends (past its empty line); -1 if not yet.

    Raises the limit's answer (431 for a request, 502 for a response) for a head longer than
    ``limit``, complete or not, and refuses a partial head that already shows a bare CR or LF.
    ``scanned`` bytes at the start were searched before and found clean (see core/buffer.py).
    """
    end = buffer.find(b"\r\n\r\n", max(0, scanned - 3))
    size = len(buffer) if end < 0 else end + 4
    if size > limit:
        if request:
            raise HttpError(431, "request header fields too large")
        raise HttpError(502, "upstream response head too large")
    if end < 0:
        check_partial(buffer, request=request, scanned=scanned)
    return -1 if end < 0 else end + 4


def check_partial(buffer: bytes | bytearray, *, request: bool, scanned: int = 0) -> None:
    """An incomplete head already holding a bare CR or LF is refused now, not at the size limit.

    Without this a head that uses bare LF line ends never shows the CRLFCRLF we look for, and
    would sit in the buffer until the 431. Only what follows ``scanned`` is looked at, plus
    one byte before it: a CR that ended the previous look may be paired with an LF now.
    """
    start = max(0, scanned - 1)
    tail = buffer[start:]
    crlf = tail.count(b"\r\n")
    # An LF at ``start`` was already judged (with the CR before it) by the previous look.
    lf = tail.count(b"\n") - (start > 0 and tail[:1] == b"\n")
    carriage = tail.count(b"\r") - tail.endswith(b"\r")
    if lf != crlf or carriage != crlf:
        raise HttpError(400 if request else 502, "bare CR or LF line ending")


def diagnose(head: bytes, *, request: bool) -> str:
    """Why the head regex refused ``head``: the reason for the log (the rare path, not timed)."""
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf:
        return "bare LF line ending"
    if head.count(b"\r") != crlf:
        return "bare CR in head"
    lines = head.split(b"\r\n")
    first = _REQUEST_LINE if request else _STATUS_LINE
    if first.fullmatch(lines[0]) is None:
        return "invalid request line" if request else "invalid status line"
    for line in lines[1:]:
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            return "obs-fold line"
        name, colon, value = line.partition(b":")
        if not colon:
            return "header line without a colon"
        if name != name.rstrip(b" \t"):
            return "whitespace before colon"
        if _NAME.fullmatch(name) is None:
            return "invalid header name"
        if _CTL.search(value) is not None:
            return "control character in header value"
    return "malformed head"


def trailer_lines(trailer: bytes) -> bytes:
    """Response trailer fields that may reach the client: framing and hop-by-hop names go."""
    return b"".join(line + b"\r\n" for line in trailer[:-2].split(b"\r\n") if line and _alias(line) not in _RESPONSE_ALIASES)


def without_field(lines: bytes, name: bytes) -> bytes:
    """``lines`` (field lines, each ending in CRLF) without the fields called ``name``."""
    return b"".join(line + b"\r\n" for line in lines.split(b"\r\n")[:-1] if _alias(line) != name)
