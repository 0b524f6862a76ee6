"""Client certificates on a terminated API name: the four modes, headers, allow-lists, SNI certificates.

Real TLS 1.3 handshakes over loopback between the proxy (``Edge``) and real clients: the stdlib
``ssl`` module and ``curl --cert``. Every mode meets every kind of client (none, one issued by the
configured CA, an unknown self-signed one, an expired one from the CA); the test checks what the
client sees (a response, or the alert that refused it), what the upstream received, and how
``nextproxy_tls_handshakes_total`` moved. In TLS 1.3 the server judges the client's certificate
after the client has already finished its side of the handshake, so a refusal usually surfaces on
the client's first read, not in ``wrap_socket``: the helpers here always send a request and read.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
import shutil
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from nextproxy.process import metrics
from nextproxy.config.model import AllowRule, CertificateConfig, ClientAuth, Config, PemSource
from nextproxy.demo.pki import CLIENT_NAME, CLIENT_URI, DemoPki, Pem
from tests.integration.harness import TERMINATED_API_NAME, Edge
from nextproxy.demo.pki import Issued, make_leaf

DAY = datetime.timedelta(days=1)
CERT_HEADERS = ("x-forwarded-client-cert", "client-cert", "client-cert-chain", "x-client-cert-verified")
HANDSHAKE_RESULTS = metrics.TLS_HANDSHAKE_RESULTS
CURL = shutil.which("curl")


# --------------------------------------------------------------------------- clients and PKI


@dataclass(frozen=True)
class Client:
    """One kind of TLS client: a certificate (or none) and its files for curl."""

    label: str
    pem: Pem | None
    files: tuple[Path, Path] | None

    @property
    def der(self) -> bytes:
        assert self.pem is not None
        return x509.load_pem_x509_certificate(self.pem.certificate).public_bytes(serialization.Encoding.DER)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.der).hexdigest()

    @property
    def spki_sha256(self) -> str:
        assert self.pem is not None
        cert = x509.load_pem_x509_certificate(self.pem.certificate)
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return hashlib.sha256(spki).hexdigest()


def demo_ca(pki: DemoPki) -> Issued:
    """The demo CA as an issuer, to mint more certificates under it."""
    return Issued.from_pem(pki.ca)


def as_pem(issued: Issued) -> Pem:
    return Pem(issued.cert_pem, issued.key_pem)


@pytest.fixture(scope="module")
def clients(pki: DemoPki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Client]:
    ca = demo_ca(pki)
    now = datetime.datetime.now(datetime.timezone.utc)
    pems: dict[str, Pem | None] = {
        "no-cert": None,
        "trusted": pki.client,
        "unknown": as_pem(make_leaf(None, "stranger", dns=("stranger.localhost",), client=True)),
        "expired": as_pem(make_leaf(ca, "expired client", client=True, not_before=now - 30 * DAY, not_after=now - DAY)),
        # Issued by the CA, but not the identity the allow-lists name.
        "other-trusted": as_pem(make_leaf(ca, "someone else", dns=("else.localhost",), uris=("spiffe://x/else",), client=True)),
        # Self-signed, carrying every name the allow-lists grant: only a pin may let it in.
        "impostor": as_pem(
            make_leaf(None, CLIENT_NAME, dns=(f"{CLIENT_NAME}.localhost",), uris=(CLIENT_URI,), client=True)
        ),
    }
    folder = tmp_path_factory.mktemp("clients")
    result = {}
    for label, pem in pems.items():
        files = None
        if pem is not None:
            cert, key = folder / f"{label}.crt", folder / f"{label}.key"
            cert.write_bytes(pem.certificate)
            key.write_bytes(pem.key)
            key.chmod(0o600)
            files = (cert, key)
        result[label] = Client(label, pem, files)
    return result


class Edges:
    """Proxies started on first use and closed at the end of the module."""

    def __init__(self, pki: DemoPki, ca_file: str) -> None:
        self.pki = pki
        self.ca_file = ca_file
        self._running: dict[object, Edge] = {}

    def mode(self, mode: ClientAuth, with_ca: bool = True) -> Edge:
        key = (mode, with_ca)
        if key not in self._running:
            self._running[key] = Edge.start(self.pki, client_auth=mode, client_ca_file=self.ca_file if with_ca else None)
        return self._running[key]

    def close(self) -> None:
        for edge in self._running.values():
            edge.close()


@pytest.fixture(scope="module")
def edges(pki: DemoPki, pki_files: dict[str, Path]) -> Iterator[Edges]:
    running = Edges(pki, str(pki_files["ca.pem"]))
    try:
        yield running
    finally:
        running.close()


# --------------------------------------------------------------------------- observing an attempt


@dataclass(frozen=True)
class Outcome:
    status: int | None = None
    headers: dict[str, list[str]] | None = None
    """Upstream-received headers, names as sent; None when the upstream was not reached."""
    body: bytes = b""
    error: str = ""
    """The client's TLS error text when refused."""


