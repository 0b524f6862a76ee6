"""The proxy answers malformed and boundary ClientHellos exactly as a plain OpenSSL server does.

Each hello goes to a plain pyOpenSSL server built from the proxy's own configuration (the same
``ServerContexts`` code, the default certificate's context) and to the real proxy over
loopback; the client half-closes after sending, and both answers must have the same shape
(``tests.hello_oracle.shape``: alert bytes equal, or both a server flight, or both a close).
The few places where the proxy answers by itself are tested against what they stand for:
SSLv2 hellos against OpenSSL 3.0, the cap against its alert. Every case is time-bounded.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable

import pytest
from OpenSSL import SSL

from nextproxy.process import metrics
from nextproxy.core.clienthello import MAX_CLIENT_HELLO, ClientHelloReader
from nextproxy.demo.pki import server_ssl_context
from nextproxy.errors import ClientHelloError
from nextproxy.edge.tlscontexts import ServerContexts
from tests.hello_oracle import (CLOSE, OPENSSL_MAX_BODY, Shape, big_hello, body_of, edited, field_boundaries,
                                interleaved, legacy_version, mutated, openssl3_answer, plain_answer, proxy_answer,
                                sslv2_hello, tlslite_hello, with_body)
from tests.hellos import handshake_payload, openssl_hello, record, refragment, sni_extension, split_hello, stdlib_hello
from tests.integration.harness import SERVER_NAME, Edge

OPENSSL = openssl_hello(SERVER_NAME)  # OpenSSL 4 client: X25519MLKEM768 key share, ~1.5 KB
STDLIB = stdlib_hello(SERVER_NAME)  # OpenSSL 3.0 client
PAYLOAD = handshake_payload(STDLIB)
# A few hundred in CI; NEXTPROXY_HELLO_FUZZ=20000 (and a seed) for a longer local hunt.
FUZZ_CASES = int(os.environ.get("NEXTPROXY_HELLO_FUZZ", "300"))
FUZZ_SEED = int(os.environ.get("NEXTPROXY_HELLO_FUZZ_SEED", "12"))
FUZZ_SECONDS = 60.0 if FUZZ_CASES <= 300 else 1800.0


@pytest.fixture(scope="module")
def plain(edge: Edge) -> SSL.Context:
    """The context a plain server gets from the proxy's own configuration and code."""
    return ServerContexts.build(edge.config).select(None, SERVER_NAME).context


def same_answer(edge: Edge, plain: SSL.Context, data: bytes) -> Shape:
    expected = plain_answer(plain, data)
    assert proxy_answer(edge.port, data) == expected, data[:64].hex()
    return expected


def alert(description: int, version: int = 0x0303) -> Shape:
    return ("bytes", (b"\x15" + version.to_bytes(2, "big") + b"\x00\x02\x02" + bytes([description])).hex())


def is_alert(answer: Shape, description: int) -> bool:
    """One fatal alert record with this description, whatever its record version."""
    text = str(answer[1]) if answer[0] == "bytes" else ""
    return len(text) == 14 and text.startswith("15") and text.endswith(f"0202{description:02x}")


FLIGHT = "flight"
DECODE_ERROR, PROTOCOL_VERSION, ILLEGAL_PARAMETER = 50, 70, 47


# --------------------------------------------------------------------------- the table

VERSIONS = [0x0000, 0x0001, 0x0002, 0x0100, 0x0102, 0x0103, 0x0200, 0x0300, 0x0301, 0x0302, 0x0303, 0x0304,
            0x0305, 0x0400, 0x7F1C, 0xFEFD, 0xFFFF]


@pytest.mark.parametrize("version", VERSIONS, ids=hex)
def test_every_legacy_version(edge: Edge, plain: SSL.Context, version: int) -> None:
    # With supported_versions (a TLS 1.3 client) and without it (tlslite-ng, TLS 1.2 style).
    same_answer(edge, plain, legacy_version(STDLIB, version))
    same_answer(edge, plain, legacy_version(OPENSSL, version))
    assert same_answer(edge, plain, tlslite_hello(version))[0] == "bytes"  # never a TLS 1.3 flight


def test_legacy_versions_the_issue_names(edge: Edge, plain: SSL.Context) -> None:
    for version in (0x0000, 0x0001, 0x0002, 0x0100, 0x0102, 0x0103, 0x0200):
        # OpenSSL puts the client's legacy_version in the alert record; the proxy's is OpenSSL's.
        assert is_alert(same_answer(edge, plain, tlslite_hello(version)), PROTOCOL_VERSION)


