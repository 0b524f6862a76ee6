"""Issue 13 through the real process: `python -m nextproxy run` with a TOML file, HAProxy in front.

The listen table and the route's rate limit arrive by SIGHUP reload (the listener keeps its
socket, the new gate applies to new connections); the counters are read from /metrics over HTTP.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
from pathlib import Path

import pytest

from nextproxy.demo.pki import DemoPki
from tests.integration.process import NAME, Proxy, Upstreams
from tests.integration.test_lifecycle import value
from tests.integration.test_proxyprotocol_haproxy import HAPROXY, free_port, haproxy

pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")


def get(proxy: Proxy, port: int, source: str, path: str) -> tuple[int, dict[str, str], bytes]:
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    with proxy.context.wrap_socket(sock, server_hostname=NAME) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nhost: {NAME}\r\nconnection: close\r\n\r\n".encode())
        data = b""
        while True:
            try:
                chunk = tls.recv(65536)
            except ssl.SSLError:
                break
            if not chunk:
                break
            data += chunk
            head, found, body = data.partition(b"\r\n\r\n")
            if found and b"content-length: " in head.lower():
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                if len(body) >= length:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    return int(lines[0].split()[1]), dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line), body


def test_toml_listener_and_route_policies_in_the_real_process(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> None:
    proxy = Proxy(tmp_path, pki, upstreams, route_options="rate_limit = { requests_per_second = 0.2, burst = 1 }")
    try:
        text = proxy.config_file.read_text().replace(
            f'listen = "127.0.0.1:{proxy.port}"',
            f'listen = {{ address = "127.0.0.1:{proxy.port}", proxy_protocol = {{ trusted = ["127.0.0.2/32"] }} }}',
        )
        proxy.config_file.write_text(text)
        proxy.process.send_signal(signal.SIGHUP)
        proxy.wait_for(lambda: proxy.events("reloaded"), 10, "reload")
        front = free_port("127.0.0.1")
        sections = f"""
frontend tcp_in
    mode tcp
    bind 127.0.0.1:{front}
    default_backend edge
backend edge
    mode tcp
    server edge 127.0.0.1:{proxy.port} send-proxy-v2 source 127.0.0.2
"""
        with haproxy(tmp_path, sections):
            status, _, body = get(proxy, front, "127.0.0.3", "/app/who")
            assert status == 200
            assert dict(json.loads(body)["headers"])["x-forwarded-for"] == "127.0.0.3"
            status, headers, _ = get(proxy, front, "127.0.0.3", "/app/who")
            assert status == 429 and 1 <= int(headers["retry-after"]) <= 5  # 0.2/s: a token every 5 s
            assert get(proxy, front, "127.0.0.4", "/app/who")[0] == 200  # another client, another bucket
        # A direct connection from an untrusted address that sends a header is refused.
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(b"PROXY TCP4 6.6.6.6 127.0.0.1 1 443\r\n")
            assert sock.recv(10) == b""
        samples = proxy.metrics()
        listener = f"127.0.0.1:{proxy.port}"
        assert value(samples, "nextproxy_proxy_protocol_headers_total", listener=listener, version="2", command="proxy") == 3
        assert value(samples, "nextproxy_proxy_protocol_rejected_total", listener=listener, reason="untrusted") == 1
        assert value(samples, "nextproxy_rate_limited_total", route="app", key="ip") == 1
        assert value(samples, "nextproxy_requests_total", route="app", code="429") == 1
        proxy.wait_for(lambda: len(proxy.events("request")) >= 3, 10, "request log lines")  # logs are buffered briefly
        assert [e["client"] for e in proxy.events("request")][-3:] == ["127.0.0.3", "127.0.0.3", "127.0.0.4"]
    finally:
        proxy.stop()


def test_denial_series_exist_at_zero_before_the_first_denial(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> None:
    """increase() and rate() miss a counter's first step when its series appears with it: the
    series a configuration can count are on /metrics, at 0, from the start."""
    proxy = Proxy(tmp_path, pki, upstreams, route_options='allow_sources = ["10.0.0.0/8"]')
    try:
        key = ("nextproxy_authorization_denied_total", (("reason", "source"), ("route", "app")))
        series = {k[1]: v for k, v in proxy.metrics().items() if k[0] == key[0]}
        assert series[key[1]] == 0.0
        # The process's configuration also has a certificate allow-list (the "guarded" route).
        assert series[(("reason", "no_certificate"), ("route", "guarded"))] == 0.0 and set(series.values()) == {0.0}
        assert proxy.https("/app/x")[0] == 403  # 127.0.0.1 is outside 10.0.0.0/8
        assert proxy.metrics()[key] == 1.0
    finally:
        proxy.stop()
