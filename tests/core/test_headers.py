"""Header policy: smuggling refusals, Host/SNI 421, hop-by-hop, edge-owned headers, XFCC, RFC 9440.

Certificates are real (made with cryptography here); the stand-in below has PeerCertificate's
fields so these tests do not depend on the TLS engine. Headers produced here are also pushed
through a real h11 client/server pair to prove h11 accepts and frames them.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
from dataclasses import dataclass
from urllib.parse import quote

import h11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nextproxy.core.headers import ClientInfo, Headers, rfc9440, websocket_accept, xfcc
from tests.core.header_oracle import check_request, is_upgrade_request, request_host, response_headers, upstream_request_headers
from nextproxy.errors import HttpError


@dataclass(frozen=True, slots=True)
class PeerCert:
    """Stand-in with the fields of nextproxy.core.tls.PeerCertificate."""

    der: bytes
    chain: tuple[bytes, ...]
    verified: bool
    verify_error: str | None
    sha256: str
    spki_sha256: str
    subject: str
    common_name: str | None
    dns_names: tuple[str, ...]
    uris: tuple[str, ...]


def make_cert(
    subject: x509.Name, dns: tuple[str, ...] = (), uris: tuple[str, ...] = ()
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256())


def peer(
    cert: x509.Certificate,
    *,
    chain: tuple[bytes, ...] = (),
    verified: bool = True,
    verify_error: str | None = None,
) -> PeerCert:
    der = cert.public_bytes(serialization.Encoding.DER)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        dns, uris = (), ()
    return PeerCert(
        der=der,
        chain=chain,
        verified=verified,
        verify_error=verify_error,
        sha256=hashlib.sha256(der).hexdigest(),
        spki_sha256=hashlib.sha256(spki).hexdigest(),
        subject=cert.subject.rfc4514_string(),
        common_name=str(cns[0].value) if cns else None,
        dns_names=dns,
        uris=uris,
    )


def name(**attrs: str) -> x509.Name:
    oids = {"CN": NameOID.COMMON_NAME, "O": NameOID.ORGANIZATION_NAME, "C": NameOID.COUNTRY_NAME}
    return x509.Name([x509.NameAttribute(oids[k], v) for k, v in attrs.items()])


@pytest.fixture(scope="module")
def client_cert() -> x509.Certificate:
    return make_cert(
        name(C="US", O="Acme, Inc.", CN="client one"),
        dns=("a.example", "b.example"),
        uris=("spiffe://acme.test/ns/web", "urn:x?role=admin;tier=1"),
    )


@pytest.fixture(scope="module")
def intermediates() -> tuple[bytes, bytes]:
    first = make_cert(name(CN="Intermediate 1"))
    second = make_cert(name(CN="Intermediate 2"))
    return (
        first.public_bytes(serialization.Encoding.DER),
        second.public_bytes(serialization.Encoding.DER),
    )


CLIENT = ClientInfo(address="192.0.2.7", server_name="example.com")
BASE: Headers = [(b"host", b"example.com"), (b"accept", b"*/*")]


def all_named(headers: Headers, wanted: bytes) -> list[bytes]:
    """Values of every header whose normalized name is ``wanted`` (any case, '_' or '-')."""
    return [v for n, v in headers if n.lower().replace(b"_", b"-") == wanted]


def upstream(headers: Headers, client: ClientInfo = CLIENT, upgrade: bool = False) -> Headers:
    check_request(b"GET", b"/", headers, client)
    return upstream_request_headers(headers, client, upgrade=upgrade)


def through_h11(method: bytes, headers: Headers, body: bytes = b"") -> h11.Request:
    """Send the headers with a real h11 client and parse them with a real h11 server."""
    client = h11.Connection(h11.CLIENT)
    wire = client.send(h11.Request(method=method, target=b"/", headers=headers)) or b""
    if body:
        wire += client.send(h11.Data(data=body)) or b""
    wire += client.send(h11.EndOfMessage()) or b""
    server = h11.Connection(h11.SERVER)
    server.receive_data(wire)
    event = server.next_event()
    assert isinstance(event, h11.Request)
    return event


# --- edge-owned headers: every client copy goes, ours replace them ---------------------------

SPOOFED = [
    b"X-Forwarded-For",
    b"X_Forwarded_For",
    b"x-forwarded-FOR",
    b"x_FORWARDED-for",
    b"Forwarded",
    b"X-Real-IP",
    b"X_Real_Ip",
    b"X-Forwarded-Proto",
    b"X-Forwarded-Host",
    b"X-Forwarded-Port",
    b"X-Forwarded-Client-Cert",
    b"x_forwarded_client_cert",
    b"Client-Cert",
    b"CLIENT_CERT",
    b"Client-Cert-Chain",
    b"client_cert_chain",
    b"X-Client-Cert-Verified",
]


@pytest.mark.parametrize("spoofed", SPOOFED)
def test_spoofed_edge_headers_are_removed_and_replaced(spoofed: bytes) -> None:
    out = upstream(BASE + [(spoofed, b"6.6.6.6;evil")])
    assert all(b"6.6.6.6" not in value for _, value in out)
    assert all_named(out, b"x-forwarded-for") == [b"192.0.2.7"]
    assert all_named(out, b"x-forwarded-proto") == [b"https"]
    assert all_named(out, b"x-forwarded-host") == [b"example.com"]
    for absent in (b"forwarded", b"x-real-ip", b"x-forwarded-port", b"x-forwarded-client-cert",
                   b"client-cert", b"client-cert-chain", b"x-client-cert-verified"):
        assert all_named(out, absent) == [], absent


def test_spoofed_cert_headers_replaced_by_real_certificate(client_cert: x509.Certificate) -> None:
    cert = peer(client_cert)
    client = ClientInfo("192.0.2.7", "example.com", cert)
    spoofed = [(b"x-forwarded-client-cert", b"Hash=00"), (b"Client_Cert", b":AAAA:"),
               (b"x-client-cert-verified", b"SUCCESS"), (b"client-cert-chain", b":AAAA:")]
    out = upstream(BASE + spoofed, client)
    assert all_named(out, b"x-forwarded-client-cert") == [xfcc(cert)]
    assert all_named(out, b"client-cert") == [rfc9440(cert.der)]
    assert all_named(out, b"x-client-cert-verified") == [b"SUCCESS"]
    assert all_named(out, b"client-cert-chain") == []  # forward_chain is off


def test_xff_is_exactly_the_client_address_even_for_ipv6() -> None:
    out = upstream(BASE + [(b"x-forwarded-for", b"10.0.0.1, 10.0.0.2")], ClientInfo("::1", None))
    assert all_named(out, b"x-forwarded-for") == [b"::1"]


def test_kept_headers_keep_their_order_and_the_edge_headers_come_last() -> None:
    headers: Headers = [
        (b"host", b"Example.COM.:8443"),
        (b"x-forwarded-for", b"1.1.1.1"),
        (b"user-agent", b"t"),
        (b"content-length", b"3"),
        (b"cookie", b"a=1"),
        (b"cookie", b"b=2"),
    ]
    out = upstream(headers)
    assert out == [
        (b"host", b"Example.COM.:8443"),
        (b"user-agent", b"t"),
        (b"content-length", b"3"),
        (b"cookie", b"a=1"),
        (b"cookie", b"b=2"),
        (b"x-forwarded-for", b"192.0.2.7"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"Example.COM.:8443"),
    ]


# --- hop-by-hop ---------------------------------------------------------------------------

HOP_BY_HOP_CASES = [
    (b"connection", b"keep-alive"),
    (b"keep-alive", b"timeout=5"),
    (b"Keep_Alive", b"timeout=5"),
    (b"proxy-connection", b"keep-alive"),
    (b"te", b"trailers"),
    (b"trailer", b"x-checksum"),
    (b"upgrade", b"h2c"),
    (b"proxy-authorization", b"Basic Zm9vOmJhcg=="),
    (b"proxy-authenticate", b"Basic"),
]


@pytest.mark.parametrize("header", HOP_BY_HOP_CASES)
def test_hop_by_hop_headers_are_removed(header: tuple[bytes, bytes]) -> None:
    assert upstream(BASE + [header])[:2] == BASE
    assert len(upstream(BASE + [header])) == len(BASE) + 3
    assert response_headers([(b"content-type", b"text/plain"), header], upgrade=False) == [
        (b"content-type", b"text/plain")
    ]


def test_headers_named_by_connection_are_removed_wherever_they_are() -> None:
    headers: Headers = [
        (b"x-before", b"1"),
        (b"host", b"example.com"),
        (b"connection", b"close, X-Before"),
        (b"connection", b"x_after ,  ,Keep-Alive"),
        (b"x-after", b"2"),
        (b"x-kept", b"3"),
    ]
    out = upstream(headers)
    assert out[:2] == [(b"host", b"example.com"), (b"x-kept", b"3")]
    resp = response_headers([(b"connection", b"x-secret"), (b"x-secret", b"s"), (b"etag", b'"1"')], upgrade=False)
    assert resp == [(b"etag", b'"1"')]


def test_connection_cannot_remove_framing_or_host() -> None:
    headers: Headers = [
        (b"host", b"example.com"),
        (b"content-length", b"3"),
        (b"connection", b"host, content-length, transfer-encoding"),
    ]
    out = upstream(headers)
    assert out[:2] == [(b"host", b"example.com"), (b"content-length", b"3")]
    assert list(through_h11(b"POST", out, b"abc").headers)[:2] == [(b"host", b"example.com"), (b"content-length", b"3")]


def test_underscore_aliases_of_framing_headers_are_dropped() -> None:
    headers = BASE + [(b"content_length", b"100"), (b"transfer_encoding", b"chunked"), (b"x_custom", b"ok")]
    out = upstream(headers)
    assert out[: len(BASE) + 1] == BASE + [(b"x_custom", b"ok")]
    assert all_named(out, b"content-length") == [] and all_named(out, b"transfer-encoding") == []


def test_chunked_request_stays_chunked() -> None:
    headers = BASE + [(b"transfer-encoding", b"chunked"), (b"x-a", b"1")]
    out = upstream(headers)
    assert out[:4] == BASE + [(b"transfer-encoding", b"chunked"), (b"x-a", b"1")]
    assert all_named(out, b"content-length") == []
    assert through_h11(b"POST", out, b"abc").headers[2] == (b"transfer-encoding", b"chunked")


def test_content_length_request_keeps_its_length() -> None:
    out = upstream(BASE + [(b"content-length", b"0")])
    assert all_named(out, b"content-length") == [b"0"]
    assert all_named(out, b"transfer-encoding") == []


def test_response_headers_keep_length_and_redeclare_chunked() -> None:
    assert response_headers([(b"content-length", b"12"), (b"connection", b"keep-alive")], upgrade=False) == [
        (b"content-length", b"12")
    ]
    chunked = response_headers([(b"transfer-encoding", b"chunked"), (b"content-type", b"a/b")], upgrade=False)
    assert chunked == [(b"transfer-encoding", b"chunked"), (b"content-type", b"a/b")]
    # An upstream that sent both: chunked wins, the length must not reach the client (RFC 9112 6.3).
    both = response_headers([(b"content-length", b"5"), (b"transfer-encoding", b"chunked")], upgrade=False)
    assert both == [(b"transfer-encoding", b"chunked")]


# --- smuggling and Host/SNI ---------------------------------------------------------------

REFUSED_400 = [
    [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")],
    [(b"transfer-encoding", b"chunked"), (b"content-length", b"0")],
    [(b"transfer-encoding", b"gzip, chunked")],
    [(b"transfer-encoding", b"chunked, chunked")],
    [(b"transfer-encoding", b"identity")],
    [(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")],
    [(b"content-length", b"5, 5")],
    [(b"content-length", b"-1")],
    [(b"content-length", b"5"), (b"content-length", b"5")],
    [(b"host", b"example.com")],  # a second Host (BASE has one)
    [(b"Host", b"evil.com")],
]


@pytest.mark.parametrize("extra", REFUSED_400)
def test_smuggling_prone_requests_are_refused_with_400(extra: Headers) -> None:
    with pytest.raises(HttpError) as info:
        check_request(b"POST", b"/", BASE + extra, CLIENT)
    assert info.value.status == 400


def test_chunked_in_any_case_is_accepted() -> None:
    check_request(b"POST", b"/", BASE + [(b"transfer-encoding", b" Chunked ")], CLIENT)


HOST_VS_SNI = [
    (b"Example.COM.:8443", "example.com", None),
    (b"example.com", "example.com", None),
    (b"EXAMPLE.com:443", "example.com", None),
    (b"example.com:", "example.com", None),
    (b"other.com", "example.com", 421),
    (b"example.com.evil", "example.com", 421),
    (b"example.com:abc", "example.com", 421),
    (b"[::1]:8443", "example.com", 421),
    (b"127.0.0.1", "example.com", 421),
    (b"other.com", None, None),
    (b"[::1]:8443", None, None),
]


@pytest.mark.parametrize(("host", "sni", "status"), HOST_VS_SNI)
def test_host_must_match_sni(host: bytes, sni: str | None, status: int | None) -> None:
    client = ClientInfo("192.0.2.7", sni)
    if status is None:
        check_request(b"GET", b"/", [(b"host", host)], client)
        return
    with pytest.raises(HttpError) as info:
        check_request(b"GET", b"/", [(b"host", host)], client)
    assert (info.value.status, info.value.reason) == (421, "misdirected request")


def test_no_host_header_is_not_a_misdirection() -> None:
    check_request(b"GET", b"/", [(b"accept", b"*/*")], CLIENT)  # HTTP/1.0; h11 requires Host on 1.1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"Example.COM.:8443", "example.com"),
        (b"example.com", "example.com"),
        (b"[::1]:8443", "::1"),
        (b"[::1]", "::1"),
        (b"[2001:DB8::1]:443", "2001:db8::1"),
        (b"127.0.0.1:80", "127.0.0.1"),
        (b"  spaced.example  ", "spaced.example"),
    ],
)
def test_request_host_normalization(value: bytes, expected: str) -> None:
    assert request_host([(b"accept", b"*/*"), (b"Host", value)]) == expected


def test_request_host_absent() -> None:
    assert request_host([(b"accept", b"*/*")]) is None


# --- client certificate headers -------------------------------------------------------------

def test_xfcc_exact_format(client_cert: x509.Certificate) -> None:
    cert = peer(client_cert)
    pem = client_cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
    digest = hashlib.sha256(client_cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    subject = client_cert.subject.rfc4514_string()
    assert subject == "CN=client one,O=Acme\\, Inc.,C=US"  # the comma is RFC 4514-escaped
    expected = (  # the contract's order: Hash, Subject, URI..., DNS..., Cert
        f"Hash={digest};"
        f'Subject="{subject}";'
        "URI=spiffe://acme.test/ns/web;"
        'URI="urn:x?role=admin;tier=1";'  # holds ';' and '=': quoted
        "DNS=a.example;"
        "DNS=b.example;"
        f'Cert="{quote(pem, safe="")}"'
    )
    assert xfcc(cert) == expected.encode("ascii")
    assert xfcc(cert) is xfcc(cert)  # cached per certificate: keep-alive requests reuse it


def test_xfcc_cert_is_envoy_url_encoded_pem(client_cert: x509.Certificate) -> None:
    value = xfcc(peer(client_cert)).decode("ascii")
    encoded = value.split('Cert="', 1)[1].split('"', 1)[0]
    assert set(encoded) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-%")
    from urllib.parse import unquote

    assert x509.load_pem_x509_certificate(unquote(encoded).encode("ascii")) == client_cert


@pytest.mark.parametrize(
    "common_name",
    ['say "hi"', "back\\slash", "ends with backslash\\", "Zoë", "line\r\nbreak", 'a";Hash=00;x="'],
)
def test_xfcc_subject_is_quoted_safely_and_round_trips(common_name: str) -> None:
    source = make_cert(name(O="Acme, Inc.", CN=common_name))
    cert = peer(source)
    value = xfcc(cert)
    through_h11(b"GET", [(b"host", b"example.com"), (b"x-forwarded-client-cert", value)])
    text = value.decode("ascii")
    assert text.count('"') == 4  # Cert="..." and Subject="...": nothing inside can end them
    subject = text.split('Subject="', 1)[1].split('"', 1)[0]
    assert x509.Name.from_rfc4514_string(subject) == source.subject


def test_xfcc_without_sans_has_only_hash_subject_cert() -> None:
    source = make_cert(name(CN="bare"))
    keys = [part.split("=", 1)[0] for part in xfcc(peer(source)).decode("ascii").split(";")]
    assert keys == ["Hash", "Subject", "Cert"]


def test_rfc9440_client_cert_decodes_to_the_der(client_cert: x509.Certificate) -> None:
    cert = peer(client_cert)
    out = upstream(BASE, ClientInfo("192.0.2.7", "example.com", cert))
    (value,) = all_named(out, b"client-cert")
    assert value.startswith(b":") and value.endswith(b":")
    assert base64.b64decode(value[1:-1], validate=True) == cert.der


def test_client_cert_chain_only_when_asked(
    client_cert: x509.Certificate, intermediates: tuple[bytes, bytes]
) -> None:
    cert = peer(client_cert, chain=intermediates)
    without = upstream(BASE, ClientInfo("192.0.2.7", "example.com", cert))
    assert all_named(without, b"client-cert-chain") == []
    with_chain = upstream(BASE, ClientInfo("192.0.2.7", "example.com", cert, forward_chain=True))
    (value,) = all_named(with_chain, b"client-cert-chain")
    items = value.split(b", ")
    assert [base64.b64decode(item[1:-1], validate=True) for item in items] == list(intermediates)
    assert all(item.startswith(b":") and item.endswith(b":") for item in items)
    empty_chain = upstream(BASE, ClientInfo("192.0.2.7", "example.com", peer(client_cert), forward_chain=True))
    assert all_named(empty_chain, b"client-cert-chain") == []


@pytest.mark.parametrize(
    ("verified", "error", "expected"),
    [
        (True, None, b"SUCCESS"),
        (False, "unable to get local issuer certificate", b"FAILED:unable to get local issuer certificate"),
        (False, None, b"FAILED:unknown"),
        (False, "bad\r\nInjected: 1", b"FAILED:bad??Injected: 1"),
        (False, "  ", b"FAILED:unknown"),
    ],
)
def test_client_cert_verified(
    client_cert: x509.Certificate, verified: bool, error: str | None, expected: bytes
) -> None:
    cert = peer(client_cert, verified=verified, verify_error=error)
    out = upstream(BASE, ClientInfo("192.0.2.7", "example.com", cert))
    assert all_named(out, b"x-client-cert-verified") == [expected]


def test_all_cert_headers_survive_a_real_h11_round_trip(
    client_cert: x509.Certificate, intermediates: tuple[bytes, bytes]
) -> None:
    cert = peer(client_cert, chain=intermediates, verified=False, verify_error="self-signed")
    out = upstream(BASE + [(b"content-length", b"2")], ClientInfo("::1", "example.com", cert, forward_chain=True))
    parsed = through_h11(b"POST", out, b"hi")
    assert list(parsed.headers) == [(n.lower(), v) for n, v in out]


# --- WebSocket upgrade ------------------------------------------------------------------------

UPGRADE_CASES: list[tuple[bytes, Headers, bool]] = [
    (b"GET", [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")], True),
    (b"GET", [(b"connection", b"keep-alive, Upgrade"), (b"upgrade", b"WebSocket")], True),
    (b"GET", [(b"connection", b"keep-alive"), (b"connection", b"upgrade"), (b"upgrade", b"websocket")], True),
    (b"GET", [(b"connection", b"upgrade"), (b"upgrade", b"h2c, websocket")], True),
    (b"POST", [(b"connection", b"upgrade"), (b"upgrade", b"websocket")], False),
    (b"GET", [(b"connection", b"keep-alive"), (b"upgrade", b"websocket")], False),
    (b"GET", [(b"connection", b"upgraded"), (b"upgrade", b"websocket")], False),
    (b"GET", [(b"connection", b"upgrade"), (b"upgrade", b"h2c")], False),
    (b"GET", [(b"connection", b"upgrade")], False),
    (b"GET", [(b"upgrade", b"websocket")], False),
]


@pytest.mark.parametrize(("method", "headers", "expected"), UPGRADE_CASES)
def test_upgrade_request_detection(method: bytes, headers: Headers, expected: bool) -> None:
    assert is_upgrade_request(method, BASE + headers) is expected


def test_upgrade_is_not_recognized_on_http_1_0() -> None:
    """RFC 9110 section 7.8: a server MUST ignore Upgrade received in an HTTP/1.0 request."""
    headers = BASE + [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    assert is_upgrade_request(b"GET", headers, b"1.1") and not is_upgrade_request(b"GET", headers, b"1.0")


def test_websocket_accept_rfc6455_example() -> None:
    assert websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_upgrade_request_headers() -> None:
    headers = BASE + [
        (b"connection", b"keep-alive, Upgrade"),
        (b"upgrade", b"WebSocket"),
        (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-protocol", b"chat"),
        (b"sec-websocket-extensions", b"permessage-deflate"),
        (b"Sec_WebSocket_Extensions", b"x-webkit-deflate-frame"),
    ]
    assert is_upgrade_request(b"GET", headers)
    out = upstream(headers, upgrade=True)
    assert out[:5] == BASE + [
        (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-protocol", b"chat"),
    ]
    assert all_named(out, b"connection") == [b"upgrade"]
    assert all_named(out, b"upgrade") == [b"websocket"]
    assert all_named(out, b"sec-websocket-extensions") == []


def test_upgrade_response_headers() -> None:
    headers: Headers = [
        (b"upgrade", b"WebSocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        (b"sec-websocket-extensions", b"permessage-deflate"),
        (b"sec-websocket-protocol", b"chat"),
    ]
    out = response_headers(headers, upgrade=True)
    assert out == [
        (b"sec-websocket-accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        (b"sec-websocket-protocol", b"chat"),
        (b"connection", b"upgrade"),
        (b"upgrade", b"websocket"),
    ]


def test_non_upgrade_drops_websocket_upgrade_headers_but_not_extensions() -> None:
    out = upstream(BASE + [(b"upgrade", b"websocket"), (b"sec-websocket-extensions", b"x")])
    assert all_named(out, b"upgrade") == []
    assert all_named(out, b"sec-websocket-extensions") == [b"x"]


def test_headers_is_the_h11_shape() -> None:
    request = through_h11(b"GET", BASE)
    out = upstream(list(request.headers))
    assert out[:2] == BASE
