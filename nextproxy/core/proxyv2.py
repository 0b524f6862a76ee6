"""PROXY protocol v2's wire constants and its writer (a header for a passthrough upstream).

Split from ``core/proxyprotocol.py``, whose reader shares these constants; both names stay
importable from there. Spec: HAProxy's doc/proxy-protocol.txt, section 2.2.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from nextproxy.core.crc32c import crc32c

V2_HEADER_SIZE = 16
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_VERSION = 0x2
TCP4, TCP6 = 0x11, 0x21
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
TLV_HEADER = 3
MAX_AUTHORITY = 255  # a DNS name; HAProxy refuses longer authorities too


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One side of the original connection."""

    ip: IPv4Address | IPv6Address
    port: int

    @property
    def host(self) -> str:
        """The address as text for X-Forwarded-For and logs: an IPv4-mapped one in the dotted
        form RFC 5952 section 5 asks for (``::ffff:10.1.2.3``), as a dual-stack socket reports
        it; Python 3.11 writes ``::ffff:a01:203``, which upstreams' IPv4 checks miss."""
        ip = self.ip
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            return f"::ffff:{ip.ipv4_mapped}"
        return str(ip)


def build_v2(source: Endpoint, destination: Endpoint, authority: str | None = None,
             alpn: bytes | None = None, *, checksum: bool = False) -> bytes:
    """A v2 PROXY-command header for a TCP connection, with optional TLVs.

    Both ends are sent in one family: IPv4 when both are IPv4 (or IPv4-mapped IPv6, as a
    dual-stack socket reports IPv4 peers), else IPv6 with any IPv4 end mapped. ``authority``
    is the client's server name, ``alpn`` one protocol name; ``checksum`` adds a CRC32c TLV.
    Raises ValueError for values no receiver could accept (a caller bug, not peer input).
    """
    src, dst = _unmapped(source.ip), _unmapped(destination.ip)
    if isinstance(src, IPv4Address) and isinstance(dst, IPv4Address):
        family, addresses = TCP4, src.packed + dst.packed
    else:
        family, addresses = TCP6, _as_ipv6(src).packed + _as_ipv6(dst).packed
    for port in (source.port, destination.port):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} out of range")
    body = addresses + source.port.to_bytes(2, "big") + destination.port.to_bytes(2, "big")
    if authority is not None:
        value = authority.encode("utf-8")
        if not 0 < len(value) <= MAX_AUTHORITY:
            raise ValueError(f"authority of {len(value)} bytes")
        body += _tlv(PP2_TYPE_AUTHORITY, value)
    if alpn is not None:
        if not 0 < len(alpn) <= 255:  # RFC 7301: a protocol name is 1..255 bytes
            raise ValueError(f"ALPN protocol of {len(alpn)} bytes")
        body += _tlv(PP2_TYPE_ALPN, alpn)
    crc_at = V2_HEADER_SIZE + len(body) + TLV_HEADER
    if checksum:
        body += _tlv(PP2_TYPE_CRC32C, bytes(4))
    header = V2_SIGNATURE + bytes((V2_VERSION << 4 | 1, family)) + len(body).to_bytes(2, "big")
    header += body
    if checksum:
        header = header[:crc_at] + crc32c(header).to_bytes(4, "big") + header[crc_at + 4:]
    return header


def _tlv(kind: int, value: bytes) -> bytes:
    return bytes((kind,)) + len(value).to_bytes(2, "big") + value


def _unmapped(ip: IPv4Address | IPv6Address) -> IPv4Address | IPv6Address:
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _as_ipv6(ip: IPv4Address | IPv6Address) -> IPv6Address:
    if isinstance(ip, IPv6Address):
        return ip
    return IPv6Address(0xFFFF << 32 | int(ip))
