"""TlsEngine against real TLS clients over memory BIOs: no sockets, no event loop, no mocks.

The peers are the stdlib ``ssl`` client (OpenSSL 3.0 of the base image) and a pyOpenSSL client
(OpenSSL 4 from cryptography); contexts come from ``nextproxy.edge.tlscontexts`` so the tests exercise
the settings production uses.
"""

from __future__ import annotations

import hashlib
import random
import ssl
from datetime import datetime, timedelta, timezone

import pytest

from nextproxy.config.model import CertificateConfig, ClientAuth, PemSource
from nextproxy.core import tls as tls_module
from nextproxy.core.handshake import openssl_failure_reason as error_reason
from nextproxy.core.tls import TlsEngine, TlsServerContext, describe_certificate
from nextproxy.errors import TlsError
from nextproxy.edge.tlscontexts import LoadedCertificate, build_edge_context, load_certificate_info
from tests.pki import Issued, TestPki, make_test_pki
from tests.tlspeer import OpenSSLPeer, TlsPeer, client_context, pump

NOW = datetime.now(timezone.utc)
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def tpki() -> TestPki:
    return make_test_pki()


@pytest.fixture(scope="module")
def server_cert(tpki: TestPki) -> LoadedCertificate:
    pair = CertificateConfig(PemSource(tpki.server.cert_pem, "CERT"), PemSource(tpki.server.key_pem, "KEY"))
    return load_certificate_info(pair)


def context(cert: LoadedCertificate, mode: ClientAuth = ClientAuth.NONE, cas: tuple[Issued, ...] = ()) -> TlsServerContext:
    return build_edge_context(cert, mode, tuple(c.cert for c in cas), "test")


def connect(ctx: TlsServerContext, peer: TlsPeer | OpenSSLPeer, now: datetime | None = NOW) -> TlsEngine:
    """Start the engine from the client's first flight, as the shell does, then finish the handshake."""
    engine = TlsEngine(ctx, peer.data_to_send(), now=now)
    result = pump(peer, engine)
    assert result.server_error is None, result.server_error
    return engine


# ------------------------------------------------------------------ handshake basics


def test_handshake_chooses_http11_from_h2_and_http11(tpki: TestPki, server_cert: LoadedCertificate) -> None:
    peer = TlsPeer(client_context(tpki.ca, alpn=("h2", "http/1.1")))
    engine = connect(context(server_cert), peer)
    assert engine.handshake_complete and peer.handshake_done and peer.error is None
    assert engine.alpn == b"http/1.1" and peer.alpn == "http/1.1"
    assert engine.server_name == "localhost"
    assert engine.tls_version == "TLSv1.3"
    assert engine.group  # whatever both sides share; the stdlib's OpenSSL 3.0 has no ML-KEM
    assert engine.peer_certificate is None  # no CertificateRequest without client auth
    # The client verified our chain against the CA with host name checking on.
    seen = peer.obj.getpeercert()
    assert seen is not None and seen["subject"] == ((("commonName", "localhost"),),)


def test_no_alpn_offered_is_served_as_http11(tpki: TestPki, server_cert: LoadedCertificate) -> None:
    peer = TlsPeer(client_context(tpki.ca, alpn=()))
    engine = connect(context(server_cert), peer)
    assert engine.handshake_complete
    assert engine.alpn is None and peer.alpn is None


@pytest.mark.parametrize("offered", [("h2",), ("h2", "h3", "spdy/3.1")])
def test_alpn_without_http11_gets_no_application_protocol(tpki: TestPki, server_cert: LoadedCertificate, offered: tuple[str, ...]) -> None:
    # RFC 7301 3.2: an HTTP/2-only client is told so, instead of a 400 it cannot read.
    peer = TlsPeer(client_context(tpki.ca, alpn=offered))
    engine = TlsEngine(context(server_cert), b"", now=NOW)
    with pytest.raises(TlsError) as info:
        engine.receive(peer.data_to_send())
    assert info.value.reason == "no_application_protocol" and info.value.alert_sent
    assert info.value.detail == f"NoApplicationProtocol: ALPN offers {b', '.join(n.encode() for n in offered)!r}, not http/1.1"
    assert not tls_module._ALPN_REFUSALS  # the refusal's words went with the failure
    out = engine.data_to_send()
    assert out == b"\x15\x03\x03\x00\x02\x02\x78", out.hex()
    peer.feed(out)
    assert isinstance(peer.error, ssl.SSLError) and "no application protocol" in str(peer.error)
    # The same context keeps serving the next client (the refusal left nothing behind in it).
    assert connect(context(server_cert), TlsPeer(client_context(tpki.ca))).alpn == b"http/1.1"


