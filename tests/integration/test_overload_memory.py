"""Memory a real proxy process holds per slow reader, idle TLS connection and half-open hello.

RSS of ``python -m nextproxy run`` from /proc, before and after opening N connections of one
kind, divided by N. The budgets leave margin over what was measured on the 2-core CI machine
(in the comments): these guard against a regression of several times, not against noise.
"""

from __future__ import annotations

import resource
import socket
import ssl
import time
from pathlib import Path
from typing import Iterator

import pytest

from nextproxy.demo.pki import DemoPki
from tests.hellos import stdlib_hello
from tests.integration.process import API, NAME, Proxy, Upstreams

KiB = 1024
BIG = 256 * 1024 * 1024  # a response the test never reads to its end


@pytest.fixture
def roomy(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> Iterator[Proxy]:
    """A proxy that lets one address hold thousands of connections and handshakes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, 8192):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))  # this test's own sockets
    proxy = Proxy(tmp_path, pki, upstreams, extra="[limits]\nmax_connections_per_ip = 100000\nmax_handshakes = 100000")
    for _ in range(3):  # warm: first requests import and allocate what every later one reuses
        proxy.https("/app/warm")
        proxy.https("/warm", server_name=API)
    time.sleep(0.3)
    try:
        yield proxy
    finally:
        proxy.stop()


def _settled(proxy: Proxy, seconds: float = 1.5) -> int:
    time.sleep(seconds)
    return proxy.memory_kib()


def _stalled_reader(proxy: Proxy, server_name: str, path: str) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel's share stays small
    tls = proxy.context.wrap_socket(sock, server_hostname=server_name)
    tls.sendall(f"GET {path} HTTP/1.1\r\nhost: {server_name}\r\n\r\n".encode())
    assert tls.recv(100)  # the response started; from now on the client reads nothing
    return tls


@pytest.mark.parametrize(
    ("server_name", "path", "budget_kib"),
    [
        # measured 244 KiB: the 128 KiB write mark, one 64 KiB upstream read, the connection
        # (~30 KiB) and allocator slack; it was ~809 KiB with 256 KiB reads and one SSL_write each
        (NAME, f"/app/big?bytes={BIG}", 320),
        # measured 127 KiB: the 64 KiB write mark plus one 64 KiB read (was ~232 KiB)
        (API, f"/big?bytes={BIG}", 192),
    ],
    ids=["terminated", "passthrough"],
)
def test_a_client_that_stops_reading_holds_no_more_than_the_buffers(
    roomy: Proxy, server_name: str, path: str, budget_kib: int
) -> None:
    clients = 50
    before = roomy.memory_kib()
    held = [_stalled_reader(roomy, server_name, path) for _ in range(clients)]
    per_client = (_settled(roomy, 3) - before) / clients
    for tls in held:
        tls.close()
    assert per_client < budget_kib, f"{per_client:.0f} KiB per stalled reader"


def test_idle_tls_connections_cost_a_bounded_amount(roomy: Proxy) -> None:
    # measured 28 KiB per connection (pyOpenSSL with MODE_RELEASE_BUFFERS, the connection's state)
    count = 2000
    before = roomy.memory_kib()
    held = []
    deadline = time.monotonic() + 60
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", roomy.port), timeout=10)
        held.append(roomy.context.wrap_socket(sock, server_hostname=NAME))
        assert time.monotonic() < deadline
    per_connection = (_settled(roomy) - before) * KiB / count
    assert per_connection < 48 * KiB, f"{per_connection / KiB:.1f} KiB per idle TLS connection"
    for tls in held:
        tls.close()


def test_half_open_hellos_cost_a_bounded_amount(roomy: Proxy) -> None:
    # measured ~4 KiB per connection: the hello reader's buffer and the pending connection
    count = 2000
    hello = stdlib_hello(NAME)
    before = roomy.memory_kib()
    held = []
    deadline = time.monotonic() + 60
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", roomy.port), timeout=10)
        sock.sendall(hello[: len(hello) // 2])
        held.append(sock)
        assert time.monotonic() < deadline
    active = ("nextproxy_connections_active", (("listener", "edge"),))
    roomy.wait_for(lambda: roomy.metrics()[active] >= count, 20, "every hello accepted")
    per_connection = (_settled(roomy) - before) * KiB / count
    assert per_connection < 16 * KiB, f"{per_connection / KiB:.1f} KiB per half-open hello"
    for sock in held:
        sock.close()
