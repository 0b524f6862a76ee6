"""Terminated TLS: real TLS clients through the proxy to real upstream servers on loopback."""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import socket
import ssl
import struct
import subprocess
import time

import pytest

from nextproxy.config.model import Timeouts
from nextproxy.demo.pki import DemoPki
from nextproxy.process import metrics
from nextproxy.demo.standins import pattern_sha256
from tests.integration.harness import PATH_ROUTES, Edge, dead_server_first

MiB = 1024 * 1024


def closed_by_peer(sock: socket.socket) -> bool:
    """True when the proxy closes the connection (EOF or reset) within 5 s, sending nothing."""
    sock.settimeout(5)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


def echo(edge: Edge, path: str, **kwargs: object) -> dict[str, object]:
    status, _, body = edge.request("GET", path, **kwargs)  # type: ignore[arg-type]
    assert status == 200, body
    return json.loads(body)  # type: ignore[no-any-return]


@pytest.mark.parametrize("route, prefix", PATH_ROUTES)
def test_each_path_reaches_its_upstream(edge: Edge, route: str, prefix: str) -> None:
    report = echo(edge, prefix + "/hello?x=1")
    assert report["service"] == route
    assert report["path"] == prefix + "/hello?x=1"  # forwarded unchanged


def test_encoded_slashes_reach_the_upstream_byte_for_byte(edge: Edge) -> None:
    assert echo(edge, "/ns/sigmai/files/a%2Fb%2fc%5Cd")["path"] == "/ns/sigmai/files/a%2Fb%2fc%5Cd"
    # ... but never a way out of the route: dot segments, or another route once decoded.
    for escape in ("/ns/sigmai/a%2F..%2F..%2Fmc/sigmai", "/ns%2Fsigmai/x", "/mc/sigmai/..%2F..%2Fns/sigmai"):
        status, _, body = edge.request("GET", escape)
        assert status == 400, (escape, body)


def test_headers_as_the_upstream_received_them(edge: Edge) -> None:
    spoofed = {
        "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Proto": "http",
        "X-Forwarded-Host": "evil.example",
        "Forwarded": "for=6.6.6.6",
        "X-Client-Cert-Verified": "SUCCESS",
        "X-Forwarded-Client-Cert": "Hash=00",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "drop me",
        "X-Custom": "kept",
    }
    report = echo(edge, "/ns/sigmai/h", headers=spoofed)
    headers = report["headers"]
    assert isinstance(headers, list)
    names = [name for name, _ in headers]
    values = dict(headers)
    assert values["host"] == f"localhost:{edge.port}"
    assert values["x-forwarded-for"] == "127.0.0.1"
    assert values["x-forwarded-proto"] == "https"
    assert values["x-forwarded-host"] == f"localhost:{edge.port}"
    assert values["x-custom"] == "kept"
    for gone in ("forwarded", "x-client-cert-verified", "x-forwarded-client-cert", "x-hop"):
        assert gone not in names
    assert names.count("x-forwarded-for") == 1


def test_underscore_and_case_spoofing_is_removed(edge: Edge) -> None:
    report = echo(edge, "/ns/sigmai", headers={"X_Forwarded_For": "6.6.6.6", "x-forwarded-PROTO": "http"})
    headers = report["headers"]
    assert isinstance(headers, list)
    names = [n for n, _ in headers]
    assert "x_forwarded_for" not in names and names.count("x-forwarded-for") == 1
    assert dict(headers)["x-forwarded-proto"] == "https" and names.count("x-forwarded-proto") == 1


