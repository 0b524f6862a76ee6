"""PROXY protocol against the real HAProxy (Debian package), both directions, on loopback.

Sender: HAProxy forwards a client's connection with `send-proxy` (v1) or `send-proxy-v2`
(with its CRC32c and unique-id TLVs) to a small asyncio server that runs our reader; the
header must name the client's real address and port, and the client's bytes must follow.
HAProxy's health checks (`check-send-proxy`) must arrive as LOCAL.

Receiver: HAProxy listens with `accept-proxy` and answers each request itself with the
addresses and authority it took from the header, so what it prints is what it understood of
our build_v2 output. A header with a wrong checksum must be refused by it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from nextproxy.core.proxyprotocol import (Endpoint, ProxyCommand, ProxyHeader, ProxyHeaderReader,
                                          Tlv, build_v2)
from nextproxy.demo.pki import DemoPki

HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None)
pytestmark = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (Debian package `haproxy`; .ci/run installs it)")

GLOBAL = """\
global
    maxconn 200
    nbthread 1
defaults
    timeout connect 2s
    timeout client 5s
    timeout server 5s
frontend ready
    mode http
    bind 127.0.0.1:{ready}
    http-request return status 200
"""
STEP = 10.0  # seconds any single step may take (start, connect, read)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextmanager
def haproxy(tmp_path: Path, sections: str) -> Iterator[None]:
    """Run HAProxy in the foreground with ``sections`` after a fixed global part.

    Ready when its `ready` frontend answers: HAProxy binds every listener before serving, and
    polling that one never opens a connection to a backend under test.
    """
    assert HAPROXY is not None
    ready = free_port("127.0.0.1")
    config = tmp_path / "haproxy.cfg"
    config.write_text(GLOBAL.format(ready=ready) + sections)
    process = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STEP
        while True:
            if process.poll() is not None:
                output = process.stdout.read().decode() if process.stdout else ""
                pytest.fail(f"haproxy exited with {process.returncode}:\n{output}")
            try:
                socket.create_connection(("127.0.0.1", ready), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "haproxy did not start listening"
                time.sleep(0.05)
        yield
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        if process.stdout:
            process.stdout.close()


class HeaderSink:
    """A loopback server that reads a PROXY header with our reader, then the client's bytes."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[ProxyHeader, bytes]] = asyncio.Queue()
        self.server: asyncio.Server | None = None

    async def start(self, host: str) -> int:
        self.server = await asyncio.start_server(self._connection, host, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = ProxyHeaderReader()
        try:
            header = None
            while header is None:
                header = parser.feed(await asyncio.wait_for(reader.read(4096), STEP))
            payload = header.trailing
            try:
                while chunk := await asyncio.wait_for(reader.read(4096), STEP):
                    payload += chunk
            except ConnectionResetError:  # HAProxy ends a layer-4 health check with a reset
                pass
            await self.received.put((header, payload))
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


FAMILIES = ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(
    not ipv6_loopback(), reason="no IPv6 loopback on this machine"))]
SENDERS = {
    "v1": ("send-proxy", 1),
    "v2": ("send-proxy-v2", 2),
    "v2-crc32c-unique-id": ("send-proxy-v2 proxy-v2-options crc32c,unique-id", 2),
}


@pytest.mark.parametrize("host", FAMILIES)
@pytest.mark.parametrize("sender", SENDERS)
def test_haproxy_sends_the_real_client_address(tmp_path: Path, host: str, sender: str) -> None:
    option, version = SENDERS[sender]

    async def main() -> None:
        sink = HeaderSink()
        backend = await sink.start(host)
        front = free_port(host)
        sections = f"""
frontend front
    mode tcp
    bind {hostport(host, front)}
    unique-id-format %ci:%cp
    default_backend sink
backend sink
    mode tcp
    server s {hostport(host, backend)} {option}
"""
        try:
            with haproxy(tmp_path, sections):
                reader, writer = await asyncio.open_connection(host, front)
                client = writer.get_extra_info("sockname")
                writer.write(b"\x16\x03\x01 the client's first bytes")
                await writer.drain()
                writer.write_eof()
                header, payload = await asyncio.wait_for(sink.received.get(), STEP)
                writer.close()
        finally:
            await sink.close()
        assert header.version == version and header.command is ProxyCommand.PROXY
        assert header.source == Endpoint(ip_address(host), client[1])
        assert header.destination == Endpoint(ip_address(host), front)
        assert payload == b"\x16\x03\x01 the client's first bytes"
        if "crc32c" in option:
            # The checksum was verified by the reader (a mismatch raises); the unique id
            # is kept raw, exactly as HAProxy formatted it.
            assert [t.type for t in header.tlvs] == [0x03, 0x05]
            assert header.tlvs[1] == Tlv(0x05, f"{host}:{client[1]}".encode())
        elif version == 2:
            assert header.tlvs == ()

    run(main())


