"""nextproxy's whole terminated path, in-process: µs per keep-alive request and per new connection.

    python benchmarks/inprocess.py             # ~15 s, nothing to install, no sockets
    python benchmarks/inprocess.py --opcodes   # bytecode counts instead of time (exact, ~5 s)

run.py measures under real load, where this 2-core VM's noise is ±15% between runs; this runs
the real shell (Accepted, TerminatedConnection, UpstreamConnection, the pool, metrics, deadlines)
and core on in-memory transports, with a stdlib ``ssl`` client on memory BIOs and canned
upstream responses, and reports the minimum of several batches: small changes show here when
they drown in run.py (the VM's speed still drifts over minutes: compare two commits by running
them alternately). Only the proxy's own calls are timed (the client's TLS work is not).
Not a test: the transports are stand-ins that only collect bytes.

``--opcodes`` counts the bytecode instructions the proxy executes per operation instead (and
the functions that execute most): the same number on every run, so two commits compare exactly
whatever the VM does. Under load each instruction costs several times its in-process time (the
handshake evicts the caches: ~40 ns per instruction per new connection under W2 against ~8 here),
so fewer instructions is what a change on the per-connection path has to show.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import sys
import time
from types import FrameType
from pathlib import Path
from typing import Any, Callable

import uvloop
from OpenSSL import SSL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from floor import REQUEST, RESPONSE  # noqa: E402  (the same request and response as floor.py)
from wsframes import OP_BINARY, frame  # noqa: E402
from nextproxy.core import buffer, chunked, codec, http1_response, request_body, upstream_leg  # noqa: E402
from nextproxy.edge.accept import Accepted  # noqa: E402
from nextproxy.config.model import (
    Address,
    CertificateConfig,
    Config,
    PathRoute,
    PemSource,
    Upstream,
    WebSocketMode,
)  # noqa: E402
from nextproxy.core.headers import websocket_accept  # noqa: E402
from nextproxy.demo.pki import make_pki  # noqa: E402
from nextproxy.process.logs import Logger  # noqa: E402
from nextproxy.process.observe import Observer  # noqa: E402
from nextproxy.edge.listener import build_runtime  # noqa: E402
from nextproxy.edge.reads import READ_SIZE  # noqa: E402
from nextproxy.edge.upstream import UpstreamConnection  # noqa: E402

CLOSING_REQUEST = REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
BATCHES = 9
TOP = 12


class MemoryTransport:
    """Collects what the proxy writes; closing tells the protocol, as a real transport would."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closing = False
        self.protocol: Any = None

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writelines(self, chunks: list[bytes]) -> None:
        self.out.extend(chunks)

    def take(self) -> bytes:
        data = b"".join(self.out)
        self.out.clear()
        return data

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            if self.protocol is not None:
                self.protocol.connection_lost(None)

    abort = close

    def is_closing(self) -> bool:
        return self.closing

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def write_eof(self) -> None: ...
    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...


