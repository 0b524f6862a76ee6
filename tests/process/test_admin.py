"""The admin port over real loopback sockets: probes, metrics, status page, limits and TLS 1.3.

Each test starts the admin server on 127.0.0.1 port 0 inside ``asyncio.run`` with a timeout, and
talks to it with ``http.client`` or a raw socket in a thread. Multiprocess metrics run in real
subprocesses, because prometheus_client picks its storage when it is first imported.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import http.client
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Awaitable, Callable, Iterator, TypeVar

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from nextproxy.process import admin, metrics
from nextproxy.process.admin import AdminState, start_admin
from nextproxy.process.status import Facts

T = TypeVar("T")
TIMEOUT = 20.0
REPO = Path(__file__).resolve().parent.parent


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
loop_factory = LOOPS["asyncio"]


@pytest.fixture(autouse=True, params=sorted(LOOPS))
def event_loop_kind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Production runs on uvloop; the plain loop keeps us honest about uvloop quirks."""
    global loop_factory
    loop_factory = LOOPS[request.param]
    yield
    loop_factory = LOOPS["asyncio"]


def run(coro: Awaitable[T], timeout: float = TIMEOUT) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(bounded())


def serve(
    state: AdminState,
    client: Callable[[int], T],
    ssl_context: ssl.SSLContext | None = None,
    send_buffer: int | None = None,
    **options: float,
) -> T:
    """Start the admin port, run the blocking ``client(port)`` in a thread, then close the server."""

    async def main() -> T:
        server = await start_admin("127.0.0.1", 0, state, ssl_context, **options)
        port = server.sockets[0].getsockname()[1]
        if send_buffer is not None:
            server.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        try:
            return await asyncio.to_thread(client, port)
        finally:
            server.close()
            await server.wait_closed()

    return run(main())


