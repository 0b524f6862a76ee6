"""Real ClientHellos for tests, and tools to re-frame and edit them.

The hellos come from real TLS clients driven over memory BIOs (no sockets): the standard
library ``ssl`` module (the base image's OpenSSL) and pyOpenSSL (the OpenSSL that
``cryptography`` bundles, whose X25519MLKEM768 key share makes a ~1.5-1.8 KB hello).
The editing helpers parse just enough of the hello to swap extensions; they are test tools,
deliberately independent of ``nextproxy.core.clienthello``.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Sequence

from OpenSSL import SSL

HANDSHAKE = 22
MAX_RECORD = 16384


def stdlib_hello(server_name: str | None = "example.com",
                 alpn: Sequence[str] = ("h2", "http/1.1"),
                 tls12_only: bool = False) -> bytes:
    """The first flight of a stdlib ``ssl`` client (one or more TLS records)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(list(alpn))
    if tls12_only:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_side=False, server_hostname=server_name)
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    assert hello, "the stdlib client produced no ClientHello"
    return hello


def openssl_hello(server_name: bytes | str | None = "example.com",
                  alpn: Sequence[bytes] = (b"h2", b"http/1.1"),
                  tls12_only: bool = False) -> bytes:
    """The first flight of a pyOpenSSL client.

    Unlike the stdlib, ``server_name`` is sent as given (bytes or str): IP literals,
    upper case, a trailing dot and non-ASCII bytes all reach the wire unchanged.
    """
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if alpn:
        context.set_alpn_protos(list(alpn))
    if tls12_only:
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
    client = SSL.Connection(context, None)
    client.set_connect_state()
    if server_name is not None:
        name = server_name.encode("utf-8") if isinstance(server_name, str) else server_name
        client.set_tlsext_host_name(name)
    try:
        client.do_handshake()
    except SSL.WantReadError:
        pass
    hello = client.bio_read(1 << 20)
    assert hello, "pyOpenSSL produced no ClientHello"
    return hello


def records(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split well-formed TLS records into (content type, version, payload)."""
    out: list[tuple[int, int, bytes]] = []
    pos = 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 3:pos + 5], "big")
        out.append((data[pos], int.from_bytes(data[pos + 1:pos + 3], "big"),
                    data[pos + 5:pos + 5 + length]))
        pos += 5 + length
    assert pos == len(data), "trailing partial record"
    return out


def record(payload: bytes, content_type: int = HANDSHAKE, version: int = 0x0301) -> bytes:
    """One TLS record (no length check, so tests can build invalid ones too)."""
    return bytes([content_type]) + version.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload


def handshake_payload(hello: bytes) -> bytes:
    """The handshake bytes carried by the records of ``hello`` (all must be handshake)."""
    parts = records(hello)
    assert all(kind == HANDSHAKE for kind, _, _ in parts)
    return b"".join(payload for _, _, payload in parts)


def refragment(hello: bytes, record_size: int) -> bytes:
    """Re-pack the handshake bytes of ``hello`` into records of ``record_size`` bytes."""
    assert 1 <= record_size <= MAX_RECORD
    version = records(hello)[0][1]
    payload = handshake_payload(hello)
    return b"".join(record(payload[i:i + record_size], version=version)
                    for i in range(0, len(payload), record_size))


def split_hello(hello: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """(body up to and including compression methods, [(extension type, data), ...])."""
    message = handshake_payload(hello)
    assert message[0] == 1
    body = message[4:4 + int.from_bytes(message[1:4], "big")]
    pos = 2 + 32
    pos += 1 + body[pos]                                   # legacy_session_id
    pos += 2 + int.from_bytes(body[pos:pos + 2], "big")    # cipher_suites
    pos += 1 + body[pos]                                   # legacy_compression_methods
    prefix = body[:pos]
    block_end = pos + 2 + int.from_bytes(body[pos:pos + 2], "big")
    pos += 2
    extensions: list[tuple[int, bytes]] = []
    while pos < block_end:
        ext_type = int.from_bytes(body[pos:pos + 2], "big")
        length = int.from_bytes(body[pos + 2:pos + 4], "big")
        extensions.append((ext_type, body[pos + 4:pos + 4 + length]))
        pos += 4 + length
    assert pos == block_end == len(body)
    return prefix, extensions


def build_hello(prefix: bytes, extensions: Iterable[tuple[int, bytes]]) -> bytes:
    """The inverse of ``split_hello``: one handshake record with these extensions."""
    block = b"".join(t.to_bytes(2, "big") + len(d).to_bytes(2, "big") + d for t, d in extensions)
    body = prefix + len(block).to_bytes(2, "big") + block
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"".join(record(message[i:i + MAX_RECORD]) for i in range(0, len(message), MAX_RECORD))


def sni_extension(*names: tuple[int, bytes]) -> bytes:
    """A server_name extension body listing (name_type, name) entries."""
    entries = b"".join(bytes([kind]) + len(n).to_bytes(2, "big") + n for kind, n in names)
    return len(entries).to_bytes(2, "big") + entries
