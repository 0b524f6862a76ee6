"""Issue 13 end to end: PROXY protocol in (HAProxy in front) and out, allow_sources, rate limits.

A real proxy (``harness.Edge``) on 127.0.0.1 trusts PROXY headers from 127.0.0.2 only; loopback
clients pick their source address (127.0.0.0/8 is all local) to play balancer, client or
stranger. Upstreams that take a PROXY header are fronted by ``HeaderRelay``, which reads it with
our reader, records it, and splices the rest to the real stand-in: the client's TLS (passthrough)
or the proxy's HTTP (terminate) reaches an ordinary server only after the header was understood.
Counters are read from the registry that /metrics exposes. Every step is time-bounded.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from dataclasses import replace
from ipaddress import ip_address
from pathlib import Path
from typing import Iterator

import pytest

from nextproxy.config.model import Address, Config, Limits, ListenerPolicy, RateLimitConfig, SniAction, SniRoute, Timeouts, Upstream
from nextproxy.core.proxyprotocol import Endpoint, ProxyCommand, ProxyHeader, ProxyHeaderReader, build_v2
from nextproxy.demo.pki import DemoPki
from nextproxy.process import metrics
from tests.integration.harness import API_NAME, SERVER_NAME, TERMINATED_API_NAME, Edge
from tests.integration.test_proxyprotocol_haproxy import FAMILIES, HAPROXY, free_port, haproxy, hostport

STEP = 10.0
BALANCER = "127.0.0.2"
DENIED_PASSTHROUGH = "denied-pt.localhost"
DENIED_TERMINATE = "denied-tls.localhost"
OUTSIDE = ("10.0.0.0/8", "fd00::/8")
LOCAL_V2 = b"\r\n\r\n\x00\r\nQUIT\n" + bytes((0x20, 0x00, 0x00, 0x00))


class HeaderRelay:
    """Reads a PROXY header with our reader, records it, then splices to ``target``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.headers: list[ProxyHeader] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return "127.0.0.1", int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            parser, header = ProxyHeaderReader(), None
            while header is None:
                header = parser.feed(await asyncio.wait_for(reader.read(4096), STEP))
            self.headers.append(header)
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            up_writer.write(header.trailing)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                while chunk := await asyncio.wait_for(src.read(65536), STEP):
                    dst.write(chunk)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)
            up_writer.close()
        except Exception:
            pass
        finally:
            writer.close()


