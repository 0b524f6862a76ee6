"""TLS contexts: the edge contexts (pyOpenSSL, one per certificate and SNI route), the upstream
client context and the admin server context (standard library ``ssl``).

Everything that can be wrong with certificate material is found here, before anything binds:
unparsable PEM, a key that does not match its certificate, an expired certificate, an unreadable
or empty CA file. Each becomes a one-line ``ConfigError`` naming the variable or key that
supplied the material. The edge context is chosen per SNI *before* the handshake, so the
client-auth mode travels with the certificate instead of being patched in a callback.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Union

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from nextproxy.config.model import CertificateConfig, ClientAuth, Config, SniAction, SniRoute, UpstreamTls
from nextproxy.core.tls import ALPN_HTTP1, TlsServerContext, note_verify_error, serve_http1_only
from nextproxy.edge.resumption import ResumingContext
from nextproxy.errors import ConfigError

__all__ = [
    "LoadedCertificate", "ServerContexts", "admin_ssl_context", "load_certificate_info",
    "upstream_ssl_context",
]  # fmt: skip

# The key types that can sign a TLS 1.3 CertificateVerify (RFC 8446 section 4.2.3).
ServerKey = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey]
_SERVER_KEY_TYPES = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)

# OpenSSL refuses to resume a session on a verifying server without a session id context
# ("session id context uninitialized"); resumption is off there anyway, this keeps it an
# ordinary full handshake if a client offers an old session.
SESSION_ID_CONTEXT = b"nextproxy-client-auth"


@dataclass(frozen=True, slots=True)
class LoadedCertificate:
    """A parsed, validated certificate/key pair: what the admin page, metrics and SNI need."""

    name: str
    """First DNS SAN, else the subject CN, else the origin."""
    sans: tuple[str, ...]
    """DNS names, lower-case; wildcards kept as ``*.example.com``."""
    not_after: float
    """Expiry as a unix timestamp."""
    origin: str
    """The variable or key that supplied the certificate."""
    not_before: float = 0.0
    chain: tuple[x509.Certificate, ...] = field(default=(), repr=False)
    """Leaf first, then the extra certificates from the same PEM, in file order."""
    key: ServerKey | None = field(default=None, repr=False)

    def matches(self, server_name: str) -> bool:
        """Exact SAN, or a wildcard SAN standing for exactly one left-most label."""
        if server_name in self.sans:
            return True
        label, dot, parent = server_name.partition(".")
        return bool(label and dot and parent) and f"*.{parent}" in self.sans


def load_certificate_info(cert: CertificateConfig, key_name: str = "", now: datetime | None = None) -> LoadedCertificate:
    """Parse and check one certificate/key pair; ``key_name`` overrides the reported origin.

    Raises ConfigError naming ``cert.certificate.origin`` (bad PEM, empty, expired) or
    ``cert.key.origin`` (bad key, key not matching the certificate).
    """
    cert_key = cert.certificate.origin
    try:
        chain = tuple(x509.load_pem_x509_certificates(cert.certificate.pem))
    except ValueError as exc:
        raise ConfigError(cert_key, f"not a PEM certificate chain ({_first_line(exc)})") from None
    if not chain:
        raise ConfigError(cert_key, "contains no certificate")
    key = _load_key(cert)
    leaf = chain[0]
    try:
        leaf_spki = _spki(leaf.public_key())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(cert_key, f"unusable public key ({_first_line(exc)})") from None
    if leaf_spki != _spki(key.public_key()):
        raise ConfigError(cert.key.origin, f"does not match the certificate in {cert_key}")
    moment = now or datetime.now(timezone.utc)
    if leaf.not_valid_after_utc <= moment:
        raise ConfigError(cert_key, f"certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    sans = _dns_names(leaf, cert_key)
    common_names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = common_names[0].value if common_names else None
    name = sans[0] if sans else cn if isinstance(cn, str) and cn else key_name or cert_key
    return LoadedCertificate(
        name=name,
        sans=sans,
        not_after=leaf.not_valid_after_utc.timestamp(),
        origin=key_name or cert_key,
        not_before=leaf.not_valid_before_utc.timestamp(),
        chain=chain,
        key=key,
    )


def _load_key(cert: CertificateConfig) -> ServerKey:
    try:
        key = serialization.load_pem_private_key(cert.key.pem, password=None)
    except TypeError:
        raise ConfigError(cert.key.origin, "the private key is encrypted; give it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(cert.key.origin, f"not a PEM private key ({_first_line(exc)})") from None
    if not isinstance(key, _SERVER_KEY_TYPES):
        raise ConfigError(cert.key.origin, f"cannot sign TLS handshakes with a {type(key).__name__}")
    return key


def _dns_names(leaf: x509.Certificate, origin: str) -> tuple[str, ...]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    except ValueError as exc:
        raise ConfigError(origin, f"unreadable certificate extensions ({_first_line(exc)})") from None
    return tuple(name.lower().rstrip(".") for name in san.get_values_for_type(x509.DNSName))


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _first_line(exc: BaseException) -> str:
    """A short reason: cryptography's messages carry a FAQ link and Rust debug output."""
    text = str(exc).strip().split(" See https://", 1)[0]
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