def handshake_counts() -> dict[str, float]:
    counts = {}
    for result in HANDSHAKE_RESULTS:
        value = metrics.registry_for_exposition().get_sample_value("nextproxy_tls_handshakes_total", {"result": result})
        counts[result] = value or 0.0
    return counts


def delta(before: dict[str, float]) -> dict[str, float]:
    after = handshake_counts()
    return {k: after[k] - before[k] for k in HANDSHAKE_RESULTS}


def upstream_headers(body: bytes) -> dict[str, list[str]]:
    """The stand-in's report of the request head, as name -> values (names exactly as received)."""
    grouped: dict[str, list[str]] = {}
    for name, value in json.loads(body)["headers"]:
        grouped.setdefault(name, []).append(value)
    return grouped


def stdlib_attempt(edge: Edge, client: Client, headers: list[tuple[str, str]] | None = None) -> Outcome:
    conn = edge.https(TERMINATED_API_NAME, context=edge.client_context(client.pem))
    try:
        conn.putrequest("GET", f"/whoami/{client.label}")
        for name, value in headers or []:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
    except ssl.SSLError as exc:
        return Outcome(error=str(exc))
    finally:
        conn.close()
    if response.status != 200:
        return Outcome(status=response.status, body=body)
    return Outcome(status=200, headers=upstream_headers(body), body=body)


