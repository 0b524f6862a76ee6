"""Our strict HTTP/1.1 head codec for both legs: one regular expression, then one loop.

A head (request or response) is validated whole by one linear regular expression: CRLF line
ends only, no obs-fold, no whitespace before a colon, token names, no CTL or DEL in values
(obs-text is allowed). Then one loop, over the lower-cased head's field lines that matter
(framing, Host, Connection, Upgrade, Expect, hop-by-hop, edge-owned, WebSocket, any name with
'_', found by a second regex), checks the framing, drops hop-by-hop and Connection-named
headers and applies the forwarding policy of ``core/headers.py`` (X-Forwarded-*,
client-certificate headers, Host/SNI 421). Every other line crosses as a slice of the head it
came in, so the outgoing head is a join, not a re-serialization, and an ordinary field costs
nothing of its own (a browser sends a dozen).

Why not h11 here: it costs most of the 100 µs budget per proxied request on four heads, and it
lets through what an edge must refuse (CTL bytes in values, Transfer-Encoding on HTTP/1.0,
bare LF, obs-fold, HTTP/1.2 request lines). h11 stays the oracle in the tests: whatever this
accepts, h11 plus ``core/headers.py`` accepts with the same fields (tests/core/test_codec_fuzz.py).

Sans-IO: no sockets, clocks or logs. Raises only ``HttpError`` with the status to answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from nextproxy.core.headers import (
    EDGE_OWNED,
    FRAMING,
    HOP_BY_HOP,
    PLAIN_TOKENS,
    ClientInfo,
    client_cert_fields,
    normalize_host,
    tokens,
    websocket_accept,
)
from nextproxy.core.headscan import TARGET_CHAR, TOKEN, VERSION, check_partial, diagnose, head_end
from nextproxy.errors import HttpError

__all__ = [
    "CHUNKED", "UNTIL_CLOSE", "RequestHead", "RequestParser", "ResponseHead", "check_partial", "connection_options",
    "diagnose", "extension_lines", "head_end", "invalid_switch", "parse_response", "trailer_lines", "without_fields",
]  # fmt: skip

_FIELD = TOKEN + rb"+:[\t\x20-\x7e\x80-\xff]*+\r\n"
# Linear by construction: a field line starts with a token character and its value cannot hold
# CR, so the engine never has two ways to match a byte. The quantifiers are possessive for the
# same reason (what follows each cannot be what it matched), which spares the engine its
# backtracking bookkeeping: ~0.2 µs per head.
_REQUEST_HEAD = re.compile(rb"(" + TOKEN + rb") (" + TARGET_CHAR + rb"++) " + VERSION + rb"\r\n(?:" + _FIELD + rb")*+\r\n")
_RESPONSE_HEAD = re.compile(VERSION + rb" ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*+))?\r\n(?:" + _FIELD + rb")*+\r\n")
_SUPPORTED = (b"1.1", b"1.0")
_PROTOCOL_LIST = re.compile(rb"[ \t,]*" + TOKEN + rb"(?:[ \t]*,[ \t,]*" + TOKEN + rb")*[ \t,]*")
"""Sec-WebSocket-Protocol is 1#token (RFC 6455 section 4.1; empty list elements are ignored,
RFC 9110 section 5.6.1.2): an empty or malformed offer is the client's error (400), not an
upstream's 101 to blame later (a 502)."""
MAX_LENGTH_DIGITS = 18
"""Content-Length digits: 10^18 fits in 63 bits, so no parser on either side can overflow."""

# What each field name means to the loop; a name not listed is kept as it came.
_DROP, _HOST, _LENGTH, _CODING, _CONNECTION, _UPGRADE, _EXPECT, _KEY, _EXTENSIONS, _ACCEPT, _PROTOCOL = range(11)
_WS_EXTENSIONS = b"sec-websocket-extensions"
_WS_PROTOCOL = b"sec-websocket-protocol"
_REQUEST_ROLES = {name: _DROP for name in HOP_BY_HOP | EDGE_OWNED} | {
    b"host": _HOST,
    b"content-length": _LENGTH,
    b"transfer-encoding": _CODING,
    b"connection": _CONNECTION,
    b"upgrade": _UPGRADE,
    b"expect": _EXPECT,
    b"sec-websocket-key": _KEY,
    _WS_EXTENSIONS: _EXTENSIONS,
    _WS_PROTOCOL: _PROTOCOL,
}
_RESPONSE_ROLES = {name: _DROP for name in HOP_BY_HOP} | {
    b"content-length": _LENGTH,
    b"transfer-encoding": _CODING,
    b"connection": _CONNECTION,
    b"sec-websocket-accept": _ACCEPT,
    _WS_PROTOCOL: _PROTOCOL,
    _WS_EXTENSIONS: _EXTENSIONS,
}
# An underscore alias (X_Forwarded_For, content_length) of a name the edge owns or frames by:
# CGI-style upstreams map '_' and '-' to one variable, so the alias would pose as the real one.
_REQUEST_ALIASES = HOP_BY_HOP | EDGE_OWNED | FRAMING
_RESPONSE_ALIASES = HOP_BY_HOP | FRAMING