def get(
    port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, half-close, and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


# ---------------------------------------------------------------------------------- probes


def test_livez_is_ok_while_the_heartbeat_runs() -> None:
    assert serve(AdminState(), lambda port: get(port, "/livez"))[::2] == (200, b"ok\n")


def test_status_lines_carry_their_reason_phrase() -> None:
    def client(port: int) -> list[bytes]:
        return [raw_exchange(port, b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path).split(b"\r\n", 1)[0] for path in (b"/livez", b"/nope")]

    assert serve(AdminState(), client) == [b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found"]


def test_livez_fails_when_loop_timers_stop_running() -> None:
    state = AdminState()

    def client(port: int) -> tuple[int, bytes]:
        # The heartbeat runs once at start and then sleeps an hour: the tick ages like a starved timer.
        state.last_loop_tick = time.monotonic() - 10
        status, _, body = get(port, "/livez")
        return status, body

    status, body = serve(state, client, heartbeat_interval=3600, stale_after=5)
    assert status == 503
    assert body.startswith(b"stale: event loop timers last ran 1")


def test_heartbeat_advances_the_tick() -> None:
    state = AdminState()
    state.last_loop_tick = 0.0

    def client(port: int) -> list[float]:
        ticks = []
        for _ in range(3):
            time.sleep(0.15)
            ticks.append(state.last_loop_tick)
        return ticks

    ticks = serve(state, client, heartbeat_interval=0.05)
    assert 0 < ticks[0] < ticks[1] < ticks[2]


def test_readyz_reports_reason_then_ready() -> None:
    state = AdminState()

    def client(port: int) -> list[tuple[int, str, object]]:
        results = []
        for ready in (False, True):
            state.ready = ready
            status, headers, body = get(port, "/readyz")
            results.append((status, headers["content-type"], json.loads(body)))
        return results

    before, after = serve(state, client)
    assert before == (503, "application/json", {"ready": False, "reason": "starting"})
    assert after == (200, "application/json", {"ready": True})


def test_head_sends_headers_without_body() -> None:
    state = AdminState(ready=True)
    status, headers, body = serve(state, lambda port: get(port, "/readyz", method="HEAD"))
    assert (status, body) == (200, b"")
    assert headers["content-length"] == str(len(b'{"ready": true}\n'))


# ---------------------------------------------------------------------------------- metrics


def touch_every_metric() -> str:
    """Give every contract metric one sample; returns the route name used."""
    route = metrics.route_metrics("admin-test-route")
    route.requests(200).inc()
    route.duration.observe(0.01)
    route.passthrough_connections.inc()
    route.websocket_sessions_active.inc()
    route.websocket_sessions_active.dec()
    route.websocket_messages_client_to_upstream.inc()
    route.websocket_messages_upstream_to_client.inc(2)
    route.websocket_session_duration.observe(42)
    route.bytes_client_to_upstream.inc(100)
    route.bytes_upstream_to_client.inc(200)
    route.denied("not_allowed").inc()
    metrics.EDGE_CONNECTIONS.inc()
    metrics.EDGE_CONNECTIONS.dec()
    metrics.tls_handshake("ok")
    metrics.tls_handshake("unheard-of")  # folded into "other"
    metrics.config_reload(ok=True)
    metrics.set_upstream_up("admin-test-upstream", True)
    metrics.set_certificate_expiry("admin-test-cert", 1_900_000_000)
    return route.route


def test_metrics_text_format_has_every_contract_metric() -> None:
    touch_every_metric()
    status, headers, body = serve(AdminState(), lambda port: get(port, "/metrics"))
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    families = list(text_string_to_metric_families(body.decode()))
    names = {f.name for f in families} | {s.name for f in families for s in f.samples}
    assert set(metrics.CONTRACT_METRIC_NAMES) <= names
    assert "process_cpu_seconds_total" in names
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    assert values[("nextproxy_upstream_up", (("upstream", "admin-test-upstream"),))] == 1
    assert values[("nextproxy_certificate_expiry_timestamp_seconds", (("name", "admin-test-cert"),))] == 1.9e9
    assert values[("nextproxy_tls_handshakes_total", (("result", "other"),))] >= 1
    # Every fixed-label series exists from the first scrape, even at zero.
    for result in metrics.TLS_HANDSHAKE_RESULTS:
        assert ("nextproxy_tls_handshakes_total", (("result", result),)) in values
    # The scrape's own connection is open while the page is rendered.
    assert values[("nextproxy_connections_active", (("listener", "admin"),))] >= 1


def test_route_metrics_children_are_cached_and_counted() -> None:
    route = metrics.route_metrics("admin-cache-route")
    assert metrics.route_metrics("admin-cache-route") is route
    assert route.requests(404) is route.requests(404)
    labels = {"route": "admin-cache-route", "code": "404"}
    before = metrics.registry_for_exposition().get_sample_value("nextproxy_requests_total", labels) or 0.0
    route.requests(404).inc(3)
    assert metrics.registry_for_exposition().get_sample_value("nextproxy_requests_total", labels) == before + 3


def test_metrics_openmetrics_when_asked() -> None:
    touch_every_metric()
    accept = {"Accept": "application/openmetrics-text; version=1.0.0, text/plain;q=0.5"}
    status, headers, body = serve(AdminState(), lambda port: get(port, "/metrics", headers=accept))
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    names = {f.name for f in parse_openmetrics(body.decode())}  # type: ignore[no-untyped-call]
    # OpenMetrics names counter families without the _total suffix.
    expected = {name.removesuffix("_total") for name in metrics.CONTRACT_METRIC_NAMES}
    assert expected <= names


def test_metrics_gzip_when_accepted() -> None:
    touch_every_metric()
    status, headers, body = serve(AdminState(), lambda port: get(port, "/metrics", headers={"Accept-Encoding": "gzip"}))
    assert (status, headers["content-encoding"]) == (200, "gzip")
    assert b"nextproxy_requests_total" in gzip.decompress(body)


# ---------------------------------------------------------------------------------- HTTP behaviour


def test_unknown_path_404_and_wrong_method_405_keep_the_connection() -> None:
    def client(port: int) -> list[tuple[int, str | None]]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        results = []
        try:
            for method, path, body in (("GET", "/nope", None), ("POST", "/livez", b"x" * 100), ("GET", "/livez", None)):
                conn.request(method, path, body=body)
                response = conn.getresponse()
                response.read()
                results.append((response.status, response.getheader("allow")))
                sock = conn.sock
            assert sock is conn.sock is not None
        finally:
            conn.close()
        return results

    assert serve(AdminState(), client) == [(404, None), (405, "GET, HEAD"), (200, None)]


def test_keep_alive_serves_two_requests_on_one_connection() -> None:
    state = AdminState(ready=True)

    def client(port: int) -> tuple[bytes, bytes, int]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/livez")
            first = conn.getresponse().read()
            sock = conn.sock
            conn.request("GET", "/readyz")
            second = conn.getresponse().read()
            # http.client would silently reconnect had the server closed; the socket must be the same.
            assert sock is not None and conn.sock is sock
            # Two pipelined requests in one write are answered in order on the same socket.
            pipelined = raw_exchange(port, b"GET /livez HTTP/1.1\r\nHost: a\r\n\r\nGET /readyz HTTP/1.1\r\nHost: a\r\n\r\n")
            return first, second, pipelined.count(b"HTTP/1.1 200 ")
        finally:
            conn.close()

    assert serve(state, client) == (b"ok\n", b'{"ready": true}\n', 2)


def test_pipelined_requests_from_a_slow_reader_are_all_answered_in_order() -> None:
    # Far more response bytes than the socket buffers hold: the server must pause reading while
    # its writes back up, then resume, and still answer every request once, in order. Loopback
    # buffers absorb megabytes, so the listener's send buffer (inherited by accepted sockets on
    # Linux) is shrunk; with it the transport buffer passes its 64 KiB high-water mark.
    touch_every_metric()
    count = 200
    requests = b"".join(b"GET /metrics?n=%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(count - 1))
    requests += b"GET /livez HTTP/1.1\r\nHost: a\r\n\r\n"

    def client(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(requests)
            time.sleep(0.2)  # let the server fill the window and pause before we read
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    data = serve(AdminState(), client, send_buffer=8192)
    assert len(data) > 1_000_000
    assert data.count(b"HTTP/1.1 200 ") == count
    assert data.endswith(b"\r\n\r\nok\n")


def test_bad_request_400_and_huge_head_431() -> None:
    def client(port: int) -> tuple[bytes, bytes]:
        bad = raw_exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
        huge = raw_exchange(port, b"GET /livez HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (admin.MAX_REQUEST_HEAD + 10))
        return bad, huge

    bad, huge = serve(AdminState(), client)
    assert bad.startswith(b"HTTP/1.1 400 ")
    assert huge.startswith(b"HTTP/1.1 431 ")


def test_a_slow_request_is_closed_at_the_request_timeout() -> None:
    def client(port: int) -> tuple[bytes, float]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            started = time.monotonic()
            # A slow client dribbling a request does not extend its deadline.
            for byte in b"GET /livez HTTP/1.1\r\n":
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    break
                time.sleep(0.05)
            data = sock.recv(1024)
            return data, time.monotonic() - started

    data, elapsed = serve(AdminState(), client, request_timeout=0.3)
    assert data == b""
    assert 0.25 < elapsed < 3


def _closed_after(sock: socket.socket, started: float) -> float:
    """Seconds from ``started`` until the server closes ``sock`` (EOF or reset)."""
    try:
        assert sock.recv(1024) == b""
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def test_silent_and_half_sent_connections_are_closed_at_the_request_timeout() -> None:
    # The defaults are short too: a flood of them is not held for the keep-alive idle time.
    assert admin.REQUEST_TIMEOUT <= 5 < admin.IDLE_TIMEOUT

    def client(port: int) -> tuple[float, float]:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as silent, socket.create_connection(
            ("127.0.0.1", port), timeout=5
        ) as partial:
            partial.sendall(b"GET /livez HTTP/1.1\r\nHo")
            return _closed_after(silent, started), _closed_after(partial, started)

    silent, partial = serve(AdminState(), client, request_timeout=0.5, idle_timeout=10)
    assert 0.4 < silent < 3
    assert 0.4 < partial < 3


def test_keep_alive_waits_the_idle_timeout_then_the_request_timeout() -> None:
    def client(port: int) -> tuple[bytes, bytes, float]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: a\r\n\r\n")
            first = sock.recv(1024)
            time.sleep(0.6)  # past the request timeout, within the idle timeout
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: a\r\n\r\n")
            second = sock.recv(1024)
            sock.sendall(b"GET /livez HTTP/1.1\r\n")  # the next request begins, then stalls
            return first, second, _closed_after(sock, time.monotonic())

    first, second, elapsed = serve(AdminState(), client, request_timeout=0.3, idle_timeout=1.5)
    assert first.startswith(b"HTTP/1.1 200 ") and second.startswith(b"HTTP/1.1 200 ")
    assert 0.2 < elapsed < 1.2  # the request timeout from its first byte, not the idle timeout


def test_a_flood_of_silent_connections_does_not_lock_out_probes() -> None:
    # The cap's worth of connections that never finish a request (some silent, some half-sent),
    # and a few more: probes are still answered at once, by evicting the oldest of the flood.
    cap = admin.MAX_CONNECTIONS
    state = AdminState(ready=True)

    def client(port: int) -> tuple[int, int, float, bytes, list[bool]]:
        held: list[socket.socket] = []
        try:
            for i in range(cap + 5):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                held.append(sock)
                if i % 2:
                    sock.sendall(b"GET /livez HTTP/1.1\r\nHo")
            time.sleep(0.1)  # let the server accept them all
            started = time.monotonic()
            livez, readyz = get(port, "/livez")[0], get(port, "/readyz")[0]
            elapsed = time.monotonic() - started
            held[0].settimeout(2)
            evicted = held[0].recv(1024)
            newest = []
            for sock in held[-10:]:
                sock.setblocking(False)
                try:
                    newest.append(sock.recv(1024) != b"")
                except BlockingIOError:
                    newest.append(True)  # still open, nothing to read
            return livez, readyz, elapsed, evicted, newest
        finally:
            for sock in held:
                sock.close()

    livez, readyz, elapsed, evicted, newest = serve(state, client, request_timeout=10)
    assert (livez, readyz) == (200, 200)
    assert elapsed < 1
    assert evicted == b""  # the oldest silent connection got a clean close
    assert all(newest)  # the newest of the flood were not the ones evicted


def test_at_the_cap_an_idle_keep_alive_connection_makes_room() -> None:
    def client(port: int) -> tuple[bytes, int, bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as first:
            first.sendall(b"GET /livez HTTP/1.1\r\nHost: a\r\n\r\n")
            answered = first.recv(1024)
            status = get(port, "/livez")[0]
            return answered, status, first.recv(1024)

    answered, status, after = serve(AdminState(), client, max_connections=1)
    assert answered.startswith(b"HTTP/1.1 200 ")
    assert status == 200
    assert after == b""  # evicted with a clean close, which keep-alive clients retry on


def test_at_the_cap_a_client_that_stopped_reading_makes_room() -> None:
    # Pipelined requests never read: the transport pauses past its high-water mark (see the
    # slow reader test); such a connection is evicted when no idle one is left.
    touch_every_metric()
    requests = b"".join(b"GET /metrics?n=%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(100))

    def client(port: int) -> tuple[int, bool]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as hog:
            hog.sendall(requests)
            time.sleep(0.2)  # let the server fill the window and pause
            status = get(port, "/livez")[0]
            hog.settimeout(2)
            try:
                while hog.recv(65536):
                    pass
                closed = True
            except ConnectionResetError:
                closed = True
            except TimeoutError:
                closed = False
            return status, closed

    assert serve(AdminState(), client, send_buffer=8192, max_connections=1) == (200, True)


def test_at_the_cap_connections_still_sending_a_response_are_not_evicted() -> None:
    # A response bigger than the socket buffers but under the 64 KiB high-water mark, to a client
    # that has not read it yet: that connection is working, so the newcomer is the one refused.
    state = AdminState(routes=[("/", "proxy", "x" * 40_000)])

    def client(port: int) -> tuple[bytes, int, bool]:
        with socket.socket() as busy:
            busy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            busy.settimeout(5)
            busy.connect(("127.0.0.1", port))
            busy.sendall(b"GET /status.json HTTP/1.1\r\nHost: a\r\n\r\n")
            busy.recv(1, socket.MSG_PEEK)  # the response has started, the rest waits on us
            try:
                refused = raw_exchange(port, b"GET /livez HTTP/1.1\r\nHost: a\r\n\r\n")
            except OSError:  # reset, or ENOTCONN when the abort lands before our half-close
                refused = b""
            received = 0
            while received < 40_000 and (chunk := busy.recv(65536)):
                received += len(chunk)
        # Once the first one has gone, a new connection is served again (bounded retries: the
        # server sees the first close asynchronously).
        for _ in range(50):
            if _livez_ok(port):
                return refused, received, True
            time.sleep(0.02)
        return refused, received, False

    refused, received, served_again = serve(state, client, send_buffer=4096, max_connections=1)
    assert refused == b"" and received >= 40_000 and served_again


def _livez_ok(port: int) -> bool:
    try:
        return get(port, "/livez")[0] == 200
    except (ConnectionError, http.client.HTTPException):
        return False


# ---------------------------------------------------------------------------------- status page


HOSTILE = """<script>alert("x")</script>'&"""


def test_status_page_and_json_escape_every_value() -> None:
    """Route, upstream and error text come from configuration files and remote peers: the page
    must show them as text (never markup), and /status.json must carry them unchanged."""
    now = time.time()
    facts = Facts()
    facts.pool = {HOSTILE: (3, 1)}
    facts.upstream_error(HOSTILE, now - 12, f"connect failed: {HOSTILE}")
    facts.reloaded(now - 3, False, f"routes.0.name: bad {HOSTILE}")
    metrics.route_metrics(HOSTILE).requests(200).inc()
    state = AdminState(
        ready=False,
        not_ready_reason=f"draining {HOSTILE}",
        routes=[("path /ns/sigmai", "http+websocket (frames)", "ns"), (f"sni {HOSTILE}", "passthrough", "a&b")],
        upstreams={"ns": True, "mc": False, HOSTILE: True},
        certificates=[("edge", now + 90 * 86400 + 60), ("old", now - 3 * 86400)],
        connections_active=7,
        websocket_sessions_active=3,
        config_source=f"/etc/{HOSTILE}.toml",
        route_kinds={HOSTILE: "http", "ns": "http"},
    )
    state.facts = lambda: facts

    def both(port: int) -> tuple[tuple[int, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]:
        return get(port, "/"), get(port, "/status.json")

    (status, headers, body), (json_status, json_headers, json_body) = serve(state, both)
    page = body.decode()
    assert status == 200 and json_status == 200
    assert headers["content-type"] == "text/html; charset=utf-8" and json_headers["content-type"] == "application/json"
    assert "default-src 'none'" in headers["content-security-policy"]
    # No markup and no script from any value; the one tag named script would be ours, and there is none.
    assert "<script" not in page.lower() and "alert(\"x\")" not in page
    escaped = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&#x27;&amp;"
    for where in (f'<td class="name">{escaped}</td>', f"connect failed: {escaped}", f"routes.0.name: bad {escaped}",
                  f"/etc/{escaped}.toml", f"not ready: draining {escaped}", f'<td class="name">sni {escaped}</td>'):
        assert where in page, where
    assert '<meta http-equiv="refresh"' in page and "<link" not in page and "src=" not in page
    assert '<td class="name">ns</td><td><span class="badge up">up</span>' in page
    assert '<td class="name">mc</td><td><span class="badge down">down</span>' in page
    assert '<td class="n">90</td>' in page and "expired 3 days ago" in page, page[page.find("<h2>Certificates"):][:1500]

    doc = json.loads(json_body)
    route = next(r for r in doc["routes"] if r["route"] == HOSTILE)
    assert route["requests_total"] >= 1
    upstream = next(u for u in doc["upstreams"] if u["name"] == HOSTILE)
    assert (upstream["open"], upstream["idle"]) == (3, 1)
    assert upstream["last_error"]["detail"] == f"connect failed: {HOSTILE}"
    assert doc["reloads"]["recent"][0]["detail"] == f"routes.0.name: bad {HOSTILE}" and not doc["reloads"]["recent"][0]["ok"]
    assert doc["connections_active"] == 7 and doc["websocket_sessions_active"] == 3
    assert doc["not_ready_reason"] == f"draining {HOSTILE}"


# ---------------------------------------------------------------------------------- TLS


def self_signed() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nextproxy admin test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_admin_over_tls13(tmp_path: Path) -> None:
    cert_pem, key_pem = self_signed()
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.minimum_version = ssl.TLSVersion.TLSv1_3
    server_context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_context = ssl.create_default_context(cadata=cert_pem.decode())

    def client(port: int) -> tuple[str | None, list[int], bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=client_context)
        try:
            statuses = []
            for path in ("/livez", "/metrics"):
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
                statuses.append(response.status)
            assert isinstance(conn.sock, ssl.SSLSocket)
            version = conn.sock.version()
        finally:
            conn.close()
        # A TLS 1.2-only client is refused by the TLS 1.3 floor.
        old = ssl.create_default_context(cadata=cert_pem.decode())
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(ssl.SSLError):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                old.wrap_socket(raw, server_hostname="127.0.0.1")
        # A malformed request inside TLS still gets its 400 before the close.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with client_context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"NOT HTTP\r\n\r\n")
                assert tls.recv(1024).startswith(b"HTTP/1.1 400 ")
        return version, statuses, body

    version, statuses, body = serve(AdminState(), client, server_context)
    assert version == "TLSv1.3"
    assert statuses == [200, 200]
    assert b"nextproxy_connections_active" in body


# ---------------------------------------------------------------------------------- multiprocess

WORKER = """
import os, sys
from nextproxy.process import metrics
edge, up, expiry = int(sys.argv[1]), sys.argv[2] == "1", float(sys.argv[3])
for _ in range(edge):
    metrics.EDGE_CONNECTIONS.inc()
metrics.set_upstream_up("ns", up)
metrics.set_certificate_expiry("edge", expiry)
metrics.route_metrics("ns-sigmai").requests(200).inc()
print(os.getpid())
"""

COLLECT = """
import json, sys
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from nextproxy.process import metrics
for pid in sys.argv[1:]:
    metrics.mark_process_dead(int(pid))
text = generate_latest(metrics.registry_for_exposition()).decode()
out = {}
for family in text_string_to_metric_families(text):
    for s in family.samples:
        out[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
print(json.dumps(out))
"""


def test_multiprocess_merge_and_gauge_modes(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}

    def python(script: str, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script), *args],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return done.stdout.strip()

    python(WORKER, "2", "1", "2000000000")
    worker_b = python(WORKER, "3", "0", "1800000000")
    both = json.loads(python(COLLECT))
    after = json.loads(python(COLLECT, worker_b))

    edge = 'nextproxy_connections_active{"listener": "edge"}'
    up = 'nextproxy_upstream_up{"upstream": "ns"}'
    expiry = 'nextproxy_certificate_expiry_timestamp_seconds{"name": "edge"}'
    requests = 'nextproxy_requests_total{"code": "200", "route": "ns-sigmai"}'
    assert (both[edge], both[up], both[expiry], both[requests]) == (5, 1, 1.8e9, 2)
    # Worker B is gone: its live gauges vanish, its counted requests do not.
    assert (after[edge], after[up], after[expiry], after[requests]) == (2, 1, 2e9, 2)
    assert "process_cpu_seconds_total{}" in after