class Counting:
    """An upstream that counts connections that carried bytes: proof that a refused client
    reached nothing (the pool's health probes connect and close without a byte)."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> tuple[str, int]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                if await asyncio.wait_for(reader.read(1), STEP):
                    self.connections += 1
            except (OSError, TimeoutError):
                pass
            writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return "127.0.0.1", int(self.server.sockets[0].getsockname()[1])


def sample(name: str, **labels: str) -> float:
    return metrics.registry_for_exposition().get_sample_value(name, labels) or 0.0


def exposed(line_start: str) -> float:
    """The value of a sample as /metrics renders it (the same registry, the same encoder)."""
    for line in metrics.exposition("text/plain").body.decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


def connect_from(source: str, port: int, host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(STEP)
    sock.bind((source, 0))
    sock.connect((host, port))
    return sock


def https_get(edge: Edge, sock: socket.socket, path: str, server_name: str = SERVER_NAME,
              extra: str = "") -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """One HTTP/1.1 request over TLS on ``sock`` (already connected, maybe PROXY-prefixed)."""
    with edge.client_context().wrap_socket(sock, server_hostname=server_name) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nhost: {server_name}\r\nconnection: close\r\n{extra}\r\n".encode())
        data = b""
        deadline = time.monotonic() + STEP
        while time.monotonic() < deadline:
            try:
                chunk = tls.recv(65536)
            except (ssl.SSLError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
            head, found, body = data.partition(b"\r\n\r\n")
            if found and (extra or _complete(head, body)):  # an upgrade: the head is all we read
                break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def _complete(head: bytes, body: bytes) -> bool:
    """The body is all here by its content-length (the proxy keeps a connection after its own
    403/429 refusals, so EOF would only come with the idle timeout)."""
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def forwarded_for(body: bytes) -> str:
    return dict(json.loads(body)["headers"])["x-forwarded-for"]


@pytest.fixture(scope="module")
def policy_edge(pki: DemoPki) -> Iterator[tuple[Edge, HeaderRelay, HeaderRelay, Counting]]:
    holder: dict[str, object] = {}

    def mutate(config: Config) -> Config:
        pt_relay, http_relay, counting = holder["pt"], holder["http"], holder["count"]
        assert isinstance(pt_relay, HeaderRelay) and isinstance(http_relay, HeaderRelay) and isinstance(counting, Counting)
        upstreams = []
        for upstream in config.upstreams:
            if upstream.name == "ns-api":
                upstream = replace(upstream, servers=(Address(*holder["pt_addr"]),))  # type: ignore[misc]
            elif upstream.name == "mc-api":
                upstream = replace(upstream, servers=(Address(*holder["http_addr"]),), proxy_protocol="v2")  # type: ignore[misc]
            upstreams.append(upstream)
        upstreams.append(Upstream("counting", (Address(*holder["count_addr"]),)))  # type: ignore[misc]
        routes = tuple(
            replace(r, allow_sources=OUTSIDE) if r.name == "ns-sigmai"
            else replace(r, rate_limit=RateLimitConfig(0.01, 2)) if r.name == "mc-sigmai"
            else replace(r, rate_limit=RateLimitConfig(0.01, 1)) if r.name == "ns-websocket"
            else r
            for r in config.routes
        )  # fmt: skip
        sni = tuple(replace(s, proxy_protocol="v2") if s.name == "ns-api" else s for s in config.sni_routes) + (
            SniRoute("denied-pt", (DENIED_PASSTHROUGH,), SniAction.PASSTHROUGH, "counting", allow_sources=OUTSIDE),
            SniRoute("denied-tls", (DENIED_TERMINATE,), SniAction.TERMINATE, "counting", allow_sources=OUTSIDE),
        )
        return replace(
            config, upstreams=tuple(upstreams), routes=routes, sni_routes=sni,
            listener_policies=(ListenerPolicy(config.listen, (BALANCER + "/32",)),),
        )  # fmt: skip

    # The relays need the stand-ins' addresses, which exist only inside Edge.start: start the
    # edge first with a placeholder, then the relays, then reload into the real configuration.
    edge = Edge.start(pki)
    try:
        pt = HeaderRelay(edge.standins["ns-api"].address)
        http = HeaderRelay(edge.standins["mc-api"].address)
        counting = Counting()
        holder.update(pt=pt, http=http, count=counting)
        holder["pt_addr"] = edge.thread.call(pt.start())
        holder["http_addr"] = edge.thread.call(http.start())
        holder["count_addr"] = edge.thread.call(counting.start())

        async def reload() -> Config:
            config = mutate(edge.config)
            edge.server.reload(config, edge.server.runtime.observer)
            return config

        edge.config = edge.thread.call(reload())
        yield edge, pt, http, counting
    finally:
        edge.close()


# ----------------------------------------------------------------------- PROXY protocol in


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sender", ["send-proxy-v2", "send-proxy"])
def test_haproxy_in_front_gives_the_real_client_address(
    tmp_path: Path, policy_edge: tuple[Edge, HeaderRelay, HeaderRelay, Counting], family: str, sender: str
) -> None:
    edge = policy_edge[0]
    front = free_port(family)
    client = "127.0.0.3" if family == "127.0.0.1" else "::1"
    version = "2" if sender.endswith("v2") else "1"
    before = sample("nextproxy_proxy_protocol_headers_total", listener="127.0.0.1:0", version=version, command="proxy")
    sections = f"""
frontend tcp_in
    mode tcp
    bind {hostport(family, front)}
    default_backend edge
backend edge
    mode tcp
    server edge 127.0.0.1:{edge.port} {sender} source {BALANCER}
