"""ClientHelloReader fed real hellos (stdlib ssl and pyOpenSSL clients) in every framing."""

from __future__ import annotations

import random

import pytest

from nextproxy.core.clienthello import MAX_CLIENT_HELLO, OPENSSL_MAX_HELLO_BODY, ClientHello, ClientHelloReader
from nextproxy.errors import ClientHelloError, HelloAnswer, TlsAlert
from tests.hellos import (build_hello, handshake_payload, openssl_hello, record, refragment,
                          split_hello, sni_extension, stdlib_hello)

STDLIB = stdlib_hello("example.com")
OPENSSL = openssl_hello("example.com")  # ~1.5 KB with the X25519MLKEM768 key share
HELLOS = {"stdlib": STDLIB, "openssl": OPENSSL}


def feed_all(chunks: list[bytes], max_size: int = MAX_CLIENT_HELLO) -> ClientHello:
    """Feed chunks in order; every chunk but the last must leave the reader waiting."""
    reader = ClientHelloReader(max_size)
    for chunk in chunks[:-1]:
        assert reader.feed(chunk) is None
    hello = reader.feed(chunks[-1])
    assert hello is not None
    return hello


def error_of(data: bytes, max_size: int = MAX_CLIENT_HELLO, *, bytewise: bool = False
             ) -> ClientHelloError:
    """The error the reader raises for ``data``, fed whole or one byte at a time."""
    reader = ClientHelloReader(max_size)
    chunks = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
    with pytest.raises(ClientHelloError) as info:
        for chunk in chunks:
            assert reader.feed(chunk) is None
    return info.value


def edited(hello: bytes, edit: dict[int, bytes | None]) -> bytes:
    """``hello`` with extensions replaced (bytes) or removed (None); new types appended."""
    prefix, extensions = split_hello(hello)
    out = [(t, edit.get(t, d)) for t, d in extensions if not (t in edit and edit[t] is None)]
    out += [(t, d) for t, d in edit.items() if d is not None and t not in dict(extensions)]
    return build_hello(prefix, [(t, d) for t, d in out if d is not None])


def handshake_body(hello: bytes) -> bytes:
    return handshake_payload(hello)[4:]


def with_body(body: bytes) -> bytes:
    return record(b"\x01" + len(body).to_bytes(3, "big") + body)


# --- framing: whole, byte at a time, trailing data, every split, re-recorded ----------------

@pytest.mark.parametrize("name", HELLOS)
def test_whole_hello(name: str) -> None:
    hello = feed_all([HELLOS[name]])
    assert hello.server_name == "example.com"
    assert hello.alpn == (b"h2", b"http/1.1")
    assert hello.offers_tls13 is True
    assert hello.raw == HELLOS[name]


@pytest.mark.parametrize("name", HELLOS)
def test_byte_at_a_time(name: str) -> None:
    data = HELLOS[name]
    hello = feed_all([data[i:i + 1] for i in range(len(data))])
    assert hello.server_name == "example.com" and hello.raw == data


@pytest.mark.parametrize("name", HELLOS)
def test_trailing_data_is_kept_in_raw(name: str) -> None:
    # A TLS 1.3 client may send early data or a ChangeCipherSpec right behind the hello.
    extra = record(b"\x01", content_type=20) + b"more"
    hello = feed_all([HELLOS[name] + extra])
    assert hello.server_name == "example.com"
    assert hello.raw == HELLOS[name] + extra


def test_feeding_after_the_hello_extends_raw() -> None:
    reader = ClientHelloReader()
    first = reader.feed(STDLIB[:100])
    second = reader.feed(STDLIB[100:] + b"x")
    third = reader.feed(b"yz")
    assert first is None and second is not None and third is not None
    assert second.raw == STDLIB + b"x"
    assert third.raw == STDLIB + b"xyz"
    assert third.server_name == second.server_name == "example.com"


@pytest.mark.parametrize("name", HELLOS)
def test_split_at_every_position(name: str) -> None:
    data = HELLOS[name]
    for cut in range(1, len(data)):
        hello = feed_all([data[:cut], data[cut:]])
        assert hello.raw == data, cut
        assert hello.server_name == "example.com", cut


