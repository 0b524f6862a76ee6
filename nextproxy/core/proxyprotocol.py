"""PROXY protocol v1 (text) and v2 (binary): an incremental, capped reader (the v2 writer and
wire constants are in ``core/proxyv2.py``, importable from here).

An L4 load balancer in front of the proxy prepends one header to each connection saying who the
client really is; a passthrough route does the same towards an API server. The reader follows
HAProxy's specification (doc/proxy-protocol.txt) strictly: anything that does not match it
exactly is refused, because a lenient reader on a port that trusts these headers lets a client
choose its own address. It keeps the bytes that follow the header (the ClientHello).

It must never do I/O, never buffer more than the largest header it accepts (107 bytes for v1,
16 + ``max_v2_payload`` for v2), and never let anything but ``ProxyProtocolError`` escape.
Whether a peer may send a header at all is the caller's decision (the trusted networks): the
specification forbids guessing from the bytes.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from nextproxy.core.crc32c import crc32c
from nextproxy.core.proxyv2 import (
    MAX_AUTHORITY,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    PP2_TYPE_UNIQUE_ID,
    TCP4,
    TCP6,
    TLV_HEADER,
    V2_HEADER_SIZE,
    V2_SIGNATURE,
    V2_VERSION,
    Endpoint,
    build_v2,
)
from nextproxy.errors import ProxyProtocolError

__all__ = [
    "PP2_TYPE_ALPN", "PP2_TYPE_AUTHORITY", "PP2_TYPE_CRC32C", "PP2_TYPE_NOOP", "PP2_TYPE_UNIQUE_ID", "V2_HEADER_SIZE",
    "V2_SIGNATURE", "Endpoint", "ProxyCommand", "ProxyHeader", "ProxyHeaderReader", "Tlv", "build_v2",
    "looks_like_proxy_protocol",
]  # fmt: skip

KiB = 1024
MAX_V1_LINE = 107
"""Longest v1 line including CRLF (the specification's worst case, "PROXY UNKNOWN" + two
full IPv6 addresses and ports); a receiver must declare a longer line invalid."""
MAX_V2_PAYLOAD = 4 * KiB
"""Default cap on the v2 bytes after the 16-byte header (addresses + TLVs). Load balancers send
a few dozen bytes (AWS adds a VPC endpoint id, HAProxy an authority and a unique id); only a
sender that forwards whole client certificates needs more, and then the cap is configurable."""

V1_SIGNATURE = b"PROXY "

# Error reasons: a fixed set, so the shell can use them as metric label values.
NOT_PROXY_PROTOCOL = "not_proxy_protocol"  # a peer that must send a header sent something else
MALFORMED = "malformed"
TOO_LONG = "too_long"
BAD_CHECKSUM = "bad_checksum"
TRUNCATED = "truncated"  # the connection ended inside the header

_MAX_UNIQUE_ID = 128  # "up to 128 bytes" (section 2.2.5)

# The family/protocol bytes section 2.2 lists as valid, with their address block sizes (UNSPEC
# has none: TLVs start right after the 16 bytes). Only TCP over IPv4/IPv6 is decoded; for the
# others a receiver "falls back to the UNSPEC mode" (use the connection's own addresses), and
# any other byte "must be rejected as invalid".
_V2_ADDRESS_SIZES = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}

_V1_IPV4 = re.compile(rb"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                      rb"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)")  # no leading zeros: not octal
_V1_IPV6_CHARS = re.compile(rb"[0-9A-Fa-f:.]{2,45}")  # dotted tail for IPv4-mapped; no %scope
_V1_PORT = re.compile(rb"0|[1-9]\d{0,4}")


class ProxyCommand(enum.Enum):
    """v2's command nibble. v1 has no command: its lines count as PROXY."""

    LOCAL = "local"  # the balancer's own connection (a health check): no client behind it
    PROXY = "proxy"