def test_keep_alive_several_requests_one_connection(edge: Edge) -> None:
    standin = edge.standins["mc-sigmai"]
    before = standin.connections
    conn = edge.https()
    try:
        for i in range(5):
            conn.request("GET", f"/mc/sigmai/{i}")
            response = conn.getresponse()
            assert response.status == 200
            assert json.loads(response.read())["path"] == f"/mc/sigmai/{i}"
    finally:
        conn.close()
    assert standin.connections - before <= 2  # the upstream connection was pooled and reused


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_8_mib_response_byte_exact(edge: Edge, chunked: bool) -> None:
    size = 8 * MiB
    status, headers, body = edge.request("GET", f"/sfs/sigmai/big?bytes={size}&chunked={int(chunked)}")
    assert status == 200 and len(body) == size
    assert hashlib.sha256(body).hexdigest() == pattern_sha256(size) == headers["x-body-sha256"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_1_mib_request_body_streams_byte_exact(edge: Edge, chunked: bool) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    conn = edge.https()
    try:
        if chunked:
            conn.putrequest("POST", "/ns/sigmai/echo")
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for i in range(0, len(payload), 100_000):
                piece = payload[i : i + 100_000]
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        else:
            conn.request("POST", "/ns/sigmai/echo", body=payload)
        response = conn.getresponse()
        assert response.status == 200
        assert response.read() == payload
    finally:
        conn.close()
    report = echo(edge, "/ns/sigmai/after")  # and the proxy is fine afterwards
    assert report["service"] == "ns-sigmai"


def test_curl_through_the_proxy(edge: Edge, pki_files: dict[str, object]) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is installed by .ci/run"
    result = subprocess.run(
        [curl, "-sS", "-v", "--max-time", "10", "--cacert", str(pki_files["ca.pem"]),
         "--resolve", f"localhost:{edge.port}:127.0.0.1", "-w", "\n%{http_code}",
         f"https://localhost:{edge.port}/mc/sigmai/curl"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    body, _, trailer = result.stdout.rpartition("\n")
    assert trailer == "200"
    assert "SSL connection using TLSv1.3" in result.stderr
    assert json.loads(body)["service"] == "mc-sigmai"


def test_curl_with_an_absolute_form_target(edge: Edge, pki_files: dict[str, object]) -> None:
    """RFC 9112 section 3.2.2: a server must accept the absolute-form (a client configured with
    a proxy sends it); the upstream gets the origin-form and the authority as Host."""
    curl = shutil.which("curl")
    assert curl, "curl is installed by .ci/run"
    origin = f"https://localhost:{edge.port}"
    result = subprocess.run(
        [curl, "-sS", "--max-time", "10", "--cacert", str(pki_files["ca.pem"]),
         "--resolve", f"localhost:{edge.port}:127.0.0.1", "-H", "Host: elsewhere.example",
         "--request-target", f"{origin}/mc/sigmai/absolute?x=1", f"{origin}/"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["path"] == "/mc/sigmai/absolute?x=1"
    assert dict(report["headers"])["host"] == f"localhost:{edge.port}"


def test_tls_1_2_is_refused_with_protocol_version(edge: Edge) -> None:
    context = ssl.create_default_context(cadata=edge.pki.ca.certificate.decode())
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError) as info:
        edge.tls_socket(context=context)
    assert "PROTOCOL_VERSION" in str(info.value).upper() or "VERSION" in str(info.value).upper()
    assert echo(edge, "/ns/sigmai")["service"] == "ns-sigmai"


def test_alpn_is_http11(edge: Edge) -> None:
    sock = edge.tls_socket(context=edge.client_context(alpn=("h2", "http/1.1")))
    try:
        assert sock.selected_alpn_protocol() == "http/1.1"
        assert sock.version() == "TLSv1.3"
    finally:
        sock.close()


def test_no_route_404_and_misdirected_421(edge: Edge) -> None:
    status, _, body = edge.request("GET", "/nowhere")
    assert status == 404 and body.endswith(b"\n")
    status, _, _ = edge.request("GET", "/ns/sigmai", headers={"Host": "other.example"})
    assert status == 421
    status, _, _ = edge.request("GET", "/ns/sigmai/%2e%2e/x")
    assert status == 400


def test_an_http2_preface_gets_a_clean_505_and_is_counted(edge: Edge) -> None:

    labels = {"route": "-", "code": "505"}
    before = metrics.registry_for_exposition().get_sample_value("nextproxy_requests_total", labels) or 0.0
    sock = edge.tls_socket()  # ALPN http/1.1 negotiated; a client speaking h2 anyway (prior knowledge)
    try:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n"), answer
    assert metrics.registry_for_exposition().get_sample_value("nextproxy_requests_total", labels) == before + 1


def test_content_length_with_transfer_encoding_is_400_and_never_forwarded(edge: Edge) -> None:
    standin = edge.standins["ns-sigmai"]
    before = standin.requests
    sock = edge.tls_socket()
    sock.sendall(b"POST /ns/sigmai HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    data = sock.recv(65536)
    sock.close()
    assert data.startswith(b"HTTP/1.1 400 ")
    assert standin.requests == before


def test_connect_is_405_and_never_forwarded(edge: Edge) -> None:
    """A path-form CONNECT would route like any request: the codec refuses every CONNECT."""
    standin = edge.standins["ns-sigmai"]
    before = standin.requests
    sock = edge.tls_socket()
    sock.sendall(b"CONNECT /ns/sigmai HTTP/1.1\r\nHost: localhost\r\n\r\n")
    data = sock.recv(65536)
    sock.close()
    assert data.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n"), data
    assert standin.requests == before


def test_huge_headers_get_431(edge: Edge) -> None:
    status, _, _ = edge.request("GET", "/ns/sigmai", headers={"X-Big": "a" * 40_000})
    assert status == 431


def test_upstream_down_gives_502_quickly_then_recovers(edge: Edge) -> None:
    edge.stop_upstream("sfs-sigmai")
    started = time.monotonic()
    status, _, _ = edge.request("GET", "/sfs/sigmai/down")
    assert status == 502
    assert time.monotonic() - started < edge.config.timeouts.connect + 1
    edge.restart_upstream("sfs-sigmai")
    assert echo(edge, "/sfs/sigmai/up")["service"] == "sfs-sigmai"


def test_garbage_cleartext_and_silent_clients_do_not_hurt(edge: Edge) -> None:
    garbage = edge.raw_socket()
    garbage.sendall(b"\x16\x03\x01\x00\x05hello-not-tls" * 3)
    # It looks like TLS, so OpenSSL answers as a plain server would (unexpected_message), then EOF.
    assert garbage.recv(100) == b"\x15\x03\x03\x00\x02\x02\x0a"
    assert closed_by_peer(garbage)

    plain = edge.raw_socket()
    plain.sendall(b"GET /ns/sigmai HTTP/1.1\r\nHost: localhost\r\n\r\n")
    answer = plain.recv(1000)
    plain.close()
    assert answer.startswith(b"HTTP/1.1 400 ") and b"https" in answer

    random_bytes = edge.raw_socket()
    random_bytes.sendall(bytes(range(256)))
    assert closed_by_peer(random_bytes)  # closed, not hung

    silent = edge.raw_socket()  # never sends; the hello timeout is 10 s by default: just leave it
    assert echo(edge, "/ns/sigmai/still-serving")["service"] == "ns-sigmai"
    silent.close()
    assert "Traceback" not in edge.logs() and "internal_error" not in edge.logs()


def test_silent_client_is_dropped_after_the_hello_timeout(pki: DemoPki) -> None:
    edge = Edge.start(pki, timeouts=Timeouts(client_hello=0.5, handshake=0.5))
    try:
        silent = edge.raw_socket()
        started = time.monotonic()
        silent.settimeout(5)
        assert silent.recv(10) == b""
        assert 0.4 < time.monotonic() - started < 3
        half = edge.raw_socket()  # half a ClientHello, then nothing
        half.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        half.settimeout(5)
        assert half.recv(10) == b""
        assert echo(edge, "/ns/sigmai")["service"] == "ns-sigmai"
    finally:
        edge.close()


def test_smoke_on_the_plain_asyncio_loop(pki: DemoPki) -> None:
    edge = Edge.start(pki, use_uvloop=False)
    try:
        assert echo(edge, "/mc/sigmai/asyncio")["service"] == "mc-sigmai"
        status, _, body = edge.request("GET", f"/sfs/sigmai/x?bytes={MiB}")
        assert status == 200 and len(body) == MiB
    finally:
        edge.close()


def test_a_trickled_request_head_is_cut_off(pki: DemoPki) -> None:
    """Slowloris: header bytes that keep coming do not extend the request-head deadline."""
    edge = Edge.start(pki, timeouts=Timeouts(request_head=1.0, client_idle=10, connect=2, upstream_response=10))
    try:
        sock = edge.tls_socket()
        sock.settimeout(0.3)
        started = time.monotonic()
        closed = False
        for byte in b"GET /ns/sigmai HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100:
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(100) == b"":
                    closed = True
                    break
            except (TimeoutError, socket.timeout):
                continue
            except (ssl.SSLError, ConnectionError):
                closed = True
                break
            if time.monotonic() - started > 5:
                break
        elapsed = time.monotonic() - started
        sock.close()
        assert closed and 0.9 < elapsed < 3, elapsed
        assert echo(edge, "/ns/sigmai/after")["service"] == "ns-sigmai"  # a normal request is unaffected
    finally:
        edge.close()


def _request_lines(edge: Edge) -> list[dict[str, object]]:
    return [json.loads(line) for line in edge.logs().splitlines() if '"event":"request"' in line]


def test_a_trickled_head_gets_408_and_a_log_line(pki: DemoPki) -> None:
    edge = Edge.start(pki, timeouts=Timeouts(request_head=0.5, client_idle=10, connect=2, upstream_response=10))
    try:
        sock = edge.tls_socket()
        sock.sendall(b"GET /ns/sigmai HTTP/1.1\r\nHost: loc")
        answer = b""
        while chunk := sock.recv(4096):  # the socket's 10 s timeout bounds it
            answer += chunk
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"request head timed out" in answer
        assert any(r["status"] == 408 and r["reason"] == "request head timed out" for r in _request_lines(edge))
    finally:
        edge.close()


def test_http_1_0_keep_alive_serves_a_second_request_on_the_connection(pki: DemoPki) -> None:
    """Found by interop testing (openssl s_client, as ab -k does): the second request of an
    HTTP/1.0 keep-alive connection got no answer; nginx serves both."""
    edge = Edge.start(pki)
    try:
        sock = edge.tls_socket()
        sock.sendall(b"GET /ns/sigmai/k1 HTTP/1.0\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n")
        first = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
        first.begin()
        assert first.status == 200 and first.getheader("connection") == "keep-alive"
        assert json.loads(first.read())["path"] == "/ns/sigmai/k1"
        sock.sendall(b"GET /ns/sigmai/k2 HTTP/1.0\r\nHost: localhost\r\n\r\n")  # no keep-alive: the last
        second = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
        second.begin()
        assert second.status == 200 and second.will_close
        assert json.loads(second.read())["path"] == "/ns/sigmai/k2"
        assert sock.recv(1024) == b""
        sock.close()
    finally:
        edge.close()


def test_an_empty_line_split_over_two_records_ends_in_a_quiet_close(pki: DemoPki) -> None:
    """A client's extra CRLF after a POST body, its CR and LF in two TLS records: no request
    came, so the head's clock ends in a quiet close as at the keep-alive timeout, not a 408
    logged against nobody (the LF had switched the clock to the body's, which then sent one)."""
    edge = Edge.start(pki, timeouts=Timeouts(request_head=0.5, request_body=1.0, client_idle=10, connect=2, upstream_response=10))
    try:
        conn = edge.https()
        conn.request("POST", "/ns/sigmai/form", body=b"a=1")
        response = conn.getresponse()
        assert response.status == 200 and response.read()
        sock = conn.sock
        sock.sendall(b"\r")
        sock.sendall(b"\n")  # two TLS records
        started = time.monotonic()
        answer = b""
        while chunk := sock.recv(4096):  # the socket's 10 s timeout bounds it
            answer += chunk
        conn.close()
        assert answer == b"" and 0.4 < time.monotonic() - started < 5
        assert [r["status"] for r in _request_lines(edge)] == [200]
    finally:
        edge.close()


def test_a_response_the_client_stops_reading_is_cut_at_the_idle_timeout_and_logged(pki: DemoPki) -> None:
    """The client asks for 64 MiB and reads nothing: the response is cut after client_idle
    without progress, and logged with the status that went out and why (it had left no line)."""
    edge = Edge.start(pki, timeouts=Timeouts(client_idle=1.0, connect=2, upstream_response=10))
    try:
        sock = edge.tls_socket()
        sock.sendall(f"GET /sfs/sigmai/big?bytes={64 * MiB} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        deadline = time.monotonic() + 8
        cut = []
        while time.monotonic() < deadline and not cut:
            time.sleep(0.2)
            cut = [r for r in _request_lines(edge) if str(r["path"]).startswith("/sfs/sigmai/big")]
        received = 0
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except (ssl.SSLError, OSError):
            pass
        sock.close()
        assert [(r["status"], r["reason"]) for r in cut] == [(200, "timed out: the client stopped reading the response")]
        assert 0 < received < 64 * MiB
    finally:
        edge.close()


def test_a_request_still_in_flight_at_the_drain_deadline_is_logged(pki: DemoPki) -> None:
    edge = Edge.start(pki)
    sock = edge.tls_socket()
    try:
        sock.sendall(b"GET /ns/sigmai/slow?delay=5 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        time.sleep(0.3)  # the request reaches the stand-in, which answers in 5 s
    finally:
        edge.close()  # drains for 0.5 s, then resets what is left
        sock.close()
    lines = [r for r in _request_lines(edge) if str(r["path"]).startswith("/ns/sigmai/slow")]
    assert [(r["status"], r["reason"]) for r in lines] == [(503, "the drain deadline ended it")]


def test_a_dead_server_of_an_upstream_is_skipped(pki: DemoPki) -> None:
    """Two servers behind one route, the first refusing: every request still succeeds."""
    edge = Edge.start(pki, mutate=dead_server_first("mc-sigmai"))
    try:
        for i in range(4):  # round-robin starts on each server in turn
            conn = edge.https()
            conn.request("GET", f"/mc/sigmai/{i}")
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())["service"] == "mc-sigmai"
            conn.close()
    finally:
        edge.close()


def test_several_listen_addresses_serve_the_same_routes(pki: DemoPki) -> None:
    import dataclasses

    from nextproxy.config.model import Address, Config

    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        second = Address("127.0.0.2", probe.getsockname()[1])

    def also_listen(config: Config) -> Config:
        return dataclasses.replace(config, listen_also=(second,))

    edge = Edge.start(pki, mutate=also_listen)
    try:
        assert echo(edge, "/ns/sigmai/first")["service"] == "ns-sigmai"
        context = edge.client_context()
        with socket.create_connection((second.host, second.port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET /mc/sigmai/second HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
        assert data.startswith(b"HTTP/1.1 200 ") and b'"service": "mc-sigmai"' in data
    finally:
        edge.close()


def test_a_client_that_resets_while_its_request_waits_is_logged_as_499(edge: Edge) -> None:
    """The client's socket is read while its request is in flight, so a reset is seen at once:
    the request is logged as nginx logs it (499, nothing sent) and the proxy keeps serving."""
    sock = edge.tls_socket()
    sock.sendall(b"GET /mc/sigmai/gone?delay=1.5 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    time.sleep(0.3)  # the request reached the upstream
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # SO_LINGER 0: a reset
    deadline = time.monotonic() + 3
    lines: list[dict[str, object]] = []
    while not lines and time.monotonic() < deadline:
        time.sleep(0.05)
        lines = [json.loads(x) for x in edge.logs().splitlines() if '"request"' in x and "/mc/sigmai/gone" in x]
    assert [(line["status"], line.get("reason")) for line in lines] == [(499, "client closed the connection")]
    assert echo(edge, "/mc/sigmai/after")["service"] == "mc-sigmai"
