"""ProxyHeaderReader and build_v2: the specification's own bytes, every framing, every refusal.

Golden inputs come from HAProxy's doc/proxy-protocol.txt: the v1 example line (section 2.1),
its four longest-line cases, and v2 headers written out byte by byte from the layout in
section 2.2. The real HAProxy as sender and receiver is in tests/integration.
"""

from __future__ import annotations

import random
import time
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from nextproxy.core.crc32c import crc32c
from nextproxy.core.proxyprotocol import (
    BAD_CHECKSUM, MALFORMED, MAX_V1_LINE, MAX_V2_PAYLOAD, NOT_PROXY_PROTOCOL, TOO_LONG, TRUNCATED,
    V2_SIGNATURE, Endpoint, ProxyCommand, ProxyHeader, ProxyHeaderReader, Tlv, build_v2,
    looks_like_proxy_protocol)
from nextproxy.core.sources import normalise_address
from nextproxy.errors import ProxyProtocolError

SIG = V2_SIGNATURE
# Section 2.1's example, with the HTTP request that follows it.
V1_EXAMPLE = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
HTTP_AFTER = b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"
# Section 2.1's longest lines a receiver must support (56, 104, 15 and 107 bytes).
FFFF6 = ":".join(["ffff"] * 8)
V1_LONGEST = {
    "tcp4": b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
    "tcp6": f"PROXY TCP6 {FFFF6} {FFFF6} 65535 65535\r\n".encode(),
    "unknown-short": b"PROXY UNKNOWN\r\n",
    "unknown-worst": f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 65535\r\n".encode(),
}
# Section 2.2, written out: signature, ver_cmd 0x21 (v2, PROXY), fam 0x11 (TCP over IPv4),
# len 12, then src 192.168.0.1, dst 192.168.0.11, src port 56324, dst port 443.
V2_TCP4 = SIG + bytes.fromhex("21 11 000c c0a80001 c0a8000b dc04 01bb")
# fam 0x21 (TCP over IPv6), len 36: 2001:db8::1 port 56324 -> 2001:db8::11 port 443.
V2_TCP6 = SIG + bytes.fromhex("21 21 0024"
                              "20010db8000000000000000000000001"
                              "20010db8000000000000000000000011"
                              "dc04 01bb")
# ver_cmd 0x20 (v2, LOCAL), fam 0x00 (UNSPEC), len 0: a health check.
V2_LOCAL = SIG + bytes.fromhex("20 00 0000")
# TCP4 plus TLVs: AUTHORITY "api.example", ALPN "h2", NOOP of 3, custom 0xE0 "x".
V2_TLVS_BODY = (bytes.fromhex("c0a80001 c0a8000b dc04 01bb")
                + b"\x02\x00\x0bapi.example" + b"\x01\x00\x02h2" + b"\x04\x00\x03\x00\x00\x00"
                + b"\xe0\x00\x01x")
V2_TLVS = SIG + b"\x21\x11" + len(V2_TLVS_BODY).to_bytes(2, "big") + V2_TLVS_BODY
# Captured from HAProxy 2.6.12 (Debian 12): a health check sent with `check-send-proxy` and
# `proxy-v2-options crc32c`: LOCAL, UNSPEC, and a CRC32c TLV computed by HAProxy.
HAPROXY_LOCAL_CRC32C = bytes.fromhex("0d0a0d0a000d0a515549540a 20 00 0007 03 0004 a9b87e8f")

# Captured from HAProxy 2.6.12 terminating TLS (SNI ns-api.localhost, ALPN h2) and forwarding
# with `send-proxy-v2 proxy-v2-options authority,ssl,crc32c`, followed by the client's "plain".
HAPROXY_TLS = bytes.fromhex(
    "0d0a0d0a000d0a515549540a 21 11 003d 7f000001 7f000001 d114 4813"
    "03 0004 2a0fcc48"  # CRC32c
    "01 0002 6832"  # ALPN: the negotiated protocol, no length prefix
    "02 0010 6e732d6170692e6c6f63616c686f7374"  # AUTHORITY
    "20 000f 01 00000000 21 0007 544c5376312e33"  # SSL: client flags, verify, VERSION TLSv1.3
    "706c61696e")