RECORD_CASES: dict[str, Callable[[], bytes]] = {
    "first record of 2^14+1": lambda: record(b"\x01" + (16381).to_bytes(3, "big") + body_of(STDLIB).ljust(16381, b"\0")),
    "later record of 2^14+1": lambda: record(PAYLOAD[:10]) + record(PAYLOAD[10:].ljust(16385, b"\0")),
    "header of 2^14+1 only": lambda: b"\x16\x03\x01\x40\x01",
    "empty record first": lambda: record(b"") + STDLIB,
    "empty record between": lambda: interleaved(STDLIB, record(b"")),
    "40 empty records between": lambda: interleaved(STDLIB, record(b"") * 40),
    "application data between": lambda: interleaved(STDLIB, record(b"x", content_type=23)),
    "empty application data between": lambda: interleaved(STDLIB, record(b"", content_type=23)),
    "change_cipher_spec between": lambda: interleaved(STDLIB, record(b"\x01", content_type=20)),
    "warning alert between": lambda: interleaved(STDLIB, record(b"\x01\x70", content_type=21)),
    "fatal alert between": lambda: interleaved(STDLIB, record(b"\x02\x28", content_type=21)),
    "heartbeat between": lambda: interleaved(STDLIB, record(b"\x01\x00\x01x", content_type=24)),
    "unknown type between": lambda: interleaved(STDLIB, record(b"x", content_type=99)),
    "1-byte records": lambda: refragment(STDLIB, 1),
    "1-byte records, OpenSSL 4 hello": lambda: refragment(OPENSSL, 1),
    "7-byte records": lambda: refragment(OPENSSL, 7),
    "later record version 2.3": lambda: record(PAYLOAD[:10]) + record(PAYLOAD[10:], version=0x0203),
    "first record version 3.0": lambda: record(PAYLOAD, version=0x0300),
    "first record version 3.255": lambda: record(PAYLOAD, version=0x03FF),
    "first record version 0.1": lambda: record(PAYLOAD, version=0x0001),
    "two hellos": lambda: STDLIB + STDLIB,
    "ServerHello type": lambda: record(b"\x02" + PAYLOAD[1:]),
    "hello then garbage": lambda: STDLIB + b"\xff" * 10,
    "handshake header split over records": lambda: record(PAYLOAD[:2]) + record(PAYLOAD[2:]),
}


@pytest.mark.parametrize("case", RECORD_CASES)
def test_record_framing(edge: Edge, plain: SSL.Context, case: str) -> None:
    same_answer(edge, plain, RECORD_CASES[case]())


def test_the_issues_record_cases(edge: Edge, plain: SSL.Context) -> None:
    assert same_answer(edge, plain, RECORD_CASES["later record of 2^14+1"]()) == alert(22)  # record_overflow
    assert same_answer(edge, plain, RECORD_CASES["application data between"]()) == alert(10, 0x0301)
    # OpenSSL 4 skips empty handshake records (the issue expected unexpected_message): so do we.
    assert same_answer(edge, plain, RECORD_CASES["empty record between"]())[0] == FLIGHT
    assert same_answer(edge, plain, RECORD_CASES["1-byte records"]())[0] == FLIGHT


@pytest.mark.parametrize("size", [64 * 1024, 80_000, 100_000, 128 * 1024, OPENSSL_MAX_BODY - 256])
def test_hellos_of_64_to_128_kib_are_answered_on_their_merits(edge: Edge, plain: SSL.Context, size: int) -> None:
    assert same_answer(edge, plain, big_hello(OPENSSL, size))[0] == FLIGHT


def test_the_largest_hellos(edge: Edge, plain: SSL.Context) -> None:
    # OpenSSL's limit exactly needs 255 compression methods (TLS 1.3 wants one): its own alert.
    same_answer(edge, plain, big_hello(OPENSSL, OPENSSL_MAX_BODY, compression=255))
    # One byte over OpenSSL's limit: refused from the handshake header, by OpenSSL's words.
    over = with_body(b"\x03\x03" + b"\0" * (OPENSSL_MAX_BODY - 1))
    assert same_answer(edge, plain, over) == alert(ILLEGAL_PARAMETER)
    # OpenSSL reads the whole first record before it looks at the handshake header.
    assert same_answer(edge, plain, over[:9]) == alert(DECODE_ERROR)


def test_over_the_cap_the_reader_answers_itself_without_a_reset(edge: Edge, plain: SSL.Context) -> None:
    # 128 KiB in 128-byte records is more than the cap counts (record headers included). OpenSSL
    # would take it; the reader refuses with OpenSSL's alert for an oversize hello, then lingers
    # so the client still reads it (never a reset with unread bytes).
    data = refragment(big_hello(OPENSSL, 128 * 1024), 128)
    assert len(data) > MAX_CLIENT_HELLO
    assert plain_answer(plain, data)[0] == FLIGHT
    assert proxy_answer(edge.port, data) == alert(ILLEGAL_PARAMETER)