def test_end_of_stream_mid_handshake_gets_openssls_decode_error(tpki: TestPki, server_cert: LoadedCertificate) -> None:
    hello = TlsPeer(client_context(tpki.ca)).data_to_send()
    engine = TlsEngine(context(server_cert), hello[:50], now=NOW)
    assert engine.error is None and engine.data_to_send() == b""
    with pytest.raises(TlsError) as info:
        engine.end_of_stream()
    assert info.value.alert_sent and engine.data_to_send() == b"\x15\x03\x03\x00\x02\x02\x32"
    assert engine.end_of_stream() == b""  # raised once; inert afterwards
    # After the handshake it is only receive(b""): plaintext so far, no error.
    peer = TlsPeer(client_context(tpki.ca))
    done = connect(context(server_cert), peer)
    assert done.end_of_stream() == b"" and done.error is None


def test_tls12_only_client_gets_protocol_version_alert(tpki: TestPki, server_cert: LoadedCertificate) -> None:
    peer = TlsPeer(client_context(tpki.ca, tls12_only=True))
    engine = TlsEngine(context(server_cert), b"", now=NOW)
    with pytest.raises(TlsError) as info:
        engine.receive(peer.data_to_send())
    assert info.value.reason == "protocol_version" and info.value.alert_sent
    out = engine.data_to_send()
    # A plaintext alert record: type 21, a legacy version, length 2, fatal(2), protocol_version(70).
    assert out[0] == 0x15 and out[3:] == b"\x00\x02\x02\x46", out.hex()
    peer.feed(out)
    assert isinstance(peer.error, ssl.SSLError) and peer.error.reason == "TLSV1_ALERT_PROTOCOL_VERSION"



def test_constructor_keeps_the_failure_and_the_alert(tpki: TestPki, server_cert: LoadedCertificate) -> None:
    # The shell's path: the ClientHello already read goes to the constructor. Raising there would
    # lose the engine and the alert in it, so the failure is kept in ``error`` instead.
    peer = TlsPeer(client_context(tpki.ca, tls12_only=True))
    engine = TlsEngine(context(server_cert), peer.data_to_send(), now=NOW)
    assert engine.error is not None
    assert engine.error.reason == "protocol_version" and engine.error.alert_sent
    out = engine.data_to_send()
    assert out[0] == 0x15 and out.endswith(b"\x02\x46")
    with pytest.raises(TlsError) as info:  # surfaced by the next call, EOF included
        engine.receive(b"")
    assert info.value is engine.error
    # Raised once: bytes arriving while the shell lingers to deliver the alert are ignored.
    assert engine.receive(b"\x16\x03\x03") == b"" and engine.receive(b"") == b""
    assert not engine.handshake_complete and engine.data_to_send() == b""


def test_post_quantum_hybrid_group_is_negotiated(server_cert: LoadedCertificate) -> None:
    peer = OpenSSLPeer(server_name="localhost", alpn=(b"h2", b"http/1.1"))
    engine = connect(context(server_cert), peer)
    assert engine.group == "X25519MLKEM768"
    assert peer.conn.get_group_name() == "X25519MLKEM768"
    assert engine.alpn == b"http/1.1"


def test_session_tickets_are_queued_right_after_the_handshake(tpki: TestPki, server_cert: LoadedCertificate) -> None:
    ctx = context(server_cert)
    cctx = client_context(tpki.ca)
    peer = TlsPeer(cctx)
    engine = TlsEngine(ctx, peer.data_to_send(), now=NOW)
    peer.feed(engine.data_to_send())  # ServerHello .. Finished
    assert peer.handshake_done
    assert engine.receive(peer.data_to_send()) == b""  # the client's Finished
    assert engine.handshake_complete
    tickets = engine.data_to_send()
    assert tickets and tickets[0] == 0x17  # NewSessionTicket records, before any reply
    peer.feed(tickets)
    assert peer.obj.session is not None and peer.obj.session.has_ticket
    # The ticket resumes against the context that issued it.
    again = TlsPeer(cctx, session=peer.obj.session)
    connect(ctx, again)
    assert again.obj.session_reused