VALID = {"v1-example": V1_EXAMPLE, **{f"v1-{k}": v for k, v in V1_LONGEST.items()},
         "v2-tcp4": V2_TCP4, "v2-tcp6": V2_TCP6, "v2-local": V2_LOCAL, "v2-tlvs": V2_TLVS,
         "v2-haproxy-local": HAPROXY_LOCAL_CRC32C, "v2-haproxy-tls": HAPROXY_TLS[:-5]}


def ep(host: str, port: int) -> Endpoint:
    return Endpoint(ip_address(host), port)


def read(chunks: list[bytes], max_v2_payload: int = MAX_V2_PAYLOAD) -> ProxyHeader:
    """Feed chunks; every chunk but the last must leave the reader waiting."""
    reader = ProxyHeaderReader(max_v2_payload)
    for chunk in chunks[:-1]:
        assert reader.feed(chunk) is None
    header = reader.feed(chunks[-1])
    assert header is not None
    return header


def error_of(data: bytes, max_v2_payload: int = MAX_V2_PAYLOAD, *, bytewise: bool = False
             ) -> ProxyProtocolError:
    reader = ProxyHeaderReader(max_v2_payload)
    chunks = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
    with pytest.raises(ProxyProtocolError) as info:
        for chunk in chunks:
            assert reader.feed(chunk) is None
    return info.value