def _special(names: Iterable[bytes]) -> re.Pattern[bytes]:
    """Finds, in a lower-cased validated head, the field lines the loop must look at: the named
    ones and any name with '_'. The rest pass through as slices of the head, unexamined."""
    alternatives = b"|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    return re.compile(rb"\r\n(" + alternatives + rb"|[^:\r\n_]*_[^:\r\n]*):")


_REQUEST_SPECIAL = _special(_REQUEST_ROLES)
_RESPONSE_SPECIAL = _special(_RESPONSE_ROLES)

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
    raw: bytes
    """The head as received, request line through empty line."""
    length: int
    """Body length, or ``CHUNKED``; 0 for none."""
    keep_alive: bool
    expect_continue: bool
    upgrade: bool
    websocket_key: bytes
    protocols: bytes
    """The Sec-WebSocket-Protocol values offered (forwarded as they came), comma-joined."""
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
        return _fields(self.raw)


@dataclass(slots=True)
class ResponseHead:
    """A validated response head and the header lines that may reach the client."""

    status: int
    reason: bytes
    version: bytes
    raw: bytes
    """The head as received, status line through empty line."""
    length: int
    """Content-Length, ``CHUNKED`` or ``UNTIL_CLOSE`` (framing as sent, before HEAD/204/304 rules)."""
    keep_alive: bool
    lines: bytes
    """Forwardable field lines, each ending in CRLF, without the empty line."""
    accept: bytes
    protocol: str | None
    extensions: bool
    """A 101 named a WebSocket extension (the field is never forwarded)."""

    @property
    def fields(self) -> list[tuple[bytes, bytes]]:
        """As received: lower-cased names, values without surrounding whitespace."""
        return _fields(self.raw)


def _fields(raw: bytes) -> list[tuple[bytes, bytes]]:
    pairs = [line.partition(b":") for line in raw[:-4].split(b"\r\n")[1:]]
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
        method, target, version = _request_line(head)
        if method == b"CONNECT":
            # A reverse proxy opens no tunnels: refused whatever the target form (nginx answers
            # 405 too), before a path target could route it upstream as an ordinary request.
            raise HttpError(405, "CONNECT is not supported")
        kept: list[bytes] = []
        pos = head.find(b"\r\n") + 2
        host: bytes | None = None
        length: bytes | None = None
        hosts = 0
        codings: list[bytes] = []
        connection: list[bytes] = []
        upgrade: list[bytes] = []
        protocols: list[bytes] = []
        extensions = expect = False
        key = b""
        for field in _REQUEST_SPECIAL.finditer(head.lower(), pos - 2):
            name, end = field.group(1), head.find(b"\r\n", field.end())
            role = _REQUEST_ROLES.get(name)
            if role is None:  # an underscore name: an alias of one we own, or kept
                alias = name.replace(b"_", b"-")
                extensions = extensions or alias == _WS_EXTENSIONS
                if alias not in _REQUEST_ALIASES:
                    continue
            else:
                value = head[field.end() : end].strip(b" \t")
                if role == _HOST:
                    hosts, host = hosts + 1, value
                    continue
                if role == _LENGTH:
                    length = _content_length(value, length, 400)
                    continue
                if role == _EXPECT:
                    expect = value.lower() == b"100-continue"
                    continue
                if role == _KEY or role == _EXTENSIONS:
                    key = value if role == _KEY else key
                    extensions = extensions or role == _EXTENSIONS
                    continue
                if role == _PROTOCOL:  # kept: only noted, to check the 101's choice against
                    protocols.append(value)
                    continue
                if role == _CODING:
                    if not codings:  # re-declared once, in its place
                        kept += (head[pos : field.start() + 2], b"transfer-encoding: chunked\r\n")
                        pos = end + 2
                    codings.append(value)
                elif role == _CONNECTION:
                    connection.append(value)
                elif role == _UPGRADE:
                    upgrade.append(value)
            kept.append(head[pos : field.start() + 2])  # drop this line
            pos = end + 2
        forward = b"".join(kept) + head[pos:-2] if kept else head[pos:-2]
        body = _request_body(version, length, codings)
        if hosts > 1 or (hosts == 0 and version == b"1.1"):
            raise HttpError(400, "several host headers" if hosts else "missing host header")
        keep_alive, is_upgrade = version == b"1.1", False
        if connection:
            # RFC 9110 section 7.8: a server MUST ignore Upgrade in an HTTP/1.0 request (and RFC
            # 6455 section 4.1 asks for HTTP/1.1): such a request is plain, its Upgrade dropped.
            upgradable = method == b"GET" and version == b"1.1"
            forward, keep_alive, is_upgrade = _connection(upgradable, forward, keep_alive, connection, upgrade, extensions)
            if is_upgrade and not all(_PROTOCOL_LIST.fullmatch(offer) for offer in protocols):
                raise HttpError(400, "invalid Sec-WebSocket-Protocol")
        forward += self._edge + (b"x-forwarded-host: " + host + b"\r\n" if host is not None else b"") + self._cert + b"\r\n"
        return RequestHead(
            method, target, version, head, body, keep_alive, expect and version == b"1.1", is_upgrade, key,
            b",".join(protocols), hosts == 1, self._misdirected(host), forward,
        )  # fmt: skip

    def _misdirected(self, host: bytes | None) -> bool:
        """Host names another server than SNI did (421, RFC 9110 section 15.5.20): a connection
        authenticated for one name must not serve another, since the certificate and the
        client-auth policy were chosen by SNI."""
        sni = self._client.server_name
        return sni is not None and host is not None and normalize_host(host) != sni