"""
    with haproxy(tmp_path, sections):
        status, _, body = https_get(edge, connect_from(client, front, family), "/sfs/sigmai/who")
    assert status == 200
    assert forwarded_for(body) == client  # the header's source, not HAProxy's 127.0.0.2
    after = sample("nextproxy_proxy_protocol_headers_total", listener="127.0.0.1:0", version=version, command="proxy")
    assert after == before + 1


def test_local_command_keeps_the_connection_address(policy_edge: tuple[Edge, HeaderRelay, HeaderRelay, Counting]) -> None:
    edge = policy_edge[0]
    sock = connect_from(BALANCER, edge.port)
    sock.sendall(LOCAL_V2)
    status, _, body = https_get(edge, sock, "/sfs/sigmai/local")
    assert status == 200 and forwarded_for(body) == BALANCER


def test_header_split_from_the_hello_and_ipv6_source(policy_edge: tuple[Edge, HeaderRelay, HeaderRelay, Counting]) -> None:
    edge = policy_edge[0]
    sock = connect_from(BALANCER, edge.port)
    header = build_v2(Endpoint(ip_address("2001:db8::7"), 40000), Endpoint(ip_address("2001:db8::1"), 443))
    for i in range(len(header)):  # a byte at a time: the reader is incremental
        sock.sendall(header[i:i + 1])
    status, _, body = https_get(edge, sock, "/sfs/sigmai/v6")
    assert status == 200 and forwarded_for(body) == "2001:db8::7"


def closed_without_answer(sock: socket.socket) -> bool:
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_untrusted_peer_sending_a_header_is_closed_and_counted(policy_edge: tuple[Edge, HeaderRelay, HeaderRelay, Counting]) -> None:
    edge = policy_edge[0]
    before = sample("nextproxy_proxy_protocol_rejected_total", listener="127.0.0.1:0", reason="untrusted")
    with connect_from("127.0.0.1", edge.port) as sock:
        sock.sendall(b"PROXY TCP4 6.6.6.6 127.0.0.1 1234 443\r\n")
        assert closed_without_answer(sock)
    with connect_from("127.0.0.1", edge.port) as sock:
        sock.sendall(build_v2(Endpoint(ip_address("6.6.6.6"), 1), Endpoint(ip_address("127.0.0.1"), 443)))
        assert closed_without_answer(sock)
    assert sample("nextproxy_proxy_protocol_rejected_total", listener="127.0.0.1:0", reason="untrusted") == before + 2
    assert exposed('nextproxy_proxy_protocol_rejected_total{listener="127.0.0.1:0",reason="untrusted"}') >= 2


def test_trusted_peer_without_a_header_is_closed_and_counted(policy_edge: tuple[Edge, HeaderRelay, HeaderRelay, Counting]) -> None:
    edge = policy_edge[0]
    before = sample("nextproxy_proxy_protocol_rejected_total", listener="127.0.0.1:0", reason="not_proxy_protocol")
    with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        https_get(edge, connect_from(BALANCER, edge.port), "/sfs/sigmai/x")
        raise OSError("the handshake must not succeed")
    assert sample("nextproxy_proxy_protocol_rejected_total", listener="127.0.0.1:0", reason="not_proxy_protocol") == before + 1


def test_plain_clients_are_unaffected(policy_edge: tuple[Edge, HeaderRelay, HeaderRelay, Counting]) -> None:
    edge = policy_edge[0]
    status, _, body = https_get(edge, connect_from("127.0.0.4", edge.port), "/sfs/sigmai/plain")
    assert status == 200 and forwarded_for(body) == "127.0.0.4"


# ----------------------------------------------------------------------- PROXY protocol out


def test_passthrough_sends_v2_with_client_sni_and_alpn_and_untouched_tls(
    policy_edge: tuple[Edge, HeaderRelay, HeaderRelay, Counting],
) -> None:
    edge, relay = policy_edge[0], policy_edge[1]
    count = len(relay.headers)
    context = edge.client_context(alpn=("http/1.1",))
    with context.wrap_socket(connect_from("127.0.0.6", edge.port), server_hostname=API_NAME) as tls:
        # The stand-in's own certificate: the TLS session is the client's, end to end.
        assert tls.getpeercert() is not None
        tls.sendall(f"GET /api/x HTTP/1.1\r\nhost: {API_NAME}\r\nconnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    header = relay.headers[count]
    assert header.version == 2 and header.command is ProxyCommand.PROXY
    assert header.source is not None and str(header.source.ip) == "127.0.0.6"
    assert header.destination is not None and header.destination.port == edge.port
    assert header.authority == API_NAME and header.alpn == b"http/1.1"
    assert header.trailing[:1] == b"\x16"  # the client's ClientHello follows, as sent
    # Several protocols offered: the upstream's own TLS chooses, so no ALPN TLV is sent.
    with edge.client_context(alpn=("h2", "http/1.1")).wrap_socket(connect_from("127.0.0.6", edge.port), server_hostname=API_NAME) as tls:
        tls.sendall(f"GET /api/x HTTP/1.1\r\nhost: {API_NAME}\r\nconnection: close\r\n\r\n".encode())
        while tls.recv(65536):
            pass
    assert relay.headers[count + 1].alpn is None and relay.headers[count + 1].authority == API_NAME


def test_http_upstream_gets_one_private_connection_per_client(
    policy_edge: tuple[Edge, HeaderRelay, HeaderRelay, Counting],
) -> None:
    edge, relay = policy_edge[0], policy_edge[2]
    count = len(relay.headers)
    for source in ("127.0.0.7", "127.0.0.8", "127.0.0.7"):
        status, _, body = https_get(edge, connect_from(source, edge.port), "/any/path", TERMINATED_API_NAME)
        assert status == 200 and forwarded_for(body) == source
    sources = [str(h.source.ip) for h in relay.headers[count:] if h.source is not None]
    assert sources == ["127.0.0.7", "127.0.0.8", "127.0.0.7"]  # never pooled across clients
    assert all(h.authority == TERMINATED_API_NAME for h in relay.headers[count:])


# ----------------------------------------------------------------------- allow_sources


def test_passthrough_outside_allow_sources_never_reaches_the_upstream(
    policy_edge: tuple[Edge, HeaderRelay, HeaderRelay, Counting],
) -> None:
    edge, counting = policy_edge[0], policy_edge[3]
    before = sample("nextproxy_authorization_denied_total", route="denied-pt", reason="source")
    with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        with edge.tls_socket(DENIED_PASSTHROUGH):
            pass
    time.sleep(0.2)
    assert counting.connections == 0
    assert sample("nextproxy_authorization_denied_total", route="denied-pt", reason="source") == before + 1


def test_terminate_outside_allow_sources_gets_access_denied(policy_edge: tuple[Edge, HeaderRelay, HeaderRelay, Counting]) -> None:
    edge, counting = policy_edge[0], policy_edge[3]
    with pytest.raises(ssl.SSLError, match="ACCESS_DENIED"):
        with edge.tls_socket(DENIED_TERMINATE):
            pass
    assert counting.connections == 0
    assert sample("nextproxy_authorization_denied_total", route="denied-tls", reason="source") >= 1


def test_path_route_outside_allow_sources_is_403(policy_edge: tuple[Edge, HeaderRelay, HeaderRelay, Counting]) -> None:
    edge = policy_edge[0]
    before = sample("nextproxy_authorization_denied_total", route="ns-sigmai", reason="source")
    status, _, body = https_get(edge, connect_from("127.0.0.1", edge.port), "/ns/sigmai/x")
    assert status == 403 and b"source" in body
    assert sample("nextproxy_authorization_denied_total", route="ns-sigmai", reason="source") == before + 1
    # Through a trusted balancer the header's source decides: an allowed one gets through.
    sock = connect_from(BALANCER, edge.port)
    sock.sendall(build_v2(Endpoint(ip_address("10.1.2.3"), 5555), Endpoint(ip_address("127.0.0.1"), 443)))
    status, _, body = https_get(edge, sock, "/ns/sigmai/x")
    assert status == 200 and forwarded_for(body) == "10.1.2.3"


# ----------------------------------------------------------------------- rate limits


def test_requests_over_the_burst_get_429_with_retry_after(policy_edge: tuple[Edge, HeaderRelay, HeaderRelay, Counting]) -> None:
    edge = policy_edge[0]
    before = sample("nextproxy_rate_limited_total", route="mc-sigmai", key="ip")
    statuses = []
    for _ in range(3):  # burst 2, one token per 100 s (slow enough for a loaded machine): the third is refused
        status, headers, _ = https_get(edge, connect_from("127.0.0.11", edge.port), "/mc/sigmai/x")
        statuses.append((status, headers.get("retry-after")))
    assert statuses[:2] == [(200, None), (200, None)]
    assert statuses[2] == (429, "100")
    # Another client has its own bucket.
    assert https_get(edge, connect_from("127.0.0.12", edge.port), "/mc/sigmai/x")[0] == 200
    assert sample("nextproxy_rate_limited_total", route="mc-sigmai", key="ip") == before + 1
    assert exposed('nextproxy_rate_limited_total{key="ip",route="mc-sigmai"}') >= 1
    assert sample("nextproxy_requests_total", route="mc-sigmai", code="429") >= 1


def test_websocket_upgrades_are_rate_limited_too(policy_edge: tuple[Edge, HeaderRelay, HeaderRelay, Counting]) -> None:
    edge = policy_edge[0]
    upgrade = "upgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    first = https_get(edge, connect_from("127.0.0.13", edge.port), "/ns/websocket", extra=upgrade)
    second = https_get(edge, connect_from("127.0.0.13", edge.port), "/ns/websocket", extra=upgrade)
    assert first[0] == 101
    assert second[0] == 429 and second[1]["retry-after"] == "100"


def test_new_connections_per_second_closes_at_accept(pki: DemoPki) -> None:
    def mutate(config: Config) -> Config:
        return replace(config, listener_policies=(ListenerPolicy(config.listen, None, 0.05),))  # 1 burst, then 1 per 20 s

    edge = Edge.start(pki, mutate=mutate)
    try:
        before = sample("nextproxy_connections_rate_limited_total", listener="127.0.0.1:0")
        assert https_get(edge, connect_from("127.0.0.14", edge.port), "/sfs/sigmai/x")[0] == 200
        with connect_from("127.0.0.14", edge.port) as sock:
            assert closed_without_answer(sock)
        # A different client address is not affected.
        assert https_get(edge, connect_from("127.0.0.15", edge.port), "/sfs/sigmai/x")[0] == 200
        assert sample("nextproxy_connections_rate_limited_total", listener="127.0.0.1:0") == before + 1
    finally:
        edge.close()


def test_trusted_peer_header_cut_short_or_too_slow_is_closed_and_counted(pki: DemoPki) -> None:
    def mutate(config: Config) -> Config:
        return replace(config, listener_policies=(ListenerPolicy(config.listen, ("127.0.0.0/8",)),))

    edge = Edge.start(pki, mutate=mutate, timeouts=Timeouts(client_hello=0.3, connect=2, upstream_response=10, client_idle=10))
    try:
        reasons = ("truncated", "timeout", "malformed")
        before = {r: sample("nextproxy_proxy_protocol_rejected_total", listener="127.0.0.1:0", reason=r) for r in reasons}
        header = build_v2(Endpoint(ip_address("192.0.2.1"), 1), Endpoint(ip_address("127.0.0.1"), 443))
        with connect_from("127.0.0.1", edge.port) as sock:  # half a header, then EOF
            sock.sendall(header[:10])
            sock.shutdown(socket.SHUT_WR)
            assert closed_without_answer(sock)
        with connect_from("127.0.0.1", edge.port) as sock:  # half a header, then nothing
            sock.sendall(header[:10])
            started = time.monotonic()
            assert closed_without_answer(sock)
            assert 0.2 < time.monotonic() - started < 5
        with connect_from("127.0.0.1", edge.port) as sock:  # v1 with a bad address
            sock.sendall(b"PROXY TCP4 999.1.1.1 127.0.0.1 1 443\r\n")
            assert closed_without_answer(sock)
        time.sleep(0.1)
        for reason in reasons:
            assert sample("nextproxy_proxy_protocol_rejected_total", listener="127.0.0.1:0", reason=reason) == before[reason] + 1
        # and a good header still works on the same listener
        sock = connect_from("127.0.0.1", edge.port)
        sock.sendall(header)
        status, _, body = https_get(edge, sock, "/sfs/sigmai/ok")
        assert status == 200 and forwarded_for(body) == "192.0.2.1"
    finally:
        edge.close()


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
def test_tls_upstream_gets_the_header_before_its_handshake(tmp_path: Path, pki: DemoPki, pki_files: dict[str, Path]) -> None:
    """HAProxy ``accept-proxy`` in front of a TLS stand-in, admitting only the client the header
    names: the request succeeds only if the v2 header came first, was valid, and named it. Its
    health probe to such an upstream is a LOCAL header, which HAProxy accepts silently."""
    from nextproxy.config.model import UpstreamTls
    from nextproxy.demo.pki import server_ssl_context
    from nextproxy.demo.standins import start_tls_api
    from nextproxy.edge.tlscontexts import upstream_ssl_context
    from nextproxy.edge.upstream import UpstreamPool

    front = free_port("127.0.0.1")

    class Owner:
        def __init__(self) -> None:
            self.data = b""
            self.done = asyncio.Event()

        def upstream_data(self, data: bytes) -> None:
            self.data += data
            if not data:
                self.done.set()

        def upstream_lost(self, exc: Exception | None) -> None:
            self.done.set()

        def upstream_writing(self, paused: bool) -> None:
            pass

        def read_room(self) -> int:
            return 64 * 1024  # UpstreamOwner: how much the next upstream read may bring

    async def exchange(source: str) -> bytes:
        tls = UpstreamTls(ca_file=str(pki_files["ca.pem"]), server_name="localhost")
        upstream = Upstream("api", (Address("127.0.0.1", front),), tls, "v2")
        config = Config(Address("127.0.0.1", 0), Address("127.0.0.1", 1), (), (upstream,), ())
        pool = UpstreamPool(config, {("api", upstream.servers[0]): upstream_ssl_context(tls)})
        owner = Owner()
        header = build_v2(Endpoint(ip_address(source), 4444), Endpoint(ip_address("127.0.0.1"), 443), authority="api.example")
        try:
            conn = await pool.connect(upstream, owner, header)
        except (OSError, ssl.SSLError):
            return b""
        conn.write(b"GET /who HTTP/1.1\r\nhost: api.example\r\nconnection: close\r\n\r\n")
        await asyncio.wait_for(owner.done.wait(), STEP)
        assert conn.private
        pool.release(conn, True)  # a private connection is closed, never pooled
        assert conn.transport is not None and conn.transport.is_closing()
        await pool._probe(upstream)  # LOCAL header: HAProxy lets it in and out without complaint
        assert pool.health["api"]
        return owner.data

    async def scenario() -> tuple[bytes, bytes]:
        standin = await start_tls_api("127.0.0.1", 0, "api", server_ssl_context(pki.upstream, pki.ca.certificate, require_client_cert=False))
        sections = f"""
