"""The one certificate minter: a throwaway PKI for the demo and for the test suite.

``make_ca()`` and ``make_leaf()`` mint EC P-256 certificates in memory that strict verifiers
accept (SKI/AKI, key usage, Python 3.13's VERIFY_X509_STRICT); ``make_pki()`` builds the demo's
CA with edge, upstream and client leaves, and the tests mint whatever else they need (expired,
self-signed, chained) with the same two functions. Nothing touches the disk unless
``DemoPki.write()`` is called. Never use these certificates for anything but a demo or a test:
the keys are unencrypted and the CA key lives in memory and wherever ``write()`` put it.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = datetime.timedelta(days=1)
VALIDITY_DAYS = 365
# Backdated so a client whose clock is a little behind still accepts a certificate minted now.
BACKDATE = datetime.timedelta(hours=1)

# One loopback IP per service, so ns, mc and sfs can all use the preset's fixed ports at once.
DEMO_HOSTS: Mapping[str, str] = {"ns": "127.0.0.2", "mc": "127.0.0.3", "sfs": "127.0.0.4"}
# SNI names the demo gives the API routes (NEXTPROXY_NS_API_SNI / NEXTPROXY_MC_API_SNI).
DEMO_API_SERVER_NAMES: Mapping[str, str] = {"ns": "ns-api.localhost", "mc": "mc-api.localhost"}
# OpenSSL matches "*.localhost" against nothing (a wildcard needs two labels to its right), so
# every demo name is also listed on its own.
DEMO_EDGE_NAMES: tuple[str, ...] = (
    "localhost", "*.localhost", *DEMO_API_SERVER_NAMES.values(), "127.0.0.1", "::1",
)  # fmt: skip
UPSTREAM_NAMES: tuple[str, ...] = (
    "localhost", "*.localhost", *DEMO_API_SERVER_NAMES.values(), "ns", "mc", "sfs",
    "127.0.0.1", *DEMO_HOSTS.values(), "::1",
)  # fmt: skip
CLIENT_NAME = "demo-client"
CLIENT_URI = "spiffe://nextproxy.demo/demo-client"


# --------------------------------------------------------------------------- the minter


@dataclass(frozen=True, slots=True)
class Pem:
    """A certificate and its private key (PKCS#8, unencrypted), both PEM."""

    certificate: bytes
    key: bytes


@dataclass(frozen=True, slots=True)
class Issued:
    """One minted certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def from_pem(cls, pem: Pem) -> Issued:
        """An issuer from files (the demo CA as written), to mint more certificates under it."""
        key = serialization.load_pem_private_key(pem.key, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("only EC keys are minted here")
        return cls(x509.load_pem_x509_certificate(pem.certificate), key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.der).hexdigest()

    @property
    def spki_sha256(self) -> str:
        spki = self.cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(spki).hexdigest()

    def pem(self) -> Pem:
        return Pem(self.cert_pem, self.key_pem)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign, crl_sign=crl_sign,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _general_names(names: Sequence[str]) -> list[x509.GeneralName]:
    """IP literals become IP SANs, the rest DNS names."""
    result: list[x509.GeneralName] = []
    for name in names:
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            result.append(x509.DNSName(name))
    return result


def _sign(
    builder: x509.CertificateBuilder, key: ec.EllipticCurvePrivateKey, issuer: Issued | None, subject: x509.Name,
    not_before: datetime.datetime, not_after: datetime.datetime,
) -> Issued:  # fmt: skip
    # SKI and AKI are what Python 3.13's default VERIFY_X509_STRICT insists on (RFC 5280 4.2.1.1-2).
    signer = issuer.key if issuer else key
    certificate = (
        builder.subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
        .sign(signer, hashes.SHA256())
    )
    return Issued(certificate, key)


def make_ca(common_name: str, issuer: Issued | None = None, *, days: int = VALIDITY_DAYS) -> Issued:
    """A CA: self-signed when ``issuer`` is None, else an intermediate under it (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .add_extension(x509.BasicConstraints(ca=True, path_length=0 if issuer else None), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
    )
    return _sign(builder, key, issuer, _name(common_name), _now() - BACKDATE, _now() + days * DAY)


def make_leaf(
    issuer: Issued | None,
    common_name: str,
    *,
    dns: Sequence[str] = (),
    uris: Sequence[str] = (),
    client: bool = False,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """An end-entity certificate; self-signed when ``issuer`` is None (nobody trusts it).

    ``dns`` names (IP literals become IP SANs) and ``uris`` go into the SAN; ``client`` selects
    the clientAuth extended key usage, else serverAuth.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    names = _general_names(dns) + [x509.UniformResourceIdentifier(uri) for uri in uris]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    start = not_before or _now() - BACKDATE
    return _sign(builder, key, issuer, _name(common_name), start, not_after or _now() + VALIDITY_DAYS * DAY)


@dataclass(frozen=True, slots=True)
class DemoPki:
    """A throwaway CA and the three leaves the demo and the tests need."""

    ca: Pem
    edge: Pem
    """Served by the proxy for terminated names; serverAuth."""
    upstream: Pem
    """Served by the stand-ins speaking TLS (the API ports, and the rest with upstream TLS)."""
    client: Pem
    """A client certificate (clientAuth, CN demo-client, SAN DNS + URI)."""

    def write(self, directory: Path) -> dict[str, Path]:
        """Write ``ca.pem``, ``ca.key``, ``edge.pem``, ``edge.key``... keys mode 0600; returns name -> path."""
        directory.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        for stem, pem in (("ca", self.ca), ("edge", self.edge), ("upstream", self.upstream), ("client", self.client)):
            for suffix, data, mode in ((".pem", pem.certificate, 0o644), (".key", pem.key, 0o600)):
                path = directory / (stem + suffix)
                _write_file(path, data, mode)
                paths[path.name] = path
        return paths


def _write_file(path: Path, data: bytes, mode: int) -> None:
    # Created with the final mode, so a key is never readable by others even for an instant;
    # fchmod covers a file left from an earlier run with wider permissions.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), mode)
        file.write(data)


def make_pki(edge_names: Sequence[str] = DEMO_EDGE_NAMES) -> DemoPki:
    """A fresh CA with edge, upstream and client leaves; IP literals in ``edge_names`` become IP SANs."""
    ca = make_ca("nextproxy demo CA")
    return DemoPki(
        ca=ca.pem(),
        edge=make_leaf(ca, "nextproxy demo edge", dns=edge_names).pem(),
        upstream=make_leaf(ca, "nextproxy demo upstream", dns=UPSTREAM_NAMES).pem(),
        client=make_leaf(ca, CLIENT_NAME, dns=(f"{CLIENT_NAME}.localhost",), uris=(CLIENT_URI,), client=True).pem(),
    )


# --------------------------------------------------------------------------- stdlib ssl helpers


def _load_pair(context: ssl.SSLContext, pem: Pem) -> None:
    # The stdlib only loads a certificate chain from files: stage the pair in a private temporary
    # directory that is gone before this returns.
    with tempfile.TemporaryDirectory(prefix="nextproxy-demo-") as directory:
        cert_path, key_path = Path(directory, "cert.pem"), Path(directory, "key.pem")
        _write_file(cert_path, pem.certificate, 0o600)
        _write_file(key_path, pem.key, 0o600)
        context.load_cert_chain(cert_path, key_path)


def server_ssl_context(pem: Pem, client_ca: bytes | None = None, require_client_cert: bool = False) -> ssl.SSLContext:
    """A TLS 1.3-only server context; asks for client certificates from ``client_ca`` if given."""
    if require_client_cert and client_ca is None:
        raise ValueError("require_client_cert needs client_ca to verify the certificate against")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    _load_pair(context, pem)
    context.set_alpn_protocols(["http/1.1"])
    if client_ca is not None:
        context.load_verify_locations(cadata=client_ca.decode("ascii"))
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context


def client_ssl_context(ca_pem: bytes, client: Pem | None = None) -> ssl.SSLContext:
    """A strict client context (hostname check, VERIFY_X509_STRICT) trusting only ``ca_pem``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca_pem.decode("ascii"))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    if client is not None:
        _load_pair(context, client)
    return context