def v2(ver_cmd: int, family: int, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return SIG + bytes((ver_cmd, family)) + size.to_bytes(2, "big") + body


TCP4_ADDRESSES = bytes.fromhex("c0a80001 c0a8000b dc04 01bb")


# --- golden bytes ---------------------------------------------------------------------------

def test_v1_spec_example_keeps_the_request_behind_it() -> None:
    header = read([V1_EXAMPLE + HTTP_AFTER])
    assert header.version == 1 and header.command is ProxyCommand.PROXY
    assert header.source == ep("192.168.0.1", 56324)
    assert header.destination == ep("192.168.0.11", 443)
    assert header.tlvs == () and header.authority is None and header.alpn is None
    assert header.trailing == HTTP_AFTER
    assert not header.uses_connection_address


@pytest.mark.parametrize("name", V1_LONGEST)
def test_v1_longest_lines_from_the_spec(name: str) -> None:
    line = V1_LONGEST[name]
    assert len(line) == {"tcp4": 56, "tcp6": 104, "unknown-short": 15,
                         "unknown-worst": MAX_V1_LINE}[name]
    header = read([line + b"tail"])
    assert header.trailing == b"tail"
    if name.startswith("unknown"):
        assert header.uses_connection_address and header.destination is None
    elif name == "tcp4":
        assert header.source == ep("255.255.255.255", 65535)
    else:
        assert header.source == ep(FFFF6, 65535) and header.destination == ep(FFFF6, 65535)


def test_v1_tcp6_compressed_and_ipv4_mapped_forms() -> None:
    # inet_ntop's output, which HAProxy sends: compressed, and dotted for IPv4-mapped.
    header = read([b"PROXY TCP6 ::ffff:192.0.2.7 2001:DB8::11 0 8443\r\n"])
    assert header.source == Endpoint(IPv6Address("::ffff:192.0.2.7"), 0)
    assert header.destination == ep("2001:db8::11", 8443)


def test_v2_tcp4_golden() -> None:
    header = read([V2_TCP4 + b"\x16\x03\x01"])
    assert header.version == 2 and header.command is ProxyCommand.PROXY
    assert header.source == ep("192.168.0.1", 56324)
    assert header.destination == ep("192.168.0.11", 443)
    assert header.tlvs == () and header.trailing == b"\x16\x03\x01"


def test_v2_tcp6_golden() -> None:
    header = read([V2_TCP6])
    assert header.source == ep("2001:db8::1", 56324)
    assert header.destination == ep("2001:db8::11", 443)
    assert isinstance(header.source.ip, IPv6Address) and header.trailing == b""


def test_v2_local_means_the_connection_address() -> None:
    header = read([V2_LOCAL + b"x"])
    assert header.command is ProxyCommand.LOCAL and header.uses_connection_address
    assert header.source is None and header.destination is None and header.trailing == b"x"


def test_v2_local_with_an_address_family_is_accepted_and_its_block_discarded() -> None:
    """Section 2.2: for LOCAL the receiver "must discard the protocol block including the family"
    (HAProxy does; a balancer filling in addresses on its health checks was refused as malformed)."""
    block = bytes([127, 0, 0, 1, 127, 0, 0, 2, 0x30, 0x39, 0x01, 0xBB])  # TCP4 addresses, no TLVs
    header = read([SIG + bytes.fromhex("20 11 000c") + block + b"x"])
    assert header.command is ProxyCommand.LOCAL and header.uses_connection_address
    assert header.tlvs == () and header.trailing == b"x"


def test_v2_local_from_haproxy_with_its_checksum() -> None:
    header = read([HAPROXY_LOCAL_CRC32C])
    assert header.command is ProxyCommand.LOCAL and header.uses_connection_address
    assert header.tlvs == (Tlv(0x03, bytes.fromhex("a9b87e8f")),)
    tampered = HAPROXY_LOCAL_CRC32C[:-1] + b"\x8e"
    assert error_of(tampered).reason == BAD_CHECKSUM


def test_v2_from_haproxy_tls_front() -> None:
    header = read([HAPROXY_TLS])
    assert header.source == ep("127.0.0.1", 53524) and header.destination == ep("127.0.0.1", 18451)
    assert header.authority == "ns-api.localhost" and header.alpn == b"h2"
    assert header.tlvs[3] == Tlv(0x20, bytes.fromhex("0100000000 21 0007") + b"TLSv1.3")
    assert header.trailing == b"plain"


def test_v2_local_ignores_the_family_but_not_the_tlvs() -> None:
    # "discard the protocol block including the family which is ignored"; no address is sent
    # with LOCAL, so the block is TLVs, as HAProxy reads it.
    header = read([v2(0x20, 0xFF, b"\x02\x00\x01a")])
    assert header.command is ProxyCommand.LOCAL and header.authority == "a"
    # A family's addresses sent anyway are skipped (they were read as TLVs and refused).
    header = read([v2(0x20, 0x11, TCP4_ADDRESSES + b"\x02\x00\x01b")])
    assert header.command is ProxyCommand.LOCAL and header.uses_connection_address and header.authority == "b"
    # With a family set but only TLVs (12 bytes or more of them), the TLVs are read as TLVs.
    header = read([v2(0x20, 0x11, b"\x02\x00\x01c" + b"\x05\x00\x0a" + b"u" * 10)])
    assert header.authority == "c"


def test_v2_tlvs_decoded_and_kept() -> None:
    header = read([V2_TLVS])
    assert header.authority == "api.example" and header.alpn == b"h2"
    assert header.tlvs == (Tlv(0x02, b"api.example"), Tlv(0x01, b"h2"),
                           Tlv(0x04, b"\x00\x00\x00"), Tlv(0xE0, b"x"))


@pytest.mark.parametrize("family,size", [(0x12, 12), (0x22, 36), (0x31, 216), (0x32, 216)])
def test_v2_valid_families_not_decoded_fall_back(family: int, size: int) -> None:
    # Section 2.2: a receiver that does not implement these "falls back to the UNSPEC mode".
    header = read([v2(0x21, family, bytes(size) + b"\x02\x00\x01a")])
    assert header.uses_connection_address and header.authority == "a"


def test_v2_proxy_with_unspec_family_uses_the_connection_address() -> None:
    header = read([v2(0x21, 0x00, b"\xe0\x00\x01x")])
    assert header.command is ProxyCommand.PROXY and header.uses_connection_address
    assert header.tlvs == (Tlv(0xE0, b"x"),)


def test_crc32c_check_values() -> None:
    # RFC 3720 B.4 and the common "123456789" check value for CRC-32C.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E


def test_v2_crc32c_verified() -> None:
    body = TCP4_ADDRESSES + b"\x03\x00\x04" + bytes(4)
    zeroed = v2(0x21, 0x11, body)
    good = zeroed[:-4] + crc32c(zeroed).to_bytes(4, "big")
    assert read([good]).source == ep("192.168.0.1", 56324)
    bad = good[:-1] + bytes((good[-1] ^ 1,))
    assert error_of(bad).reason == BAD_CHECKSUM
    # Any changed byte outside the field breaks it too (here: the source port).
    tampered = good[:26] + b"\xdc\x05" + good[28:]
    assert error_of(tampered).reason == BAD_CHECKSUM


# --- framing: byte at a time, every split, trailing data --------------------------------------

@pytest.mark.parametrize("name", VALID)
def test_byte_at_a_time_equals_whole(name: str) -> None:
    data = VALID[name] + b"after"
    whole = read([data])
    assert whole.trailing == b"after"
    header_only = VALID[name]
    bytewise = read([header_only[i:i + 1] for i in range(len(header_only))])
    assert bytewise == ProxyHeader(whole.version, whole.command, whole.source,
                                   whole.destination, whole.tlvs, whole.authority, whole.alpn, b"")


@pytest.mark.parametrize("name", VALID)
def test_every_split_point(name: str) -> None:
    data = VALID[name] + HTTP_AFTER
    expected = read([data])
    for cut in range(1, len(data)):
        reader = ProxyHeaderReader()
        first = reader.feed(data[:cut])
        if first is None:
            assert reader.feed(data[cut:]) == expected
        else:  # the header ended inside the first chunk: the rest is the caller's
            assert first.trailing + data[cut:] == expected.trailing
            assert first.source == expected.source


def test_reader_is_single_use() -> None:
    reader = ProxyHeaderReader()
    assert reader.feed(V2_TCP4) is not None
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


# --- refusals ---------------------------------------------------------------------------------

BAD_V1 = {
    # no CRLF
    "bare-lf": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", MALFORMED),
    "bare-cr": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", MALFORMED),
    "cr-cr-lf": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", MALFORMED),
    "lf-then-crlf": (b"PROXY UNKNOWN\n\r\n", MALFORMED),
    # protocol and fields
    "lower-case": (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", NOT_PROXY_PROTOCOL),
    "no-space": (b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", NOT_PROXY_PROTOCOL),
    "empty": (b"PROXY \r\n", MALFORMED),
    "udp4": (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", MALFORMED),
    "unknown-suffix": (b"PROXY UNKNOWNX\r\n", MALFORMED),
    "five-fields": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", MALFORMED),
    "seven-fields": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", MALFORMED),
    "double-space": (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", MALFORMED),
    "trailing-space": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", MALFORMED),
    "tab": (b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n", MALFORMED),
    # addresses
    "v4-leading-zero": (b"PROXY TCP4 192.168.0.01 5.6.7.8 1 2\r\n", MALFORMED),
    "v4-256": (b"PROXY TCP4 256.1.1.1 5.6.7.8 1 2\r\n", MALFORMED),
    "v4-three-parts": (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", MALFORMED),
    "v6-in-tcp4": (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", MALFORMED),
    "v4-in-tcp6": (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", MALFORMED),
    "v6-scope": (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", MALFORMED),
    "v6-two-gaps": (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", MALFORMED),
    "v6-five-hex": (b"PROXY TCP6 12345::1 ::1 1 2\r\n", MALFORMED),
    "non-ascii": ("PROXY TCP4 １.2.3.4 5.6.7.8 1 2\r\n".encode(), MALFORMED),
    # ports
    "port-65536": (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", MALFORMED),
    "port-leading-zero": (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", MALFORMED),
    "port-negative": (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", MALFORMED),
    "port-hex": (b"PROXY TCP4 1.2.3.4 5.6.7.8 0x50 2\r\n", MALFORMED),
    "port-plus": (b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n", MALFORMED),
    "port-fullwidth": ("PROXY TCP4 1.2.3.4 5.6.7.8 ８０ 2\r\n".encode(), MALFORMED),
    # length
    "no-crlf-in-107": (b"PROXY UNKNOWN " + b"a" * 100, TOO_LONG),
    "crlf-at-108": (b"PROXY UNKNOWN " + b"a" * 92 + b"\r\n", TOO_LONG),
}


@pytest.mark.parametrize("name", BAD_V1)
def test_v1_refusals(name: str) -> None:
    data, reason = BAD_V1[name]
    assert error_of(data).reason == reason
    assert error_of(data, bytewise=True).reason == reason


BAD_V2 = {
    "one-byte-off": (SIG[:11] + b"\x0b" + V2_TCP4[12:], NOT_PROXY_PROTOCOL),
    "version-1": (v2(0x11, 0x11, TCP4_ADDRESSES), MALFORMED),
    "version-3": (v2(0x31, 0x11, TCP4_ADDRESSES), MALFORMED),
    "command-2": (v2(0x22, 0x11, TCP4_ADDRESSES), MALFORMED),
    "command-f": (v2(0x2F, 0x11, TCP4_ADDRESSES), MALFORMED),
    "family-4": (v2(0x21, 0x41, TCP4_ADDRESSES), MALFORMED),
    "protocol-3": (v2(0x21, 0x13, TCP4_ADDRESSES), MALFORMED),
    "family-10": (v2(0x21, 0x10, TCP4_ADDRESSES), MALFORMED),
    "family-ff": (v2(0x21, 0xFF, TCP4_ADDRESSES), MALFORMED),
    "tcp4-short": (v2(0x21, 0x11, TCP4_ADDRESSES[:8]), MALFORMED),
    "tcp6-short": (v2(0x21, 0x21, bytes(35)), MALFORMED),
    "tcp6-with-tcp4-block": (v2(0x21, 0x21, TCP4_ADDRESSES), MALFORMED),
    "unix-short": (v2(0x21, 0x31, bytes(215)), MALFORMED),
    "over-cap": (v2(0x21, 0x11, b"", length=MAX_V2_PAYLOAD + 1), TOO_LONG),
    "max-length": (v2(0x21, 0x11, b"", length=0xFFFF), TOO_LONG),
    "tlv-header-cut": (v2(0x21, 0x11, TCP4_ADDRESSES + b"\x02\x00"), MALFORMED),
    "tlv-overrun": (v2(0x21, 0x11, TCP4_ADDRESSES + b"\x02\x00\x05abc"), MALFORMED),
    "authority-twice": (v2(0x21, 0x11, TCP4_ADDRESSES + b"\x02\x00\x01a\x02\x00\x01b"),
                        MALFORMED),
    "alpn-twice": (v2(0x21, 0x11, TCP4_ADDRESSES + b"\x01\x00\x01a\x01\x00\x01a"), MALFORMED),
    "authority-not-utf8": (v2(0x21, 0x11, TCP4_ADDRESSES + b"\x02\x00\x02\xc3\x28"), MALFORMED),
    "authority-empty": (v2(0x21, 0x11, TCP4_ADDRESSES + b"\x02\x00\x00"), MALFORMED),
    "authority-256": (v2(0x21, 0x11, TCP4_ADDRESSES + b"\x02\x01\x00" + b"a" * 256), MALFORMED),
    "alpn-empty": (v2(0x21, 0x11, TCP4_ADDRESSES + b"\x01\x00\x00"), MALFORMED),
    "unique-id-129": (v2(0x21, 0x11, TCP4_ADDRESSES + b"\x05\x00\x81" + b"u" * 129), MALFORMED),
    "crc-3-bytes": (v2(0x21, 0x11, TCP4_ADDRESSES + b"\x03\x00\x03abc"), MALFORMED),
    "crc-wrong": (v2(0x21, 0x11, TCP4_ADDRESSES + b"\x03\x00\x04abcd"), BAD_CHECKSUM),
}


@pytest.mark.parametrize("name", BAD_V2)
def test_v2_refusals(name: str) -> None:
    data, reason = BAD_V2[name]
    assert error_of(data).reason == reason
    assert error_of(data, bytewise=True).reason == reason


@pytest.mark.parametrize("data,at", [
    (b"GET / HTTP/1.1\r\n", 1),             # plain HTTP: refused at the first byte
    (b"\x16\x03\x01\x02\x00", 1),           # a TLS ClientHello without a header
    (b"PROXYTCP4", 6),                     # the space is part of the signature
    (SIG[:5] + b"X", 6),
    (v2(0x11, 0x11, b""), 13),              # version nibble judged at once
    (v2(0x21, 0x41, b""), 14),              # family judged before the length
    (v2(0x21, 0x11, b"", length=0xFFFF), 16),  # over the cap: refused before the body
])
def test_refused_as_early_as_possible(data: bytes, at: int) -> None:
    reader = ProxyHeaderReader()
    for i in range(at - 1):
        assert reader.feed(data[i:i + 1]) is None
    with pytest.raises(ProxyProtocolError):
        reader.feed(data[at - 1:at])


def test_configurable_cap() -> None:
    assert error_of(V2_TCP6, max_v2_payload=35).reason == TOO_LONG
    assert read([V2_TCP6], max_v2_payload=36).source == ep("2001:db8::1", 56324)
    with pytest.raises(ValueError):
        ProxyHeaderReader(max_v2_payload=0x10000)


@pytest.mark.parametrize("name", VALID)
def test_closed_inside_the_header_is_truncated(name: str) -> None:
    data = VALID[name]
    reader = ProxyHeaderReader()
    assert reader.feed(data[:-1]) is None
    with pytest.raises(ProxyProtocolError) as info:
        reader.feed(b"")
    assert info.value.reason == TRUNCATED
    assert error_of(b"").reason == TRUNCATED


def test_error_is_sticky() -> None:
    reader = ProxyHeaderReader()
    with pytest.raises(ProxyProtocolError) as first:
        reader.feed(b"HELLO")
    with pytest.raises(ProxyProtocolError) as again:
        reader.feed(V2_TCP4)
    assert (again.value.reason, again.value.detail) == (first.value.reason, first.value.detail)
    assert str(again.value).startswith(NOT_PROXY_PROTOCOL)


def test_looks_like_proxy_protocol() -> None:
    assert looks_like_proxy_protocol(V1_EXAMPLE) and looks_like_proxy_protocol(V2_LOCAL)
    assert looks_like_proxy_protocol(b"PROXY") and looks_like_proxy_protocol(SIG[:5])
    assert not looks_like_proxy_protocol(b"PRO")  # too short to tell from PROPFIND...
    assert not looks_like_proxy_protocol(b"POST / HTTP/1.1\r\n")
    assert not looks_like_proxy_protocol(b"\x16\x03\x01\x02\x00\x01")


# --- writer -> reader -------------------------------------------------------------------------

@pytest.mark.parametrize("source,destination,family", [
    (ep("203.0.113.7", 40000), ep("198.51.100.1", 443), 0x11),
    (ep("2001:db8::7", 40000), ep("2001:db8::1", 443), 0x21),
    (ep("::ffff:203.0.113.7", 1), ep("::ffff:198.51.100.1", 2), 0x11),  # dual-stack socket
    (ep("203.0.113.7", 0), ep("2001:db8::1", 65535), 0x21),             # mixed: mapped into v6
])
@pytest.mark.parametrize("checksum", [False, True])
def test_round_trip(source: Endpoint, destination: Endpoint, family: int, checksum: bool) -> None:
    data = build_v2(source, destination, "api.example", b"h2", checksum=checksum)
    assert data[:12] == SIG and data[12] == 0x21 and data[13] == family
    header = read([data[i:i + 1] for i in range(len(data))])
    assert header.authority == "api.example" and header.alpn == b"h2"
    assert [t.type for t in header.tlvs] == [0x02, 0x01] + ([0x03] if checksum else [])
    assert header.source is not None and header.destination is not None
    assert (header.source.port, header.destination.port) == (source.port, destination.port)
    if family == 0x11:
        assert isinstance(header.source.ip, IPv4Address)
        assert header.source.ip == normalise_address(source.ip)
        assert header.destination.ip == normalise_address(destination.ip)
    elif isinstance(source.ip, IPv4Address):
        assert header.source.ip == IPv6Address(f"::ffff:{source.ip}")
        assert header.destination.ip == destination.ip
    else:
        assert (header.source.ip, header.destination.ip) == (source.ip, destination.ip)


def test_writer_without_tlvs_is_the_golden_layout() -> None:
    assert build_v2(ep("192.168.0.1", 56324), ep("192.168.0.11", 443)) == V2_TCP4
    assert build_v2(ep("2001:db8::1", 56324), ep("2001:db8::11", 443)) == V2_TCP6


def test_writer_refuses_values_no_receiver_accepts() -> None:
    with pytest.raises(ValueError):
        build_v2(ep("1.2.3.4", 65536), ep("1.2.3.4", 1))
    with pytest.raises(ValueError):
        build_v2(ep("1.2.3.4", 1), ep("1.2.3.4", 1), authority="")
    with pytest.raises(ValueError):
        build_v2(ep("1.2.3.4", 1), ep("1.2.3.4", 1), alpn=b"x" * 256)


def test_writer_checksum_detects_tampering() -> None:
    data = bytearray(build_v2(ep("203.0.113.7", 40000), ep("198.51.100.1", 443), "a.example",
                              checksum=True))
    data[17] ^= 0x01  # the source address
    assert error_of(bytes(data)).reason == BAD_CHECKSUM


# --- bounded fuzz ---------------------------------------------------------------------------

def _mutant(rng: random.Random, seeds: list[bytes]) -> bytes:
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1 and data:
            del data[rng.randrange(len(data)):]
        elif op == 2:
            data[rng.randrange(len(data) + 1):0] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and len(data) > 15:
            data[14:16] = rng.randrange(0x10000).to_bytes(2, "big")
    return bytes(data)


def test_bounded_fuzz_raises_only_our_error() -> None:
    """Mutated headers in random framings: None, a header or ProxyProtocolError, nothing else."""
    rng = random.Random(13)
    seeds = list(VALID.values()) + [build_v2(ep("2001:db8::7", 1), ep("::1", 2), "é.example",
                                             b"h2", checksum=True)]
    outcomes = {"header": 0, "need-more": 0, "error": 0}
    deadline = time.monotonic() + 20
    for _ in range(20_000):
        assert time.monotonic() < deadline, "fuzz budget exceeded"
        data = _mutant(rng, seeds)
        reader = ProxyHeaderReader(rng.choice([MAX_V2_PAYLOAD, 64]))
        pos, result = 0, None
        try:
            while pos < len(data) and result is None:
                step = rng.randint(1, 32)
                result = reader.feed(data[pos:pos + step])
                pos += step
            outcomes["header" if result is not None else "need-more"] += 1
            if result is not None and result.source is not None:
                assert result.destination is not None
                assert 0 <= result.source.port <= 0xFFFF
        except ProxyProtocolError as exc:
            assert exc.reason in (NOT_PROXY_PROTOCOL, MALFORMED, TOO_LONG, BAD_CHECKSUM)
            outcomes["error"] += 1
    assert min(outcomes.values()) > 500, outcomes  # the fuzz reached every outcome


def test_an_ipv4_mapped_client_is_written_in_dotted_form() -> None:
    """RFC 5952 section 5 and what a dual-stack socket reports; Python 3.11's str() gives
    '::ffff:a01:203', which an upstream's IPv4 allow-list or log search misses."""
    header = read([b"PROXY TCP6 ::ffff:10.1.2.3 2001:db8::11 56324 443\r\n"])
    assert header.source is not None and header.source.host == "::ffff:10.1.2.3"
    assert read([V2_TCP6]).source.host == "2001:db8::1"  # type: ignore[union-attr]
