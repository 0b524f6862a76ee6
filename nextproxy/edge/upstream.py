"""Upstream connections: connect (plain or TLS), a keep-alive pool, and health.

A pooled connection keeps its leg (the core's client state, made by ``core.http1``; opaque
here) so reuse only cycles it. A
connection is checked before reuse: anything the upstream sent while idle (bytes or EOF) marks it
dead, and idle connections are dropped after ``timeouts.pool_idle``, which stays below the 5 s
after which Python servers close idle keep-alive connections: reusing a connection at the moment
the upstream closes it is the classic source of spurious 502s.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import socket
import ssl
from typing import Any, Awaitable, Callable, Protocol, Sequence, TypeVar, cast

from nextproxy.config.model import Address, Config, Upstream
from nextproxy.core.upstream_leg import UpstreamLeg, new_upstream_leg
from nextproxy.core.proxyprotocol import V2_SIGNATURE
from nextproxy.edge.acceptor import out_of_descriptors
from nextproxy.edge.reads import READ_SIZE, read_buffer
from nextproxy.edge.resumption import keep_session
from nextproxy.edge.writes import TurnWrites

LOCAL_V2 = V2_SIGNATURE + bytes((0x20, 0x00, 0x00, 0x00))
"""A PROXY v2 LOCAL header without addresses: what the health probe sends to such upstreams."""
HEALTH_INTERVAL = 10.0
"""Seconds between TCP probes of every upstream server (nextproxy_upstream_up)."""
SWEEP_INTERVAL = 1.0


_T = TypeVar("_T")

OPEN_CONNECTIONS: collections.Counter[str] = collections.Counter()
"""Open upstream connections of this process by upstream name, across pools (a reload's new
pool does not own the old pool's connections, which stay open until their requests end)."""


async def first_that_answers(servers: Sequence[Address], attempt: Callable[[Address], Awaitable[_T]]) -> _T:
    """``attempt`` on each server in turn until one succeeds; raises the last failure.

    As nginx's ``proxy_next_upstream error timeout``: a refused or timed-out connect has sent
    nothing, so trying the next server is always safe. A TLS failure is not retried elsewhere:
    it is a configuration problem, and failing over would hide it.
    """
    error: OSError | TimeoutError | None = None
    for server in servers:
        try:
            return await attempt(server)
        except ssl.SSLError:
            raise
        except (OSError, TimeoutError) as exc:
            if out_of_descriptors(exc):
                raise  # our shortage, not this server's: the next one would fail the same way
            error = exc
    assert error is not None, "no servers"
    try:
        raise error
    finally:
        # This frame is in the error's traceback: holding the error here too would make a cycle
        # that keeps the frame, and the client connection it references, alive until a full
        # garbage collection.
        del error


async def _sent_first(loop: asyncio.AbstractEventLoop, server: Address, preamble: bytes) -> socket.socket:
    """A connected TCP socket to ``server`` that has already sent ``preamble``: the PROXY header
    must precede the TLS ClientHello, which ``create_connection(ssl=...)`` would send at once."""
    infos = await loop.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            await loop.sock_sendall(sock, preamble)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:  # a timeout's cancellation: never leak the descriptor
            sock.close()
            raise
    raise error or OSError(f"cannot resolve {server.host!r}")


class UpstreamOwner(Protocol):
    """Whoever currently uses an upstream connection (a client connection's shell)."""

    def upstream_data(self, data: bytes) -> None: ...
    def upstream_lost(self, exc: Exception | None) -> None: ...
    def upstream_writing(self, paused: bool) -> None: ...
    def read_room(self) -> int:
        """How many bytes the next upstream read may bring (the client's room below its mark)."""


class UpstreamConnection(asyncio.BufferedProtocol):
    """One TCP (or TLS) connection to an upstream server.

    A BufferedProtocol so that the read size is ours, not uvloop's: what the owner's client can
    take below its write mark (``UpstreamOwner.read_room``, ``edge.reads``)."""

    def __init__(self, upstream: Upstream, server: Address, max_header_size: int, writes: TurnWrites | None = None) -> None:
        """``writes``: the runtime's, so that requests leave at the end of the loop's turn
        (``edge.writes``); without, every write is sent at once."""
        self.upstream = upstream
        self._writes = writes or TurnWrites()
        self.server = server
        self.leg: UpstreamLeg = new_upstream_leg(str(server), max_header_size)
        """The core's upstream state, kept with the TCP connection; the shell only hands it back."""
        self.transport: asyncio.Transport | None = None
        self.owner: UpstreamOwner | None = None
        self.alive = False
        self.idle_since = 0.0
        self.private = False
        """It began with a PROXY header naming one client: never pooled, never reused by another."""
        self._tls: ssl.SSLObject | None = None
        """Its TLS until the first bytes arrive, when its session is kept for the next
        connection to this server (``edge.resumption``): the tickets come before them."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only look-alikes.
        self.transport = cast(asyncio.Transport, transport)
        self.alive = True
        OPEN_CONNECTIONS[self.upstream.name] += 1
        if self.upstream.tls is not None:
            self._tls = transport.get_extra_info("ssl_object")

    def get_buffer(self, sizehint: int) -> memoryview:
        owner = self.owner
        return read_buffer(owner.read_room() if owner is not None else READ_SIZE)

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(read_buffer(nbytes)))

    def data_received(self, data: bytes) -> None:
        if self._tls is not None:
            keep_session(self._tls)
            self._tls = None
        if self.owner is not None:
            self.owner.upstream_data(data)
        else:
            self.close()  # bytes from an idle connection: its state is unknown, never reuse it

    def eof_received(self) -> bool:
        self.alive = False
        if self.owner is not None:
            self.owner.upstream_data(b"")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        if self.transport is not None:
            OPEN_CONNECTIONS[self.upstream.name] -= 1
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.upstream_lost(exc)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_writing(True)

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_writing(False)

    def write(self, data: bytes) -> None:
        if data and self.transport is not None and self.alive:
            self._writes.write(self.transport, data)

    def half_close(self) -> None:
        """Our side is done (a tunnel's client sent EOF); the upstream may still answer."""
        transport = self.transport
        if transport is not None and transport.can_write_eof():
            self._writes.flush()  # what this turn wrote goes before the EOF
            transport.write_eof()

    def close(self) -> None:
        self.alive = False
        self.owner = None
        if self.transport is not None:
            self._writes.flush()  # rare (errors, the idle sweep): no need to queue the close too
            self.transport.close()

    @property
    def reusable_now(self) -> bool:
        return self.alive and self.transport is not None and not self.transport.is_closing()


class UpstreamSlot:
    """The upstream connection a client connection uses now, and the backpressure between them:
    the upstream is read only while the client's write buffer is below its high-water mark."""

    __slots__ = ("conn", "client_paused", "paused")

    def __init__(self) -> None:
        self.conn: UpstreamConnection | None = None
        self.client_paused = False
        self.paused = False
        """The upstream's write buffer is full: the client is not read meanwhile."""

    def attach(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        if self.client_paused and conn.transport is not None:
            conn.transport.pause_reading()

    def client_writing(self, paused: bool) -> None:
        self.client_paused = paused
        transport = self.conn.transport if self.conn is not None else None
        if transport is not None:
            if paused:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.write(data)

    def release(self, pool: UpstreamPool, reusable: bool) -> None:
        """Back to the pool if ``reusable`` (else closed); the slot is empty afterwards."""
        conn, self.conn = self.conn, None
        self.paused = False
        if conn is not None:
            if conn.transport is not None:
                conn.transport.resume_reading()
            pool.release(conn, reusable)


class UpstreamPool:
    """Idle keep-alive connections per upstream server, connect timeouts, and health state."""

    def __init__(
        self,
        config: Config,
        tls_contexts: dict[tuple[str, Address], ssl.SSLContext],
        on_health: Callable[[str, bool], None] = lambda name, up: None,
        writes: TurnWrites | None = None,
        on_probe_down: Callable[[str, str], None] = lambda name, detail: None,
    ) -> None:
        self._config = config
        self._writes = writes or TurnWrites()
        self._tls = tls_contexts
        # Keyed by the upstream as well as the server: two upstreams may name one host:port with
        # different TLS settings (plain vs TLS, another server_name or CA), and a connection made
        # under one must never serve the other.
        self._idle: dict[tuple[str, Address], list[UpstreamConnection]] = {}
        self._next_server = {u.name: itertools.count() for u in config.upstreams}
        self._on_health = on_health
        self._on_probe_down = on_probe_down
        """Called with the reason when a health probe finds an upstream down that was up: an
        upstream nobody sent a request to would otherwise go down with no error on record."""
        self.health: dict[str, bool] = {u.name: True for u in config.upstreams}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._prober: asyncio.Task[None] | None = None

    def start(self) -> None:
        # Kept: on Python 3.11 every get_running_loop() call costs a getpid() syscall, and
        # take_idle/release run on every request.
        self._loop = loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)
        self._prober = loop.create_task(self._probe_forever())

    def _now(self) -> float:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop.time()

    def retire(self) -> None:
        """A reload replaced this pool: its idle connections still serve the old runtime's
        connections, but upstream health is the new pool's to report (a removed upstream must
        not be reported again, nor a kept one twice)."""
        if self._prober is not None:
            self._prober.cancel()
            self._prober = None
        self._on_health = lambda name, up: None
        self._on_probe_down = lambda name, detail: None

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._prober is not None:
            self._prober.cancel()
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    def mark(self, name: str, up: bool) -> None:
        if self.health.get(name) != up:
            self.health[name] = up
        self._on_health(name, up)

    def counts(self) -> dict[str, tuple[int, int]]:
        """Upstream name -> (open, idle) connections, for the status page (not the hot path)."""
        return {
            u.name: (OPEN_CONNECTIONS[u.name], sum(len(self._idle.get((u.name, server), ())) for server in u.servers))
            for u in self._config.upstreams
        }

    def take_idle(self, upstream: Upstream, owner: UpstreamOwner) -> UpstreamConnection | None:
        """A pooled connection that is still usable, without waiting; None if there is none.

        Checked before reuse: closed, EOF'd or over-age connections are dropped here.
        """
        loop_time = self._now()
        name = upstream.name
        for server in upstream.servers:
            idle = self._idle.get((name, server))
            while idle:
                conn = idle.pop()
                if conn.reusable_now and loop_time - conn.idle_since < self._config.timeouts.pool_idle:
                    conn.owner = owner
                    return conn
                conn.close()
        return None

    async def connect(self, upstream: Upstream, owner: UpstreamOwner, preamble: bytes = b"") -> UpstreamConnection:
        """A new connection, round-robin, failing over to the next server (``first_that_answers``).

        ``preamble`` (a PROXY protocol header) is written first, before any TLS, and makes the
        connection private to this client: ``release`` closes it instead of pooling it.
        """
        servers = upstream.servers
        start = next(self._next_server[upstream.name])
        in_turn = [servers[(start + offset) % len(servers)] for offset in range(len(servers))]
        conn = await first_that_answers(in_turn, lambda server: self._connect(upstream, server, preamble))
        conn.owner = owner
        conn.private = bool(preamble)
        return conn

    async def _connect(self, upstream: Upstream, server: Address, preamble: bytes = b"") -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        tls = self._tls.get((upstream.name, server))
        server_hostname = None
        if tls is not None:
            server_hostname = (upstream.tls.server_name if upstream.tls else None) or server.host
        try:
            async with asyncio.timeout(self._config.timeouts.connect):
                where: dict[str, Any] = {"host": server.host, "port": server.port}
                if preamble:
                    where = {"sock": await _sent_first(loop, server, preamble)}
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(upstream, server, self._config.limits.max_upstream_header_size, self._writes),
                    **where,
                    ssl=tls,
                    server_hostname=server_hostname,
                    ssl_handshake_timeout=self._config.timeouts.connect if tls else None,
                )
        except ssl.SSLError:
            self.mark(upstream.name, True)  # it answered: reachable, but its TLS is refused
            raise
        except (OSError, TimeoutError) as exc:
            if not out_of_descriptors(exc):  # EMFILE says nothing about the upstream's health
                self.mark(upstream.name, False)
            raise
        self.mark(upstream.name, True)
        return conn

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        conn.owner = None
        if not reusable or conn.private or not conn.reusable_now:
            conn.close()
            return
        idle = self._idle.setdefault((conn.upstream.name, conn.server), [])
        if len(idle) >= self._config.limits.pool_size:
            conn.close()
            return
        conn.idle_since = self._now()
        idle.append(conn)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        limit = self._config.timeouts.pool_idle
        for key, idle in self._idle.items():
            keep = [c for c in idle if c.reusable_now and now - c.idle_since < limit]
            for conn in idle:
                if conn not in keep:
                    conn.close()
            self._idle[key] = keep
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._probe(u) for u in self._config.upstreams), return_exceptions=True)
            await asyncio.sleep(HEALTH_INTERVAL)

    async def _probe(self, upstream: Upstream) -> None:
        """A TCP connect to each server; up if any answers (TLS is not checked here)."""
        up = False
        failure = ""
        for server in upstream.servers:
            try:
                async with asyncio.timeout(self._config.timeouts.connect):
                    _, writer = await asyncio.open_connection(server.host, server.port)
                if upstream.proxy_protocol is not None:
                    # A receiver that requires the header would log a headerless probe as an
                    # error: a LOCAL header is how balancers say "health check, no client".
                    writer.write(LOCAL_V2)
                writer.close()
                up = True
                break
            except (OSError, TimeoutError) as exc:
                if out_of_descriptors(exc):
                    return  # no verdict: the probe could not even try
                failure = f"health check: {server}: {exc or 'connect timed out'}"
                continue
        was_up = self.health.get(upstream.name, True)
        self.mark(upstream.name, up)
        if was_up and not up:
            self._on_probe_down(upstream.name, failure)
