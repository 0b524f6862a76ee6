"""An upstream that dies mid-body, on real sockets: the client must see a cut response, not a whole one.

The upstream is a plain blocking socket server on loopback that answers with a body ending at
close, sends part of it, then either resets the connection (SO_LINGER 0: a RST, as a crashed
process or a middlebox would) or closes it cleanly. A reset is a read error, not an end of
body: the proxy must send no final chunk, close the client, and log and count a 502.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from nextproxy.demo.pki import DemoPki
from nextproxy.process import metrics
from tests.integration.harness import Edge, RawUpstream, point_route_at

ROUTE = "sfs-sigmai"
PARTIAL = b"the first part of a body that never ends well"


class CuttingUpstream(RawUpstream):
    """Answers each request with a head and part of a read-until-close body, then cuts it."""

    def __init__(self, *, reset: bool) -> None:
        self.reset = reset
        super().__init__(timeout=10)

    def answer(self, conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + PARTIAL)
        time.sleep(0.3)  # let the proxy forward the part before the cut
        if self.reset:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.fixture(params=[True, False], ids=["reset", "clean-close"])
def cut(request: pytest.FixtureRequest, pki: DemoPki) -> Iterator[tuple[Edge, CuttingUpstream]]:
    upstream = CuttingUpstream(reset=request.param)
    edge = Edge.start(pki, mutate=point_route_at(upstream.address))
    try:
        yield edge, upstream
    finally:
        edge.close()
        upstream.close()


def read_all(edge: Edge) -> bytes:
    sock = edge.tls_socket()
    sock.sendall(b"GET /sfs/sigmai/stream HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    received = b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, OSError):
            break
        if not chunk:
            break
        received += chunk
    sock.close()
    return received


def count(code: str) -> float:
    return metrics.registry_for_exposition().get_sample_value("nextproxy_requests_total", {"route": ROUTE, "code": code}) or 0.0


def test_mid_body_cut_reaches_the_client_only_as_a_cut(cut: tuple[Edge, CuttingUpstream]) -> None:
    edge, upstream = cut
    before_502, before_200 = count("502"), count("200")
    received = read_all(edge)
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding: chunked\r\n" in received.lower()
    assert PARTIAL in received  # streamed as it arrived
    deadline = time.monotonic() + 5
    lines: list[dict[str, object]] = []
    while time.monotonic() < deadline and not lines:
        lines = [json.loads(x) for x in edge.logs().splitlines() if '"request"' in x and "/sfs/sigmai/stream" in x]
        time.sleep(0.05)
    assert len(lines) == 1
    if upstream.reset:
        assert not received.endswith(b"0\r\n\r\n")  # no final chunk: the client knows it is cut
        assert lines[0]["status"] == 502 and "upstream" in str(lines[0]["reason"])
        assert count("502") == before_502 + 1 and count("200") == before_200
    else:
        assert received.endswith(b"\r\n0\r\n\r\n")  # a clean close is this body's end
        assert lines[0]["status"] == 200
        assert count("200") == before_200 + 1