@pytest.mark.parametrize("name", HELLOS)
def test_one_byte_records_fed_one_byte_at_a_time(name: str) -> None:
    data = refragment(HELLOS[name], 1)
    assert len(data) == 6 * len(handshake_payload(HELLOS[name]))
    hello = feed_all([data[i:i + 1] for i in range(len(data))])
    assert hello.server_name == "example.com"
    assert hello.alpn == (b"h2", b"http/1.1")
    assert hello.raw == data


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 64, 100, 511, 1000, 16384])
@pytest.mark.parametrize("name", HELLOS)
def test_n_byte_records(name: str, size: int) -> None:
    data = refragment(HELLOS[name], size)
    whole = feed_all([data])
    segmented = feed_all([data[i:i + 13] for i in range(0, len(data), 13)])
    assert whole == segmented
    assert whole.server_name == "example.com" and whole.raw == data


def test_records_with_ssl3_and_tls12_record_versions() -> None:
    payload = handshake_payload(STDLIB)
    for version in (0x0300, 0x0301, 0x0302, 0x0303):
        hello = feed_all([record(payload, version=version)])
        assert hello.server_name == "example.com"


# --- what is extracted --------------------------------------------------------------------

def test_no_sni_and_no_alpn() -> None:
    hello = feed_all([stdlib_hello(server_name=None, alpn=())])
    assert hello.server_name is None
    assert hello.alpn == ()
    assert hello.offers_tls13 is True


def test_ip_literal_sni_is_none() -> None:
    for name in (b"127.0.0.1", b"10.1.2.3.", b"127.1", b"::1", b"[::1]"):
        assert feed_all([openssl_hello(name)]).server_name is None, name


def test_non_ascii_sni_is_none() -> None:
    assert feed_all([openssl_hello("bücher.example")]).server_name is None
    assert feed_all([openssl_hello(b"b\xfccher.example")]).server_name is None


def test_punycode_sni_is_kept() -> None:
    assert feed_all([openssl_hello(b"xn--bcher-kva.example")]).server_name == "xn--bcher-kva.example"


def test_upper_case_and_trailing_dot_sni_are_normalized() -> None:
    assert feed_all([openssl_hello(b"API.Example.COM.")]).server_name == "api.example.com"
    assert feed_all([openssl_hello(b"Ns.Example.com")]).server_name == "ns.example.com"


@pytest.mark.parametrize("name", [b"-bad.example", b"bad-.example", b"a..example", b"*.example.com",
                                  b"under_score.example", b"a b.example", b"x" * 64 + b".example",
                                  (b"a" * 63 + b".") * 4 + b"com", b"."])
def test_invalid_host_names_are_none(name: bytes) -> None:
    data = edited(STDLIB, {0: sni_extension((0, name))})
    assert feed_all([data]).server_name is None


def test_longest_valid_host_name() -> None:
    name = (b"a" * 63 + b".") * 3 + b"b" * 61  # 253 bytes
    assert feed_all([edited(STDLIB, {0: sni_extension((0, name))})]).server_name == name.decode()


def test_unknown_name_type_is_skipped() -> None:
    data = edited(STDLIB, {0: sni_extension((7, b"opaque"), (0, b"Host.example"))})
    assert feed_all([data]).server_name == "host.example"
    only_unknown = edited(STDLIB, {0: sni_extension((7, b"opaque"))})
    assert feed_all([only_unknown]).server_name is None


@pytest.mark.parametrize("client", [stdlib_hello, openssl_hello])
def test_tls12_only_client_does_not_offer_tls13(client: object) -> None:
    assert callable(client)
    hello = client("example.com", tls12_only=True)
    result = feed_all([hello])
    assert result.offers_tls13 is False
    assert result.alpn == (b"h2", b"http/1.1")
    assert result.server_name == "example.com"


@pytest.mark.parametrize("versions,offers", [
    (b"\x04\x03\x04\x03\x03", True), (b"\x04\x03\x03\x03\x04", True),
    # 0x7f03 then 0x0403: the bytes 03 04 straddle the two versions, neither is TLS 1.3.
    (b"\x04\x7f\x03\x04\x03", False), (b"\x02\x03\x03", False),
])
def test_tls13_is_found_only_as_a_whole_version(versions: bytes, offers: bool) -> None:
    assert feed_all([edited(STDLIB, {43: versions})]).offers_tls13 is offers