@dataclass(frozen=True, slots=True)
class Tlv:
    """One v2 type-length-value entry, exactly as received."""

    type: int
    value: bytes


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete, valid header and the bytes that followed it."""

    version: int
    """1 (text) or 2 (binary)."""
    command: ProxyCommand
    source: Endpoint | None
    """The client. None means "use the connection's own address": a LOCAL command, a v1
    UNKNOWN line, or a v2 family this reader does not decode (UNSPEC, UDP, UNIX)."""
    destination: Endpoint | None
    """The address the client connected to; None exactly when ``source`` is None."""
    tlvs: tuple[Tlv, ...]
    """Every v2 TLV in wire order, the decoded ones included; empty for v1."""
    authority: str | None
    """PP2_TYPE_AUTHORITY: the server name the client asked for (its SNI), if sent."""
    alpn: bytes | None
    """PP2_TYPE_ALPN: the application protocol, if sent."""
    trailing: bytes
    """Bytes fed after the header: the start of the client's own stream (its ClientHello),
    which the caller must process next."""

    @property
    def uses_connection_address(self) -> bool:
        """True when the caller keeps the socket's peer address as the client's."""
        return self.source is None


def _detached(error: ProxyProtocolError) -> ProxyProtocolError:
    """An unraised copy for the sticky error (a raised one's traceback pins the caller)."""
    return ProxyProtocolError(error.reason, error.detail)


class ProxyHeaderReader:
    """Feed bytes as they arrive; ``feed`` returns the header once it is complete.

    ``feed(b"")`` means the peer closed the connection. After an error every later ``feed``
    raises the same error. The reader is single-use: once it has returned a header, the bytes
    after it are in ``ProxyHeader.trailing`` and feeding it again is a caller bug.
    """

    def __init__(self, max_v2_payload: int = MAX_V2_PAYLOAD) -> None:
        if not 0 <= max_v2_payload <= 0xFFFF:
            raise ValueError(f"max_v2_payload must be 0..65535, got {max_v2_payload}")
        self._max_v2_payload = max_v2_payload
        # Never holds more than the cap between feeds: an incomplete header longer than
        # the cap is refused in the same feed that made it so.
        self._buffer = bytearray()
        self._error: ProxyProtocolError | None = None
        self._done = False

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Consume ``data``; return the header when complete, None if more bytes are needed."""
        if self._error is not None:
            raise _detached(self._error)
        if self._done:
            raise RuntimeError("ProxyHeaderReader.feed after the header was returned")
        try:
            if not data:
                raise ProxyProtocolError(
                    TRUNCATED, f"connection closed after {len(self._buffer)} header bytes")
            self._buffer += data
            header = self._parse(self._buffer)
        except ProxyProtocolError as exc:
            self._fail(exc)
            raise
        except (ValueError, IndexError) as exc:  # ValueError includes UnicodeDecodeError
            # Every length is checked, so this is a bug; the shell still gets our type.
            error = ProxyProtocolError(MALFORMED, f"unparseable header: {exc!r}")
            self._fail(error)
            raise error from exc
        if header is not None:
            self._done = True
            self._buffer = bytearray()
        return header

    def _fail(self, error: ProxyProtocolError) -> None:
        self._error = _detached(error)
        self._buffer = bytearray()

    def _parse(self, buf: bytearray) -> ProxyHeader | None:
        if buf[0] == V1_SIGNATURE[0]:
            return _parse_v1(buf) if _signature_seen(buf, V1_SIGNATURE) else None
        if buf[0] == V2_SIGNATURE[0]:
            return self._parse_v2(buf) if _signature_seen(buf, V2_SIGNATURE) else None
        raise ProxyProtocolError(NOT_PROXY_PROTOCOL, f"first byte {buf[0]:#04x}")

    def _parse_v2(self, buf: bytearray) -> ProxyHeader | None:
        # Each field is judged as soon as it arrives: never wait for bytes we will refuse.
        if len(buf) <= 12:
            return None
        version, command_bits = buf[12] >> 4, buf[12] & 0x0F
        if version != V2_VERSION:
            raise ProxyProtocolError(MALFORMED, f"v2 version nibble {version}, not 2")
        if command_bits > 1:
            raise ProxyProtocolError(MALFORMED, f"v2 command {command_bits}, not LOCAL or PROXY")
        command = ProxyCommand.PROXY if command_bits else ProxyCommand.LOCAL
        if len(buf) <= 13:
            return None
        family = buf[13]
        # LOCAL: "the receiver ... must discard the protocol block including the family".
        if command is ProxyCommand.PROXY and family not in _V2_ADDRESS_SIZES:
            raise ProxyProtocolError(MALFORMED, f"v2 address family/protocol {family:#04x}")
        if len(buf) < V2_HEADER_SIZE:
            return None
        length = buf[14] << 8 | buf[15]
        if length > self._max_v2_payload:
            raise ProxyProtocolError(
                TOO_LONG, f"v2 header announces {length} bytes, cap is {self._max_v2_payload}")
        end = V2_HEADER_SIZE + length
        if len(buf) < end:
            return None
        header, trailing = bytes(buf[:end]), bytes(buf[end:])
        if command is ProxyCommand.LOCAL:
            # The family is ignored and addresses are usually not sent ("it sets this field to
            # zero"), so the block is TLVs: HAProxy reads it so, and its health checks put a
            # CRC32c there, verified like any other. A block that does not read as TLVs but does
            # after a family's addresses is a sender that filled them in anyway: they are
            # skipped ("discard the protocol block including the family"; HAProxy accepts it).
            try:
                tlvs = _parse_tlvs(header, V2_HEADER_SIZE)
            except ProxyProtocolError:
                size = _V2_ADDRESS_SIZES.get(family, 0)
                if not size or length < size:
                    raise
                tlvs = _parse_tlvs(header, V2_HEADER_SIZE + size)
            authority, alpn = _known_tlvs(tlvs)
            return ProxyHeader(2, command, None, None, tlvs, authority, alpn, trailing)
        return _decode_v2(header, family, trailing)


def _signature_seen(buf: bytearray, signature: bytes) -> bool:
    """True once ``buf`` holds the whole signature; raises as soon as it cannot match."""
    seen = bytes(buf[:len(signature)])
    if not signature.startswith(seen):
        raise ProxyProtocolError(NOT_PROXY_PROTOCOL, f"bad signature {seen!r}")
    return len(seen) == len(signature)


def _parse_v1(buf: bytearray) -> ProxyHeader | None:
    """A v1 line ends at the first CRLF within 107 bytes; a lone CR or LF is an error."""
    window = bytes(buf[:MAX_V1_LINE])
    lf = window.find(b"\n")
    cr = window.find(b"\r")
    if 0 <= cr < len(window) - 1 and window[cr + 1] != 0x0A:
        raise ProxyProtocolError(MALFORMED, "v1 line has a CR without LF")
    if lf == -1:
        if len(window) >= MAX_V1_LINE:
            raise ProxyProtocolError(TOO_LONG, f"no CRLF in the first {MAX_V1_LINE} bytes")
        return None
    if cr != lf - 1:
        raise ProxyProtocolError(MALFORMED, "v1 line has an LF without CR")
    fields = window[:cr].split(b" ")
    trailing = bytes(buf[lf + 1:])
    protocol = fields[1]
    if protocol == b"UNKNOWN":
        # "the receiver must ignore anything presented before the CRLF"
        return ProxyHeader(1, ProxyCommand.PROXY, None, None, (), None, None, trailing)
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(MALFORMED, f"v1 protocol {protocol[:16]!r}")
    if len(fields) != 6:
        raise ProxyProtocolError(
            MALFORMED, f"v1 {protocol.decode()} line has {len(fields)} single-space fields, not 6")
    source = Endpoint(_v1_address(protocol, fields[2]), _v1_port(fields[4]))
    destination = Endpoint(_v1_address(protocol, fields[3]), _v1_port(fields[5]))
    return ProxyHeader(1, ProxyCommand.PROXY, source, destination, (), None, None, trailing)


def _v1_address(protocol: bytes, text: bytes) -> IPv4Address | IPv6Address:
    if protocol == b"TCP4":
        if _V1_IPV4.fullmatch(text):
            return IPv4Address(text.decode("ascii"))
    elif _V1_IPV6_CHARS.fullmatch(text):
        try:
            return IPv6Address(text.decode("ascii"))
        except ValueError:
            pass
    raise ProxyProtocolError(MALFORMED, f"v1 {protocol.decode()} address {text[:48]!r}")


def _v1_port(text: bytes) -> int:
    if _V1_PORT.fullmatch(text) and int(text) <= 0xFFFF:
        return int(text)
    raise ProxyProtocolError(MALFORMED, f"v1 port {text[:16]!r}")


def _decode_v2(header: bytes, family: int, trailing: bytes) -> ProxyHeader:
    """Addresses and TLVs of a complete PROXY-command header with a known family."""
    size = _V2_ADDRESS_SIZES[family]
    if len(header) - V2_HEADER_SIZE < size:
        raise ProxyProtocolError(MALFORMED, f"v2 address block of {len(header) - V2_HEADER_SIZE}"
                                            f" bytes, family {family:#04x} needs {size}")
    source = destination = None
    block = header[V2_HEADER_SIZE:V2_HEADER_SIZE + size]
    if family in (TCP4, TCP6):
        width = 4 if family == TCP4 else 16
        kind = IPv4Address if family == TCP4 else IPv6Address
        ports = 2 * width
        source = Endpoint(kind(block[:width]), block[ports] << 8 | block[ports + 1])
        destination = Endpoint(kind(block[width:ports]), block[ports + 2] << 8 | block[ports + 3])
    tlvs = _parse_tlvs(header, V2_HEADER_SIZE + size)
    authority, alpn = _known_tlvs(tlvs)
    return ProxyHeader(2, ProxyCommand.PROXY, source, destination, tlvs, authority, alpn,
                       trailing)


def _parse_tlvs(header: bytes, pos: int) -> tuple[Tlv, ...]:
    """Split the TLV area, which must end exactly at the header's end; verify a CRC32c."""
    tlvs: list[Tlv] = []
    end = len(header)
    while pos < end:
        if pos + TLV_HEADER > end:
            raise ProxyProtocolError(MALFORMED, f"truncated TLV header at offset {pos}")
        kind, size = header[pos], header[pos + 1] << 8 | header[pos + 2]
        start, stop = pos + TLV_HEADER, pos + TLV_HEADER + size
        if stop > end:
            raise ProxyProtocolError(MALFORMED, f"TLV {kind:#04x} of {size} bytes overruns "
                                                f"the header by {stop - end}")
        if kind == PP2_TYPE_CRC32C:
            _verify_crc32c(header, start, size)
        tlvs.append(Tlv(kind, header[start:stop]))
        pos = stop
    return tuple(tlvs)


def _known_tlvs(tlvs: tuple[Tlv, ...]) -> tuple[str | None, bytes | None]:
    """Authority and ALPN, checked; the other types' values are the sender's business."""
    seen: set[int] = set()
    authority: str | None = None
    alpn: bytes | None = None
    for tlv in tlvs:
        if tlv.type in (PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, PP2_TYPE_CRC32C, PP2_TYPE_UNIQUE_ID):
            # Two values for one fact: whichever we picked, the other hop may pick the other.
            if tlv.type in seen:
                raise ProxyProtocolError(MALFORMED, f"TLV {tlv.type:#04x} appears twice")
            seen.add(tlv.type)
        if tlv.type == PP2_TYPE_AUTHORITY:
            if not 0 < len(tlv.value) <= MAX_AUTHORITY:
                raise ProxyProtocolError(MALFORMED, f"authority of {len(tlv.value)} bytes")
            try:
                authority = tlv.value.decode("utf-8")
            except UnicodeDecodeError:
                raise ProxyProtocolError(MALFORMED, "authority is not UTF-8") from None
        elif tlv.type == PP2_TYPE_ALPN:
            if not tlv.value:
                raise ProxyProtocolError(MALFORMED, "empty ALPN TLV")
            alpn = tlv.value
        elif tlv.type == PP2_TYPE_UNIQUE_ID and len(tlv.value) > _MAX_UNIQUE_ID:
            raise ProxyProtocolError(MALFORMED, f"unique id of {len(tlv.value)} bytes")
    return authority, alpn


def _verify_crc32c(header: bytes, start: int, size: int) -> None:
    """Section 2.2.3: the checksum covers the whole header with its own field zeroed."""
    if size != 4:
        raise ProxyProtocolError(MALFORMED, f"CRC32c TLV of {size} bytes, not 4")
    sent = int.from_bytes(header[start:start + 4], "big")
    computed = crc32c(header[:start] + bytes(4) + header[start + 4:])
    if sent != computed:
        raise ProxyProtocolError(BAD_CHECKSUM, f"CRC32c {sent:#010x}, header has {computed:#010x}")


def looks_like_proxy_protocol(first_bytes: bytes) -> bool:
    """True if a connection's first bytes start with either signature (at least 5 bytes).

    For counting headers from peers that are not trusted to send one: such a connection is
    refused either way, and this only names why. Pass the first read from the socket: senders
    write the header at once, so that read holds the signature.
    """
    if first_bytes[:1] == b"\x16":
        return False  # a TLS handshake record: every connection of a plain edge listener
    for signature in (V1_SIGNATURE, V2_SIGNATURE):
        head = first_bytes[:len(signature)]
        if len(head) >= 5 and signature.startswith(head):
            return True
    return False
