"""The stand-in upstreams and the demo PKI, driven by real clients over loopback.

The servers run on an event loop in a background thread; the clients are ordinary blocking
ones (http.client, raw sockets + h11/wsproto, stdlib ssl, curl), each socket with a timeout,
so every test is bounded in time.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import deque
from collections.abc import Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import h11
import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Message, Ping, Pong, Request, TextMessage

from nextproxy.config import from_environment
from nextproxy.demo.commands import demo_environment, start_demo_upstreams
from nextproxy.demo.pki import DemoPki, client_ssl_context, make_pki, server_ssl_context
from nextproxy.demo.standins import StandIn, pattern, pattern_sha256, start_http_ws, start_tls_api

T = TypeVar("T")
TIMEOUT = 20.0
MiB = 1024 * 1024


class LoopThread:
    """An asyncio loop in a daemon thread: the servers live there, the test clients block here."""

    def __init__(self, kind: str) -> None:
        self.loop = uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()
        # Anything a stand-in lets escape (an exception in a connection handler) lands here.
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, context: self.errors.append(context))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


@pytest.fixture(scope="module")
def pki() -> DemoPki:
    return make_pki()


# uvloop is what production runs; plain asyncio keeps us honest about uvloop quirks.
@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def loop(request: pytest.FixtureRequest) -> Iterator[LoopThread]:
    runner = LoopThread(request.param)
    yield runner
    assert runner.errors == []
    runner.stop()


@pytest.fixture(scope="module")
def plain(loop: LoopThread) -> Iterator[StandIn]:
    standin = loop.run(start_http_ws("127.0.0.1", 0, "ns-sigmai"))
    yield standin
    loop.run(standin.close())


@pytest.fixture(scope="module")
def api(loop: LoopThread, pki: DemoPki) -> Iterator[StandIn]:
    context = server_ssl_context(pki.upstream, pki.ca.certificate, require_client_cert=False)
    standin = loop.run(start_tls_api("127.0.0.1", 0, "ns-api", context))
    yield standin
    loop.run(standin.close())


# --------------------------------------------------------------------------- small real clients


def connect(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=TIMEOUT)


def sender(sock: socket.socket, chunks: Iterable[bytes]) -> threading.Thread:
    """Send from another thread: an echo streams back while we send, so we must read meanwhile."""

    def send_all() -> None:
        for chunk in chunks:
            sock.sendall(chunk)

    thread = threading.Thread(target=send_all, daemon=True)
    thread.start()
    return thread


class Exchange:
    """One HTTP/1.1 request/response with h11 as the client, body sent concurrently."""

    def __init__(self, sock: socket.socket, conn: h11.Connection | None = None) -> None:
        self.sock = sock
        self.conn = conn or h11.Connection(h11.CLIENT)

    def request(self, method: str, target: str, headers: list[tuple[str, str]], body: Iterable[bytes] = ()) -> None:
        head = [("host", "localhost"), *headers]
        first = self.conn.send(h11.Request(method=method, target=target, headers=head))
        data = [first] + [self.conn.send(h11.Data(data=piece)) for piece in body] + [self.conn.send(h11.EndOfMessage())]
        self.thread = sender(self.sock, (d for d in data if d))

    def response(self) -> tuple[h11.Response, bytes, int]:
        """The final response, its body, and how many Data events carried it."""
        pieces: list[bytes] = []
        head: h11.Response | None = None
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                pieces.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self.thread.join(TIMEOUT)
                assert head is not None
                return head, b"".join(pieces), len(pieces)
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError("connection closed before the response ended")


def header(response: h11.Response, name: str) -> str | None:
    values = [v.decode() for n, v in response.headers if n == name.encode()]
    return values[0] if values else None


class WsClient:
    """A blocking wsproto client over a socket."""

    def __init__(self, address: tuple[str, int], target: str, subprotocols: list[str] | None = None) -> None:
        self.sock = connect(address)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: deque[Any] = deque()
        request = Request(host="localhost", target=target, subprotocols=subprotocols or [],
                          extra_headers=[(b"x-test", b"ws")])  # fmt: skip
        self.sock.sendall(self.ws.send(request))
        accept = self.next_event()
        assert isinstance(accept, AcceptConnection), accept
        self.subprotocol = accept.subprotocol

    def send(self, event: Any) -> None:
        self.sock.sendall(self.ws.send(event))

    def next_event(self) -> Any:
        for _ in range(100_000):
            if self.pending:
                return self.pending.popleft()
            self.pending.extend(self.ws.events())
            if not self.pending:
                data = self.sock.recv(65536)
                self.ws.receive_data(data or None)
        raise AssertionError("no event")

    def message(self) -> tuple[str | bytes, int]:
        """One whole message and the number of events it came in."""
        parts: list[Any] = []
        while True:
            event = self.next_event()
            assert isinstance(event, Message), event
            parts.append(event.data)
            if event.message_finished:
                joined = "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)
                return joined, len(parts)

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- HTTP


def test_json_reports_request_as_received(plain: StandIn) -> None:
    conn = http.client.HTTPConnection(*plain.address, timeout=TIMEOUT)
    body = b"hello stand-in"
    conn.putrequest("POST", "/ns/sigmai/thing?a=1&b=%20x", skip_host=True, skip_accept_encoding=True)
    for name, value in (("Host", "example.test"), ("X-Two", "2"), ("X-One", "1"), ("X-Two", "again"),
                        ("Content-Length", str(len(body)))):  # fmt: skip
        conn.putheader(name, value)
    conn.endheaders(body)
    response = conn.getresponse()
    report = json.loads(response.read())
    conn.close()
    assert response.status == 200
    assert response.getheader("content-type") == "application/json"
    assert report["service"] == "ns-sigmai"
    assert report["method"] == "POST"
    assert report["path"] == "/ns/sigmai/thing?a=1&b=%20x"
    # lower-cased, in the order sent, repeats kept
    assert report["headers"][:4] == [["host", "example.test"], ["x-two", "2"], ["x-one", "1"], ["x-two", "again"]]
    assert report["body_length"] == len(body)
    assert report["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert "tls" not in report


def test_echo_streams_one_mebibyte_back_byte_exact(plain: StandIn) -> None:
    body = os.urandom(MiB)
    pieces = [body[i : i + 64 * 1024] for i in range(0, len(body), 64 * 1024)]
    with connect(plain.address) as sock:
        exchange = Exchange(sock)
        exchange.request("PUT", "/ns/sigmai/echo", [("content-length", str(len(body)))], pieces)
        response, echoed, _ = exchange.response()
    assert response.status_code == 200
    assert header(response, "transfer-encoding") == "chunked"
    assert echoed == body


def test_echo_is_streamed_before_the_request_body_ends(plain: StandIn) -> None:
    # Half the body in, the first half must already be on its way back: nothing is buffered whole.
    with connect(plain.address) as sock:
        conn = h11.Connection(h11.CLIENT)
        sock.sendall(conn.send(h11.Request(method="POST", target="/x/echo/y",
                                           headers=[("host", "a"), ("transfer-encoding", "chunked")])))  # fmt: skip
        sock.sendall(conn.send(h11.Data(data=b"first-half")))
        received = b""
        for _ in range(100):
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Data):
                received += event.data
                if received == b"first-half":
                    break
        assert received == b"first-half"
        sock.sendall(conn.send(h11.Data(data=b"+second")) + conn.send(h11.EndOfMessage()))
        rest = b""
        for _ in range(100):
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Data):
                rest += event.data
            else:
                break
        assert isinstance(event, h11.EndOfMessage)
    assert rest == b"+second"


def test_echo_answers_expect_100_continue_first(plain: StandIn) -> None:
    with connect(plain.address) as sock:
        conn = h11.Connection(h11.CLIENT)
        headers = [("host", "a"), ("content-length", "5"), ("expect", "100-continue")]
        sock.sendall(conn.send(h11.Request(method="POST", target="/echo", headers=headers)))
        events: list[Any] = []
        body = b""
        for _ in range(100):
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
                continue
            events.append(type(event))
            if isinstance(event, h11.InformationalResponse):
                assert event.status_code == 100
                sock.sendall(conn.send(h11.Data(data=b"hello")) + conn.send(h11.EndOfMessage()))
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
    assert events[0] is h11.InformationalResponse  # the body was sent only after the 100
    assert body == b"hello"


@pytest.mark.parametrize("chunked", [True, False])
def test_bytes_eight_mebibytes(plain: StandIn, chunked: bool) -> None:
    size = 8 * MiB
    target = f"/mc/sigmai?bytes={size}" + ("&chunked=1" if chunked else "")
    with connect(plain.address) as sock:
        exchange = Exchange(sock)
        exchange.request("GET", target, [])
        response, body, _ = exchange.response()
    assert response.status_code == 200
    if chunked:
        assert header(response, "transfer-encoding") == "chunked"
        assert header(response, "content-length") is None
    else:
        assert header(response, "content-length") == str(size)
        assert header(response, "transfer-encoding") is None
    assert len(body) == size
    assert header(response, "x-body-sha256") == hashlib.sha256(body).hexdigest() == pattern_sha256(size)
    assert body == pattern(size)
    assert body[:16] == b"0123456789abcdef"


def test_keep_alive_three_requests_on_one_connection(loop: LoopThread) -> None:
    standin = loop.run(start_http_ws("127.0.0.1", 0, "sfs-sigmai"))
    try:
        conn = http.client.HTTPConnection(*standin.address, timeout=TIMEOUT)
        paths = []
        for i in range(3):
            conn.request("POST", f"/sfs/sigmai/{i}", body=b"x" * i)
            response = conn.getresponse()
            paths.append(json.loads(response.read())["path"])
            assert not response.will_close
        conn.close()
        assert paths == ["/sfs/sigmai/0", "/sfs/sigmai/1", "/sfs/sigmai/2"]
        assert (standin.connections, standin.requests) == (1, 3)
    finally:
        loop.run(standin.close())


def test_status_delay_and_close(plain: StandIn) -> None:
    with connect(plain.address) as sock:
        exchange = Exchange(sock)
        started = time.monotonic()
        exchange.request("GET", "/ns/sigmai?status=418&delay=0.3&close=1", [])
        response, body, _ = exchange.response()
        elapsed = time.monotonic() - started
        assert response.status_code == 418
        assert header(response, "connection") == "close"
        assert json.loads(body)["service"] == "ns-sigmai"
        assert elapsed >= 0.3
        assert sock.recv(1) == b""  # the server closed right after the response


def test_drip_sends_spaced_pieces(plain: StandIn) -> None:
    with connect(plain.address) as sock:
        exchange = Exchange(sock)
        started = time.monotonic()
        exchange.request("GET", "/?bytes=1024&drip=0.05", [])
        response, body, events = exchange.response()
        elapsed = time.monotonic() - started
    assert body == pattern(1024)
    assert events >= 3  # 256-byte pieces 50 ms apart arrive as separate reads
    assert elapsed >= 0.15


def test_head_and_204_have_no_body(plain: StandIn) -> None:
    conn = http.client.HTTPConnection(*plain.address, timeout=TIMEOUT)
    conn.request("HEAD", "/ns/sigmai?bytes=100")
    response = conn.getresponse()
    assert (response.status, response.getheader("content-length"), response.read()) == (200, "100", b"")
    conn.request("GET", "/ns/sigmai/echo?status=204")
    response = conn.getresponse()
    assert (response.status, response.read()) == (204, b"")
    conn.request("GET", "/ns/sigmai")  # still in step after both
    assert json.loads(conn.getresponse().read())["method"] == "GET"
    conn.close()


def test_bad_query_and_bad_request_get_400(plain: StandIn) -> None:
    conn = http.client.HTTPConnection(*plain.address, timeout=TIMEOUT)
    conn.request("GET", "/?status=abc")
    response = conn.getresponse()
    assert response.status == 400
    assert "status" in json.loads(response.read())["error"]
    conn.close()
    with connect(plain.address) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400 ")
    with connect(plain.address) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
        reply = b""
        for _ in range(100):
            piece = sock.recv(65536)
            if not piece:
                break  # and the server closed the connection after its answer
            reply += piece
        assert reply.startswith(b"HTTP/1.1 400 ")
        assert b'"error": "' in reply and b"connection: close" in reply.lower()


CLIENTS = ["http.client"] + (["curl"] if shutil.which("curl") else [])


@pytest.mark.parametrize("client", CLIENTS)
def test_echo_with_a_second_client(plain: StandIn, client: str, tmp_path: Path) -> None:
    body = os.urandom(3 * MiB // 2)  # above curl's Expect: 100-continue threshold
    url = f"http://{plain.address[0]}:{plain.address[1]}/ns/sigmai/echo"
    if client == "curl":
        source = tmp_path / "body"
        source.write_bytes(body)
        done = subprocess.run(["curl", "-sS", "--max-time", "20", "--data-binary", f"@{source}", url],
                              capture_output=True, timeout=TIMEOUT, check=True)  # fmt: skip
        echoed = done.stdout
    else:
        conn = http.client.HTTPConnection(*plain.address, timeout=TIMEOUT)
        conn.request("POST", "/ns/sigmai/echo", body=body)  # fits in loopback buffers
        echoed = conn.getresponse().read()
        conn.close()
    assert echoed == body


def test_port_taken_names_the_address(loop: LoopThread, plain: StandIn) -> None:
    host, port = plain.address
    with pytest.raises(OSError, match=f"'other' cannot listen on {host}:{port}"):
        loop.run(start_http_ws(host, port, "other"))


# --------------------------------------------------------------------------- WebSocket


def test_websocket_echo_info_and_close_code(plain: StandIn) -> None:
    client = WsClient(plain.address, "/ns/websocket/x?y=1", subprotocols=["demo.v2", "demo.v1"])
    try:
        assert client.subprotocol == "demo.v2"
        client.send(TextMessage(data="héllo"))
        assert client.message()[0] == "héllo"
        client.send(BytesMessage(data=b"\x00\xffbin"))
        assert client.message()[0] == b"\x00\xffbin"
        client.send(Ping(payload=b"p1"))
        pong = client.next_event()
        assert isinstance(pong, Pong) and pong.payload == b"p1"
        client.send(TextMessage(data="info"))
        info = json.loads(client.message()[0])
        assert info["path"] == "/ns/websocket/x?y=1"
        assert info["subprotocol"] == "demo.v2"
        assert info["service"] == "ns-sigmai"
        assert ["x-test", "ws"] in info["headers"]
        client.send(TextMessage(data="close:4001:bye: now"))
        closing = client.next_event()
        assert isinstance(closing, CloseConnection)
        assert (closing.code, closing.reason) == (4001, "bye: now")
        client.send(closing.response())
        assert client.sock.recv(1) == b""
    finally:
        client.close()


def test_websocket_streams_fragments_without_assembling(plain: StandIn) -> None:
    client = WsClient(plain.address, "/")
    try:
        client.send(BytesMessage(data=b"a" * 1000, message_finished=False))
        first = client.next_event()  # echoed before the message is finished
        assert isinstance(first, BytesMessage) and not first.message_finished
        assert first.data == b"a" * len(first.data)
        data = os.urandom(MiB)
        pieces = [data[i : i + 64 * 1024] for i in range(0, MiB, 64 * 1024)]
        frames = [client.ws.send(BytesMessage(data=p, message_finished=i == len(pieces) - 1)) for i, p in enumerate(pieces)]
        thread = sender(client.sock, frames)
        echoed, _ = client.message()
        thread.join(TIMEOUT)
        assert isinstance(echoed, bytes)
        assert b"a" * 1000 + data == bytes(first.data) + echoed
        client.send(CloseConnection(code=1000, reason="done"))
        reply = client.next_event()
        assert isinstance(reply, CloseConnection) and reply.code == 1000
    finally:
        client.close()


def test_websocket_protocol_violation_gets_close_1002(plain: StandIn) -> None:
    client = WsClient(plain.address, "/")
    try:
        client.sock.sendall(b"\x81\x02hi")  # unmasked client frame: RFC 6455 section 5.1 forbids it
        closing = client.next_event()
        assert isinstance(closing, CloseConnection) and closing.code == 1002
    finally:
        client.close()


# --------------------------------------------------------------------------- TLS API and PKI


def test_tls_api_reports_the_client_certificate(api: StandIn, pki: DemoPki) -> None:
    context = client_ssl_context(pki.ca.certificate, pki.client)
    conn = http.client.HTTPSConnection(*api.address, timeout=TIMEOUT, context=context)
    conn.request("GET", "/api/v1?x=1", headers={"Host": "ns-api.localhost"})
    response = conn.getresponse()
    report = json.loads(response.read())
    assert conn.sock is not None
    served = x509.load_der_x509_certificate(conn.sock.getpeercert(binary_form=True) or b"")
    conn.close()
    client_der = x509.load_pem_x509_certificate(pki.client.certificate).public_bytes(Encoding.DER)
    assert report["service"] == "ns-api"
    assert report["tls"]["client_cert_sha256"] == hashlib.sha256(client_der).hexdigest()
    assert report["tls"]["client_cert_subject"] == "CN=demo-client"
    assert report["tls"]["version"] == "TLSv1.3"
    # http.client sends the host it connected to as SNI; an IP is never sent as SNI
    assert report["tls"]["server_name"] is None
    assert served == x509.load_pem_x509_certificate(pki.upstream.certificate)


def test_tls_api_sees_sni_and_no_certificate(api: StandIn, pki: DemoPki) -> None:
    context = client_ssl_context(pki.ca.certificate)
    with socket.create_connection(api.address, timeout=TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname="mc-api.localhost") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nhost: mc-api.localhost\r\nconnection: close\r\n\r\n")
            data = b""
            for _ in range(1000):
                piece = tls.recv(65536)
                if not piece:
                    break
                data += piece
    report = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert report["tls"]["server_name"] == "mc-api.localhost"
    assert report["tls"]["client_cert_sha256"] is None
    assert report["tls"]["alpn"] is None


@pytest.mark.parametrize("name", ["localhost", "ns-api.localhost", "127.0.0.1"])
def test_edge_certificate_passes_strict_verification(loop: LoopThread, pki: DemoPki, name: str) -> None:
    standin = loop.run(start_http_ws("127.0.0.1", 0, "edge", server_ssl_context(pki.edge)))
    try:
        context = client_ssl_context(pki.ca.certificate)
        assert context.verify_flags & ssl.VERIFY_X509_STRICT
        assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
        with socket.create_connection(standin.address, timeout=TIMEOUT) as raw:
            with context.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.version() == "TLSv1.3"
                subject = dict(item[0] for item in tls.getpeercert()["subject"])  # type: ignore[index,misc]
        assert subject["commonName"] == "nextproxy demo edge"
        with socket.create_connection(standin.address, timeout=TIMEOUT) as raw:
            with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
                context.wrap_socket(raw, server_hostname="not-in-the-certificate.example")
    finally:
        loop.run(standin.close())


def test_pki_extensions_and_files(pki: DemoPki, tmp_path: Path) -> None:
    ca = x509.load_pem_x509_certificate(pki.ca.certificate)
    edge = x509.load_pem_x509_certificate(pki.edge.certificate)
    client = x509.load_pem_x509_certificate(pki.client.certificate)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert edge.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ski
    assert list(edge.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    client_san = client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert client_san.get_values_for_type(x509.UniformResourceIdentifier)
    assert client_san.get_values_for_type(x509.DNSName)
    files = pki.write(tmp_path / "pki")
    assert set(files) == {f"{s}.{e}" for s in ("ca", "edge", "upstream", "client") for e in ("pem", "key")}
    for name, path in files.items():
        assert path.read_bytes() == getattr(getattr(pki, name.split(".")[0]), "key" if name.endswith(".key") else "certificate")
        if name.endswith(".key"):
            assert path.stat().st_mode & 0o777 == 0o600


# --------------------------------------------------------------------------- the preset's upstreams


def test_demo_upstreams_answer_where_the_preset_points(loop: LoopThread, pki: DemoPki, tmp_path: Path) -> None:
    # Unusual loopback IPs, so a concurrent run of the real demo ports does not collide with us.
    base = 100 + os.getpid() % 100
    hosts = {"ns": f"127.{base}.0.2", "mc": f"127.{base}.0.3", "sfs": f"127.{base}.0.4"}
    standins = loop.run(start_demo_upstreams(hosts, pki=pki))
    try:
        config = from_environment(demo_environment(pki.write(tmp_path), hosts=hosts))
        by_name = {s.name: s for s in standins}
        assert set(by_name) == {u.name for u in config.upstreams}
        for upstream in config.upstreams:
            address = upstream.servers[0]
            assert by_name[upstream.name].address == (address.host, address.port)
        for name in ("ns-websocket", "ns-sigmai", "mc-sigmai", "sfs-sigmai"):
            conn = http.client.HTTPConnection(*by_name[name].address, timeout=TIMEOUT)
            conn.request("GET", "/probe")
            assert json.loads(conn.getresponse().read())["service"] == name
            conn.close()
        context = client_ssl_context(pki.ca.certificate, pki.client)
        with socket.create_connection(by_name["mc-api"].address, timeout=TIMEOUT) as raw:
            with context.wrap_socket(raw, server_hostname="mc-api.localhost") as tls:
                assert tls.getpeercert() is not None
        # the same ports again: a clear error naming the address, and nothing left half-started
        with pytest.raises(OSError, match=f"cannot listen on {hosts['ns']}:9999"):
            loop.run(start_demo_upstreams(hosts, pki=pki))
    finally:
        for standin in standins:
            loop.run(standin.close())
    # all closed: the ports are free again
    again = loop.run(start_demo_upstreams(hosts, pki=pki))
    for standin in again:
        loop.run(standin.close())


def test_websocket_over_the_tls_api_reports_tls(api: StandIn, pki: DemoPki) -> None:
    context = client_ssl_context(pki.ca.certificate, pki.client)
    with socket.create_connection(api.address, timeout=TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname="ns-api.localhost") as tls:
            ws = WSConnection(ConnectionType.CLIENT)
            tls.sendall(ws.send(Request(host="ns-api.localhost", target="/ws")))
            events: list[Any] = []
            for _ in range(100):
                ws.receive_data(tls.recv(65536))
                fresh = list(ws.events())
                if any(isinstance(e, AcceptConnection) for e in fresh):
                    tls.sendall(ws.send(TextMessage(data="info")))
                events.extend(fresh)
                if any(isinstance(e, TextMessage) for e in events):
                    break
    assert isinstance(events[0], AcceptConnection)
    info = json.loads(next(e.data for e in events if isinstance(e, TextMessage)))
    assert info["tls"]["server_name"] == "ns-api.localhost"
    assert info["tls"]["client_cert_subject"] == "CN=demo-client"


def test_required_client_certificate_is_enforced(loop: LoopThread, pki: DemoPki) -> None:
    context = server_ssl_context(pki.upstream, pki.ca.certificate, require_client_cert=True)
    standin = loop.run(start_tls_api("127.0.0.1", 0, "strict-api", context))
    try:
        for client, ok in ((pki.client, True), (None, False)):
            with socket.create_connection(standin.address, timeout=TIMEOUT) as raw:
                with client_ssl_context(pki.ca.certificate, client).wrap_socket(raw, server_hostname="localhost") as tls:
                    # TLS 1.3: the server judges the certificate after the client's handshake ends,
                    # so a refusal shows up on the first read.
                    tls.sendall(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
                    if ok:
                        assert tls.recv(12) == b"HTTP/1.1 200"
                    else:
                        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED|certificate required"):
                            tls.recv(12)
    finally:
        loop.run(standin.close())
    with pytest.raises(ValueError):
        server_ssl_context(pki.upstream, None, require_client_cert=True)


@pytest.mark.parametrize("client", CLIENTS)
def test_tls_api_with_a_second_client(api: StandIn, pki: DemoPki, client: str, tmp_path: Path) -> None:
    files = pki.write(tmp_path)
    host, port = api.address
    if client == "curl":
        done = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "--cacert", str(files["ca.pem"]), "--cert", str(files["client.pem"]),
             "--key", str(files["client.key"]), "--resolve", f"mc-api.localhost:{port}:{host}",
             f"https://mc-api.localhost:{port}/v1?bytes=5000000&chunked=1", "-D", "-"],
            capture_output=True, timeout=TIMEOUT, check=True,
        )  # fmt: skip
        head, body = done.stdout.split(b"\r\n\r\n", 1)
        digest = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.startswith(b"x-body-sha256"))
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=TIMEOUT, context=client_ssl_context(pki.ca.certificate))
        conn.request("GET", "/v1?bytes=5000000&chunked=1")
        response = conn.getresponse()
        body, digest = response.read(), (response.getheader("x-body-sha256") or "").encode()
        conn.close()
    assert len(body) == 5_000_000
    assert digest.decode() == hashlib.sha256(body).hexdigest() == pattern_sha256(5_000_000)