def test_alpn_order_is_kept() -> None:
    hello = feed_all([stdlib_hello(alpn=("http/1.1", "h2", "acme-tls/1"))])
    assert hello.alpn == (b"http/1.1", b"h2", b"acme-tls/1")


def test_hello_without_extensions() -> None:
    prefix, _ = split_hello(STDLIB)
    hello = feed_all([with_body(prefix)])
    assert hello == ClientHello(None, (), False, with_body(prefix))


# --- what is refused ----------------------------------------------------------------------

@pytest.mark.parametrize("data", [b"\x00" * 64, b"\xff\xfe garbage", b"SSH-2.0-OpenSSH_9.6\r\n",
                                  b"\x80\x2e\x02\x03\x01", b"\x16\x00\x01\x00\x05hello"])
def test_garbage_is_closed_without_an_answer(data: bytes) -> None:
    # The last two: an SSLv2 record that is no hello; a "handshake" record of major version 0,
    # which OpenSSL also closes on without an alert ("doesn't look like TLS").
    for bytewise in (False, True):
        err = error_of(data, bytewise=bytewise)
        assert err.answer is HelloAnswer.CLOSE and not err.plaintext_http


@pytest.mark.parametrize("version,record_version", [(0x0301, 0x0301), (0x0302, 0x0302), (0x0303, 0x0303),
                                                    (0x0304, 0x0303), (0x0002, 0x0303)])
def test_sslv2_hello_gets_protocol_version_from_the_reader(version: int, record_version: int) -> None:
    # OpenSSL 4 drops these silently; the reader answers as OpenSSL 3 did (the oracle test checks).
    data = b"\x80\x2e\x01" + version.to_bytes(2, "big") + b"\x00" * 20
    for bytewise in (False, True):
        err = error_of(data, bytewise=bytewise)
        assert err.answer is HelloAnswer.ALERT and err.alert is TlsAlert.PROTOCOL_VERSION
        assert err.alert_record() == b"\x15" + record_version.to_bytes(2, "big") + b"\x00\x02\x02\x46"
    assert ClientHelloReader().feed(data[:4]) is None  # the version is waited for


def test_end_of_stream() -> None:
    reader = ClientHelloReader()
    assert reader.feed(STDLIB[:40]) is None
    with pytest.raises(ClientHelloError) as info:
        reader.feed(b"")
    # A truncated hello is OpenSSL's to answer (decode_error), with every byte read so far.
    assert info.value.answer is HelloAnswer.TLS_LIBRARY and reader.received() == STDLIB[:40]
    for data in (b"", b"GE", b"\x80\x2e"):
        reader = ClientHelloReader()
        assert data == b"" or reader.feed(data) is None
        with pytest.raises(ClientHelloError) as info:
            reader.feed(b"")
        assert info.value.answer is HelloAnswer.CLOSE, data
    reader = ClientHelloReader()
    assert reader.feed(STDLIB) is not None and reader.feed(b"") is not None  # after the hello: nothing new


@pytest.mark.parametrize("line", [b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\n", b"HEAD / HTTP/1.0\r\n",
                                  b"PUT /", b"DELETE /a", b"OPTIONS * HTTP/1.1", b"PATCH /",
                                  b"CONNECT host:443 HTTP/1.1", b"PRI * HTTP/2.0\r\n"])
def test_clear_text_http(line: bytes) -> None:
    for bytewise in (False, True):
        err = error_of(line, bytewise=bytewise)
        assert err.plaintext_http is True and err.answer is HelloAnswer.USE_HTTPS


def test_clear_text_sniff_waits_only_while_ambiguous() -> None:
    reader = ClientHelloReader()
    assert reader.feed(b"OPTIO") is None
    with pytest.raises(ClientHelloError) as info:
        reader.feed(b"NX")
    assert not info.value.plaintext_http
    assert error_of(b"GETX /").plaintext_http is False
    assert error_of(b"get / HTTP/1.1").plaintext_http is False


