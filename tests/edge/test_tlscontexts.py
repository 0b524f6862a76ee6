"""tlsconfig: certificate material is checked before anything binds, and contexts behave.

Certificates come from tests/pki.py; handshakes run over memory BIOs against real peers
(TlsEngine as the server for the upstream client context, stdlib ssl for the admin context).
"""

from __future__ import annotations

import ssl
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from nextproxy.config.model import (
    Address,
    CertificateConfig,
    ClientAuth,
    Config,
    PemSource,
    SniAction,
    SniRoute,
    UpstreamTls,
)
from nextproxy.config import from_toml
from nextproxy.core.tls import TlsEngine
from nextproxy.errors import ConfigError
from nextproxy.edge.tlscontexts import (
    LoadedCertificate,
    ServerContexts,
    admin_ssl_context,
    build_edge_context,
    load_certificate_info,
    upstream_ssl_context,
)
from tests.pki import DAY, Issued, TestPki, make_leaf, make_test_pki
from tests.tlspeer import TlsPeer, client_context, pump

NOW = datetime.now(timezone.utc)
LOOP = 50


@pytest.fixture(scope="module")
def tpki() -> TestPki:
    return make_test_pki()


def pair(issued: Issued, cert_origin: str = "CERT", key_origin: str = "KEY", key: Issued | None = None) -> CertificateConfig:
    return CertificateConfig(
        PemSource(issued.cert_pem, cert_origin), PemSource((key or issued).key_pem, key_origin)
    )


def config(*certificates: CertificateConfig, sni_routes: tuple[SniRoute, ...] = (), source: str = "test.toml") -> Config:
    return Config(
        listen=Address("127.0.0.1", 0),
        admin_listen=Address("127.0.0.1", 0),
        certificates=certificates,
        upstreams=(),
        routes=(),
        sni_routes=sni_routes,
        source=source,
    )


def handshake_subject(contexts: ServerContexts, server_name: str | None, tpki: TestPki) -> str:
    """Which certificate a real client is shown for this SNI."""
    context = client_context(None)
    peer = TlsPeer(context, server_name=server_name)
    engine = TlsEngine(contexts.select(None, server_name), peer.data_to_send(), now=NOW)
    result = pump(peer, engine)
    assert result.server_error is None and engine.handshake_complete
    der = peer.obj.getpeercert(binary_form=True)
    assert der is not None
    from cryptography import x509

    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


# ------------------------------------------------------------------ loading certificates


def test_inline_and_file_pem_load_the_same_certificate(tpki: TestPki, tmp_path: Path) -> None:
    files = tpki.write(tmp_path)
    cert_pem = tpki.server.cert_pem.decode()
    key_pem = tpki.server.key_pem.decode()
    (tmp_path / "inline.toml").write_text(
        f'listen = "127.0.0.1:0"\nadmin_listen = "127.0.0.1:0"\n'
        f"[[tls.certificates]]\ncertificate = '''{cert_pem}'''\nkey = '''{key_pem}'''\n"
    )
    (tmp_path / "files.toml").write_text(
        f'listen = "127.0.0.1:0"\nadmin_listen = "127.0.0.1:0"\n'
        f'[[tls.certificates]]\ncertificate_file = "{files["server.crt"]}"\nkey_file = "{files["server.key"]}"\n'
    )
    inline = ServerContexts.build(from_toml(str(tmp_path / "inline.toml"), env={})).certificates[0]
    from_files = ServerContexts.build(from_toml(str(tmp_path / "files.toml"), env={})).certificates[0]
    assert inline.origin == "tls.certificates[0].certificate"
    assert from_files.origin == "tls.certificates[0].certificate_file"
    for loaded in (inline, from_files):
        assert loaded.name == "localhost"
        assert loaded.sans == ("localhost", "example.com", "*.example.com")
        assert loaded.not_after == tpki.server.cert.not_valid_after_utc.timestamp()
        assert loaded.not_before == tpki.server.cert.not_valid_before_utc.timestamp()


