"""OpenSSL as the oracle for what the proxy answers to a ClientHello, and hellos to ask it about.

``plain_answer`` is a plain pyOpenSSL server over memory BIOs: it gets every byte a client sent,
then the client's half-close, and returns what OpenSSL wrote, exactly as a plain server on a
socket would have written it. ``openssl3_answer`` is the same with the standard library's
OpenSSL 3.0, which still answers SSLv2-format hellos (OpenSSL 4 closes on them silently).
``proxy_answer`` sends the same bytes to a real proxy over loopback, half-closes and reads to
EOF. ``shape`` reduces an answer to what must be equal: alert records byte for byte, "close"
for nothing, and for a server flight only its record types (a flight carries fresh randoms
and an ECDSA signature whose length varies).

The hello builders make malformed and boundary hellos from real ones (``tests.hellos``) and
with tlslite-ng, an implementation independent of both OpenSSL and our reader.
"""

from __future__ import annotations

import random
import socket
import ssl
from collections.abc import Iterator

from OpenSSL import SSL
from tlslite.messages import ClientHello as TlsliteHello  # type: ignore[import-untyped]

from tests.hellos import HANDSHAKE, MAX_RECORD, build_hello, handshake_payload, record, records, split_hello

Shape = tuple[object, ...]
CLOSE: Shape = ("close",)
OPENSSL_MAX_BODY = 131_396


# --------------------------------------------------------------------------- answers


def shape(out: bytes, reset: bool = False) -> Shape:
    """What must match between two servers' answers (see the module docstring)."""
    if reset:
        return ("reset", out.hex())
    if not out:
        return CLOSE
    if out[0] == HANDSHAKE:
        kinds: list[int] = []
        pos = 0
        while pos + 5 <= len(out):
            kinds.append(out[pos])
            pos += 5 + int.from_bytes(out[pos + 3:pos + 5], "big")
        return ("flight", tuple(kinds))
    return ("bytes", out.hex())


def plain_answer(context: SSL.Context, data: bytes) -> Shape:
    """A plain OpenSSL server's answer to ``data`` followed by the client's half-close."""
    conn = SSL.Connection(context, None)
    conn.set_accept_state()
    if data:
        conn.bio_write(data)
    conn.bio_shutdown()
    try:
        conn.do_handshake()
    except Exception:  # every refusal; what matters is what it wrote
        pass
    out = bytearray()
    for _ in range(100):
        try:
            out += conn.bio_read(65536)
        except SSL.Error:
            break
    return shape(bytes(out))


def openssl3_answer(context: ssl.SSLContext, data: bytes) -> Shape:
    """The same with the standard library's OpenSSL (3.0 here)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = context.wrap_bio(incoming, outgoing, server_side=True)
    incoming.write(data)
    incoming.write_eof()
    try:
        conn.do_handshake()
    except ssl.SSLError:
        pass
    return shape(outgoing.read())


def proxy_answer(port: int, data: bytes, timeout: float = 5.0) -> Shape:
    """Send ``data`` to the proxy, half-close, and read its answer to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        out = bytearray()
        try:
            for _ in range(1000):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                out += chunk
            else:
                raise AssertionError("the proxy kept talking")
        except ConnectionResetError:
            return shape(bytes(out), reset=True)
    return shape(bytes(out))


# --------------------------------------------------------------------------- hellos


def with_body(body: bytes, record_size: int = MAX_RECORD) -> bytes:
    """A ClientHello message with this body, in records of ``record_size``."""
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"".join(record(message[i:i + record_size]) for i in range(0, len(message), record_size))


def body_of(hello: bytes) -> bytes:
    return handshake_payload(hello)[4:]


def legacy_version(hello: bytes, version: int) -> bytes:
    body = body_of(hello)
    return with_body(version.to_bytes(2, "big") + body[2:])


def tlslite_hello(version: int, server_name: str = "localhost", tls13_suites: bool = True) -> bytes:
    """A TLS 1.2-style hello (no supported_versions) built by tlslite-ng, in one record."""
    suites = [0x1301, 0x1302, 0xC02B, 0x002F] if tls13_suites else [0xC02B, 0x002F]
    hello = TlsliteHello().create((version >> 8, version & 0xFF), bytes(range(32)), b"", suites,
                                  serverName=server_name)
    return record(bytes(hello.write()))