def curl(edge: Edge, client: Client, ca_file: Path, *extra: str, path: str = "/curl") -> subprocess.CompletedProcess[str]:
    assert CURL, "curl is installed by .ci/run"
    command = [
        CURL, "-sS", "-v", "--max-time", "10", "--tlsv1.3", "--cacert", str(ca_file),
        "--resolve", f"{TERMINATED_API_NAME}:{edge.port}:127.0.0.1", "-w", "\n%{http_code}",
    ]  # fmt: skip
    if client.files is not None:
        command += ["--cert", str(client.files[0]), "--key", str(client.files[1])]
    command += [*extra, f"https://{TERMINATED_API_NAME}:{edge.port}{path}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=20)


def curl_attempt(edge: Edge, client: Client, ca_file: Path) -> tuple[Outcome, str]:
    result = curl(edge, client, ca_file)
    if result.returncode != 0:
        return Outcome(error=result.stderr), result.stderr
    body, _, code = result.stdout.rpartition("\n")
    outcome = Outcome(status=int(code), body=body.encode())
    if code == "200":
        outcome = replace(outcome, headers=upstream_headers(body.encode()))
    return outcome, result.stderr


# --------------------------------------------------------------------------- what each case must do


@dataclass(frozen=True)
class Accepted:
    verified: str | None
    """X-Client-Cert-Verified the upstream must get; None: no certificate headers at all."""


@dataclass(frozen=True)
class Refused:
    alert: tuple[str, ...]
    """Any of these (upper-case) must appear in the client's error: OpenSSL names the alert."""
    result: str
    """The nextproxy_tls_handshakes_total label that must move."""


NONE, OPTIONAL, ANY, CA = ClientAuth.NONE, ClientAuth.OPTIONAL, ClientAuth.REQUIRE_ANY, ClientAuth.REQUIRE_CA
CERT_REQUIRED = Refused(("CERTIFICATE_REQUIRED", "CERTIFICATE REQUIRED"), "certificate_required")
EXPECTED: dict[tuple[ClientAuth, str], Accepted | Refused] = {
    (NONE, "no-cert"): Accepted(None),
    (NONE, "trusted"): Accepted(None),  # never asked, so never sent
    (NONE, "unknown"): Accepted(None),
    (NONE, "expired"): Accepted(None),
    (OPTIONAL, "no-cert"): Accepted(None),
    (OPTIONAL, "trusted"): Accepted("SUCCESS"),
    (OPTIONAL, "unknown"): Accepted("FAILED:unknown_ca"),
    (OPTIONAL, "expired"): Accepted("FAILED:expired"),
    (ANY, "no-cert"): CERT_REQUIRED,
    (ANY, "trusted"): Accepted("SUCCESS"),
    (ANY, "unknown"): Accepted("FAILED:unknown_ca"),
    (ANY, "expired"): Accepted("FAILED:expired"),
    (CA, "no-cert"): CERT_REQUIRED,
    (CA, "trusted"): Accepted("SUCCESS"),
    (CA, "unknown"): Refused(("UNKNOWN_CA", "UNKNOWN CA", "BAD_CERTIFICATE", "BAD CERTIFICATE"), "unknown_ca"),
    (CA, "expired"): Refused(("CERTIFICATE_EXPIRED", "CERTIFICATE EXPIRED"), "certificate_expired"),
}
CASES = [pytest.param(mode, label, id=f"{mode.value}-{label}") for mode, label in EXPECTED]


def xfcc_fields(value: str) -> list[tuple[str, str]]:
    """Split one XFCC element into (key, value) pairs, honouring Envoy's double quotes."""
    pairs = []
    for match in re.finditer(r'([A-Za-z]+)=("(?:[^"\\]|\\.)*"|[^;]*)(?:;|$)', value):
        raw = match.group(2)
        pairs.append((match.group(1), raw[1:-1].replace('\\"', '"') if raw.startswith('"') else raw))
    return pairs


def check_identity_headers(headers: dict[str, list[str]], client: Client, verified: str | None) -> None:
    """What the upstream must receive for this client: exactly the proxy's certificate headers."""
    normalized = {name.lower().replace("_", "-"): values for name, values in headers.items()}
    if verified is None:
        for name in CERT_HEADERS:
            assert name not in normalized, f"{name} reached the upstream without a certificate"
        return
    for name in ("x-forwarded-client-cert", "client-cert", "x-client-cert-verified"):
        assert name in headers and len(headers[name]) == 1, f"{name}: {headers.get(name)}"
        assert normalized[name] == headers[name]  # only the proxy's own, lower-case copy
    assert "client-cert-chain" not in normalized  # chain forwarding is off
    assert headers["x-client-cert-verified"] == [verified]
    # RFC 9440: an sf-binary item, ':' base64(DER) ':'.
    client_cert = headers["client-cert"][0]
    assert client_cert.startswith(":") and client_cert.endswith(":")
    assert base64.b64decode(client_cert[1:-1], validate=True) == client.der
    fields = xfcc_fields(headers["x-forwarded-client-cert"][0])
    keys = [k for k, _ in fields]
    values = dict(fields)
    assert keys[0] == "Hash" and values["Hash"] == hashlib.sha256(client.der).hexdigest()
    cert = x509.load_pem_x509_certificate(urllib.parse.unquote(values["Cert"]).encode())
    assert cert.public_bytes(serialization.Encoding.DER) == client.der
    assert values["Subject"] == cert.subject.rfc4514_string()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns, uris = san.get_values_for_type(x509.DNSName), san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        dns, uris = [], []
    assert [v for k, v in fields if k == "DNS"] == dns
    assert [v for k, v in fields if k == "URI"] == uris


# --------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("mode, label", CASES)
def test_mode_by_client_stdlib(edges: Edges, clients: dict[str, Client], mode: ClientAuth, label: str) -> None:
    edge = edges.mode(mode)
    client = clients[label]
    expected = EXPECTED[(mode, label)]
    before = handshake_counts()
    requests_before = edge.standins["mc-api"].requests
    outcome = stdlib_attempt(edge, client)
    moved = delta(before)
    if isinstance(expected, Refused):
        assert outcome.status is None, f"accepted: {outcome}"
        assert any(alert in outcome.error.upper() for alert in expected.alert), outcome.error
        assert moved[expected.result] == 1
        assert moved["ok"] == 0
        other = {"certificate_required", "unknown_ca", "certificate_expired", "bad_certificate"} - {expected.result}
        assert all(moved[r] == 0 for r in other), moved
        assert edge.standins["mc-api"].requests == requests_before
        # The first refusal of a kind in an interval is logged at once, with its reason.
        logs = edge.logs()
        assert f'"reason":"{expected.result}"' in logs or f'"{expected.result}":' in logs
    else:
        assert outcome.status == 200 and outcome.headers is not None, outcome
        assert moved["ok"] == 1 and sum(moved.values()) == 1, moved
        check_identity_headers(outcome.headers, client, expected.verified)


@pytest.mark.parametrize("mode, label", CASES)
def test_mode_by_client_curl(
    edges: Edges, clients: dict[str, Client], pki_files: dict[str, Path], mode: ClientAuth, label: str
) -> None:
    edge = edges.mode(mode)
    client = clients[label]
    expected = EXPECTED[(mode, label)]
    outcome, trace = curl_attempt(edge, client, pki_files["ca.pem"])
    # curl -v names every handshake message it reads: "Request CERT" is the CertificateRequest.
    assert ("Request CERT" in trace) == (mode is not ClientAuth.NONE), trace
    assert "SSL connection using TLSv1.3" in trace
    if isinstance(expected, Refused):
        assert outcome.status is None, outcome
        assert any(alert in outcome.error.upper() for alert in expected.alert), outcome.error
    else:
        assert outcome.status == 200 and outcome.headers is not None, outcome
        check_identity_headers(outcome.headers, client, expected.verified)


def test_bytes_after_a_refusal_are_not_a_second_failure(edges: Edges, clients: dict[str, Client]) -> None:
    """A TLS 1.3 client sends its request before it learns it was refused; the proxy, lingering
    to deliver the alert, must not count those bytes (or the EOF) as another failed handshake."""
    edge = edges.mode(ClientAuth.REQUIRE_CA)
    before = handshake_counts()
    sock = edge.tls_socket(TERMINATED_API_NAME, edge.client_context(clients["unknown"].pem))
    try:
        request = f"GET / HTTP/1.1\r\nHost: {TERMINATED_API_NAME}\r\n\r\n".encode()
        for _ in range(3):  # three records, the later ones arriving after the refusal
            sock.sendall(request)
            time.sleep(0.05)
        with pytest.raises(ssl.SSLError, match="(?i)unknown.ca"):
            sock.recv(100)
    finally:
        sock.close()
    time.sleep(0.2)  # the EOF reaches the proxy within its 0.5 s linger
    moved = delta(before)
    assert moved == {**{r: 0.0 for r in HANDSHAKE_RESULTS}, "unknown_ca": 1.0}, moved


def test_optional_without_a_ca_forwards_the_certificate_unverified(edges: Edges, clients: dict[str, Client]) -> None:
    edge = edges.mode(ClientAuth.OPTIONAL, with_ca=False)
    outcome = stdlib_attempt(edge, clients["trusted"])
    assert outcome.status == 200 and outcome.headers is not None
    check_identity_headers(outcome.headers, clients["trusted"], "FAILED:no_ca_configured")


def test_client_cert_via_intermediate_is_verified(
    pki: DemoPki, pki_files: dict[str, Path], clients: dict[str, Client], tmp_path: Path
) -> None:
    """A client sending its intermediate: OpenSSL (require-ca) and the in-process verdict agree."""
    # The demo CA has path length 0, so this test brings its own root with an intermediate.
    from nextproxy.demo.pki import make_ca

    root = make_ca("client root")
    intermediate = make_ca("client intermediate", root)
    leaf = make_leaf(intermediate, "chained client", dns=("chained.localhost",), client=True)
    (tmp_path / "root.pem").write_bytes(root.cert_pem)
    client = Client("chained", Pem(leaf.cert_pem + intermediate.cert_pem, leaf.key_pem), None)
    for mode in (ClientAuth.OPTIONAL, ClientAuth.REQUIRE_CA):
        edge = Edge.start(pki, client_auth=mode, client_ca_file=str(tmp_path / "root.pem"))
        try:
            outcome = stdlib_attempt(edge, client)
        finally:
            edge.close()
        assert outcome.status == 200 and outcome.headers is not None, (mode, outcome)
        check_identity_headers(outcome.headers, client, "SUCCESS")


def test_client_cert_chain_is_forwarded_when_enabled(pki: DemoPki, tmp_path: Path) -> None:
    """RFC 9440 Client-Cert-Chain carries the intermediates the client sent, only when enabled."""
    import base64

    from nextproxy.demo.pki import make_ca

    root = make_ca("chain root")
    intermediate = make_ca("chain intermediate", root)
    leaf = make_leaf(intermediate, "chain client", dns=("chain.localhost",), client=True)
    (tmp_path / "root.pem").write_bytes(root.cert_pem)
    client = Client("chained", Pem(leaf.cert_pem + intermediate.cert_pem, leaf.key_pem), None)
    intermediate_der = x509.load_pem_x509_certificate(intermediate.cert_pem).public_bytes(serialization.Encoding.DER)

    def forward(config: Config) -> Config:
        sni = tuple(replace(r, forward_client_cert_chain=True) if r.name == "mc-api" else r for r in config.sni_routes)
        return replace(config, sni_routes=sni)

    for enabled in (False, True):
        edge = Edge.start(pki, client_auth=ClientAuth.REQUIRE_CA, client_ca_file=str(tmp_path / "root.pem"),
                          mutate=forward if enabled else None)  # fmt: skip
        try:
            outcome = stdlib_attempt(edge, client)
        finally:
            edge.close()
        assert outcome.status == 200 and outcome.headers is not None
        chain = outcome.headers.get("client-cert-chain", [])
        if enabled:
            assert [base64.b64decode(v.strip().strip(":")) for v in chain[0].split(",")] == [intermediate_der]
        else:
            assert chain == []


# --------------------------------------------------------------------------- spoofed headers

SPOOFED = [
    ("X-Forwarded-Client-Cert", "Hash=" + "0" * 64 + ';Subject="CN=admin"'),
    ("x_forwarded_client_cert", "Hash=" + "1" * 64),
    ("CLIENT-CERT", ":AAAA:"),
    ("Client_Cert", ":AAAA:"),
    ("Client-Cert-Chain", ":AAAA:, :BBBB:"),
    ("client_cert_chain", ":AAAA:"),
    ("X-Client-Cert-Verified", "SUCCESS"),
    ("X_CLIENT_CERT_VERIFIED", "SUCCESS"),
]


@pytest.mark.parametrize("label", ["no-cert", "trusted", "unknown"])
def test_spoofed_certificate_headers_never_reach_the_upstream(
    edges: Edges, clients: dict[str, Client], label: str
) -> None:
    client = clients[label]
    outcome = stdlib_attempt(edges.mode(ClientAuth.OPTIONAL), client, SPOOFED)
    assert outcome.status == 200 and outcome.headers is not None, outcome
    verified = EXPECTED[(ClientAuth.OPTIONAL, label)]
    assert isinstance(verified, Accepted)
    check_identity_headers(outcome.headers, client, verified.verified)
    received = json.dumps(outcome.headers)
    assert ":AAAA:" not in received and "0" * 64 not in received and "CN=admin" not in received


def test_spoofed_headers_through_curl(edges: Edges, clients: dict[str, Client], pki_files: dict[str, Path]) -> None:
    edge = edges.mode(ClientAuth.REQUIRE_ANY)
    client = clients["unknown"]
    extra = [arg for name, value in SPOOFED for arg in ("-H", f"{name}: {value}")]
    result = curl(edge, client, pki_files["ca.pem"], *extra)
    assert result.returncode == 0, result.stderr
    body, _, code = result.stdout.rpartition("\n")
    assert code == "200"
    check_identity_headers(upstream_headers(body.encode()), client, "FAILED:unknown_ca")


# --------------------------------------------------------------------------- allow-lists


def with_allow(rules: tuple[AllowRule, ...]) -> Callable[[Config], Config]:
    def mutate(config: Config) -> Config:
        sni = tuple(replace(r, allow=rules) if r.name == "mc-api" else r for r in config.sni_routes)
        return replace(config, sni_routes=sni)

    return mutate


def counter(name: str, labels: dict[str, str]) -> float:
    return metrics.registry_for_exposition().get_sample_value(name, labels) or 0.0


ALLOW_CASES = {
    # rule kind -> clients let in (everyone else gets 403)
    "sha256": {"trusted"},
    "spki": {"trusted"},
    "dns": {"trusted"},
    "uri": {"trusted"},
    "cn": {"trusted"},
    "sha256-impostor": {"impostor"},  # a pin needs no chain: it names the exact certificate
    "spki-impostor": {"impostor"},
}


def allow_rule(kind: str, clients: dict[str, Client]) -> AllowRule:
    if kind == "sha256":
        return AllowRule("sha256", clients["trusted"].sha256)
    if kind == "spki":
        return AllowRule("spki", clients["trusted"].spki_sha256)
    if kind == "sha256-impostor":
        return AllowRule("sha256", clients["impostor"].sha256)
    if kind == "spki-impostor":
        return AllowRule("spki", clients["impostor"].spki_sha256)
    value = {"dns": f"{CLIENT_NAME}.localhost", "uri": CLIENT_URI, "cn": CLIENT_NAME}[kind]
    return AllowRule(kind, value)


@pytest.mark.parametrize("kind", list(ALLOW_CASES))
def test_allow_list(pki: DemoPki, pki_files: dict[str, Path], clients: dict[str, Client], kind: str) -> None:
    rule = allow_rule(kind, clients)
    edge = Edge.start(
        pki, client_auth=ClientAuth.OPTIONAL, client_ca_file=str(pki_files["ca.pem"]), mutate=with_allow((rule,))
    )
    try:
        for label in ("trusted", "other-trusted", "impostor", "no-cert"):
            client = clients[label]
            denied_labels = {"route": "mc-api"}
            forbidden_before = counter("nextproxy_requests_total", {"route": "mc-api", "code": "403"})
            reasons = ("no_certificate", "not_allowed", "not_allowed_unverified")
            denied_before = {r: counter("nextproxy_authorization_denied_total", {**denied_labels, "reason": r}) for r in reasons}
            requests_before = edge.standins["mc-api"].requests
            outcome = stdlib_attempt(edge, client)
            if label in ALLOW_CASES[kind]:
                assert outcome.status == 200, (label, outcome)
                continue
            reason = "no_certificate" if client.pem is None else "not_allowed" if label != "impostor" else "not_allowed_unverified"
            assert outcome.status == 403, (label, outcome)
            assert outcome.body == reason.encode() + b"\n"
            assert edge.standins["mc-api"].requests == requests_before  # never forwarded
            assert counter("nextproxy_requests_total", {"route": "mc-api", "code": "403"}) == forbidden_before + 1
            for r in reasons:
                expected = denied_before[r] + (1 if r == reason else 0)
                assert counter("nextproxy_authorization_denied_total", {**denied_labels, "reason": r}) == expected
            fingerprint = client.sha256 if client.pem is not None else "-"
            denial = [
                json.loads(line) for line in edge.logs().splitlines() if '"authorization_denied"' in line
            ][-1]
            assert (denial["route"], denial["reason"], denial["fingerprint"]) == ("mc-api", reason, fingerprint)
    finally:
        edge.close()


def test_allow_list_through_curl(pki: DemoPki, pki_files: dict[str, Path], clients: dict[str, Client]) -> None:
    rule = AllowRule("cn", CLIENT_NAME)
    edge = Edge.start(
        pki, client_auth=ClientAuth.REQUIRE_ANY, client_ca_file=str(pki_files["ca.pem"]), mutate=with_allow((rule,))
    )
    try:
        for label, code in (("trusted", "200"), ("impostor", "403")):
            result = curl(edge, clients[label], pki_files["ca.pem"])
            assert result.returncode == 0, result.stderr
            assert result.stdout.rpartition("\n")[2] == code, (label, result.stdout)
    finally:
        edge.close()


# --------------------------------------------------------------------------- several certificates by SNI


def test_certificate_chosen_by_sni(pki: DemoPki, pki_files: dict[str, Path], clients: dict[str, Client]) -> None:
    """Three certificates on one port: exact name, wildcard, and the default for anything else.

    The API name's certificate is not the default's, and its client-auth mode comes with it:
    the whole context is picked from the SNI before the handshake.
    """
    ca = demo_ca(pki)
    default = make_leaf(ca, "default edge", dns=("localhost",))
    api = make_leaf(ca, "api edge", dns=(TERMINATED_API_NAME,))
    wildcard = make_leaf(ca, "wildcard edge", dns=("*.wild.localhost",))
    pairs = tuple(
        CertificateConfig(PemSource(i.cert_pem, f"cert{n}.pem"), PemSource(i.key_pem, f"cert{n}.key"))
        for n, i in enumerate((default, api, wildcard))
    )
    edge = Edge.start(
        pki, certificates=pairs, client_auth=ClientAuth.REQUIRE_ANY, client_ca_file=str(pki_files["ca.pem"])
    )
    try:
        for server_name, served in (
            ("localhost", default),
            (TERMINATED_API_NAME, api),
            ("a.wild.localhost", wildcard),
            ("unknown.example", default),
        ):
            context = edge.client_context(pki.client)
            if served is not default or server_name == "localhost":
                sock = edge.tls_socket(server_name, context)  # hostname checked by the client too
            else:
                context.check_hostname = False
                sock = edge.tls_socket(server_name, context)
            try:
                assert sock.getpeercert(binary_form=True) == served.der, server_name
            finally:
                sock.close()
        # Same port: localhost has no client auth, the API name requires a certificate.
        plain = edge.request("GET", "/ns/sigmai/x")
        assert plain[0] == 200
        assert "x-forwarded-client-cert" not in upstream_headers(plain[2])
        outcome = stdlib_attempt(edge, clients["no-cert"])
        assert "CERTIFICATE_REQUIRED" in outcome.error.upper(), outcome
        outcome = stdlib_attempt(edge, clients["trusted"])
        assert outcome.status == 200 and outcome.headers is not None
        check_identity_headers(outcome.headers, clients["trusted"], "SUCCESS")
    finally:
        edge.close()


def test_certificate_chosen_by_sni_with_curl(pki: DemoPki, pki_files: dict[str, Path], tmp_path: Path) -> None:
    ca = demo_ca(pki)
    other = make_leaf(ca, "other edge", dns=("other.test",))
    pairs = (
        CertificateConfig(PemSource(pki.edge.certificate, "edge.pem"), PemSource(pki.edge.key, "edge.key")),
        CertificateConfig(PemSource(other.cert_pem, "other.pem"), PemSource(other.key_pem, "other.key")),
    )
    edge = Edge.start(pki, certificates=pairs)
    try:
        assert CURL
        for name, subject in (("other.test", "CN=other edge"), ("localhost", "CN=nextproxy demo edge")):
            result = subprocess.run(
                [CURL, "-sS", "-v", "--max-time", "10", "--cacert", str(pki_files["ca.pem"]),
                 "--resolve", f"{name}:{edge.port}:127.0.0.1", "-o", "/dev/null", "-w", "%{http_code}",
                 f"https://{name}:{edge.port}/nowhere"],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert result.stdout == "404"  # routed by path: the handshake (and name check) passed
            assert f"subject: {subject}" in result.stderr.replace("subject: CN = ", "subject: CN="), result.stderr
    finally:
        edge.close()


# --------------------------------------------------------------------------- resumption


def fetch_with_session(
    edge: Edge, server_name: str, context: ssl.SSLContext, path: str, session: ssl.SSLSession | None
) -> tuple[bool, ssl.SSLSession | None, bytes]:
    """One request on a fresh connection offering ``session``: (resumed?, session after, body)."""
    sock = context.wrap_socket(edge.raw_socket(), server_hostname=server_name, session=session)
    try:
        resumed = bool(sock.session_reused)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        for _ in range(1000):  # bounded: the response is a few KiB and ends with the close
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
        # TLS 1.3 tickets arrive after the handshake: the session is complete only now.
        return resumed, sock.session, data
    finally:
        sock.close()


@pytest.mark.parametrize("mode", [ClientAuth.OPTIONAL, ClientAuth.REQUIRE_ANY, ClientAuth.REQUIRE_CA])
def test_resumption_never_skips_the_client_certificate(edges: Edges, clients: dict[str, Client], mode: ClientAuth) -> None:
    """Client-auth contexts resume nothing: the second connection offers the first one's session,
    gets a full handshake, and the identity is forwarded again. The control (a name without client
    auth, same proxy, same client) does resume, which shows the session really was offered."""
    edge = edges.mode(mode)
    client = clients["trusted"]
    context = edge.client_context(client.pem)
    for server_name, path, resumes in (("localhost", "/ns/sigmai/r", True), (TERMINATED_API_NAME, "/r", False)):
        first_resumed, session, _ = fetch_with_session(edge, server_name, context, path, None)
        assert not first_resumed and session is not None
        before = handshake_counts()
        resumed, _, data = fetch_with_session(edge, server_name, context, path, session)
        assert resumed is resumes, server_name
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert delta(before)["ok"] == 1
        if server_name == TERMINATED_API_NAME:
            check_identity_headers(upstream_headers(body), client, "SUCCESS")


def test_a_fresh_self_signed_certificate_per_request_buys_no_fresh_rate_limit(pki: DemoPki, pki_files: dict[str, Path]) -> None:
    """Found by black-box testing: the rate limit was keyed by any presented certificate, so a
    client minting one per connection was never limited. Unverified ones now count by address;
    a verified certificate still has a bucket of its own."""
    from nextproxy.config.model import RateLimitConfig

    def limited(config: Config) -> Config:
        sni = tuple(replace(r, rate_limit=RateLimitConfig(0.01, 2)) if r.name == "mc-api" else r for r in config.sni_routes)
        return replace(config, sni_routes=sni)

    edge = Edge.start(pki, client_auth=ClientAuth.OPTIONAL, client_ca_file=str(pki_files["ca.pem"]), mutate=limited)
    try:
        statuses = []
        for i in range(4):
            minted = as_pem(make_leaf(None, f"throwaway {i}", client=True))
            statuses.append(stdlib_attempt(edge, Client(f"minted-{i}", minted, None)).status)
        assert statuses == [200, 200, 429, 429]
        assert stdlib_attempt(edge, Client("trusted", pki.client, None)).status == 200  # its own bucket
        assert counter("nextproxy_rate_limited_total", {"route": "mc-api", "key": "ip"}) >= 2
    finally:
        edge.close()
