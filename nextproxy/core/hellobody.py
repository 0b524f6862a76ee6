"""The ClientHello message body (RFC 8446 section 4.1.2), read as far as routing needs.

Split from ``core/clienthello.py``: the reader there reassembles records and segments into one
handshake message; this walks the complete body by offsets to its extensions and reads the
three routing uses (server_name, ALPN, supported_versions). Every other field is only
bounds-checked: it is OpenSSL's (or the passthrough upstream's) to judge. Sans-IO; raises only
``ClientHelloError``.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from nextproxy.errors import ClientHelloError, TlsAlert

_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43
_TLS13_BYTES = b"\x03\x04"
_WANTED_EXTENSIONS = frozenset((_EXT_SERVER_NAME, _EXT_ALPN, _EXT_SUPPORTED_VERSIONS))
_HOST_NAME = re.compile(rb"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)")
"""Lower-case DNS labels of 1-63 letters, digits and inner hyphens, joined by dots; the last
label is the group (RFC 1123 section 2.1)."""
_EXTENSION_HEADER = struct.Struct(">HH").unpack_from
"""An extension's type and length in one C call: the walk below runs once per extension."""


@dataclass(slots=True)
class ClientHello:
    """What routing needs from a ClientHello, plus the bytes to replay.

    Not frozen (nothing changes it; a later feed makes a new one): one is built per connection,
    and a frozen dataclass pays an ``object.__setattr__`` per field."""

    server_name: str | None
    """Validated DNS host name, lower-case, no trailing dot; None if absent, an IP literal,
    non-ASCII or otherwise not a host name (routing then falls back to the default)."""
    alpn: tuple[bytes, ...]
    """ALPN protocol names in the client's order; empty if the extension is absent."""
    offers_tls13: bool
    """True if supported_versions lists TLS 1.3 (0x0304)."""
    raw: bytes
    """Every byte fed so far, including bytes after the hello: replayed into the TLS engine
    or to a passthrough upstream."""


def fail(alert: TlsAlert, reason: str) -> ClientHelloError:
    """Looks like TLS, but no routing facts: OpenSSL gets the bytes and gives the answer."""
    return ClientHelloError(alert, reason)



def _vector(buf: bytes, pos: int, end: int, width: int, field: str) -> tuple[int, int]:
    """Bounds (start, stop) of the vector at ``pos`` with a ``width``-byte length prefix.

    Offsets rather than cursor objects or slices: a hello is a dozen nested vectors, and
    this keeps a normal parse at a few microseconds. Overrunning ``end`` is a decode error.
    """
    start = pos + width
    if start > end:
        raise fail(TlsAlert.DECODE_ERROR, f"{field}: length truncated")
    stop = start + (buf[pos] if width == 1 else buf[pos] << 8 | buf[pos + 1])
    if stop > end:
        raise fail(TlsAlert.DECODE_ERROR, f"{field}: {stop - end} bytes missing")
    return start, stop


def _expect_end(pos: int, end: int, field: str) -> None:
    if pos != end:
        raise fail(TlsAlert.DECODE_ERROR, f"{field}: {end - pos} trailing bytes")


def parse_body(body: bytes, raw: bytes = b"") -> ClientHello:
    """Parse a complete ClientHello body (RFC 8446 4.1.2) as far as routing needs; ``raw`` is
    every byte that carried it (kept in the result for replay).

    The fixed fields are only walked, not judged: legacy_version, the session id, cipher
    suites and compression methods are OpenSSL's (or the passthrough upstream's) to refuse.
    Judging them here would only send a hello OpenSSL accepts to the default route.
    """
    end = len(body)
    # legacy_version and random (34 bytes), then three vectors: legacy_session_id<0..32>,
    # cipher_suites<2..2^16-2>, legacy_compression_methods<1..2^8-1>. Walked by offsets in
    # one go (an index past the body is the truncation), checked once after.
    try:
        pos = 35 + body[34]
        pos += 2 + (body[pos] << 8 | body[pos + 1])
        pos += 1 + body[pos]
    except IndexError:
        pos = end + 1
    if pos > end:
        raise fail(TlsAlert.DECODE_ERROR, "ClientHello: truncated before its extensions")
    extensions: dict[int, bytes] = {}
    # A pre-TLS-1.2 style hello may end here; TLS 1.3 clients always send extensions.
    if pos + 2 <= end and pos + 2 + (body[pos] << 8 | body[pos + 1]) == end:
        extensions = _split_extensions(body, pos + 2, end)  # the vector ends the body, as it must
    elif pos < end:
        start, pos = _vector(body, pos, end, 2, "extensions")
        extensions = _split_extensions(body, start, pos)
        _expect_end(pos, end, "ClientHello")
    server_name = None
    if _EXT_SERVER_NAME in extensions:
        server_name = _parse_server_name(extensions[_EXT_SERVER_NAME])
    alpn: tuple[bytes, ...] = ()
    if _EXT_ALPN in extensions:
        alpn = _parse_alpn(extensions[_EXT_ALPN])
    offers_tls13 = False
    if _EXT_SUPPORTED_VERSIONS in extensions:
        offers_tls13 = _offers_tls13(extensions[_EXT_SUPPORTED_VERSIONS])
    return ClientHello(server_name, alpn, offers_tls13, raw)