def test_not_after_is_the_leaf_expiry_and_extra_chain_certs_are_kept(tpki: TestPki) -> None:
    leaf = make_leaf(tpki.intermediate, "chained.example.org", dns=("Chained.Example.org",))
    chained = CertificateConfig(
        PemSource(leaf.cert_pem + tpki.intermediate.cert_pem, "CHAIN"), PemSource(leaf.key_pem, "CHAIN_KEY")
    )
    loaded = load_certificate_info(chained)
    assert loaded.not_after == leaf.cert.not_valid_after_utc.timestamp()
    assert loaded.sans == ("chained.example.org",)  # lower-cased
    assert [c.subject for c in loaded.chain] == [leaf.cert.subject, tpki.intermediate.cert.subject]
    # A client trusting only the root verifies the chain: the intermediate is sent.
    contexts = ServerContexts.build(config(chained))
    peer = TlsPeer(client_context(tpki.ca), server_name="chained.example.org")
    engine = TlsEngine(contexts.select(None, "chained.example.org"), peer.data_to_send(), now=NOW)
    assert pump(peer, engine).server_error is None and peer.error is None and peer.handshake_done


def test_name_falls_back_to_the_common_name(tpki: TestPki) -> None:
    no_san = make_leaf(tpki.ca, "only-a-cn")
    loaded = load_certificate_info(pair(no_san), key_name="admin_tls")
    assert (loaded.name, loaded.sans, loaded.origin) == ("only-a-cn", (), "admin_tls")


def test_key_not_matching_the_certificate_names_the_key(tpki: TestPki) -> None:
    with pytest.raises(ConfigError) as info:
        ServerContexts.build(config(pair(tpki.server, "NEXTPROXY_TLS_CERTIFICATE", "NEXTPROXY_TLS_KEY_FILE", key=tpki.client)))
    assert info.value.key == "NEXTPROXY_TLS_KEY_FILE"
    assert "does not match" in info.value.reason and "NEXTPROXY_TLS_CERTIFICATE" in info.value.reason
    assert "\n" not in str(info.value)


def test_expired_edge_certificate_is_refused(tpki: TestPki) -> None:
    old = make_leaf(tpki.ca, "old.example.com", dns=("old.example.com",), not_before=NOW - 30 * DAY, not_after=NOW - DAY)
    with pytest.raises(ConfigError) as info:
        ServerContexts.build(config(pair(old, "tls.certificates[0].certificate")))
    assert info.value.key == "tls.certificates[0].certificate" and "expired" in info.value.reason
    # The same certificate was fine while valid: expiry is judged at `now`.
    assert load_certificate_info(pair(old), now=NOW - 2 * DAY).name == "old.example.com"