def test_errors_are_sticky() -> None:
    reader = ClientHelloReader()
    with pytest.raises(ClientHelloError) as first:
        reader.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ClientHelloError) as again:
        reader.feed(STDLIB)
    assert (again.value.alert, again.value.reason) == (first.value.alert, first.value.reason)


@pytest.mark.parametrize("content_type", [20, 21, 23, 24])
def test_non_handshake_record(content_type: int) -> None:
    err = error_of(record(handshake_payload(STDLIB), content_type=content_type))
    assert err.alert is TlsAlert.UNEXPECTED_MESSAGE and not err.plaintext_http
    # The same after a first handshake record: the hello must not be interleaved.
    payload = handshake_payload(STDLIB)
    data = record(payload[:10]) + record(payload[10:], content_type=content_type)
    for bytewise in (False, True):
        err = error_of(data, bytewise=bytewise)
        assert err.alert is TlsAlert.UNEXPECTED_MESSAGE and err.answer is HelloAnswer.TLS_LIBRARY


def test_non_client_hello_handshake_message() -> None:
    payload = bytearray(handshake_payload(STDLIB))
    payload[0] = 2  # ServerHello
    err = error_of(record(bytes(payload[:1])) + record(bytes(payload[1:])), bytewise=True)
    assert err.alert is TlsAlert.UNEXPECTED_MESSAGE


def test_wrong_record_version_major() -> None:
    data = bytearray(STDLIB)
    data[1] = 2
    assert error_of(bytes(data)).answer is HelloAnswer.CLOSE  # the first record: not TLS
    payload = handshake_payload(STDLIB)
    later = record(payload[:10]) + record(payload[10:], version=0x0203)
    err = error_of(later)
    assert err.alert is TlsAlert.PROTOCOL_VERSION and err.answer is HelloAnswer.TLS_LIBRARY


def test_oversize_record_is_refused_from_its_header() -> None:
    header = bytes([22, 3, 1]) + (16385).to_bytes(2, "big")
    # The header alone is enough: nothing of the body is waited for.
    assert error_of(header, bytewise=True).alert is TlsAlert.RECORD_OVERFLOW


def test_empty_records_are_skipped_as_openssl_does() -> None:
    payload = handshake_payload(STDLIB)
    data = record(b"") + record(payload[:10]) + record(b"") + record(b"") + record(payload[10:])
    for bytewise in (False, True):
        chunks = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
        assert feed_all(chunks).server_name == "example.com"


def test_default_cap_holds_the_largest_hello_openssl_accepts() -> None:
    # 131,396 bytes of body + 4 of header, in nine full-size records of 5-byte headers.
    assert MAX_CLIENT_HELLO == 132 * 1024 >= OPENSSL_MAX_HELLO_BODY + 4 + 9 * 5
    prefix, extensions = split_hello(STDLIB)
    # Pad with an unknown extension to just fit a 64 KiB cap, records included; then one byte more.
    cap = 64 * 1024
    message = len(build_hello(prefix, extensions + [(0xFAFA, b"")])) - 5
    fitting = cap - 4 * 5 - message  # the padded message needs four records
    for pad, fits in ((fitting, True), (fitting + 1, False)):
        data = build_hello(prefix, extensions + [(0xFAFA, b"p" * pad)])
        assert len(data) == cap + (0 if fits else 1)
        assert feed_all([data]).server_name == "example.com"  # the default cap takes both
        if fits:
            assert feed_all([data], max_size=cap).server_name == "example.com"
        else:
            # Refused from the handshake header, before the rest of the first record arrives,
            # by the reader itself: OpenSSL would have accepted this hello.
            err = error_of(data[:9], max_size=cap, bytewise=True)
            assert err.alert is TlsAlert.ILLEGAL_PARAMETER and err.answer is HelloAnswer.ALERT
            assert err.alert_record() == b"\x15\x03\x03\x00\x02\x02\x2f"