class Bench:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        pki = make_pki(("localhost",))
        pair = CertificateConfig(PemSource(pki.edge.certificate, "edge cert"), PemSource(pki.edge.key, "edge key"))
        upstream = Upstream("web", (Address("127.0.0.1", 18080),))
        routes = (PathRoute("tunnel", "/tunnel", "web", websocket=WebSocketMode.TUNNEL), PathRoute("web", "/", "web"))
        config = Config(Address("127.0.0.1", 18443), Address("127.0.0.1", 19613), (pair,), (upstream,), routes)
        self.runtime = build_runtime(config, Observer(Logger("warning")))
        self.runtime.pool._loop = loop  # the pool's timers are not started: nothing here waits
        self.loop = loop
        self.client_context = ssl.create_default_context(cafile=None)
        self.client_context.load_verify_locations(cadata=pki.ca.certificate.decode())
        self.client_context.check_hostname = False  # no SNI: the Host header is an IP literal
        self.server = upstream.servers[0]
        self._upstream_config = upstream
        self.upstream, self.upstream_transport = self.new_upstream()
        self.proxy_seconds = 0.0
        self.handshake_seconds = 0.0

    def new_upstream(self) -> tuple[UpstreamConnection, MemoryTransport]:
        """An upstream connection on an in-memory transport."""
        upstream, transport = UpstreamConnection(self._upstream_config, self.server, 65536), MemoryTransport()
        upstream.connection_made(transport)  # type: ignore[arg-type]
        return upstream, transport

    def pool_upstream(self) -> None:
        self.upstream.idle_since = self.loop.time()
        self.runtime.pool._idle[(self._upstream_config.name, self.server)] = [self.upstream]

    def timed(self, step: Callable[[], object]) -> None:
        start = time.perf_counter()
        step()
        self.proxy_seconds += time.perf_counter() - start


    def connect(self) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, MemoryTransport]:
        """Accept, read the hello, complete the handshake; returns the client side."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = self.client_context.wrap_bio(incoming, outgoing, server_hostname=None)
        try:
            client.do_handshake()
        except ssl.SSLWantReadError:
            pass
        transport = MemoryTransport()
        self.runtime.admission.admit("127.0.0.1")  # as edge.acceptor does before the protocol exists
        accepted = Accepted(self.runtime, self.loop, "127.0.0.1")
        transport.protocol = accepted
        hello = outgoing.read()
        self.timed(lambda: (accepted.connection_made(transport), accepted.data_received(hello)))  # type: ignore[arg-type, func-returns-value]
        incoming.write(transport.take())
        client.do_handshake()
        return client, incoming, outgoing, transport

    def exchange(self, client: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, transport: MemoryTransport, request: bytes) -> None:
        """One request through the proxy to the canned upstream and back to the client."""
        self.pool_upstream()
        client.write(request)
        record = outgoing.read()
        self.timed(lambda: transport.protocol.data_received(record))
        self.upstream_transport.out.clear()
        self.timed(lambda: self.upstream.data_received(RESPONSE))
        incoming.write(transport.take())
        response = client.read(65536)
        assert response.startswith(b"HTTP/1.1 200 "), response[:80]


class OpcodeCount:
    """Counts the bytecode instructions executed inside ``Bench.timed`` (the proxy's calls),
    by function, with a trace function (``--opcodes``)."""

    def __init__(self, bench: Bench) -> None:
        self.by_function: collections.Counter[str] = collections.Counter()
        self._on = False
        timed = bench.timed

        def counted(step: Callable[[], object]) -> None:
            self._on = True
            try:
                timed(step)
            finally:
                self._on = False

        bench.timed = counted  # type: ignore[method-assign]
        sys.settrace(self._trace)

    def _trace(self, frame: FrameType, event: str, arg: object) -> Any:
        if event == "call":
            frame.f_trace_opcodes = True
        elif event == "opcode" and self._on and frame.f_code.co_filename != __file__:
            code = frame.f_code
            self.by_function[f"{Path(code.co_filename).name}:{code.co_qualname}"] += 1
        return self._trace

    def per(self, n: int, run: Callable[[], object]) -> tuple[float, list[tuple[str, float]]]:
        """Instructions per operation over ``run`` (``n`` operations), and the top functions."""
        self.by_function.clear()
        run()
        top = [(name, count / n) for name, count in self.by_function.most_common(TOP)]
        return sum(self.by_function.values()) / n, top


def websocket_echo(bench: Bench, path: bytes = b"/chat") -> Callable[..., float]:
    """Upgrade one connection to a WebSocket session on ``path`` ("/chat" relays frames,
    "/tunnel/chat" is a tunnel) over an upstream connection of its own; the returned function
    times n echoes (client -> upstream -> client) through it."""
    client, incoming, outgoing, transport = bench.connect()
    bench.upstream, bench.upstream_transport = upstream, upstream_transport = bench.new_upstream()
    bench.pool_upstream()
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    client.write(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    transport.protocol.data_received(outgoing.read())
    upstream.data_received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           b"Sec-WebSocket-Accept: " + websocket_accept(key) + b"\r\n\r\n")
    incoming.write(transport.take())
    assert client.read(65536).startswith(b"HTTP/1.1 101 ")
    bench.upstream, bench.upstream_transport = bench.new_upstream()  # the session keeps its own

    def echoes(n: int, size: int = 32) -> float:
        """``size``-byte echoes: the client's records reach the proxy in reads of at most
        ``READ_SIZE`` (64 KiB, as the shell reads them), the upstream's frame in one read of
        up to 128 KiB."""
        from_client = frame(OP_BINARY, b"x" * size, b"\x01\x02\x03\x04")
        from_upstream = frame(OP_BINARY, b"x" * size)
        bench.proxy_seconds = 0.0
        for _ in range(n):
            client.write(from_client)
            records = outgoing.read()
            for start in range(0, len(records), READ_SIZE):
                read = records[start : start + READ_SIZE]
                bench.timed(lambda: transport.protocol.data_received(read))
            upstream_transport.out.clear()
            for start in range(0, len(from_upstream), 2 * READ_SIZE):
                read = from_upstream[start : start + 2 * READ_SIZE]
                bench.timed(lambda: upstream.data_received(read))
            incoming.write(transport.take())
            echoed = bytearray()
            while len(echoed) < len(from_upstream):
                echoed += client.read(len(from_upstream))
            assert echoed == from_upstream
        return bench.proxy_seconds / n * 1e6

    return echoes


class CodecClock:
    """Times every call into the codec (outermost calls only): head search, the two head parsers,
    the client response head, chunked framing. Each entry point is wrapped where the session
    looks it up (a module-level name imported elsewhere is rebound in that module)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0
        self._wrap(codec.RequestParser, "parse")
        self._wrap(buffer, "head_end")
        self._wrap(upstream_leg, "parse_response")
        self._wrap(http1_response, "client_response")
        self._wrap(http1_response, "encode_chunk")
        self._wrap(request_body, "encode_chunk")
        self._wrap(chunked.ChunkedReader, "feed")

    def _wrap(self, owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - start

        setattr(owner, name, timed)


def best_of(run: Callable[[], float]) -> float:
    return min(run() for _ in range(BATCHES))


def count_opcodes(bench: Bench) -> None:
    """``--opcodes``: bytecode per keep-alive request, per new connection, per 32 B echo."""
    client, incoming, outgoing, transport = bench.connect()
    for _ in range(50):  # warm: first calls import, compile regular expressions, fill caches
        bench.exchange(client, incoming, outgoing, transport, REQUEST)
        bench.exchange(*bench.connect(), CLOSING_REQUEST)
    counter = OpcodeCount(bench)
    n = 100
    rows = [
        ("keep-alive request", counter.per(n, lambda: [bench.exchange(client, incoming, outgoing, transport, REQUEST) for _ in range(n)])),
        ("new connection + one request + close", counter.per(n, lambda: [bench.exchange(*bench.connect(), CLOSING_REQUEST) for _ in range(n)])),
    ]
    echoes = websocket_echo(bench)
    echoes(20)
    rows.append(("WebSocket echo, frames mode, 32 B", counter.per(n, lambda: echoes(n))))
    tunnel = websocket_echo(bench, b"/tunnel/chat")
    tunnel(20)
    rows.append(("WebSocket echo, tunnel mode, 32 B", counter.per(n, lambda: tunnel(n))))
    sys.settrace(None)
    print(f"Python {sys.version.split()[0]}; bytecode instructions the proxy executes per operation, in-process\n")
    for title, (total, top) in rows:
        print(f"  {title:<40} {total:7.0f}")
        for name, count in top:
            print(f"      {count:6.0f}  {name}")


async def main() -> None:
    bench = Bench(asyncio.get_running_loop())
    if "--opcodes" in sys.argv[1:]:
        count_opcodes(bench)
        return
    client, incoming, outgoing, transport = bench.connect()

    def keep_alive(n: int = 2000) -> float:
        bench.proxy_seconds = 0.0
        for _ in range(n):
            bench.exchange(client, incoming, outgoing, transport, REQUEST)
        return bench.proxy_seconds / n * 1e6

    # OpenSSL's handshake calls, timed: the engine calls SSL_do_handshake directly (through its
    # module's name for it) and pyOpenSSL's method only without the direct calls.
    from nextproxy.core import tls

    handshake, direct_handshake = SSL.Connection.do_handshake, tls._SSL_do_handshake

    def timed_handshake(conn: SSL.Connection) -> None:
        start = time.perf_counter()
        try:
            handshake(conn)
        finally:
            bench.handshake_seconds += time.perf_counter() - start

    def timed_direct(ssl: Any) -> int:
        start = time.perf_counter()
        try:
            return direct_handshake(ssl)  # type: ignore[no-any-return]
        finally:
            bench.handshake_seconds += time.perf_counter() - start

    def new_connections(n: int = 150) -> float:
        bench.proxy_seconds = bench.handshake_seconds = 0.0
        for _ in range(n):
            bench.exchange(*bench.connect(), CLOSING_REQUEST)
        return bench.proxy_seconds / n * 1e6

    keep_alive(500)
    request = best_of(keep_alive)
    SSL.Connection.do_handshake, tls._SSL_do_handshake = timed_handshake, timed_direct  # type: ignore[method-assign]
    new_connections(50)
    samples = []
    for _ in range(BATCHES):
        total = new_connections()
        samples.append((total, bench.handshake_seconds / 150 * 1e6))
    connection, openssl = min(samples)
    SSL.Connection.do_handshake, tls._SSL_do_handshake = handshake, direct_handshake  # type: ignore[method-assign]
    clock = CodecClock()  # last: its wrappers add a little to every codec call

    def inside_codec(n: int = 2000) -> float:
        clock.seconds = 0.0
        keep_alive(n)
        return clock.seconds / n * 1e6

    codec_share = best_of(inside_codec)
    echoes = websocket_echo(bench)
    echoes(200)
    echo = best_of(lambda: echoes(2000))
    echoes(20, 65536)
    big_echo = best_of(lambda: echoes(200, 65536))
    tunnel = websocket_echo(bench, b"/tunnel/chat")
    tunnel(200)
    tunnel_echo = best_of(lambda: tunnel(2000))
    tunnel(20, 65536)
    big_tunnel_echo = best_of(lambda: tunnel(200, 65536))
    print(f"Python {sys.version.split()[0]}; proxy-side µs, best of {BATCHES} batches, in-process\n")
    print(f"  keep-alive request (client record in -> upstream -> response record out) {request:7.1f}")
    print(f"    of which inside the codec (both legs' heads; a pass with timing wrappers) {codec_share:6.1f}")
    print(f"  new connection + one request + close                                    {connection:7.1f}")
    print(f"    of which OpenSSL's handshake (SSL_do_handshake)                       {openssl:7.1f}")
    print(f"  WebSocket echo, frames mode, 32 B (client -> upstream -> client)         {echo:7.1f}")
    print(f"  WebSocket echo, frames mode, 64 KiB (client in 64 KiB reads, upstream 128 KiB) {big_echo:7.1f}")
    print(f"  WebSocket echo, tunnel mode, 32 B                                       {tunnel_echo:7.1f}")
    print(f"  WebSocket echo, tunnel mode, 64 KiB (as above)                          {big_tunnel_echo:7.1f}")


if __name__ == "__main__":
    uvloop.run(main())