frontend pp_in
    mode tcp
    bind 127.0.0.1:{front} accept-proxy
    tcp-request session reject if !{{ src 192.0.2.77 }} !LOCALHOST
    default_backend api
backend api
    mode tcp
    server api 127.0.0.1:{standin.address[1]}
"""
        with haproxy(tmp_path, sections):
            good = await exchange("192.0.2.77")
            bad = await exchange("192.0.2.78")
        await standin.close()
        return good, bad

    good, bad = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert good.startswith(b"HTTP/1.1 200") and b'"service": "api"' in good
    assert not bad.startswith(b"HTTP/1.1 200")


def test_per_address_cap_counts_the_clients_behind_a_trusted_balancer(pki: DemoPki) -> None:
    def mutate(config: Config) -> Config:
        return replace(config, listener_policies=(ListenerPolicy(config.listen, ("127.0.0.0/8",)),))

    edge = Edge.start(pki, mutate=mutate, limits=Limits(max_connections_per_ip=2))
    held: list[socket.socket] = []
    try:
        before = sample("nextproxy_connections_refused_total", reason="max_connections_per_ip")

        def through_balancer(client: str) -> socket.socket:
            sock = connect_from("127.0.0.1", edge.port)
            sock.sendall(build_v2(Endpoint(ip_address(client), 4000 + len(held)), Endpoint(ip_address("127.0.0.1"), 443)))
            held.append(sock)
            return sock

        # Four connections from the balancer's one address, for two clients: none is over its cap.
        for client in ("192.0.2.10", "192.0.2.10", "192.0.2.11", "192.0.2.11"):
            through_balancer(client)
        status, _, body = https_get(edge, through_balancer("192.0.2.12"), "/sfs/sigmai/ok")
        assert status == 200 and forwarded_for(body) == "192.0.2.12"
        # A third connection for a client that holds two is refused at its header.
        assert closed_without_answer(through_balancer("192.0.2.10"))
        time.sleep(0.1)
        assert sample("nextproxy_connections_refused_total", reason="max_connections_per_ip") == before + 1
    finally:
        for sock in held:
            sock.close()
        edge.close()