def _request_line(head: bytes) -> tuple[bytes, bytes, bytes]:
    """Method, target and version of a head the regex validates whole (400), in a version we
    speak (505)."""
    match = _REQUEST_HEAD.fullmatch(head)
    if match is None:
        raise HttpError(400, diagnose(head, request=True))
    method, target, version = match.groups()
    if version not in _SUPPORTED:
        raise HttpError(505, "http version not supported")
    return method, target, version


def _content_length(value: bytes, seen: bytes | None, status: int) -> bytes:
    """Exactly one Content-Length of 1-18 digits (identical duplicates refused too)."""
    if seen is not None:
        raise HttpError(status, "repeated content-length")
    if not (0 < len(value) <= MAX_LENGTH_DIGITS and value.isdigit()):
        raise HttpError(status, "invalid content-length")
    return value


def _connection(
    upgradable: bool, forward: bytes, keep_alive: bool, connection: list[bytes], upgrade: list[bytes], extensions: bool
) -> tuple[bytes, bool, bool]:
    """A request's Connection options: close, the fields they name (dropped), a WebSocket
    upgrade (only for an ``upgradable`` request: an HTTP/1.1 GET). Returns the forwarded
    lines, keep-alive and whether it upgrades."""
    options, named = connection_options(b",".join(connection))
    # HTTP/1.0 persists only if asked to (RFC 9112 section 9.3 and appendix C.2.2), as nginx
    # honours it (ab -k, old clients); HTTP/1.1 persists unless told otherwise.
    keep_alive = (keep_alive or b"keep-alive" in options) and b"close" not in options
    is_upgrade = upgradable and b"upgrade" in options and b"websocket" in set(tokens(upgrade))
    if named:
        forward = without_fields(forward, named)
    if is_upgrade:
        if extensions:
            # The frame relay re-frames messages: an extension negotiated end to end would
            # be applied to frames it never sees, so permessage-deflate is stripped both ways.
            forward = without_fields(forward, {_WS_EXTENSIONS})
        forward += _UPGRADE_LINES
    return forward, keep_alive, is_upgrade


@lru_cache(maxsize=256)
def connection_options(value: bytes) -> tuple[frozenset[bytes], frozenset[bytes]]:
    """The Connection tokens (normalized), and the field names among them to drop.

    Cached: nearly every message says one of a handful of values ("keep-alive", "close",
    "Upgrade"). Framing fields may not be named away (a client sending "Connection:
    content-length" would otherwise turn its body into a second request upstream).
    """
    options = frozenset(tokens([value]))
    return options, options - PLAIN_TOKENS - FRAMING


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
    kept: list[bytes] = []
    pos = head.find(b"\r\n") + 2
    length: bytes | None = None
    codings: list[bytes] = []
    connection: list[bytes] = []
    accept = b""
    protocol: str | None = None
    extensions = False
    for field in _RESPONSE_SPECIAL.finditer(head.lower(), pos - 2):
        name, end = field.group(1), head.find(b"\r\n", field.end())
        role = _RESPONSE_ROLES.get(name)
        if role is None:  # an underscore name: an alias of one that frames, or kept
            alias = name.replace(b"_", b"-")
            if alias not in _RESPONSE_ALIASES and (alias != _WS_EXTENSIONS or status != 101):
                continue
        elif role == _EXTENSIONS:
            if status != 101:
                continue
            extensions = True
        else:
            value = head[field.end() : end].strip(b" \t")
            if role == _LENGTH:
                length = _content_length(value, length, 502)
                continue
            if role == _ACCEPT:
                accept = value
                continue
            if role == _PROTOCOL:
                # Several fields join into one value that names no single offered subprotocol.
                text = value.decode("latin-1")
                protocol = text if protocol is None else protocol + ", " + text
                continue
            if role == _CODING:
                codings.append(value)
            elif role == _CONNECTION:
                connection.append(value)
        kept.append(head[pos : field.start() + 2])  # drop this line
        pos = end + 2
    lines = b"".join(kept) + head[pos:-2] if kept else head[pos:-2]
    body = _response_body(version, length, codings)
    keep_alive = version == b"1.1"
    if connection:
        options, named = connection_options(b",".join(connection))
        keep_alive = keep_alive and b"close" not in options
        if named:
            lines = without_fields(lines, named)
    return ResponseHead(status, reason or b"", version, head, body, keep_alive, lines, accept, protocol, extensions)