def test_client_auth_contexts_never_resume(tpki: TestPki, server_cert: LoadedCertificate) -> None:
    ctx = context(server_cert, ClientAuth.OPTIONAL, (tpki.ca,))
    cctx = client_context(tpki.ca, cert=tpki.client_via_intermediate, chain=(tpki.intermediate,))
    first = TlsPeer(cctx)
    connect(ctx, first)  # pumps until idle: whatever ticket the server sends has arrived
    assert first.obj.session is not None
    second = TlsPeer(cctx, session=first.obj.session)
    engine = connect(ctx, second)
    assert not second.obj.session_reused
    # Identity survives because the second handshake was a full one, chain included.
    assert engine.peer_certificate is not None and engine.peer_certificate.verified
    assert engine.peer_certificate.chain == (tpki.intermediate.der,)


# ------------------------------------------------------------------ application data


def test_application_data_both_ways_including_one_mebibyte(tpki: TestPki, server_cert: LoadedCertificate) -> None:
    peer = TlsPeer(client_context(tpki.ca))
    engine = connect(context(server_cert), peer)
    peer.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert pump(peer, engine).server_plaintext == b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    engine.send(b"HTTP/1.1 204 No Content\r\n\r\n")
    pump(peer, engine)
    assert bytes(peer.received) == b"HTTP/1.1 204 No Content\r\n\r\n"

    big = random.Random(7).randbytes(MiB)
    peer.send(big)
    assert pump(peer, engine).server_plaintext == big
    engine.send(big)
    out = engine.data_to_send()
    assert len(out) > MiB  # all records queued by one send(): the loop took everything
    peer.received.clear()
    peer.feed(out)
    assert bytes(peer.received) == big


@pytest.mark.parametrize("mode", [ClientAuth.NONE, ClientAuth.OPTIONAL])
def test_connections_skip_pyopenssls_callback_map_unless_a_callback_needs_it(
    tpki: TestPki, server_cert: LoadedCertificate, mode: ClientAuth
) -> None:
    """Without client auth no pyOpenSSL callback runs (ALPN is OpenSSL's callback), so the engine
    makes its connection without pyOpenSSL's constructor, which enters every connection in a
    class-wide weak map; a verifying context's verify callback needs that map. Either way the
    connection serves, ALPN included, and is freed with its engine."""
    from OpenSSL import SSL

    assert tls_module._BARE_OK, "pyOpenSSL's Connection constructor changed: review _bare_connection"
    server = context(server_cert, mode, (tpki.ca,) if mode is not ClientAuth.NONE else ())
    before = len(SSL.Connection._reverse_mapping)
    peer = TlsPeer(client_context(tpki.ca, alpn=("h2", "http/1.1")))
    engine = connect(server, peer)
    mapped = len(SSL.Connection._reverse_mapping) - before
    assert mapped == (0 if mode is ClientAuth.NONE else 1)
    assert isinstance(engine._conn, SSL.Connection)
    assert engine.alpn == b"http/1.1" and engine.server_name == "localhost" and engine.tls_version == "TLSv1.3"
    peer.send(b"ping")
    assert pump(peer, engine).server_plaintext == b"ping"
    engine.close()
    peer.feed(engine.data_to_send())
    assert peer.peer_closed  # our close_notify
    del engine
    assert len(SSL.Connection._reverse_mapping) == before


