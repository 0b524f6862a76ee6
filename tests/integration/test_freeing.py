"""A closed connection is freed at once by reference counting, never left to the cycle collector.

A reference cycle (say a connection and the timer callback bound to it) keeps a closed
connection, its TLS object, h11 state and buffers alive until a full collection, and that
collection then walks every live connection: memory that grows with churn, and pauses that
grow with the number of open connections. With the cycle collector off, anything that is not
freed at close stays visible in ``gc.get_objects()``.
"""

from __future__ import annotations

import gc
import socket
import ssl
import time
from typing import Iterator

import pytest

from nextproxy.edge.accept import Accepted
from nextproxy.config.model import WebSocketMode
from nextproxy.edge.connection import TerminatedConnection
from nextproxy.core.http1 import HttpSession
from nextproxy.core.tls import TlsEngine
from nextproxy.core.websocket import WebSocketRelay
from nextproxy.edge.passthrough import Splice
from nextproxy.demo.pki import DemoPki
from nextproxy.edge.upstream import UpstreamConnection
from nextproxy.demo.wsclient import connect
from tests.integration.harness import API_NAME, SERVER_NAME, Edge

KINDS = (Accepted, TerminatedConnection, TlsEngine, HttpSession, WebSocketRelay, Splice, UpstreamConnection)


@pytest.fixture
def no_cycle_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


def alive() -> dict[str, int]:
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, KINDS):
            counts[type(obj).__name__] = counts.get(type(obj).__name__, 0) + 1
    return counts


def settle(edge: Edge) -> None:
    """Wait until the proxy has closed everything (connection_lost runs on the loop)."""
    runtime = edge.server.runtime
    deadline = time.monotonic() + 10
    while runtime.connections or runtime.passthroughs or runtime.pending:
        assert time.monotonic() < deadline, "connections still open"
        time.sleep(0.05)
    time.sleep(0.2)  # callbacks scheduled by the closes (call_soon) have run


def close_pool(edge: Edge) -> None:
    """Pooled upstream connections are alive by design: close them (on the proxy's loop)."""

    async def stop() -> None:
        edge.server.runtime.pool.stop()

    edge.thread.call(stop())
    time.sleep(0.2)


def test_every_kind_of_connection_is_freed_at_close(edge: Edge, no_cycle_collector: None) -> None:
    settle(edge)
    close_pool(edge)
    before = alive()
    for _ in range(3):
        # Terminated HTTPS, keep-alive, two requests.
        conn = edge.https()
        for _ in range(2):
            conn.request("GET", "/ns/sigmai/x")
            assert conn.getresponse().read()
        conn.request("GET", "/nowhere")  # refused by the proxy itself (404), connection kept
        assert conn.getresponse().status == 404
        conn.close()
        # A WebSocket session through the frame relay.
        ws = connect(f"wss://{SERVER_NAME}:{edge.port}/ns/websocket/ws", address=("127.0.0.1", edge.port), context=edge.client_context())
        ws.send("hi")
        assert ws.recv().data == "hi"
        ws.close(1000, "bye")
        # Passthrough by SNI.
        context = edge.client_context(edge.pki.client)
        context.check_hostname = False
        with edge.tls_socket(API_NAME, context=context) as sock:
            sock.sendall(f"GET /v1/who HTTP/1.1\r\nHost: {API_NAME}\r\nConnection: close\r\n\r\n".encode())
            while sock.recv(65536):
                pass
        # A refused handshake (TLS 1.2 only) and a client that is not TLS at all.
        old = edge.client_context()
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(ssl.SSLError):
            edge.tls_socket(SERVER_NAME, context=old)
        with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            raw.recv(4096)
    # Upstreams that are down: 502, or a passthrough client closed; failed connects leave nothing.
    edge.stop_upstream("sfs-sigmai")
    edge.stop_upstream("ns-api")
    try:
        assert edge.request("GET", "/sfs/sigmai/down")[0] == 502
        context = edge.client_context()
        context.check_hostname = False
        with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as raw:
            with pytest.raises((ssl.SSLError, OSError)):
                context.wrap_socket(raw, server_hostname=API_NAME).recv(10)
    finally:
        edge.restart_upstream("sfs-sigmai")
        edge.restart_upstream("ns-api")
    settle(edge)
    close_pool(edge)
    assert alive() == before


def test_a_websocket_tunnel_is_freed_at_close(pki: DemoPki, no_cycle_collector: None) -> None:
    edge = Edge.start(pki, websocket=WebSocketMode.TUNNEL)
    try:
        settle(edge)
        before = alive()
        for _ in range(3):
            ws = connect(f"wss://{SERVER_NAME}:{edge.port}/ns/sigmai/t", address=("127.0.0.1", edge.port), context=edge.client_context())
            ws.send("through")
            assert ws.recv().data == "through"
            assert ws.close(1000).close_code == 1000
        settle(edge)
        assert alive() == before
    finally:
        edge.close()