def _split_extensions(buf: bytes, pos: int, end: int) -> dict[int, bytes]:
    """Extension type -> data for the three we read; every extension is bounds-checked.

    The hottest loop of a parse (a dozen or more extensions, some 40% of its bytecode before),
    so each step is one struct call and an addition: a header or length running past ``end``
    stops the walk, and the check after it says which (the header's offset is worked out
    there, not kept on every step)."""
    wanted: dict[int, bytes] = {}
    try:
        while pos < end:
            ext_type, length = _EXTENSION_HEADER(buf, pos)
            pos += 4 + length
            if ext_type in _WANTED_EXTENSIONS and pos <= end:
                if ext_type in wanted:
                    # RFC 8446 4.2: no more than one of a type; two SNIs leave no route. OpenSSL
                    # only catches duplicates of types it knows, so others are its business.
                    raise fail(TlsAlert.DECODE_ERROR, f"duplicate extension {ext_type}")
                wanted[ext_type] = buf[pos - length : pos]
    except struct.error:  # the header runs past the body itself (``pos`` is still its offset)
        raise fail(TlsAlert.DECODE_ERROR, "extensions: truncated extension header") from None
    if pos > end:
        if pos - length > end:  # the header itself ran past the extensions
            raise fail(TlsAlert.DECODE_ERROR, "extensions: truncated extension header")
        raise fail(TlsAlert.DECODE_ERROR, f"extension {ext_type}: {pos - end} bytes missing")
    return wanted


def _parse_server_name(data: bytes) -> str | None:
    """RFC 6066 section 3: a list of (name_type, opaque name); we use host_name (0)."""
    size = len(data)
    if size > 5 and data[2] == 0 and (data[0] << 8 | data[1]) == size - 2 and (data[3] << 8 | data[4]) == size - 5:
        return normalize_host(data[5:])  # what every client sends: one non-empty host_name
    pos, end = _vector(data, 0, size, 2, "server_name_list")
    _expect_end(end, size, "server_name")
    if pos == end:
        raise fail(TlsAlert.DECODE_ERROR, "empty server_name_list")
    host: bytes | None = None
    while pos < end:
        name_type = data[pos]
        start, pos = _vector(data, pos + 1, end, 2, "server name")
        if start == pos:
            raise fail(TlsAlert.DECODE_ERROR, "empty server name")
        if name_type == 0:
            # "MUST NOT contain more than one name of the same name_type" (RFC 6066 3).
            if host is not None:
                raise fail(TlsAlert.DECODE_ERROR, "two host_name entries in server_name")
            host = data[start:pos]
    return None if host is None else normalize_host(host)


def normalize_host(name: bytes) -> str | None:
    """A lower-case DNS host name without trailing dot, or None if ``name`` is not one.

    None (not an error) for IP literals, non-ASCII and other junk: RFC 6066 forbids IP
    literals in SNI, but real clients send them, and the right answer is the default route.
    """
    if name.endswith(b"."):
        name = name[:-1]
    if not 0 < len(name) <= 253:
        return None
    name = name.lower()
    # One regular expression instead of a loop over the labels (every connection's SNI, and the
    # Host of every request on a connection that sent one: ~45 bytecodes a label before).
    match = _HOST_NAME.fullmatch(name)
    # An all-numeric last label is an IPv4 literal (or a shorthand like "127.1"); no TLD is.
    if match is None or match.group(1).isdigit():
        return None
    return name.decode("ascii")


def _parse_alpn(data: bytes) -> tuple[bytes, ...]:
    """RFC 7301 3.1: ProtocolNameList<2..2^16-1> of ProtocolName<1..2^8-1>."""
    pos, end = _vector(data, 0, len(data), 2, "protocol_name_list")
    _expect_end(end, len(data), "alpn")
    if pos == end:
        raise fail(TlsAlert.DECODE_ERROR, "empty ALPN protocol list")
    protocols: list[bytes] = []
    while pos < end:
        start, pos = _vector(data, pos, end, 1, "protocol_name")
        if start == pos:
            raise fail(TlsAlert.DECODE_ERROR, "empty ALPN protocol name")
        protocols.append(data[start:pos])
    return tuple(protocols)


def _offers_tls13(data: bytes) -> bool:
    """RFC 8446 4.2.1: ClientHello supported_versions is ProtocolVersion versions<2..254>; True
    if TLS 1.3 is one of them (a search, not a list of every version: clients name it first)."""
    size = len(data)
    if not (size > 2 and data[0] == size - 1 and size % 2):  # else: which check fails, and how
        pos, end = _vector(data, 0, size, 1, "supported_versions")
        _expect_end(end, size, "supported_versions")
        raise fail(TlsAlert.DECODE_ERROR, f"supported_versions length {end - pos}")
    pos = 1
    found = data.find(_TLS13_BYTES, pos)
    while found != -1 and (found - pos) % 2:  # the bytes straddle two versions: search on
        found = data.find(_TLS13_BYTES, found + 1)
    return found != -1