@pytest.mark.parametrize("direct", [True, False], ids=["direct-openssl-calls", "pyopenssl-methods"])
def test_both_data_paths_agree_on_data_close_and_failure(
    tpki: TestPki, server_cert: LoadedCertificate, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """Application data goes through OpenSSL's calls directly when pyOpenSSL exposes them, else
    through pyOpenSSL's methods: both must give the same bytes, close and failure."""
    if not direct:
        monkeypatch.setattr(tls_module, "_DIRECT_OK", False)
    peer = TlsPeer(client_context(tpki.ca))
    engine = connect(context(server_cert), peer)
    assert (engine._direct is not None) is direct  # the path under test is the one taken
    big = random.Random(11).randbytes(300_000)
    peer.send(big)
    records = peer.data_to_send()
    # Fed as the shell feeds it: memoryviews of a reused read buffer, cut anywhere.
    plaintext, scratch = [], bytearray(70_000)
    for start in range(0, len(records), 65_000):
        piece = records[start : start + 65_000]
        scratch[: len(piece)] = piece
        plaintext.append(engine.receive(memoryview(scratch)[: len(piece)]))
    assert b"".join(plaintext) == big
    engine.send(memoryview(big)[1:])
    engine.send(b"")  # nothing to seal: no record, no error
    peer.feed(engine.data_to_send())
    assert bytes(peer.received) == big[1:]
    # A forged application-data record after the handshake: bad_record_mac, raised once, alerted.
    with pytest.raises(TlsError) as failure:
        engine.receive(b"\x17\x03\x03\x00\x20" + bytes(32))
    assert failure.value.alert_sent and "bad record mac" in failure.value.detail.lower()
    assert engine.receive(b"\x17\x03\x03\x00\x01\x00") == b""  # inert afterwards
    assert engine.data_to_send()  # the alert


def test_client_close_notify_both_paths_after_data(tpki: TestPki, server_cert: LoadedCertificate, monkeypatch: pytest.MonkeyPatch) -> None:
    for direct in (True, False):
        monkeypatch.setattr(tls_module, "_DIRECT_OK", direct)
        peer = TlsPeer(client_context(tpki.ca))
        engine = connect(context(server_cert), peer)
        peer.send(b"last words")
        peer.close()
        assert pump(peer, engine).server_plaintext == b"last words" and engine.peer_closed, direct


def test_ciphertext_fed_one_byte_at_a_time(tpki: TestPki, server_cert: LoadedCertificate) -> None:
    peer = TlsPeer(client_context(tpki.ca, cert=tpki.client))
    engine = TlsEngine(context(server_cert, ClientAuth.REQUIRE_CA, (tpki.ca,)), b"", now=NOW)
    assert engine.data_to_send() == b""
    result = pump(peer, engine, chunk=1)
    assert result.server_error is None and engine.handshake_complete
    assert engine.peer_certificate is not None and engine.peer_certificate.verified
    peer.send(b"hello, one byte at a time")
    assert pump(peer, engine, chunk=1).server_plaintext == b"hello, one byte at a time"


def test_receive_of_nothing_is_a_no_op(tpki: TestPki, server_cert: LoadedCertificate) -> None:
    peer = TlsPeer(client_context(tpki.ca))
    engine = TlsEngine(context(server_cert), b"", now=NOW)
    assert engine.receive(b"") == b"" and not engine.handshake_complete
    connect_rest = pump(peer, engine)
    assert connect_rest.server_error is None and engine.handshake_complete
    assert engine.receive(b"") == b""


# ------------------------------------------------------------------ closing


def test_client_close_notify_is_seen_and_answered(tpki: TestPki, server_cert: LoadedCertificate) -> None:
    peer = TlsPeer(client_context(tpki.ca))
    engine = connect(context(server_cert), peer)
    peer.send(b"last words")
    peer.close()
    result = pump(peer, engine)
    assert result.server_plaintext == b"last words"
    assert engine.peer_closed
    assert engine.receive(b"") == b""  # reads return nothing from now on, without raising
    engine.close()
    out = engine.data_to_send()
    assert out  # our close_notify
    peer.feed(out)
    assert peer.peer_closed and peer.error is None
    engine.close()  # idempotent
    assert engine.data_to_send() == b""


def test_server_close_notify_reaches_the_client(tpki: TestPki, server_cert: LoadedCertificate) -> None:
    peer = TlsPeer(client_context(tpki.ca))
    engine = connect(context(server_cert), peer)
    engine.send(b"bye")
    engine.close()
    peer.feed(engine.data_to_send())
    assert bytes(peer.received) == b"bye" and peer.peer_closed
    with pytest.raises(TlsError):
        engine.send(b"too late")
    peer.close()
    pump(peer, engine)
    assert engine.peer_closed


# ------------------------------------------------------------------ client authentication matrix

# (mode, client certificate) -> None when the handshake succeeds, else (reason, client-side alert)
MATRIX: dict[tuple[ClientAuth, str], tuple[str, str] | None] = {
    (ClientAuth.NONE, "none"): None,
    (ClientAuth.NONE, "client"): None,
    (ClientAuth.NONE, "unknown_client"): None,
    (ClientAuth.NONE, "expired_client"): None,
    (ClientAuth.OPTIONAL, "none"): None,
    (ClientAuth.OPTIONAL, "client"): None,
    (ClientAuth.OPTIONAL, "unknown_client"): None,
    (ClientAuth.OPTIONAL, "expired_client"): None,
    (ClientAuth.REQUIRE_ANY, "none"): ("certificate_required", "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
    (ClientAuth.REQUIRE_ANY, "client"): None,
    (ClientAuth.REQUIRE_ANY, "unknown_client"): None,
    (ClientAuth.REQUIRE_ANY, "expired_client"): None,
    (ClientAuth.REQUIRE_CA, "none"): ("certificate_required", "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
    (ClientAuth.REQUIRE_CA, "client"): None,
    (ClientAuth.REQUIRE_CA, "unknown_client"): ("unknown_ca", "TLSV1_ALERT_UNKNOWN_CA"),
    (ClientAuth.REQUIRE_CA, "expired_client"): ("certificate_expired", "SSLV3_ALERT_CERTIFICATE_EXPIRED"),
}
# What PeerCertificate says when the handshake succeeds with a certificate: (verified, verify_error).
VERDICT = {"client": (True, None), "unknown_client": (False, "unknown_ca"), "expired_client": (False, "expired")}


@pytest.mark.parametrize(("mode", "who"), list(MATRIX))
def test_client_auth_matrix(tpki: TestPki, server_cert: LoadedCertificate, mode: ClientAuth, who: str) -> None:
    issued: Issued | None = None if who == "none" else getattr(tpki, who)
    peer = TlsPeer(client_context(tpki.ca, cert=issued))
    engine = TlsEngine(context(server_cert, mode, (tpki.ca,)), peer.data_to_send(), now=NOW)
    result = pump(peer, engine)
    expected = MATRIX[(mode, who)]
    if expected is not None:
        reason, client_alert = expected
        assert result.server_error is not None and result.server_error.reason == reason
        assert result.server_error.alert_sent
        assert not engine.handshake_complete
        assert isinstance(peer.error, ssl.SSLError) and peer.error.reason == client_alert
        return
    assert result.server_error is None and peer.error is None and engine.handshake_complete
    cert = engine.peer_certificate
    if mode is ClientAuth.NONE or issued is None:
        assert cert is None
        return
    assert cert is not None
    assert cert.der == issued.der
    assert cert.sha256 == hashlib.sha256(cert.der).hexdigest() == issued.sha256
    assert cert.spki_sha256 == issued.spki_sha256
    assert (cert.verified, cert.verify_error) == VERDICT[who]
    assert cert.subject == issued.cert.subject.rfc4514_string()
    assert cert.common_name == issued.cert.subject.rfc4514_string().removeprefix("CN=")


def test_peer_certificate_names_and_chain(tpki: TestPki, server_cert: LoadedCertificate) -> None:
    peer = TlsPeer(client_context(tpki.ca, cert=tpki.client))
    engine = connect(context(server_cert, ClientAuth.REQUIRE_CA, (tpki.ca,)), peer)
    cert = engine.peer_certificate
    assert cert is not None
    assert cert.dns_names == ("client.example.net",) and cert.uris == ("spiffe://test/client",)
    # The leaf is never in the chain (OpenSSL's server-side get_peer_cert_chain leaves it out).
    assert cert.der not in cert.chain

    peer = TlsPeer(client_context(tpki.ca, cert=tpki.client_via_intermediate, chain=(tpki.intermediate,)))
    engine = connect(context(server_cert, ClientAuth.REQUIRE_CA, (tpki.ca,)), peer)
    cert = engine.peer_certificate
    assert cert is not None and cert.verified
    assert cert.chain == (tpki.intermediate.der,)
    assert cert.dns_names == ("two.example.net",) and cert.uris == ()


@pytest.mark.parametrize(
    ("now", "cas", "verdict"),
    [
        (NOW - timedelta(days=2), ("ca",), "not_yet_valid"),  # time is an input: the shell's clock
        (NOW + timedelta(days=400), ("ca",), "expired"),
        (NOW, (), "no_ca_configured"),
        (NOW, ("other_ca",), "unknown_ca"),
        (None, ("ca",), "no_verification_time"),
    ],
)
def test_verdict_depends_on_time_and_configured_cas(
    tpki: TestPki, server_cert: LoadedCertificate, now: datetime | None, cas: tuple[str, ...], verdict: str
) -> None:
    ctx = context(server_cert, ClientAuth.OPTIONAL, tuple(getattr(tpki, name) for name in cas))
    engine = connect(ctx, TlsPeer(client_context(tpki.ca, cert=tpki.client)), now=now)
    assert engine.peer_certificate is not None
    assert engine.peer_certificate.verified is False
    assert engine.peer_certificate.verify_error == verdict


def test_client_certificate_without_san_verifies(tpki: TestPki, server_cert: LoadedCertificate) -> None:
    from tests.pki import make_leaf

    cn_only = make_leaf(tpki.ca, "cn only", client=True)
    engine = connect(context(server_cert, ClientAuth.OPTIONAL, (tpki.ca,)), TlsPeer(client_context(tpki.ca, cert=cn_only)))
    cert = engine.peer_certificate
    assert cert is not None and cert.verified and cert.dns_names == () and cert.common_name == "cn only"


# ------------------------------------------------------------------ failures


def test_client_rejecting_our_certificate_is_not_a_bad_client_cert(tpki: TestPki, server_cert: LoadedCertificate) -> None:
    peer = TlsPeer(client_context(tpki.other_ca))
    engine = TlsEngine(context(server_cert), peer.data_to_send(), now=NOW)
    result = pump(peer, engine)
    assert isinstance(peer.error, ssl.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(peer.error)
    assert result.server_error is not None
    assert result.server_error.reason == "client_alert" and not result.server_error.alert_sent
    assert "unknown ca" in str(result.server_error)


def test_garbage_raises_tls_error_only(server_cert: LoadedCertificate) -> None:
    engine = TlsEngine(context(server_cert), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", now=NOW)
    assert engine.error is not None and engine.error.reason == "other"
    engine = TlsEngine(context(server_cert), b"", now=NOW)
    with pytest.raises(TlsError):
        engine.send(b"before the handshake")
    engine.close()  # nothing to close yet; must not raise
    for junk in (b"\x16\x03\x01\x00\x05hello", b"\x00" * 64):
        engine = TlsEngine(context(server_cert), b"", now=NOW)
        with pytest.raises(TlsError):
            engine.receive(junk)
        assert engine.error is not None
        # Raised once; afterwards inert, never another exception type.
        assert engine.receive(b"\x16\x03\x03\x00\x01\x01") == b""
        assert isinstance(engine.data_to_send(), bytes)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[('SSL routines', '', 'unsupported protocol')]", "protocol_version"),
        ("wrong version number", "protocol_version"),
        ("tlsv1 alert protocol version", "protocol_version"),
        ("peer did not return a certificate", "certificate_required"),
        ("certificate verify failed", "bad_certificate"),
        ("tlsv1 alert unknown ca", "client_alert"),  # the client refused *our* certificate
        ("no suitable key share", "no_shared_group"),
        ("no shared cipher", "no_shared_cipher"),
        ("bad record type", "other"),
    ],
)
def test_error_reason_mapping(text: str, reason: str) -> None:
    assert error_reason(text) == reason


def test_unparsable_certificate_is_reported_unverified(tpki: TestPki, server_cert: LoadedCertificate) -> None:
    # OpenSSL accepts some encodings cryptography refuses; the certificate must still be
    # reported (never verified) instead of vanishing.
    ctx = context(server_cert, ClientAuth.OPTIONAL, (tpki.ca,))
    cert = describe_certificate(b"\x30\x03\x02\x01\x00", (), ctx, NOW)
    assert (cert.verified, cert.verify_error) == (False, "unparsable")
    assert cert.sha256 == hashlib.sha256(b"\x30\x03\x02\x01\x00").hexdigest()
    good = describe_certificate(tpki.client.der, (), ctx, NOW)
    assert good.verified and good.spki_sha256 == tpki.client.spki_sha256


def test_a_self_signed_client_certificate_is_named_as_such() -> None:
    """`openssl req -x509` makes a self-signed certificate with CA:TRUE, which the end-entity
    policy refuses before any chain is sought: named self_signed (nginx's reason), not the
    catch-all "invalid"."""
    from cryptography import x509
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    from nextproxy.core import peercert
    from nextproxy.demo.pki import make_ca

    trusted, stranger = make_ca("trusted"), make_ca("self-signed client")
    leaf = x509.load_pem_x509_certificate(stranger.cert_pem)
    verifier = (
        PolicyBuilder().store(Store([x509.load_pem_x509_certificate(trusted.cert_pem)])).time(NOW)
        .extension_policies(ca_policy=peercert._CA_POLICY, ee_policy=peercert._EE_POLICY).build_client_verifier()
    )  # fmt: skip
    with pytest.raises(VerificationError) as failure:
        verifier.verify(leaf, [])
    assert peercert._verify_error(str(failure.value), leaf, NOW) == "self_signed"