def test_lying_handshake_length_fails_early() -> None:
    # A handshake header claiming 16 MB must not make the reader wait for (and buffer) it; past
    # OpenSSL's own limit OpenSSL refuses it from the header too, in its own words.
    err = error_of(record(b"\x01\xff\xff\xff" + b"\x03\x03"), bytewise=True)
    assert err.alert is TlsAlert.ILLEGAL_PARAMETER and err.answer is HelloAnswer.TLS_LIBRARY
    just_over = (OPENSSL_MAX_HELLO_BODY + 1).to_bytes(3, "big")
    assert error_of(record(b"\x01" + just_over), bytewise=True).answer is HelloAnswer.TLS_LIBRARY
    at_limit = OPENSSL_MAX_HELLO_BODY.to_bytes(3, "big")
    assert ClientHelloReader().feed(record(b"\x01" + at_limit)) is None


def test_small_custom_cap() -> None:
    assert feed_all([STDLIB], max_size=len(STDLIB)).raw == STDLIB
    assert error_of(STDLIB, max_size=len(STDLIB) - 1).answer is HelloAnswer.ALERT
    # Record headers count: 1-byte records of the same hello need six times the bytes.
    one_byte = refragment(STDLIB, 1)
    assert feed_all([one_byte], max_size=len(one_byte)).raw == one_byte
    for bytewise in (False, True):
        err = error_of(one_byte, max_size=len(one_byte) - 1, bytewise=bytewise)
        assert err.alert is TlsAlert.ILLEGAL_PARAMETER and err.answer is HelloAnswer.ALERT


def test_cap_counts_bytes_before_completion_only() -> None:
    # Bytes behind the hello are the shell's business, not part of the cap.
    assert feed_all([STDLIB + b"x" * 1000], max_size=len(STDLIB)).raw == STDLIB + b"x" * 1000


def test_truncated_lengths_inside_the_hello() -> None:
    body = handshake_body(STDLIB)
    no_extensions = len(split_hello(STDLIB)[0])  # a complete (extension-less) hello
    for cut in range(len(body)):
        if cut == no_extensions:
            continue
        err = error_of(with_body(body[:cut]))
        assert err.alert is TlsAlert.DECODE_ERROR and err.answer is HelloAnswer.TLS_LIBRARY, cut
    # And one byte too many: lengths must add up exactly.
    assert error_of(with_body(body + b"\x00")).alert is TlsAlert.DECODE_ERROR


@pytest.mark.parametrize("ext_type,data", [
    (0, b""), (0, b"\x00\x00"), (0, b"\x00\x06\x00\x00\x02ab"), (0, b"\x00\x03\x00\x00\x00"),
    (0, sni_extension((0, b"a.example"), (0, b"b.example"))), (0, sni_extension((0, b"a")) + b"\x00"),
    (16, b""), (16, b"\x00\x00"), (16, b"\x00\x01\x00"), (16, b"\x00\x04\x02h2"), (16, b"\x00\x02\x02h2"),
    (43, b""), (43, b"\x00"), (43, b"\x03\x03\x04\x03"), (43, b"\x02\x03\x04\x00"),
])
def test_malformed_extensions(ext_type: int, data: bytes) -> None:
    assert error_of(edited(STDLIB, {ext_type: data})).alert is TlsAlert.DECODE_ERROR


def test_fixed_fields_are_walked_not_judged() -> None:
    # The reader only routes: legacy_version, session id, cipher suites and compression methods
    # are OpenSSL's to judge (the oracle test shows it refuses these); the SNI is still found.
    body = handshake_body(STDLIB)
    sid = 34
    long_session_id = body[:sid] + b"\x21" + b"s" * 33 + body[sid + 1 + body[sid]:]
    suites = sid + 1 + body[sid]
    rest = body[suites + 2 + int.from_bytes(body[suites:suites + 2], "big"):]
    odd_suites = body[:suites] + b"\x00\x03\x13\x01\x13" + rest
    no_suites = body[:suites] + b"\x00\x00" + rest
    not_tls = b"\x02\x00" + body[2:]
    for edited_body in (long_session_id, odd_suites, no_suites, not_tls):
        assert feed_all([with_body(edited_body)]).server_name == "example.com"


