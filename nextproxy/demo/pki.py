"""The demo: a throwaway PKI and the stand-in ns/mc/sfs upstreams of the built-in preset.

``nextproxy demo`` and the test suite use the same pieces: ``make_pki()`` mints a CA and leaf
certificates in memory (EC P-256, one year) that strict verifiers accept; ``start_demo_upstreams()``
starts the stand-ins (``nextproxy.demo.standins``) where the environment preset expects them, one
loopback IP per service; ``demo_environment()`` writes the NEXTPROXY_* variables that point the
preset at them. Nothing touches the disk unless ``DemoPki.write()`` is called.
Never use these certificates for anything but a demo or a test: the CA key lives in memory
and in whatever directory ``write()`` was given.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import shutil
import ssl
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nextproxy.config.preset import PRESET_API_ROUTES, PRESET_PATH_ROUTES
from nextproxy.demo.standins import PATTERN, StandIn, pattern, pattern_sha256, start_http_ws, start_tls_api

__all__ = [
    "DEMO_API_SERVER_NAMES", "DEMO_HOSTS", "DEMO_EDGE_NAMES", "PATTERN", "DemoPki", "Pem", "StandIn",
    "client_ssl_context", "demo_environment", "demo_pki_folder", "hand_over", "make_pki", "parse_owner",
    "pattern", "pattern_sha256", "server_ssl_context", "start_demo_upstreams", "start_http_ws", "start_tls_api",
]  # fmt: skip

DAYS = datetime.timedelta(days=1)
VALIDITY = 365 * DAYS
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


# --------------------------------------------------------------------------- PKI


@dataclass(frozen=True, slots=True)
class Pem:
    """A certificate and its private key (PKCS#8, unencrypted), both PEM."""

    certificate: bytes
    key: bytes


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


def _general_names(names: Sequence[str]) -> list[x509.GeneralName]:
    result: list[x509.GeneralName] = []
    for name in names:
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            result.append(x509.DNSName(name))
    return result


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


class _Issuer:
    """The CA while minting: its key and certificate sign every leaf."""

    def __init__(self, common_name: str, now: datetime.datetime) -> None:
        self.now = now
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.certificate = (
            self._builder(name, name, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def _builder(self, subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - BACKDATE)
            .not_valid_after(self.now + VALIDITY)
        )

    def pem(self) -> Pem:
        return Pem(self.certificate.public_bytes(serialization.Encoding.PEM), _key_pem(self.key))

    def leaf(self, common_name: str, names: Sequence[x509.GeneralName], usage: x509.ObjectIdentifier) -> Pem:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        issuer_ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        # SKI and AKI are what Python 3.13's default VERIFY_X509_STRICT insists on (RFC 5280 4.2.1.1-2).
        certificate = (
            self._builder(subject, self.certificate.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return Pem(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign, crl_sign=crl_sign,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def make_pki(edge_names: Sequence[str] = DEMO_EDGE_NAMES) -> DemoPki:
    """A fresh CA with edge, upstream and client leaves; IP literals in ``edge_names`` become IP SANs."""
    issuer = _Issuer("nextproxy demo CA", datetime.datetime.now(datetime.timezone.utc))
    server_auth = ExtendedKeyUsageOID.SERVER_AUTH
    return DemoPki(
        ca=issuer.pem(),
        edge=issuer.leaf("nextproxy demo edge", _general_names(edge_names), server_auth),
        upstream=issuer.leaf("nextproxy demo upstream", _general_names(UPSTREAM_NAMES), server_auth),
        client=issuer.leaf(
            CLIENT_NAME,
            [x509.DNSName(f"{CLIENT_NAME}.localhost"), x509.UniformResourceIdentifier(CLIENT_URI)],
            ExtendedKeyUsageOID.CLIENT_AUTH,
        ),
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


# --------------------------------------------------------------------------- the preset's upstreams


async def start_demo_upstreams(
    hosts: Mapping[str, str] | None = None,
    *,
    pki: DemoPki | None = None,
    upstream_tls: bool = False,
) -> list[StandIn]:
    """Start one stand-in per preset route where the preset expects it; returns them all.

    ``hosts`` maps "ns"/"mc"/"sfs" to an IP (default DEMO_HOSTS). Each stand-in is named after
    its route ("ns-sigmai", "ns-api"...), which is also the "service" its JSON reports. The API
    ports speak TLS with ``pki.upstream`` and ask (not require) for a client certificate from
    ``pki.ca``; with ``upstream_tls`` the HTTP/WebSocket ports speak TLS too. Without ``pki`` a
    fresh one is made, and nobody can verify it. Raises OSError naming the address if a port is
    taken; nothing is left listening then.
    """
    hosts = DEMO_HOSTS if hosts is None else hosts
    pki = make_pki() if pki is None else pki
    api_tls = server_ssl_context(pki.upstream, pki.ca.certificate, require_client_cert=False)
    http_tls = server_ssl_context(pki.upstream) if upstream_tls else None
    started: list[StandIn] = []
    try:
        for name, _prefix, service, port in PRESET_PATH_ROUTES:
            started.append(await start_http_ws(hosts[service.lower()], port, name, http_tls))
        for name, service, port in PRESET_API_ROUTES:
            started.append(await start_tls_api(hosts[service.lower()], port, name, api_tls))
    except BaseException:
        await asyncio.gather(*(standin.close() for standin in started), return_exceptions=True)
        raise
    return started


def demo_environment(
    files: Mapping[str, Path],
    *,
    listen: str = "127.0.0.1:8443",
    admin_listen: str = "127.0.0.1:9613",
    hosts: Mapping[str, str] | None = None,
    api_mode: str = "passthrough",
) -> dict[str, str]:
    """NEXTPROXY_* variables pointing the preset at the demo upstreams and ``DemoPki.write()`` files.

    With ``api_mode="terminate"`` the preset re-encrypts to every upstream, so start the
    stand-ins with ``upstream_tls=True``; the proxy then presents the demo client certificate.
    """
    hosts = DEMO_HOSTS if hosts is None else hosts
    env = {
        "NEXTPROXY_LISTEN": listen,
        "NEXTPROXY_ADMIN_LISTEN": admin_listen,
        "NEXTPROXY_TLS_CERTIFICATE_FILE": str(files["edge.pem"]),
        "NEXTPROXY_TLS_KEY_FILE": str(files["edge.key"]),
        "NEXTPROXY_API_MODE": api_mode,
    }
    for service, host in hosts.items():
        env[f"NEXTPROXY_{service.upper()}_HOST"] = host
    for service, server_name in DEMO_API_SERVER_NAMES.items():
        env[f"NEXTPROXY_{service.upper()}_API_SNI"] = server_name
    if api_mode == "terminate":
        env["NEXTPROXY_UPSTREAM_TLS"] = "true"
        env["NEXTPROXY_UPSTREAM_CA_FILE"] = str(files["ca.pem"])
        env["NEXTPROXY_UPSTREAM_TLS_CERTIFICATE_FILE"] = str(files["client.pem"])
        env["NEXTPROXY_UPSTREAM_TLS_KEY_FILE"] = str(files["client.key"])
    return env


# --------------------------------------------------------------------------- the PKI on disk


@contextmanager
def demo_pki_folder(keep: str | None) -> Iterator[Path]:
    """Where ``nextproxy demo`` writes its PKI: ``keep`` if given (left in place), else a fresh temp
    folder removed on the way out, so a stopped demo leaves no CA private key behind.
    """
    if keep is not None:
        yield Path(keep)
        return
    folder = Path(tempfile.mkdtemp(prefix="nextproxy-demo-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def parse_owner(text: str) -> tuple[int, int]:
    """``UID:GID`` (numbers: the names on the host and in a container need not agree)."""
    uid, sep, gid = text.partition(":")
    if not (sep and uid.isdigit() and gid.isdigit()):
        raise ValueError(f"expected UID:GID (numbers), got {text!r}")
    return int(uid), int(gid)


def hand_over(folder: Path, files: Mapping[str, Path], owner: tuple[int, int]) -> None:
    """Give ``folder`` and ``files`` to ``owner``, keys readable by its group (0640).

    A container's root writes the PKI into a host folder for a host user, who must be able to use
    the client key and delete the folder; the group is for the container user (the image's gid
    10001) that has to read the edge and upstream keys. Needs root, or to be ``owner`` already.
    """
    uid, gid = owner
    for path in (folder, *files.values()):
        os.chown(path, uid, gid)
        if path.suffix == ".key":
            os.chmod(path, 0o640)