def _response_body(version: bytes, length: bytes | None, codings: list[bytes]) -> int:
    """A response's framing as sent: chunked, a length, or until close; ambiguity is a 502."""
    if codings:
        if version == b"1.0":
            # RFC 9112 section 6.1: an HTTP/1.0 message with Transfer-Encoding MUST be treated
            # as having faulty framing (a 1.0 hop may not have decoded it; a desync vector).
            raise HttpError(502, "transfer-encoding on HTTP/1.0")
        if length is not None:
            raise HttpError(502, "content-length with transfer-encoding")
        if len(codings) > 1 or b"," in codings[0] or codings[0].lower() != b"chunked":
            raise HttpError(502, "unsupported transfer-encoding")
        return CHUNKED
    return int(length) if length is not None else UNTIL_CLOSE


def extension_lines(raw: bytes) -> bytes:
    """A head's Sec-WebSocket-Extensions field lines as received, each ending in CRLF: a tunnel
    passes the negotiation on (the frame relay strips it, ``_connection``). Rare path."""
    lines = raw[:-4].split(b"\r\n")[1:]
    return b"".join(line + b"\r\n" for line in lines if line.partition(b":")[0].lower() == _WS_EXTENSIONS)


def _extension_names(lines: bytes) -> frozenset[bytes]:
    """The extension names in Sec-WebSocket-Extensions lines (RFC 6455 section 9.1), lower-case;
    b"" among them if an element is empty."""
    values = b",".join(line.partition(b":")[2] for line in lines.split(b"\r\n") if line)
    return frozenset(item.partition(b";")[0].strip(b" \t").lower() for item in values.split(b","))


def invalid_switch(request: RequestHead, response: ResponseHead, *, tunnel: bool = False) -> str | None:
    """Why a 101 does not complete ``request``'s opening handshake as the upstream received
    it, or None if it does. The proxy is the upstream's client, and RFC 6455 section 4.1 makes
    the client fail the connection on each of these: a 502, never relayed. A ``tunnel`` was
    forwarded the client's extension offer (the client checks the choice, end to end)."""
    if not request.upgrade:
        return "a 101 to a request that did not upgrade"
    if response.accept != websocket_accept(request.websocket_key):
        return "wrong Sec-WebSocket-Accept"
    if response.extensions:
        # _connection strips Sec-WebSocket-Extensions from every upgrade the frame relay
        # forwards, so any extension in the 101 is one the upstream was never offered; a
        # tunnel forwarded the client's offer, and the choice must be among it.
        names = _extension_names(extension_lines(request.raw)) if tunnel else frozenset[bytes]()
        chosen = _extension_names(extension_lines(response.raw))
        if b"" in chosen or not chosen <= names:
            return "an extension the request did not offer"
    protocol = response.protocol
    if protocol is not None:
        # Compared exactly, as wsproto's client does: one token the request listed.
        offered = {name.strip(b" \t") for name in request.protocols.split(b",")} - {b""}
        if protocol.encode("latin-1") not in offered:
            return "a subprotocol the request did not offer"
    return None


def trailer_lines(trailer: bytes) -> bytes:
    """Response trailer fields that may reach the client: framing and hop-by-hop names go."""
    return b"".join(line + b"\r\n" for line in trailer[:-2].split(b"\r\n") if line and _alias(line) not in _RESPONSE_ALIASES)


def without_fields(lines: bytes, names: set[bytes] | frozenset[bytes]) -> bytes:
    """``lines`` (field lines, each ending in CRLF) without the fields named in ``names``
    (compared lower-cased, with '_' as '-'). The rare path: Connection-named fields, upgrades."""
    return b"".join(line + b"\r\n" for line in lines.split(b"\r\n")[:-1] if _alias(line) not in names)