@pytest.mark.parametrize("version", [0x0301, 0x0302, 0x0303, 0x0304, 0x0002])
def test_sslv2_hello_gets_protocol_version_as_openssl_3_sent(edge: Edge, plain: SSL.Context, version: int) -> None:
    context = server_ssl_context(edge.pki.edge)  # TLS 1.3 only, like the proxy's
    data = sslv2_hello(version)
    assert plain_answer(plain, data) == CLOSE  # OpenSSL 4 says nothing: the reader must
    expected = openssl3_answer(context, data)
    assert is_alert(expected, PROTOCOL_VERSION)
    assert proxy_answer(edge.port, data) == expected


def test_truncated_at_every_field_boundary(edge: Edge, plain: SSL.Context) -> None:
    cuts = list(field_boundaries(STDLIB))
    assert len(cuts) > 30
    for cut in cuts:
        # The client half-closes mid-hello: OpenSSL answers decode_error once it sees EOF.
        assert same_answer(edge, plain, STDLIB[:cut]) == alert(DECODE_ERROR), cut


def test_a_silent_client_is_closed_where_openssl_would_send_decode_error(edge: Edge, plain: SSL.Context) -> None:
    # The one deliberate difference: port scans and TCP health checks get no alert.
    assert plain_answer(plain, b"") == alert(DECODE_ERROR)
    assert proxy_answer(edge.port, b"") == CLOSE


def test_not_tls_is_closed_as_openssl_does(edge: Edge, plain: SSL.Context) -> None:
    for data in (b"SSH-2.0-OpenSSH_9.6\r\n", b"\x00" * 64, b"\x16\x00\x01\x00\x05hello", bytes(range(256))):
        assert same_answer(edge, plain, data) == CLOSE


@pytest.mark.parametrize("ext_type", [0, 16, 43, 51, 10, 13, 0x0A0A, 0xFAFA])
def test_duplicate_extensions(edge: Edge, plain: SSL.Context, ext_type: int) -> None:
    _, extensions = split_hello(OPENSSL)
    data = dict(extensions).get(ext_type, b"")
    same_answer(edge, plain, edited(OPENSSL, {}, [(ext_type, data)]))
    same_answer(edge, plain, edited(OPENSSL, {}, [(ext_type, data), (ext_type, data)]))


SNI_CASES = {
    "empty": b"", "empty list": b"\x00\x00", "list overrun": b"\x00\x06\x00\x00\x02ab",
    "empty name": b"\x00\x03\x00\x00\x00", "two host names": sni_extension((0, b"a.example"), (0, b"b.example")),
    "trailing byte": sni_extension((0, b"localhost")) + b"\x00", "unknown type only": sni_extension((1, b"localhost")),
    "unknown type after": sni_extension((0, b"localhost"), (1, b"x")), "NUL in name": sni_extension((0, b"local\0host")),
    "256-byte name": sni_extension((0, b"a" * 256)), "IP literal": sni_extension((0, b"127.0.0.1")),
    "non-ASCII": sni_extension((0, "bücher.example".encode())), "trailing dot": sni_extension((0, b"localhost.")),
    "upper case": sni_extension((0, b"LOCALHOST")), "name overrun": b"\x00\x0c\x00\x00\x0alocalhost",
}


@pytest.mark.parametrize("case", SNI_CASES)
def test_malformed_sni(edge: Edge, plain: SSL.Context, case: str) -> None:
    same_answer(edge, plain, edited(OPENSSL, {0: SNI_CASES[case]}))


ALPN_CASES = {
    "empty": b"", "empty list": b"\x00\x00", "empty name": b"\x00\x01\x00", "overrun": b"\x00\x04\x02h2",
    "name overrun": b"\x00\x02\x02h2", "trailing byte": b"\x00\x03\x02h2\x00", "h2 only": b"\x00\x03\x02h2",
    "unknown only": b"\x00\x04\x03foo", "http/1.1 last": b"\x00\x0f\x02h2\x02h3\x08http/1.1",
    "HTTP/1.1 in upper case": b"\x00\x09\x08HTTP/1.1",
}


@pytest.mark.parametrize("case", ALPN_CASES)
def test_malformed_alpn(edge: Edge, plain: SSL.Context, case: str) -> None:
    answer = same_answer(edge, plain, edited(OPENSSL, {16: ALPN_CASES[case]}))
    if case in ("h2 only", "unknown only", "HTTP/1.1 in upper case"):
        assert answer == alert(120)  # no_application_protocol


# --------------------------------------------------------------------------- fuzz


def fuzz_bases() -> list[bytes]:
    return [STDLIB, OPENSSL, refragment(STDLIB, 50), refragment(OPENSSL, 300), stdlib_hello(None, (), tls12_only=True)]


