"""Re-encryption: the proxy as a TLS 1.3 client of its upstreams, against real TLS stand-ins.

The stand-ins serve the demo PKI's upstream certificate (issued by the demo CA) and, with
``upstream_reports_tls``, report what their side of the TLS connection saw: version, SNI and the
client certificate the proxy presented. A failed verification must be a 502 with a log line
that says why, never a silent fallback to cleartext or to an unverified connection.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from nextproxy.config.model import CertificateConfig, Config, PathRoute, PemSource, Upstream, UpstreamTls
from nextproxy.demo.pki import DemoPki
from tests.integration.harness import TERMINATED_API_NAME, Edge
from nextproxy.demo.pki import make_ca, make_leaf


def client_pair(pki: DemoPki) -> CertificateConfig:
    return CertificateConfig(PemSource(pki.client.certificate, "upstream client.pem"), PemSource(pki.client.key, "upstream client.key"))


def client_sha256(pki: DemoPki) -> str:
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return hashlib.sha256(x509.load_pem_x509_certificate(pki.client.certificate).public_bytes(Encoding.DER)).hexdigest()


def get(edge: Edge, path: str, server_name: str = "localhost") -> tuple[int, dict[str, object] | bytes]:
    status, _, body = edge.request("GET", path, server_name=server_name)
    return status, (json.loads(body) if status == 200 else body)


def upstream_errors(edge: Edge) -> list[dict[str, str]]:
    return [json.loads(line) for line in edge.logs().splitlines() if '"upstream_error"' in line]


@pytest.fixture(scope="module")
def verified_edge(pki: DemoPki, pki_files: dict[str, Path]) -> Iterator[Edge]:
    """Upstreams verified against the demo CA; the proxy presents the demo client certificate."""
    edge = Edge.start(
        pki,
        upstream_tls=UpstreamTls(ca_file=str(pki_files["ca.pem"]), client_certificate=client_pair(pki)),
        upstream_reports_tls=True,
    )
    try:
        yield edge
    finally:
        edge.close()


@pytest.mark.parametrize("path, service", [("/ns/sigmai/x", "ns-sigmai"), ("/sfs/sigmai/y", "sfs-sigmai")])
def test_request_is_re_encrypted_with_tls13(verified_edge: Edge, pki: DemoPki, path: str, service: str) -> None:
    status, report = get(verified_edge, path)
    assert status == 200 and isinstance(report, dict), report
    assert report["service"] == service and report["path"] == path
    tls = report["tls"]
    assert isinstance(tls, dict)
    assert tls["version"] == "TLSv1.3"
    assert tls["alpn"] == "http/1.1"
    # The stand-in requires a client certificate here, and got the configured one.
    assert tls["client_cert_sha256"] == client_sha256(pki)
    assert tls["client_cert_subject"] == "CN=demo-client"


def test_terminated_api_name_is_re_encrypted_too(verified_edge: Edge) -> None:
    status, report = get(verified_edge, "/api", server_name=TERMINATED_API_NAME)
    assert status == 200 and isinstance(report, dict)
    assert report["service"] == "mc-api"
    assert report["tls"]["version"] == "TLSv1.3"  # type: ignore[index]


def test_pooled_tls_connections_are_reused(verified_edge: Edge) -> None:
    standin = verified_edge.standins["mc-sigmai"]
    get(verified_edge, "/mc/sigmai/warm")  # leaves one pooled connection behind
    before_connections, before_requests = standin.connections, standin.requests
    for i in range(5):  # five client connections, one after the other
        status, report = get(verified_edge, f"/mc/sigmai/{i}")
        assert status == 200 and isinstance(report, dict) and report["path"] == f"/mc/sigmai/{i}"
    assert standin.requests - before_requests == 5
    assert standin.connections == before_connections  # every request rode the pooled TLS connection


def test_new_upstream_connections_resume_the_servers_last_session(verified_edge: Edge, pki: DemoPki) -> None:
    """Every new upstream TLS connection was a full handshake (nginx, HAProxy and Envoy resume).
    The stand-in closes after each answer (``close=1``), so each request needs a new upstream
    connection: after the first, each resumes, with the client certificate still the one the
    full handshake presented."""
    reports = []
    for i in range(4):
        status, report = get(verified_edge, f"/sfs/sigmai/resume-{i}?close=1")
        assert status == 200 and isinstance(report, dict), report
        reports.append(report["tls"])
    assert [tls["resumed"] for tls in reports[1:]] == [True, True, True]
    assert {tls["version"] for tls in reports} == {"TLSv1.3"}
    assert {tls["client_cert_sha256"] for tls in reports} == {client_sha256(pki)}


def test_each_server_of_an_upstream_resumes_its_own_session(pki: DemoPki, pki_files: dict[str, Path]) -> None:
    """Sessions are kept per server, as nginx keeps them per peer: one slot per upstream would
    offer each server the other's session on every turn of the round robin (both are
    ``127.0.0.1`` to TLS), and never resume."""

    def one_upstream_two_servers(config: Config) -> Config:
        servers = tuple(next(u for u in config.upstreams if u.name == name).servers[0] for name in ("ns-sigmai", "ns-api"))
        pair = Upstream("pair", servers, UpstreamTls(ca_file=str(pki_files["ca.pem"])))
        return replace(config, upstreams=config.upstreams + (pair,), routes=config.routes + (PathRoute("pair", "/pair", "pair"),))

    edge = Edge.start(pki, upstream_tls=UpstreamTls(ca_file=str(pki_files["ca.pem"])), upstream_reports_tls=True, mutate=one_upstream_two_servers)
    try:
        answers = []
        for i in range(6):
            status, report = get(edge, f"/pair/{i}?close=1")
            assert status == 200 and isinstance(report, dict), report
            answers.append((report["service"], report["tls"]["resumed"]))  # type: ignore[index]
        assert {service for service, _ in answers} == {"ns-sigmai", "ns-api"}  # both served (two TLS contexts: two ticket keys)
        assert all(resumed for _, resumed in answers[2:]), answers
    finally:
        edge.close()


def test_curl_through_a_re_encrypting_proxy(verified_edge: Edge, pki_files: dict[str, Path]) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is installed by .ci/run"
    port = verified_edge.port
    result = subprocess.run(
        [curl, "-sS", "--max-time", "10", "--cacert", str(pki_files["ca.pem"]),
         "--resolve", f"localhost:{port}:127.0.0.1", f"https://localhost:{port}/ns/sigmai/curl"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tls"]["version"] == "TLSv1.3"


def test_sni_and_name_verification(pki: DemoPki, pki_files: dict[str, Path]) -> None:
    """``server_name`` is sent as SNI and verified against the upstream's certificate."""
    ca = str(pki_files["ca.pem"])
    edge = Edge.start(pki, upstream_tls=UpstreamTls(ca_file=ca, server_name="localhost"), upstream_reports_tls=True)
    try:
        status, report = get(edge, "/ns/sigmai/sni")
        assert status == 200 and isinstance(report, dict)
        assert report["tls"]["server_name"] == "localhost"  # type: ignore[index]
    finally:
        edge.close()
    edge = Edge.start(pki, upstream_tls=UpstreamTls(ca_file=ca, server_name="not-the-upstream.example"))
    try:
        before = edge.standins["ns-sigmai"].requests
        status, body = get(edge, "/ns/sigmai/wrong-name")
        assert status == 502, body
        assert edge.standins["ns-sigmai"].requests == before
        errors = upstream_errors(edge)
        assert errors and "certificate verify failed" in errors[-1]["detail"]
        assert "Hostname mismatch" in errors[-1]["detail"], errors[-1]
    finally:
        edge.close()


