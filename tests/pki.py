"""A small throwaway PKI for the TLS tests, made with ``cryptography`` at test time.

``make_test_pki()`` returns a CA, an intermediate, server leaves (SAN + SKI/AKI), client
certificates issued by the CA (directly and through the intermediate), a self-signed client
certificate nobody trusts, an expired CA-issued client certificate and a second, unrelated CA
with its own server leaf. Everything lives in memory (PEM bytes); ``TestPki.write()`` puts the
files on disk when a test needs paths. EC P-256 keys keep generation in the milliseconds.
Never use these for anything but tests: the keys are written unencrypted.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = datetime.timedelta(days=1)
# Backdated so clocks a little behind still accept a certificate minted now.
BACKDATE = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class Issued:
    """One certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.der).hexdigest()

    @property
    def spki_sha256(self) -> str:
        spki = self.cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return hashlib.sha256(spki).hexdigest()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def make_ca(common_name: str, issuer: Issued | None = None, *, days: int = 365) -> Issued:
    """A CA: self-signed when ``issuer`` is None, else an intermediate under it (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - BACKDATE)
        .not_valid_after(_now() + days * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0 if issuer else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    return Issued(builder.sign(signer_key, hashes.SHA256()), key)


def make_leaf(
    issuer: Issued | None,
    common_name: str,
    *,
    dns: tuple[str, ...] = (),
    uris: tuple[str, ...] = (),
    client: bool = False,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """An end-entity certificate; self-signed when ``issuer`` is None.

    ``client`` selects the clientAuth extended key usage (else serverAuth).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or _now() - BACKDATE)
        .not_valid_after(not_after or _now() + 90 * DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key((issuer.key if issuer else key).public_key()),
            critical=False,
        )
    )
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(builder.sign(issuer.key if issuer else key, hashes.SHA256()), key)


@dataclass(frozen=True)
class TestPki:
    ca: Issued
    intermediate: Issued
    server: Issued
    """Leaf for localhost, example.com and *.example.com, issued by ``ca``."""
    client: Issued
    """Client certificate issued by ``ca``, with a DNS and a URI SAN."""
    client_via_intermediate: Issued
    """Client certificate issued by ``intermediate``."""
    unknown_client: Issued
    """Self-signed client certificate: no configured CA knows it."""
    expired_client: Issued
    """Issued by ``ca``, expired yesterday."""
    other_ca: Issued
    other_server: Issued
    """Leaf for localhost issued by ``other_ca``."""

    __test__ = False  # not a pytest test class despite the name

    def write(self, folder: Path) -> dict[str, Path]:
        """Write every certificate and key as ``<name>.crt`` / ``<name>.key``; return the paths."""
        paths: dict[str, Path] = {}
        for field_name in self.__dataclass_fields__:
            issued: Issued = getattr(self, field_name)
            for suffix, data in (("crt", issued.cert_pem), ("key", issued.key_pem)):
                path = folder / f"{field_name}.{suffix}"
                path.write_bytes(data)
                path.chmod(0o600)
                paths[f"{field_name}.{suffix}"] = path
        return paths


def make_test_pki() -> TestPki:
    ca = make_ca("nextproxy test CA")
    intermediate = make_ca("nextproxy test intermediate", ca)
    other_ca = make_ca("unrelated CA")
    return TestPki(
        ca=ca,
        intermediate=intermediate,
        server=make_leaf(ca, "localhost", dns=("localhost", "example.com", "*.example.com")),
        client=make_leaf(ca, "client one", dns=("client.example.net",), uris=("spiffe://test/client",), client=True),
        client_via_intermediate=make_leaf(intermediate, "client two", dns=("two.example.net",), client=True),
        unknown_client=make_leaf(None, "stranger", dns=("stranger.example.net",), client=True),
        expired_client=make_leaf(
            ca, "expired client", client=True, not_before=_now() - 30 * DAY, not_after=_now() - DAY
        ),
        other_ca=other_ca,
        other_server=make_leaf(other_ca, "localhost", dns=("localhost",)),
    )
