"""Passthrough by SNI: raw TCP to an upstream that does its own TLS and client-certificate checks."""

from __future__ import annotations

import hashlib
import time
import json
import socket
import ssl

from cryptography import x509

from nextproxy.demo.standins import pattern_sha256
from nextproxy.config.model import Config
from nextproxy.demo.pki import DemoPki
from tests.integration.harness import API_NAME, Edge, dead_server_first


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
    import json
    import time

    def lines() -> list[dict[str, object]]:
        return [json.loads(line) for line in edge.logs().splitlines() if '"event":"passthrough"' in line]

    before = len(lines())
    opened = time.monotonic()
    sock = edge.tls_socket(API_NAME, context=api_context(edge, with_client_cert=False))
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {API_NAME}\r\nConnection: close\r\n\r\n".encode())
    read_response(sock)
    time.sleep(0.2)  # a duration the line must show
    sock.close()
    lived = time.monotonic() - opened
    for _ in range(50):
        if len(lines()) > before:
            break
        time.sleep(0.05)
    [line] = lines()[before:]
    assert line["route"] == "ns-api" and line["bytes_to_client"] and line["bytes_to_upstream"], line
    assert isinstance(line["duration_s"], float) and 0.2 <= line["duration_s"] <= lived + 0.5, line


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


def test_max_connections_refuses_the_excess(pki: DemoPki) -> None:
    from nextproxy.config.model import Limits

    edge = Edge.start(pki, limits=Limits(max_connections=3))
    try:
        held = [edge.raw_socket() for _ in range(3)]
        import time

        time.sleep(0.2)
        extra = edge.raw_socket()
        extra.settimeout(5)
        try:
            assert extra.recv(10) == b""
        except ConnectionResetError:
            pass
        extra.close()
        for sock in held:
            sock.close()
        time.sleep(0.2)
        status, _, _ = edge.request("GET", "/ns/sigmai")
        assert status == 200
        assert "connections_refused" in edge.logs()
    finally:
        edge.close()


def test_replayed_hello_half_close_and_byte_exactness(pki: DemoPki) -> None:
    """A raw TCP upstream sees exactly the client's bytes, then EOF, and can still answer."""
    import dataclasses
    import threading

    from nextproxy.config.model import Address
    from tests.hellos import openssl_hello

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    seen: dict[str, bytes] = {}

    def upstream() -> None:
        for _ in range(5):  # the proxy's health probe connects too, and sends nothing
            conn, _ = listener.accept()
            conn.settimeout(10)
            data = b""
            while chunk := conn.recv(65536):  # until the client's half-close arrives as EOF
                data += chunk
            if data:
                seen["data"] = data
                conn.sendall(b"got:" + data)  # the other direction still flows
                conn.close()
                return
            conn.close()

    thread = threading.Thread(target=upstream)
    thread.start()
    address = Address(*listener.getsockname())

    def point_api_at_raw_server(config: Config) -> Config:
        upstreams = tuple(dataclasses.replace(u, servers=(address,)) if u.name == "ns-api" else u for u in config.upstreams)
        return dataclasses.replace(config, upstreams=upstreams)

    edge = Edge.start(pki, mutate=point_api_at_raw_server)
    try:
        hello = openssl_hello(server_name=API_NAME)
        payload = hello + bytes(range(256)) * 512
        client = edge.raw_socket()
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
        client.close()
        thread.join(10)
        assert seen["data"] == payload
        assert answer == b"got:" + payload
    finally:
        edge.close()
        listener.close()


def test_idle_passthrough_is_closed_after_the_idle_timeout(pki: DemoPki) -> None:
    from nextproxy.config.model import Timeouts
    from tests.hellos import openssl_hello

    edge = Edge.start(pki, timeouts=Timeouts(passthrough_idle=0.6, connect=2))
    try:
        client = edge.raw_socket()
        client.sendall(openssl_hello(server_name=API_NAME))  # the real upstream answers, then silence
        client.settimeout(5)
        started = time.monotonic()
        received = b""
        try:
            while chunk := client.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        elapsed = time.monotonic() - started
        client.close()
        assert received.startswith(b"\x16\x03")  # the upstream's ServerHello came through
        assert 0.5 < elapsed < 3, elapsed  # then nothing moved for passthrough_idle: closed
    finally:
        edge.close()


def test_a_dead_passthrough_server_is_skipped(pki: DemoPki) -> None:
    """The passthrough upstream's first server refuses: the hello is replayed to the next one."""
    edge = Edge.start(pki, mutate=dead_server_first("ns-api"))
    try:
        sock = edge.tls_socket(API_NAME, context=api_context(edge, with_client_cert=False))
        try:
            assert sock.getpeercert(binary_form=True) == der(edge.pki.upstream.certificate)
            sock.sendall(f"GET /v1/who HTTP/1.1\r\nHost: {API_NAME}\r\nConnection: close\r\n\r\n".encode())
            assert read_response(sock).startswith(b"HTTP/1.1 200")
        finally:
            sock.close()
    finally:
        edge.close()


def test_a_failed_passthrough_connect_is_filed_under_the_upstream(pki: DemoPki) -> None:
    """As an HTTP route's failure is: the status page's row and the health are the upstream's
    (it was filed under the SNI route's name, a row of its own with nothing else in it)."""
    from dataclasses import replace

    from tests.integration.harness import refusing_port

    from nextproxy.config.model import Address, Upstream

    dead = Address(*refusing_port().getsockname())

    def renamed(config: Config) -> Config:
        sni = tuple(replace(r, upstream="api-servers") if r.name == "ns-api" else r for r in config.sni_routes)
        return replace(config, upstreams=(*config.upstreams, Upstream("api-servers", (dead,))), sni_routes=sni)

    edge = Edge.start(pki, mutate=renamed)
    try:
        raw = socket.create_connection(("127.0.0.1", edge.port), timeout=10)
        try:
            api_context(edge, with_client_cert=False).wrap_socket(raw, server_hostname=API_NAME)
        except (ssl.SSLError, OSError):
            pass  # the client is closed: nothing answered the hello
        finally:
            raw.close()
        deadline = time.monotonic() + 5
        while "passthrough connect failed" not in edge.logs() and time.monotonic() < deadline:
            time.sleep(0.05)
        [line] = [json.loads(line) for line in edge.logs().splitlines() if "passthrough connect failed" in line]
        assert line["upstream"] == "api-servers" and "passthrough connect failed (ns-api)" in line["detail"], line
    finally:
        edge.close()