def test_wrong_ca_is_a_502_with_a_clear_log_line(pki: DemoPki, tmp_path: Path) -> None:
    other_ca = make_ca("some other CA")
    ca_file = tmp_path / "other-ca.pem"
    ca_file.write_bytes(other_ca.cert_pem)
    edge = Edge.start(pki, upstream_tls=UpstreamTls(ca_file=str(ca_file)))
    try:
        standin = edge.standins["sfs-sigmai"]
        for attempt in range(2):  # and again: a failure is never cached into a cleartext retry
            status, body = get(edge, "/sfs/sigmai/x")
            assert status == 502, body
        assert standin.requests == 0  # no request ever reached it
        errors = upstream_errors(edge)
        assert len(errors) == 2
        assert errors[-1]["upstream"] == "sfs-sigmai"
        assert "TLS to upstream failed" in errors[-1]["detail"]
        assert "certificate verify failed" in errors[-1]["detail"]
    finally:
        edge.close()


def test_upstream_requiring_a_client_certificate_without_one_is_a_502(pki: DemoPki, pki_files: dict[str, Path]) -> None:
    edge = Edge.start(
        pki, upstream_tls=UpstreamTls(ca_file=str(pki_files["ca.pem"])), upstream_requires_client_cert=True
    )
    try:
        standin = edge.standins["ns-sigmai"]
        status, body = get(edge, "/ns/sigmai/no-client-cert")
        assert status == 502, body
        assert standin.requests == 0
        # TLS 1.3: the upstream refuses after the proxy's side of the handshake succeeded, so the
        # refusal arrives as a certificate_required alert on the connection, once the request
        # has been written; the exchange is still answered (and logged) as a 502.
        logged = [json.loads(line) for line in edge.logs().splitlines() if '"event":"request"' in line]
        assert [(r["route"], r["status"]) for r in logged] == [("ns-sigmai", 502)]
    finally:
        edge.close()