def sslv2_hello(version: int) -> bytes:
    """An SSLv2-format (2-byte header) ClientHello built by tlslite-ng."""
    hello = TlsliteHello(ssl2=True).create((version >> 8, version & 0xFF), bytes(16), b"",
                                           [0x010080, 0x00002F, 0x000035])
    message = bytes(hello.write())
    return bytes([0x80 | len(message) >> 8, len(message) & 0xFF]) + message


def big_hello(hello: bytes, body_size: int, compression: int = 1) -> bytes:
    """``hello`` grown to ``body_size`` bytes of body: cipher suites first, then a padding
    extension (each vector holds at most 65,535 bytes, so only both reach OpenSSL's limit)."""
    prefix, extensions = split_hello(hello)
    sid = 34 + 1 + prefix[34]
    suites_len = int.from_bytes(prefix[sid:sid + 2], "big")
    suites = prefix[sid + 2:sid + 2 + suites_len]
    comp = b"\x00" + bytes(range(1, compression))
    block = sum(4 + len(d) for _, d in extensions)
    fixed = sid + 2 + 1 + len(comp) + 2
    room = body_size - fixed - block - len(suites) - 4  # for new suites and the padding
    grow = max(min(65534 - len(suites), room) // 2 * 2, 0)  # suites first, the rest as padding
    suites += b"\x0a\x0a" * (grow // 2)
    pad = room - grow
    assert 0 <= pad and block + 4 + pad <= 65535, (room, grow, pad)
    extensions = [*extensions, (0xFAFA, b"p" * pad)]
    ext_block = b"".join(t.to_bytes(2, "big") + len(d).to_bytes(2, "big") + d for t, d in extensions)
    body = (prefix[:sid] + len(suites).to_bytes(2, "big") + suites + bytes([len(comp)]) + comp
            + len(ext_block).to_bytes(2, "big") + ext_block)
    assert len(body) == body_size, (len(body), body_size)
    return with_body(body)


def edited(hello: bytes, edit: dict[int, bytes | None], extra: list[tuple[int, bytes]] | None = None) -> bytes:
    """``hello`` with extensions replaced (bytes) or removed (None), then ``extra`` appended."""
    prefix, extensions = split_hello(hello)
    out = [(t, edit.get(t, d)) for t, d in extensions]
    return build_hello(prefix, [(t, d) for t, d in out if d is not None] + (extra or []))


def interleaved(hello: bytes, between: bytes, cut: int = 10) -> bytes:
    """The hello in two handshake records with ``between`` (whole records) in the middle."""
    payload = handshake_payload(hello)
    return record(payload[:cut]) + between + record(payload[cut:])


def field_boundaries(hello: bytes) -> Iterator[int]:
    """Every offset in ``hello`` (one record) where a field or vector starts or ends."""
    (kind, _, _), = records(hello)
    assert kind == HANDSHAKE
    yield from range(1, 6)  # inside the record header
    base = 5 + 4
    yield from range(6, base + 1)  # the handshake header
    body = body_of(hello)
    cuts = {2, 34}
    pos = 34
    for width in (1, 2, 1):  # session id, cipher suites, compression methods
        cuts.add(pos + width)
        pos += width + int.from_bytes(body[pos:pos + width], "big")
        cuts.add(pos)
    cuts.add(pos + 2)  # extensions length
    pos += 2
    while pos < len(body):
        cuts.update((pos + 2, pos + 4))
        pos += 4 + int.from_bytes(body[pos + 2:pos + 4], "big")
        cuts.add(pos)
    yield from (base + cut for cut in sorted(cuts) if base + cut < len(hello))


def mutated(rng: random.Random, bases: list[bytes]) -> bytes:
    """A real hello with a few random edits: flips, cuts, insertions, re-framed records."""
    data = bytearray(rng.choice(bases))
    for _ in range(rng.randint(1, 3)):
        if not data:
            break
        pos = rng.randrange(len(data))
        op = rng.randrange(5)
        if op == 0:
            data[pos] = rng.randrange(256)
        elif op == 1:
            del data[pos:pos + rng.randint(1, 8)]
        elif op == 2:
            data[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:
            data = data[:pos]
        else:  # a length field pointed elsewhere: the most common decoder bug to probe
            data[pos:pos + 2] = rng.randrange(65536).to_bytes(2, "big")
    return bytes(data)
