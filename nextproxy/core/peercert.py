"""The client certificate as presented, and our verdict on it, verified in-process.

Split from ``core/tls.py``: the engine there takes the DER OpenSSL accepted; this describes it
(digests, subject, SANs) and verifies its chain against the context's client CAs with
``cryptography.x509.verification`` at the time the shell passes in (the core has no clock).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError


class TlsServerContext(Protocol):
    """What verification reads of ``core.tls.TlsServerContext``: its client CAs as a store."""

    @property
    def store(self) -> Store | None: ...

# Client certificates often carry only a subject CN; the WebPKI default policy would refuse
# them for lacking a SAN, which is a server-certificate rule, not a client-certificate one.
_EE_POLICY = ExtensionPolicy.webpki_defaults_ee().may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
_CA_POLICY = ExtensionPolicy.webpki_defaults_ca()


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """The client certificate as presented, and our verdict on it."""

    der: bytes
    chain: tuple[bytes, ...]
    """Intermediates as the client sent them, DER, leaf excluded."""
    verified: bool
    """The chain leads to a configured client CA at the verification time."""
    verify_error: str | None
    """Why not verified: unknown_ca, expired, not_yet_valid, self_signed, no_ca_configured,
    unparsable, no_verification_time or invalid (anything else the policy refuses, e.g. a wrong EKU)."""
    sha256: str
    """Hex SHA-256 of ``der``."""
    spki_sha256: str
    """Hex SHA-256 of the DER SubjectPublicKeyInfo (the pin that survives re-issuance)."""
    subject: str
    """RFC 4514."""
    common_name: str | None
    dns_names: tuple[str, ...]
    uris: tuple[str, ...]


def describe_certificate(
    der: bytes, chain: tuple[bytes, ...], context: TlsServerContext, now: datetime | None
) -> PeerCertificate:
    """The facts about a client certificate, and whether it chains to ``context``'s CAs at ``now``."""
    digest = hashlib.sha256(der).hexdigest()
    try:
        leaf = x509.load_der_x509_certificate(der)
        intermediates = [x509.load_der_x509_certificate(c) for c in chain]
        spki = leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        subject = leaf.subject.rfc4514_string()
        common_names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        dns_names, uris = _san_names(leaf)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # Malformed encodings, duplicated extensions, unknown key types: facts unknown, and
        # never verified.
        return PeerCertificate(der, chain, False, "unparsable", digest, "", "", None, (), ())
    common_name = common_names[0].value if common_names else None
    verified, error = _verify(leaf, intermediates, context, now)
    return PeerCertificate(
        der=der,
        chain=chain,
        verified=verified,
        verify_error=error,
        sha256=digest,
        spki_sha256=hashlib.sha256(spki).hexdigest(),
        subject=subject,
        common_name=common_name if isinstance(common_name, str) else None,
        dns_names=dns_names,
        uris=uris,
    )


def _san_names(leaf: x509.Certificate) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), ()
    return tuple(san.get_values_for_type(x509.DNSName)), tuple(san.get_values_for_type(x509.UniformResourceIdentifier))


def _verify(
    leaf: x509.Certificate, intermediates: list[x509.Certificate], context: TlsServerContext, now: datetime | None
) -> tuple[bool, str | None]:
    if context.store is None:
        return False, "no_ca_configured"
    if now is None:
        # The core has no clock; without a time no validity period can be judged.
        return False, "no_verification_time"
    verifier = (
        PolicyBuilder()
        .store(context.store)
        .time(now)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        return False, _verify_error(str(exc), leaf, now)
    except ValueError:
        return False, "unparsable"
    return True, None


def _verify_error(message: str, leaf: x509.Certificate, now: datetime) -> str:
    """A short, bounded label for a failed verification (metrics and headers use it)."""
    if "not valid at validation time" in message:
        # cryptography names the offending certificate only in prose; judge the leaf ourselves.
        if now < leaf.not_valid_before_utc:
            return "not_yet_valid"
        return "expired"
    if "candidates exhausted" in message:
        return "unknown_ca"
    if leaf.issuer == leaf.subject:
        return "self_signed"  # nginx says the same ("self-signed certificate"); rather than "invalid"
    return "invalid"
