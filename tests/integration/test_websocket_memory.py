"""WebSocket relay memory and backpressure, measured on a real proxy process."""

from __future__ import annotations

import socket
import time

from pathlib import Path
from typing import Iterator

import pytest

from nextproxy.demo.pki import DemoPki
from tests.integration.process import Proxy, Upstreams

MiB = 1024 * 1024


@pytest.fixture
def big_proxy(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> Iterator[Proxy]:
    running = Proxy(tmp_path, pki, upstreams, route_options="max_message_size = 134217728")
    yield running
    running.stop()


def test_64_mib_message_is_streamed_not_buffered(big_proxy: Proxy) -> None:
    proxy = big_proxy
    ws = proxy.websocket()
    ws.send("warm-up")
    assert ws.recv().data == "warm-up"
    before = proxy.memory_kib("VmRSS")
    piece = bytes(range(256)) * 1024  # 256 KiB fragments, 64 MiB in all
    total = 64 * MiB
    received = 0
    for i in range(total // len(piece)):
        ws.send(piece, final=i == total // len(piece) - 1)
        # The echo comes back frame by frame while we send: read what is there, never the whole.
        ws.sock.setblocking(False)
        try:
            while True:
                data, finished = ws.recv_piece()
                assert data is not None
                received += len(data)
        except (BlockingIOError, ssl_want_read()):
            pass
        finally:
            ws.sock.setblocking(True)
            ws.sock.settimeout(30)
    while received < total:
        data, finished = ws.recv_piece()
        assert data is not None
        received += len(data)
    assert received == total and finished
    peak = proxy.memory_kib("VmHWM")
    ws.close()
    # Whole-message buffering would add 64 MiB (twice, for both legs); streaming stays near the baseline.
    print(f"64 MiB message: proxy RSS before {before} KiB, peak {peak} KiB")
    assert peak - before < 24 * 1024, (before, peak)


def ssl_want_read() -> type[BaseException]:
    import ssl

    return ssl.SSLWantReadError


def test_a_client_that_does_not_read_is_paused_not_buffered(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> None:
    proxy = Proxy(tmp_path, pki, upstreams, drain=1)
    try:
        stalled_client(proxy)
    finally:
        proxy.stop()


def stalled_client(proxy: Proxy) -> None:
    ws = proxy.websocket()
    ws.send("warm-up")
    assert ws.recv().data == "warm-up"
    before = proxy.memory_kib("VmRSS")
    message = b"x" * (64 * 1024)
    ws.sock.settimeout(2.0)
    sent = 0
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline and sent < 512 * MiB:
            ws.send(message)  # echoed back, and we never read the echoes
            sent += len(message)
    except (socket.timeout, TimeoutError):
        pass  # the proxy stopped reading us: backpressure reached the sender
    print(f"non-reading client: sent {sent // 1024} KiB before the proxy stopped reading")
    assert sent < 256 * MiB, "the proxy kept reading a client whose replies piled up"
    grown = proxy.memory_kib("VmRSS") - before
    assert grown < 32 * 1024, (sent, grown)
    ws.sock.close()


def test_tunnel_mode_applies_the_same_backpressure(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> None:
    proxy = Proxy(tmp_path, pki, upstreams, drain=1, route_options='websocket = "tunnel"')
    try:
        stalled_client(proxy)
    finally:
        proxy.stop()