def load_ca_file(key: str, path: str) -> tuple[x509.Certificate, ...]:
    """Every certificate in a PEM CA bundle; an unreadable, unparsable or empty file is a ConfigError."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path!r}: {exc.strerror or exc}") from None
    try:
        cas = tuple(x509.load_pem_x509_certificates(data))
    except ValueError as exc:
        raise ConfigError(key, f"{path!r} is not a PEM certificate bundle ({_first_line(exc)})") from None
    if not cas:
        raise ConfigError(key, f"{path!r} contains no certificate")
    return cas


# --------------------------------------------------------------------------- edge contexts


def _accept_any(connection: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int) -> bool:
    # optional / require-any: the certificate is described and judged after the handshake
    # (PeerCertificate.verified); OpenSSL still checks that the client holds the key.
    return True


def _openssl_verdict(connection: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int) -> bool:
    # require-ca: OpenSSL's own chain verdict; on failure it sends the matching alert
    # (unknown_ca, certificate_expired, ...); the engine's failure reason says which, too.
    if not ok:
        note_verify_error(connection, errnum)
    return bool(ok)


def build_edge_context(
    certificate: LoadedCertificate,
    client_auth: ClientAuth = ClientAuth.NONE,
    client_cas: tuple[x509.Certificate, ...] = (),
    name: str = "default",
) -> TlsServerContext:
    """One pyOpenSSL server context: TLS 1.3 only, one certificate, one client-auth mode."""
    assert certificate.key is not None and certificate.chain, "use load_certificate_info()"
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    # Idle connections give their read/write buffers back (design.md: the ~7 KiB per idle
    # connection figure assumes this mode).
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.use_certificate(certificate.chain[0])
    for extra in certificate.chain[1:]:
        context.add_extra_chain_cert(extra)
    context.use_privatekey(certificate.key)
    context.check_privatekey()
    # HTTP/1.1 is all we speak. A client that offers ALPN without it (an h2-only client) gets
    # the no_application_protocol alert RFC 7301 3.2 asks for, not a 400 it cannot read; a
    # client offering no ALPN at all is served HTTP/1.1.
    serve_http1_only(context)
    # The group list is OpenSSL 4's default, which puts X25519MLKEM768 first.
    if client_auth is not ClientAuth.NONE:
        _configure_client_auth(context, client_auth, client_cas)
    # Only a client-auth context has a pyOpenSSL callback (verify) that needs its callback map.
    return TlsServerContext(context, client_auth, client_cas, name, pyopenssl_callbacks=client_auth is not ClientAuth.NONE)


def _configure_client_auth(context: SSL.Context, mode: ClientAuth, cas: tuple[x509.Certificate, ...]) -> None:
    # No resumption where identity matters. A resumed TLS 1.3 session carries no Certificate
    # message: OpenSSL restores the leaf from the ticket but not the intermediates (measured: a
    # client verified through an intermediate comes back as unknown_ca), and nothing is checked
    # again (expiry, a reloaded CA). A full handshake per connection is the price; client-auth
    # routes are API traffic, not page loads. pyOpenSSL cannot set num_tickets to 0 (nor do
    # cryptography's bindings expose SSL_CTX_set_num_tickets), so OpenSSL still sends its two
    # stateful tickets (seen with s_client); with the session cache off none ever resumes.
    context.set_options(SSL.OP_NO_TICKET)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_session_id(SESSION_ID_CONTEXT)
    # The CA names in the CertificateRequest help clients holding several certificates pick one.
    for ca in cas:
        context.add_client_ca(ca)
    if mode is ClientAuth.REQUIRE_CA:
        store = context.get_cert_store()
        assert store is not None
        for ca in cas:
            store.add_cert(crypto.X509.from_cryptography(ca))
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _openssl_verdict)
    elif mode is ClientAuth.REQUIRE_ANY:
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _accept_any)
    else:
        context.set_verify(SSL.VERIFY_PEER, _accept_any)


class ServerContexts:
    """All edge TLS contexts, built once per (re)load; the context is picked from the SNI before the handshake."""

    def __init__(self, certificates: tuple[LoadedCertificate, ...], client_cas: dict[str, tuple[x509.Certificate, ...]]) -> None:
        if not certificates:
            raise ConfigError("tls.certificates", "missing: at least one certificate/key pair")
        self.certificates = certificates
        self._client_cas = client_cas
        self._cache: dict[tuple[int, str | None], TlsServerContext] = {}

    @classmethod
    def build(cls, config: Config, now: datetime | None = None) -> ServerContexts:
        """Parse and check every certificate and client CA; raises ConfigError naming the key."""
        certificates = tuple(load_certificate_info(pair, now=now) for pair in config.certificates)
        client_cas: dict[str, tuple[x509.Certificate, ...]] = {}
        preset = config.source == "environment preset"
        for index, route in enumerate(config.sni_routes):
            if route.client_ca_file:
                key = "NEXTPROXY_API_CLIENT_CA_FILE" if preset else f"sni_routes[{index}].client_ca_file"
                client_cas[route.name] = load_ca_file(key, route.client_ca_file)
        contexts = cls(certificates, client_cas)
        # Build what the first connections need now, so OpenSSL's own checks fail here and
        # not on a client's handshake.
        for cert_index, certificate in enumerate(certificates):
            contexts._context(cert_index, None)
        for route in config.sni_routes:
            if route.action is not SniAction.TERMINATE:
                continue
            name = next((n for n in route.server_names if not n.startswith("*.")), None)
            contexts.select(route, name)
        return contexts

    def select(self, sni_route: SniRoute | None, server_name: str | None) -> TlsServerContext:
        """The context for this handshake: certificate from the SNI, client auth from the route."""
        index = 0
        if server_name is not None:
            index = next((i for i, c in enumerate(self.certificates) if c.matches(server_name)), 0)
        return self._context(index, sni_route)

    def _context(self, index: int, route: SniRoute | None) -> TlsServerContext:
        key = (index, route.name if route else None)
        context = self._cache.get(key)
        if context is None:
            certificate = self.certificates[index]
            mode, name = ClientAuth.NONE, certificate.name
            cas: tuple[x509.Certificate, ...] = ()
            if route is not None:
                mode, name = route.client_auth, f"{certificate.name}/{route.name}"
                cas = self._client_cas.get(route.name, ())
                if route.client_ca_file and route.name not in self._client_cas:
                    # A route this set was not built for (should not happen): still honour its CA.
                    cas = load_ca_file(f"sni_routes.{route.name}.client_ca_file", route.client_ca_file)
                    self._client_cas[route.name] = cas
            try:
                context = build_edge_context(certificate, mode, cas, name)
            except (SSL.Error, TypeError, ValueError) as exc:
                raise ConfigError(certificate.origin, f"OpenSSL refused it: {exc}") from None
            self._cache[key] = context
        return context


# --------------------------------------------------------------------------- stdlib contexts


@contextmanager
def _pem_file(cert: CertificateConfig) -> Iterator[str]:
    """The pair as one private temporary file (key first), for APIs that only take paths.

    The directory is 0700 and the file 0600; both are gone when the block ends.
    """
    with tempfile.TemporaryDirectory(prefix="nextproxy-") as folder:
        path = os.path.join(folder, "pair.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(cert.key.pem.rstrip() + b"\n" + cert.certificate.pem)
        yield path


def _load_chain(context: ssl.SSLContext, cert: CertificateConfig) -> None:
    load_certificate_info(cert)  # precise errors (origin, expiry) before OpenSSL's vaguer ones
    with _pem_file(cert) as path:
        try:
            context.load_cert_chain(path)
        except ssl.SSLError as exc:
            raise ConfigError(cert.key.origin, f"OpenSSL refused the pair: {exc.reason or exc}") from None


def upstream_ssl_context(tls: UpstreamTls) -> ssl.SSLContext:
    """Client side of re-encryption: TLS 1.3, certificate and host name verified, ALPN http/1.1;
    for one upstream server, whose last session it offers (``edge.resumption``)."""
    context = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    if tls.ca_file:
        load_ca_file(tls.ca_file_key, tls.ca_file)  # readable, PEM, not empty
        try:
            context.load_verify_locations(cafile=tls.ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(tls.ca_file_key, f"OpenSSL refused {tls.ca_file!r}: {exc}") from None
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.client_certificate is not None:
        _load_chain(context, tls.client_certificate)
    context.set_alpn_protocols([ALPN_HTTP1.decode()])
    return context


def admin_ssl_context(cert: CertificateConfig) -> ssl.SSLContext:
    """Server side for the admin port: TLS 1.3 only, no client certificates."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    _load_chain(context, cert)
    context.set_alpn_protocols([ALPN_HTTP1.decode()])
    return context
