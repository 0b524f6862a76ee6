"""Passthrough by SNI: raw TCP to an upstream that does its own TLS and client-certificate checks."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl

from cryptography import x509

from nextproxy.standins import pattern_sha256
from tests.integration.harness import API_NAME, Edge


def der(pem: bytes) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def api_context(edge: Edge, with_client_cert: bool) -> ssl.SSLContext:
    context = edge.client_context(edge.pki.client if with_client_cert else None)
    context.check_hostname = False  # the stand-in's certificate names the upstream, not API_NAME
    return context


def read_response(sock: ssl.SSLSocket) -> bytes:
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    return data


def test_client_sees_the_upstream_certificate_and_upstream_sees_the_client(edge: Edge) -> None:
    sock = edge.tls_socket(API_NAME, context=api_context(edge, with_client_cert=True))
    try:
        assert sock.getpeercert(binary_form=True) == der(edge.pki.upstream.certificate)
        sock.sendall(f"GET /v1/who HTTP/1.1\r\nHost: {API_NAME}\r\nConnection: close\r\n\r\n".encode())
        head, _, body = read_response(sock).partition(b"\r\n\r\n")
    finally:
        sock.close()
    assert head.startswith(b"HTTP/1.1 200")
    report = json.loads(body)
    assert report["service"] == "ns-api"
    tls = report["tls"]
    assert tls["client_cert_sha256"] == hashlib.sha256(der(edge.pki.client.certificate)).hexdigest()
    assert tls["server_name"] == API_NAME
    # Passthrough never adds forwarding headers: the proxy does not see the HTTP at all.
    assert "x-forwarded-for" not in [name for name, _ in report["headers"]]


def test_bulk_transfer_is_byte_exact(edge: Edge) -> None:
    size = 16 * 1024 * 1024
    sock = edge.tls_socket(API_NAME, context=api_context(edge, with_client_cert=False))
    try:
        sock.sendall(f"GET /bulk?bytes={size} HTTP/1.1\r\nHost: {API_NAME}\r\nConnection: close\r\n\r\n".encode())
        data = read_response(sock)
    finally:
        sock.close()
    body = data.partition(b"\r\n\r\n")[2]
    assert len(body) == size and hashlib.sha256(body).hexdigest() == pattern_sha256(size)


def test_passthrough_is_counted_and_logged(edge: Edge) -> None:
    sock = edge.tls_socket(API_NAME, context=api_context(edge, with_client_cert=False))
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {API_NAME}\r\nConnection: close\r\n\r\n".encode())
    read_response(sock)
    sock.close()
    for _ in range(50):
        if '"event":"passthrough"' in edge.logs():
            break
        import time

        time.sleep(0.05)
    assert '"route":"ns-api"' in edge.logs()


def test_upstream_down_closes_the_client(edge: Edge) -> None:
    edge.stop_upstream("ns-api")
    raw = socket.create_connection(("127.0.0.1", edge.port), timeout=10)
    context = api_context(edge, with_client_cert=False)
    try:
        try:
            sock = context.wrap_socket(raw, server_hostname=API_NAME)
        except (ssl.SSLError, ConnectionError, OSError):
            return  # refused during the handshake: the expected outcome
        assert sock.recv(10) == b""
    finally:
        raw.close()
