"""The edge's header policy over h11-shaped header lists: the tests' oracle for core/codec.py.

``nextproxy/core/codec.py`` applies the policy of ``nextproxy/core/headers.py`` inside its one
loop over a raw head; nothing in the product holds h11 header lists any more. These functions
are the same policy in its plain, list-shaped form, kept next to the tests that use them: the
differential fuzzer (tests/core/test_codec_fuzz.py) checks that whatever the codec accepts,
h11's parse plus these functions accept too, with the same forwarded fields.
"""

from __future__ import annotations

from nextproxy.core.headers import (
    EDGE_OWNED,
    FRAMING,
    HOP_BY_HOP,
    PLAIN_TOKENS,
    ClientInfo,
    Headers,
    client_cert_fields,
    normalize_host,
    tokens,
)
from nextproxy.errors import HttpError

_FRAMING = FRAMING
_PLAIN_TOKENS = PLAIN_TOKENS
# No permessage-deflate across the frame relay: the relay re-frames messages, so an extension
# negotiated end to end would be applied to frames it never sees. Stripped both ways.
_WS_EXTENSIONS = b"sec-websocket-extensions"
_DROP_REQUEST = HOP_BY_HOP | EDGE_OWNED
_DROP_REQUEST_UPGRADE = _DROP_REQUEST | {_WS_EXTENSIONS}
_DROP_RESPONSE = HOP_BY_HOP
_DROP_RESPONSE_UPGRADE = HOP_BY_HOP | {_WS_EXTENSIONS}


def _normalize(name: bytes) -> bytes:
    """As ``headers.tokens`` compares: lower-case, '_' as '-'."""
    return name.lower().replace(b"_", b"-")


def request_host(headers: Headers) -> str | None:
    """The Host value normalized for comparison with SNI: lower-case, no port, no trailing dot."""
    for name, value in headers:
        if name.lower() == b"host":
            return normalize_host(value)
    return None


def check_request(method: bytes, target: bytes, headers: Headers, client: ClientInfo) -> None:
    """Raise HttpError for a request that must not be forwarded.

    h11 already refuses some of these, but it accepts Content-Length with Transfer-Encoding and
    merges duplicates; this is the check that holds whoever parsed the head. ``method`` and
    ``target`` are the routing module's to judge (dot segments, absolute-form).
    """
    host: bytes | None = None
    hosts = lengths = codings = 0
    for name, value in headers:
        lname = name.lower()
        if lname == b"host":
            hosts += 1
            host = value
        elif lname == b"content-length":
            lengths += 1
            if not (value.isdigit() and value.isascii()):
                raise HttpError(400, "invalid content-length")
        elif lname == b"transfer-encoding":
            codings += 1
            # RFC 9112 section 6.1: only chunked is ours to decode; "gzip, chunked" would make
            # the upstream unzip what we framed, and anything else is a smuggling probe.
            if value.strip().lower() != b"chunked":
                raise HttpError(400, "unsupported transfer-encoding")
    if codings and lengths:
        # RFC 9112 section 6.3: the classic desync. Refused, never "fixed" and forwarded.
        raise HttpError(400, "content-length with transfer-encoding")
    if codings > 1 or lengths > 1:
        raise HttpError(400, "repeated framing header")
    if hosts > 1:
        raise HttpError(400, "several host headers")
    if client.server_name is not None and host is not None:
        # RFC 9110 section 15.5.20: a connection authenticated for one name must not serve
        # another (certificate and client-auth policy were chosen by SNI).
        if normalize_host(host) != client.server_name:
            raise HttpError(421, "misdirected request")


def _filter_named(headers: Headers, named: set[bytes]) -> Headers:
    return [(name, value) for name, value in headers if _normalize(name) not in named]


def _forward(headers: Headers, drop: frozenset[bytes]) -> tuple[Headers, bytes | None]:
    """One pass: keep what may cross, note Host and chunked framing, honour Connection tokens."""
    out: Headers = []
    host: bytes | None = None
    chunked = length = False
    connection: list[bytes] = []
    for name, value in headers:
        lname = name.lower()
        norm = lname.replace(b"_", b"-")
        if norm in drop:
            if lname == b"connection":
                connection.append(value)
            elif lname == b"transfer-encoding":
                # check_request admitted only "chunked": re-declared once, in its place.
                if not chunked:
                    out.append((b"transfer-encoding", b"chunked"))
                chunked = True
            continue
        if norm in _FRAMING and norm != lname:
            continue  # content_length / host alias
        if lname == b"host":
            host = value if host is None else host
        elif lname == b"content-length":
            length = True
        out.append((name, value))
    named = {token for token in tokens(connection) if token not in _PLAIN_TOKENS}
    named -= _FRAMING
    if named:
        out = _filter_named(out, named)
    if chunked and length:
        # RFC 9112 section 6.3: with chunked framing a Content-Length must not be forwarded.
        out = [(name, value) for name, value in out if name.lower() != b"content-length"]
    return out, host


def upstream_request_headers(headers: Headers, client: ClientInfo, *, upgrade: bool) -> Headers:
    """The request headers to send upstream (call after ``check_request`` accepted them).

    Order is kept; Host and Content-Length pass as they are; X-Forwarded-* and the client
    certificate headers are set (never appended to: we are the edge, earlier hops are lies).
    """
    out, host = _forward(headers, _DROP_REQUEST_UPGRADE if upgrade else _DROP_REQUEST)
    if upgrade:
        out.append((b"connection", b"upgrade"))
        out.append((b"upgrade", b"websocket"))
    out.append((b"x-forwarded-for", client.address.encode("ascii", "replace")))
    out.append((b"x-forwarded-proto", b"https"))
    if host is not None:
        out.append((b"x-forwarded-host", host))
    out += client_cert_fields(client)
    return out


def response_headers(headers: Headers, *, upgrade: bool) -> Headers:
    """The upstream response headers to send to the client.

    h11 on the client leg re-frames the body, so Transfer-Encoding is re-declared only when
    the upstream was chunked; Content-Length passes unchanged.
    """
    out, _ = _forward(headers, _DROP_RESPONSE_UPGRADE if upgrade else _DROP_RESPONSE)
    if upgrade:
        out.append((b"connection", b"upgrade"))
        out.append((b"upgrade", b"websocket"))
    return out


def is_upgrade_request(method: bytes, headers: Headers, version: bytes = b"1.1") -> bool:
    """True for a WebSocket opening handshake (RFC 6455 section 4.2.1): HTTP/1.1 only, since
    a server MUST ignore Upgrade in an HTTP/1.0 request (RFC 9110 section 7.8)."""
    if method != b"GET" or version != b"1.1":
        return False
    connection: list[bytes] = []
    upgrade: list[bytes] = []
    for name, value in headers:
        lname = name.lower()
        if lname == b"connection":
            connection.append(value)
        elif lname == b"upgrade":
            upgrade.append(value)
    if b"upgrade" not in set(tokens(connection)):
        return False
    return any(token == b"websocket" for token in tokens(upgrade))