def test_haproxy_health_checks_arrive_as_local(tmp_path: Path) -> None:
    async def main() -> None:
        sink = HeaderSink()
        backend = await sink.start("127.0.0.1")
        sections = f"""
backend checked
    mode tcp
    server s 127.0.0.1:{backend} send-proxy-v2 proxy-v2-options crc32c check check-send-proxy inter 100ms
"""
        try:
            with haproxy(tmp_path, sections):
                header, payload = await asyncio.wait_for(sink.received.get(), STEP)
        finally:
            await sink.close()
        assert header.command is ProxyCommand.LOCAL and header.uses_connection_address
        assert [t.type for t in header.tlvs] == [0x03] and payload == b""

    run(main())


def test_haproxy_tls_front_sends_authority_and_alpn(tmp_path: Path, pki: DemoPki) -> None:
    # HAProxy terminates TLS and tells the next hop the SNI and the negotiated ALPN.
    bundle = tmp_path / "edge.pem"
    bundle.write_bytes(pki.edge.certificate + pki.edge.key)
    client_tls = ssl.create_default_context(cadata=pki.ca.certificate.decode())
    client_tls.set_alpn_protocols(["h2", "http/1.1"])

    async def main() -> None:
        sink = HeaderSink()
        backend = await sink.start("127.0.0.1")
        front = free_port("127.0.0.1")
        sections = f"""
frontend tls
    mode tcp
    bind 127.0.0.1:{front} ssl crt {bundle} alpn h2,http/1.1
    default_backend sink
backend sink
    mode tcp
    server s 127.0.0.1:{backend} send-proxy-v2 proxy-v2-options authority,ssl,crc32c
"""
        try:
            with haproxy(tmp_path, sections):
                _, writer = await asyncio.open_connection(
                    "127.0.0.1", front, ssl=client_tls, server_hostname="ns-api.localhost")
                client = writer.get_extra_info("sockname")
                writer.write(b"decrypted by haproxy")
                await writer.drain()
                header, payload = await asyncio.wait_for(sink.received.get(), STEP)
                writer.close()
        finally:
            await sink.close()
        assert header.source == Endpoint(ip_address("127.0.0.1"), client[1])
        assert header.authority == "ns-api.localhost" and header.alpn == b"h2"
        assert [t.type for t in header.tlvs] == [0x03, 0x01, 0x02, 0x20]  # 0x20: SSL, kept raw
        assert payload == b"decrypted by haproxy"

    run(main())


ACCEPTING = """
frontend accepting
    mode http
    bind 127.0.0.1:{port} accept-proxy
    http-request return status 200 content-type text/plain lf-string "src=%[src] src_port=%[src_port] dst=%[dst] dst_port=%[dst_port] authority=%[fc_pp_authority]"
"""
REQUEST = b"GET / HTTP/1.1\r\nHost: api.example\r\nConnection: close\r\n\r\n"


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection; everything HAProxy answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=STEP) as sock:
        sock.sendall(data)
        response = b""
        try:
            while chunk := sock.recv(4096):
                response += chunk
        except ConnectionResetError:
            pass
        return response


@pytest.mark.parametrize("source,destination", [
    (("203.0.113.7", 40000), ("198.51.100.1", 443)),
    (("2001:db8::7", 40001), ("2001:db8::1", 8443)),
    (("::ffff:203.0.113.8", 40002), ("::ffff:198.51.100.1", 443)),  # sent as IPv4
])
@pytest.mark.parametrize("checksum", [False, True])
def test_haproxy_accepts_our_v2_header(tmp_path: Path, source: tuple[str, int],
                                       destination: tuple[str, int], checksum: bool) -> None:
    port = free_port("127.0.0.1")
    header = build_v2(Endpoint(ip_address(source[0]), source[1]),
                      Endpoint(ip_address(destination[0]), destination[1]),
                      authority="api.example", alpn=b"h2", checksum=checksum)
    with haproxy(tmp_path, ACCEPTING.format(port=port)):
        response = exchange(port, header + REQUEST)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response
    src, dst = (ip_address(a) for a in (source[0], destination[0]))
    src = getattr(src, "ipv4_mapped", None) or src
    dst = getattr(dst, "ipv4_mapped", None) or dst
    assert body.decode() == (f"src={src} src_port={source[1]} dst={dst} dst_port={destination[1]}"
                             " authority=api.example")


def test_haproxy_refuses_our_header_with_a_broken_checksum(tmp_path: Path) -> None:
    # Proves both that HAProxy checks the CRC32c and that ours (accepted above) is right.
    port = free_port("127.0.0.1")
    header = bytearray(build_v2(Endpoint(ip_address("203.0.113.7"), 40000),
                                Endpoint(ip_address("198.51.100.1"), 443), checksum=True))
    intact = bytes(header)
    header[-1] ^= 0x01
    with haproxy(tmp_path, ACCEPTING.format(port=port)):
        assert exchange(port, intact + REQUEST).startswith(b"HTTP/1.1 200")
        assert exchange(port, bytes(header) + REQUEST) == b""  # closed without an answer