@pytest.mark.parametrize(
    ("cert_pem", "key_pem", "bad_key"),
    [
        (b"not a certificate", None, "CERT"),
        (b"", None, "CERT"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", None, "CERT"),
        (None, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "KEY"),
        (None, b"", "KEY"),
    ],
)
def test_unparsable_pem_names_its_origin(tpki: TestPki, cert_pem: bytes | None, key_pem: bytes | None, bad_key: str) -> None:
    bad = CertificateConfig(
        PemSource(tpki.server.cert_pem if cert_pem is None else cert_pem, "CERT"),
        PemSource(tpki.server.key_pem if key_pem is None else key_pem, "KEY"),
    )
    with pytest.raises(ConfigError) as info:
        load_certificate_info(bad)
    assert info.value.key == bad_key
    assert "\n" not in str(info.value)


def test_encrypted_key_is_refused_with_a_clear_reason(tpki: TestPki) -> None:
    encrypted = tpki.server.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(ConfigError) as info:
        load_certificate_info(CertificateConfig(PemSource(tpki.server.cert_pem, "CERT"), PemSource(encrypted, "KEY")))
    assert info.value.key == "KEY" and "encrypted" in info.value.reason


def test_client_ca_file_problems_name_the_route_key(tpki: TestPki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"nothing to see")
    for path in (str(tmp_path / "missing.pem"), str(garbage)):
        route = SniRoute("api", ("api.example.com",), SniAction.TERMINATE, None, ClientAuth.REQUIRE_CA, path)
        with pytest.raises(ConfigError) as info:
            ServerContexts.build(config(pair(tpki.server), sni_routes=(route,)))
        assert info.value.key == "sni_routes[0].client_ca_file" and path in info.value.reason
        with pytest.raises(ConfigError) as info:
            ServerContexts.build(config(pair(tpki.server), sni_routes=(route,), source="environment preset"))
        assert info.value.key == "NEXTPROXY_API_CLIENT_CA_FILE"


# ------------------------------------------------------------------ SNI selection


def test_sni_selects_among_certificates_including_wildcards(tpki: TestPki) -> None:
    first = make_leaf(tpki.ca, "first.example.org", dns=("first.example.org", "www.example.org"))
    second = make_leaf(tpki.ca, "example.com", dns=("example.com", "*.example.com"))
    contexts = ServerContexts.build(config(pair(first), pair(second)))
    assert [c.name for c in contexts.certificates] == ["first.example.org", "example.com"]
    expected = {
        "first.example.org": "CN=first.example.org",
        "www.example.org": "CN=first.example.org",
        "example.com": "CN=example.com",
        "api.example.com": "CN=example.com",  # wildcard: one label
        "a.b.example.com": "CN=first.example.org",  # two labels: no match, the default
        "unknown.test": "CN=first.example.org",
        None: "CN=first.example.org",
    }
    for name, subject in expected.items():
        assert handshake_subject(contexts, name, tpki) == subject, name


def test_client_auth_comes_from_the_route_and_contexts_are_cached(tpki: TestPki, tmp_path: Path) -> None:
    files = tpki.write(tmp_path)
    strict = SniRoute("strict", ("api.example.com",), SniAction.TERMINATE, None, ClientAuth.REQUIRE_CA, str(files["ca.crt"]))
    loose = SniRoute("loose", ("open.example.com",), SniAction.TERMINATE, None, ClientAuth.OPTIONAL)
    contexts = ServerContexts.build(config(pair(tpki.server), sni_routes=(strict, loose)))
    plain = contexts.select(None, "api.example.com")
    assert plain.client_auth is ClientAuth.NONE and plain.client_cas == ()
    ctx = contexts.select(strict, "api.example.com")
    assert ctx.client_auth is ClientAuth.REQUIRE_CA and ctx.client_cas == (tpki.ca.cert,)
    assert contexts.select(strict, "other.example.com") is ctx  # same certificate, same route
    assert contexts.select(loose, "open.example.com").client_auth is ClientAuth.OPTIONAL
    assert contexts.select(loose, "open.example.com") is not ctx
    # And the route's mode is really in force: no certificate, no handshake.
    peer = TlsPeer(client_context(tpki.ca), server_name="api.example.com")
    engine = TlsEngine(ctx, peer.data_to_send(), now=NOW)
    result = pump(peer, engine)
    assert result.server_error is not None and result.server_error.reason == "certificate_required"


def test_optional_sends_ca_names_in_the_certificate_request(tpki: TestPki) -> None:
    from OpenSSL import SSL

    loaded = load_certificate_info(pair(tpki.server))
    ctx = build_edge_context(loaded, ClientAuth.OPTIONAL, (tpki.ca.cert,))
    # A pyOpenSSL client can read the names the server asked for.
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    client.set_tlsext_host_name(b"localhost")
    engine = TlsEngine(ctx, b"", now=NOW)
    for _ in range(LOOP):
        try:
            client.do_handshake()
            break
        except SSL.WantReadError:
            pass
        engine.receive(client.bio_read(65536))
        client.bio_write(engine.data_to_send())
    names = client.get_client_ca_list()
    assert [n.CN for n in names] == ["nextproxy test CA"]


# ------------------------------------------------------------------ stdlib contexts


def test_upstream_context_verifies_the_server_from_its_ca(tpki: TestPki, tmp_path: Path) -> None:
    files = tpki.write(tmp_path)
    upstream = upstream_ssl_context(UpstreamTls(ca_file=str(files["ca.crt"])))
    assert upstream.minimum_version is ssl.TLSVersion.TLSv1_3
    assert upstream.verify_mode is ssl.CERT_REQUIRED and upstream.check_hostname

    good = build_edge_context(load_certificate_info(pair(tpki.server)))
    peer = TlsPeer(upstream, server_name="localhost")
    engine = TlsEngine(good, peer.data_to_send(), now=NOW)
    assert pump(peer, engine).server_error is None
    assert peer.error is None and peer.handshake_done and peer.alpn == "http/1.1"

    wrong_name = TlsPeer(upstream, server_name="not-in-the-certificate.test")
    pump(wrong_name, TlsEngine(good, wrong_name.data_to_send(), now=NOW))
    assert isinstance(wrong_name.error, ssl.SSLCertVerificationError)

    foreign = build_edge_context(load_certificate_info(pair(tpki.other_server)))
    other = TlsPeer(upstream, server_name="localhost")
    result = pump(other, TlsEngine(foreign, other.data_to_send(), now=NOW))
    assert isinstance(other.error, ssl.SSLCertVerificationError)
    assert other.error.verify_message == "unable to get local issuer certificate"
    assert result.server_error is not None and result.server_error.reason == "client_alert"


def test_upstream_context_presents_the_client_certificate(tpki: TestPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pki").mkdir()
    files = tpki.write(tmp_path / "pki")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    tls = UpstreamTls(ca_file=str(files["ca.crt"]), client_certificate=pair(tpki.client, "UP_CERT", "UP_KEY"))
    upstream = upstream_ssl_context(tls)
    assert list(scratch.iterdir()) == []  # the temporary key file is gone
    server = build_edge_context(load_certificate_info(pair(tpki.server)), ClientAuth.REQUIRE_CA, (tpki.ca.cert,))
    peer = TlsPeer(upstream, server_name="localhost")
    engine = TlsEngine(server, peer.data_to_send(), now=NOW)
    assert pump(peer, engine).server_error is None
    assert engine.peer_certificate is not None and engine.peer_certificate.der == tpki.client.der
    assert engine.peer_certificate.verified

    with pytest.raises(ConfigError) as info:
        upstream_ssl_context(UpstreamTls(client_certificate=pair(tpki.client, "UP_CERT", "UP_KEY", key=tpki.server)))
    assert info.value.key == "UP_KEY"
    with pytest.raises(ConfigError) as info:
        upstream_ssl_context(UpstreamTls(ca_file=str(tmp_path / "absent.pem")))
    assert info.value.key == "upstream_tls.ca_file"


def test_upstream_context_without_ca_file_uses_the_system_store() -> None:
    context = upstream_ssl_context(UpstreamTls())
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version is ssl.TLSVersion.TLSv1_3


def test_admin_context_serves_tls13_with_its_certificate(tpki: TestPki) -> None:
    admin = admin_ssl_context(pair(tpki.server))
    assert admin.minimum_version is ssl.TLSVersion.TLSv1_3
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = admin.wrap_bio(s_in, s_out, server_side=True)
    peer = TlsPeer(client_context(tpki.ca), server_name="localhost")
    for _ in range(LOOP):
        s_in.write(peer.data_to_send())
        try:
            server.do_handshake()
        except ssl.SSLWantReadError:
            pass
        out = s_out.read()
        if not out:
            break
        peer.feed(out)
    assert peer.handshake_done and peer.error is None
    assert server.version() == "TLSv1.3"

    old_client = TlsPeer(client_context(tpki.ca, tls12_only=True))
    s_in2, s_out2 = ssl.MemoryBIO(), ssl.MemoryBIO()
    server2 = admin.wrap_bio(s_in2, s_out2, server_side=True)
    s_in2.write(old_client.data_to_send())
    with pytest.raises(ssl.SSLError):
        server2.do_handshake()

    with pytest.raises(ConfigError) as info:
        admin_ssl_context(pair(tpki.server, key_origin="NEXTPROXY_ADMIN_TLS_KEY", key=tpki.client))
    assert info.value.key == "NEXTPROXY_ADMIN_TLS_KEY"


def test_loaded_certificate_matching_rules() -> None:
    loaded = LoadedCertificate("x", ("example.com", "*.example.com"), 0.0, "o")
    assert loaded.matches("example.com") and loaded.matches("a.example.com")
    assert not loaded.matches("a.b.example.com") and not loaded.matches("example.org")
    assert not loaded.matches(".example.com") and not loaded.matches("com")