def test_self_signed_upstream_is_refused_even_with_its_own_name(pki: DemoPki, pki_files: dict[str, Path], tmp_path: Path) -> None:
    """A certificate with the right name but no chain to the CA: 502, never trusted."""
    from nextproxy.demo.pki import Pem, server_ssl_context
    from nextproxy.demo.standins import start_http_ws

    liar = make_leaf(None, "localhost", dns=("localhost", "127.0.0.1"))
    edge = Edge.start(pki, upstream_tls=UpstreamTls(ca_file=str(pki_files["ca.pem"]), server_name="localhost"))
    try:
        # Swap the sfs stand-in for one serving the self-signed certificate, on the same port.
        host, port = edge.stop_upstream("sfs-sigmai")

        async def impostor() -> object:
            return await start_http_ws(host, port, "sfs-sigmai", server_ssl_context(Pem(liar.cert_pem, liar.key_pem)))

        edge.standins["sfs-sigmai"] = edge.thread.call(impostor())  # type: ignore[assignment]
        status, body = get(edge, "/sfs/sigmai/liar")
        assert status == 502, body
        assert edge.standins["sfs-sigmai"].requests == 0
        assert "certificate verify failed" in upstream_errors(edge)[-1]["detail"]
    finally:
        edge.close()


def test_a_pooled_connection_never_serves_another_upstream_on_the_same_server(pki: DemoPki, pki_files: dict[str, Path]) -> None:
    """Two upstreams naming one server with different TLS settings share no pooled connection:
    a connection verified for ``ns-sigmai`` must not carry a request for an upstream whose own
    verification (here: the wrong server_name) fails, and a plain upstream must not ride it."""
    ca = str(pki_files["ca.pem"])

    def same_server_twice(config: Config) -> Config:
        server = next(u for u in config.upstreams if u.name == "ns-sigmai").servers
        wrong = Upstream("wrong-name", server, UpstreamTls(ca_file=ca, server_name="not-the-upstream.example"))
        plain = Upstream("plain", server, None)
        routes = (PathRoute("wrong-name", "/wrong", "wrong-name"), PathRoute("plain", "/plain", "plain"))
        return replace(config, upstreams=config.upstreams + (wrong, plain), routes=config.routes + routes)

    edge = Edge.start(pki, upstream_tls=UpstreamTls(ca_file=ca), upstream_reports_tls=True, mutate=same_server_twice)
    try:
        standin = edge.standins["ns-sigmai"]
        for i in range(3):
            # One client connection per request, so the pooled upstream connection is the only
            # thing the requests could share.
            status, report = get(edge, f"/ns/sigmai/{i}")
            assert status == 200 and isinstance(report, dict), report
            served = standin.requests
            status, body = get(edge, f"/wrong/{i}")
            assert status == 502, body
            assert "Hostname mismatch" in upstream_errors(edge)[-1]["detail"]
            status, body = get(edge, f"/plain/{i}")
            assert status == 502, body  # cleartext to a TLS server: it never parses a request
            assert standin.requests == served
    finally:
        edge.close()