def openssl_accepts(context: SSL.Context, data: bytes) -> bool:
    """OpenSSL answered ``data`` with a server flight (it may also still be waiting: False)."""
    conn = SSL.Connection(context, None)
    conn.set_accept_state()
    conn.bio_write(data or b"\0")
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        try:
            return conn.bio_read(1) == b"\x16"
        except SSL.WantReadError:
            return False
    except Exception:
        return False
    return True


def test_reader_never_refuses_a_hello_openssl_accepts(plain: SSL.Context) -> None:
    # The reader only routes: a hello it refuses goes to the default context, so refusing one
    # that OpenSSL would take would lose its SNI route. No sockets: thousands of cases.
    rng = random.Random(20261204)
    bases = fuzz_bases()
    outcomes = {"agree": 0, "openssl_only_refuses": 0}
    for _ in range(3000):
        data = mutated(rng, bases)
        accepted = openssl_accepts(plain, data)
        try:
            routed = ClientHelloReader().feed(data) is not None
        except ClientHelloError:
            routed = False
        if accepted:
            assert routed, data.hex()
        outcomes["agree" if routed == accepted else "openssl_only_refuses"] += 1
    assert all(outcomes.values()), outcomes


def test_fuzzed_hellos_get_the_plain_servers_answer(edge: Edge, plain: SSL.Context) -> None:
    rng = random.Random(FUZZ_SEED)
    bases = fuzz_bases()
    started = time.monotonic()
    kinds: dict[str, int] = {}
    done = 0
    for done in range(1, FUZZ_CASES + 1):
        data = mutated(rng, bases)
        if not data or data[0] != 0x16:
            continue  # not TLS: closed (tested above); an empty connection is the one exception
        answer = same_answer(edge, plain, data)
        kinds[str(answer[0])] = kinds.get(str(answer[0]), 0) + 1
        if time.monotonic() - started > FUZZ_SECONDS:
            break
    assert done >= 50 and kinds.get("bytes", 0) and kinds.get(FLIGHT, 0), kinds


# --------------------------------------------------------------------------- ALPN with real clients


def no_application_protocol_count() -> float:
    return float(metrics.TLS_HANDSHAKE_BY_RESULT["no_application_protocol"]._value.get())


def test_an_h2_only_stdlib_client_gets_no_application_protocol(edge: Edge) -> None:
    before = no_application_protocol_count()
    with pytest.raises(ssl.SSLError) as info:
        edge.tls_socket(context=edge.client_context(alpn=("h2",)))
    assert "NO_APPLICATION_PROTOCOL" in str(info.value).upper().replace(" ", "_")
    assert no_application_protocol_count() == before + 1
    assert "no_application_protocol" in edge.logs()
    # No ALPN at all is served as HTTP/1.1, as before.
    sock = edge.tls_socket(context=edge.client_context(alpn=()))
    try:
        assert sock.selected_alpn_protocol() is None
        sock.sendall(b"GET /ns/sigmai HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
    finally:
        sock.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")
def test_openssl_s_client_offering_h2_gets_no_application_protocol(edge: Edge) -> None:
    before = no_application_protocol_count()
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{edge.port}", "-servername", SERVER_NAME, "-alpn", "h2"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20,
    )
    assert result.returncode != 0
    assert "no application protocol" in result.stderr, result.stderr
    assert no_application_protocol_count() == before + 1


def test_passthrough_leaves_alpn_to_the_upstream(edge: Edge) -> None:
    from tests.integration.harness import API_NAME

    context = edge.client_context(alpn=("h2",))
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=API_NAME) as sock:
            assert sock.version() == "TLSv1.3"  # the upstream stand-in took it; we never judged


# --------------------------------------------------------------------------- no answer lost to a reset


@pytest.mark.parametrize("first,answer", [
    (b"GET / HTTP/1.1\r\n", b"HTTP/1.1 400 "),
    (sslv2_hello(0x0303), b"\x15\x03\x03\x00\x02\x02\x46"),
    (b"\x16\x03\x01\x00\x05hello", b"\x15\x03\x03\x00\x02\x02\x0a"),  # OpenSSL's unexpected_message
    (b"SSH-2.0-OpenSSH_9.6\r\n", b""),
])
def test_bytes_after_a_refusal_do_not_reset_the_answer(edge: Edge, first: bytes, answer: bytes) -> None:
    # Closing right after answering would make the kernel answer the client's next bytes with a
    # reset, which can discard the answer before the client reads it; the proxy half-closes and
    # drains instead, like a plain server after a failed handshake.
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as sock:
        sock.sendall(first)
        time.sleep(0.05)
        sock.sendall(b"more bytes the server will never use\r\n" * 100)
        out = bytearray()
        for _ in range(100):
            chunk = sock.recv(65536)  # a reset raises ConnectionResetError here
            if not chunk:
                break
            out += chunk
    assert bytes(out).startswith(answer) and (answer or not out)