def test_duplicate_extension() -> None:
    prefix, extensions = split_hello(OPENSSL)
    alpn = dict(extensions)[16]
    err = error_of(build_hello(prefix, extensions + [(16, alpn)]))
    assert err.alert is TlsAlert.DECODE_ERROR and "duplicate" in err.reason
    assert err.answer is HelloAnswer.TLS_LIBRARY
    # OpenSSL ignores duplicates of types it does not know (two GREASE values): so do we.
    hello = feed_all([build_hello(prefix, extensions + [(0x0A0A, b""), (0x0A0A, b"x")])])
    assert hello.server_name == "example.com"


def test_fuzzed_real_hellos_only_raise_client_hello_error() -> None:
    rng = random.Random(20240611)
    bases = [STDLIB, OPENSSL, refragment(STDLIB, 50), stdlib_hello(None, (), tls12_only=True)]
    outcomes = {"none": 0, "hello": 0, "error": 0}
    for _ in range(2000):
        data = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 4)):
            if not data:
                break
            op = rng.randrange(4)
            pos = rng.randrange(len(data))
            if op == 0:
                data[pos] = rng.randrange(256)
            elif op == 1:
                del data[pos:pos + rng.randint(1, 40)]
            elif op == 2:
                data[pos:pos] = rng.randbytes(rng.randint(1, 40))
            else:
                data = data[:pos]
        reader = ClientHelloReader(rng.choice([MAX_CLIENT_HELLO, 600]))
        step = rng.choice([1, 7, len(data) or 1])
        try:
            result = None
            for i in range(0, len(data), step):
                result = reader.feed(bytes(data[i:i + step]))
                if result is not None:
                    break
        except ClientHelloError as exc:
            assert isinstance(exc.alert, TlsAlert) and isinstance(exc.answer, HelloAnswer)
            outcomes["error"] += 1
            continue
        if result is None:
            outcomes["none"] += 1
        else:
            assert isinstance(result, ClientHello)
            assert result.raw == bytes(data[:len(result.raw)])
            outcomes["hello"] += 1
    # Each outcome must occur, or the fuzz is not exercising the reader.
    assert all(outcomes.values()), outcomes


def _labelwise_host(name: bytes) -> str | None:
    """normalize_host's definition, label by label (RFC 1123 2.1 names, no IP literals): the
    reference its single regular expression must agree with."""
    if name.endswith(b"."):
        name = name[:-1]
    if not 0 < len(name) <= 253:
        return None
    labels = name.lower().split(b".")
    for label in labels:
        if not 0 < len(label) <= 63 or label.startswith(b"-") or label.endswith(b"-"):
            return None
        if any(c not in b"abcdefghijklmnopqrstuvwxyz0123456789-" for c in label):
            return None
    return None if labels[-1].isdigit() else name.lower().decode("ascii")


def test_normalize_host_agrees_with_the_labelwise_definition() -> None:
    from nextproxy.core.hellobody import normalize_host

    fixed = [
        b"example.com", b"Example.COM.", b"a", b"a.", b"a..", b".a", b"a..b", b"-a.b", b"a-.b", b"a-b.c",
        b"127.0.0.1", b"127.1", b"1.2.3.4a", b"4a.1", b"xn--bcher-kva.example", b"a_b.example", b"a b",
        b"\xc3\xa9.example", b"a" * 63 + b".b", b"a" * 64 + b".b", b".".join([b"a" * 63] * 4)[:253],
        b".".join([b"a" * 63] * 4)[:254], b"", b".", b"::1", b"[::1]", b"host:443", b"0", b"0.a",
    ]  # fmt: skip
    rng = random.Random(20261204)

    def near_name() -> bytes:
        """Labels of edge lengths from a mostly valid alphabet, sometimes one foreign byte."""
        labels = [bytes(rng.choice(b"ab9Z-") for _ in range(rng.choice((0, 1, 2, 5, 62, 63, 64))))
                  for _ in range(rng.randint(1, 5))]  # fmt: skip
        name = bytearray(b".".join(labels) + (b"." if rng.random() < 0.2 else b""))
        if name and rng.random() < 0.3:
            name[rng.randrange(len(name))] = rng.choice(b"_:\xc3 .-7")
        return bytes(name)

    fuzzed = [near_name() for _ in range(3000)]
    assert sum(_labelwise_host(name) is not None for name in fuzzed) > 300  # both answers occur
    for name in fixed + fuzzed:
        assert normalize_host(name) == _labelwise_host(name), name
