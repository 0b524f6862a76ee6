"""The edge listener of one process: bind, accept, drain on SIGTERM, reload on SIGHUP.

Binding happens only after the whole configuration (certificates included) has been validated,
so a bad configuration never holds the port. A port is this process's alone unless it is one
of a supervisor's workers (``shared``): SO_REUSEPORT lets any process of the same user join a
port, and the kernel would then silently split the traffic between two unrelated proxies.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from nextproxy.config.model import Address, Config
from nextproxy.core import admission as core_admission
from nextproxy.core.routing import RouteTable
from nextproxy.edge.accept import Accepted
from nextproxy.edge.acceptor import Acceptor
from nextproxy.edge.admission import Admission
from nextproxy.edge.gate import ListenerGate
from nextproxy.edge.host import Group, Member
from nextproxy.edge.observer import EdgeObserver
from nextproxy.edge.tlscontexts import ServerContexts, upstream_ssl_context
from nextproxy.edge.upstream import UpstreamPool
from nextproxy.edge.writes import TurnWrites
from nextproxy.errors import ConfigError

BACKLOG = 1024


@dataclass(slots=True, eq=False)
class Runtime:
    """Everything a connection needs (``edge.host.Host``), swapped as a whole on reload: old
    connections keep theirs. It is also the registry of the connections it serves."""

    config: Config
    routes: RouteTable
    contexts: ServerContexts
    pool: UpstreamPool
    observer: EdgeObserver
    admission: Admission
    gates: dict[Address, ListenerGate] = field(default_factory=dict)
    """Each listen address's accept-time policy (PROXY protocol trust, connection rate)."""
    draining: bool = False
    retired: bool = False
    """A reload replaced this runtime (``ProxyServer.reload``)."""
    groups: dict[Group, set[Member]] = field(default_factory=lambda: {group: set() for group in Group})
    writes: TurnWrites = field(default_factory=TurnWrites)
    """This process's writes of the current loop turn (``edge.writes``), shared by every runtime
    a reload made; bound to the loop when the listener starts."""

    @property
    def pending(self) -> set[Member]:
        """Connections whose ClientHello is still being read."""
        return self.groups[Group.PENDING]

    @property
    def connections(self) -> set[Member]:
        """Terminated connections (WebSocket sessions included)."""
        return self.groups[Group.TERMINATED]

    @property
    def passthroughs(self) -> set[Member]:
        return self.groups[Group.PASSTHROUGH]

    def active(self) -> int:
        return len(self.pending) + len(self.connections) + len(self.passthroughs)

    def closed(self, peer: str) -> None:
        self.admission.release(peer)
        self.observer.connection_closed()

    def enter(self, member: Member, group: Group) -> None:
        self.groups[group].add(member)

    def leave(self, member: Member, group: Group) -> bool:
        members = self.groups[group]
        if member in members:
            members.discard(member)
            return True
        return False


def bind(address: Address, key: str, *, shared: bool = False) -> socket.socket:
    """A listening socket, or ConfigError naming the key (port in use, bad address).

    ``shared``: SO_REUSEPORT, for a supervisor's workers, which each bind the address so that
    the kernel spreads connections over them (``process.workers``; their supervisor first
    ``probe``s the address). Otherwise the bind fails while anyone else listens there. SO_REUSEADDR
    is always set: it only lets a restarted proxy bind past its old connections in TIME_WAIT.
    """
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(key, f"cannot resolve {address.host!r}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ConfigError(key, f"cannot listen on {address}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def probe(config: Config) -> None:
    """ConfigError unless every edge address can be bound exclusively now (then freed again).

    A supervisor calls it before spawning workers: their SO_REUSEPORT binds would succeed beside
    another proxy of the same user on the port, and fail with a plain listener there in every
    worker at once. Binding without SO_REUSEPORT fails in both cases, once, before anything runs.
    """
    for address in (config.listen, *config.listen_also):
        bind(address, config.key_name("listen")).close()


def describe_routes(config: Config) -> list[tuple[str, str, str]]:
    """(match, action, target) rows of the routing table, for ``check`` and the status page."""
    return RouteTable(config).describe()


def denial_series(config: Config) -> list[tuple[str, str]]:
    """The (route, reason) pairs ``config`` can count as denied, for the process to create at 0
    (``core.admission.denial_series``; the process layer reaches the core through the edge)."""
    return core_admission.denial_series(config)


def build_runtime(
    config: Config, observer: EdgeObserver, contexts: ServerContexts | None = None, admission: Admission | None = None,
    writes: TurnWrites | None = None,
) -> Runtime:
    """Everything derived from one Config; raises ConfigError before anything is bound.
    ``admission`` and ``writes``: the process's, carried over on reload (else new ones)."""
    contexts = contexts or ServerContexts.build(config)
    # A context per upstream server: each keeps that server's TLS session to resume.
    tls = {(u.name, server): upstream_ssl_context(u.tls) for u in config.upstreams if u.tls is not None for server in u.servers}
    writes = writes or TurnWrites()
    pool = UpstreamPool(
        config, tls, on_health=observer.upstream_health, writes=writes,
        on_probe_down=lambda name, detail: observer.upstream_error(name, detail, "-"),
    )  # fmt: skip
    admission = admission or Admission(config.limits)
    gates = {address: ListenerGate.build(config.listener_policy(address)) for address in (config.listen, *config.listen_also)}
    return Runtime(
        config=config, routes=RouteTable(config), contexts=contexts, pool=pool, observer=observer,
        admission=admission, gates=gates, writes=writes,
    )  # fmt: skip


class ProxyServer:
    """One process's edge listener and the runtime it serves with."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._acceptors: list[Acceptor] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._old: list[Runtime] = []

    @property
    def address(self) -> tuple[str, int]:
        assert self._acceptors
        sockname = self._acceptors[0].sock.getsockname()
        return str(sockname[0]), int(sockname[1])

    def bound(self) -> str:
        """Every edge address as bound (ports chosen by the kernel included), for the log:
        ``127.0.0.1:8443, [::1]:8443``."""
        return ", ".join(str(Address(str(a.sock.getsockname()[0]), int(a.sock.getsockname()[1]))) for a in self._acceptors)

    async def start(self, sock: socket.socket | None = None, *, shared: bool = False) -> None:
        """Bind every edge address (the first may come bound, as ``sock``) and accept.
        ``shared``: this process is one of a supervisor's workers (see ``bind``)."""
        self._loop = loop = asyncio.get_running_loop()
        config = self.runtime.config
        key = config.key_name("listen")
        sock = sock or bind(config.listen, key, shared=shared)
        more: list[socket.socket] = []
        try:
            for address in config.listen_also:
                more.append(bind(address, key, shared=shared))
        except ConfigError:
            for bound in [sock, *more]:  # all bound, or none: nothing half-started stays open
                bound.close()
            raise
        self.runtime.pool.start()
        self.runtime.writes.bind(loop, lambda exc: self.runtime.observer.bug(exc, "-"))
        for address, listening in zip((config.listen, *config.listen_also), [sock, *more]):
            listening.setblocking(False)
            acceptor = Acceptor(
                loop, listening, partial(self._protocol, address), self.runtime.admission,
                lambda: self.runtime.observer, partial(self._balancer, address), BACKLOG,
            )  # fmt: skip
            self._acceptors.append(acceptor)
            acceptor.start()
        self.runtime.admission.watch_handshakes(self._handshakes_fell)

    def _handshakes_fell(self) -> None:
        for acceptor in self._acceptors:
            acceptor.handshakes_fell()

    def _protocol(self, address: Address, peer: str) -> Accepted:
        assert self._loop is not None  # set by start(), before the listener exists
        runtime = self.runtime  # the current one: a reload's new gates apply to new connections
        gate = runtime.gates.get(address)
        return Accepted(runtime, self._loop, peer) if gate is None else Accepted(runtime, self._loop, peer, gate)

    def _balancer(self, address: Address, peer: str) -> bool:
        """A trusted balancer's connections are counted per client once its PROXY header names one."""
        gate = self.runtime.gates.get(address)
        return gate is not None and gate.must_send_header(peer)

    def reload(self, config: Config, observer: EdgeObserver, contexts: ServerContexts | None = None) -> None:
        """Swap in a new runtime; established connections keep the one they started with."""
        admission = self.runtime.admission
        new = build_runtime(config, observer, contexts, admission, self.runtime.writes)
        admission.limits = config.limits  # the counts carry over: the caps cover every runtime
        # What is known of upstreams that stay carries over too: one still down is not reported
        # down again (a line per reload), nor shown up until its first probe.
        for name, up in self.runtime.pool.health.items():
            if name in new.pool.health:
                new.pool.health[name] = up
        new.pool.start()
        old, self.runtime = self.runtime, new
        self._old.append(old)
        # Keep-alive must not keep a replaced configuration (a revoked allow-list, a removed
        # route) alive forever: HTTP connections close after their exchange in flight, as
        # nginx's old workers close theirs. WebSocket sessions and splices keep theirs.
        old.retired = True
        old.pool.retire()
        for conn in list(old.connections):
            conn.retire()
        asyncio.get_running_loop().call_later(max(config.timeouts.pool_idle, 1.0) + 1, self._retire, old)

    def _retire(self, old: Runtime) -> None:
        if not old.active():
            old.pool.stop()
            if old in self._old:
                self._old.remove(old)
        else:
            asyncio.get_running_loop().call_later(5.0, self._retire, old)

    def _runtimes(self) -> list[Runtime]:
        return [self.runtime, *self._old]

    def websocket_sessions(self) -> int:
        return sum(len(rt.groups[Group.WEBSOCKET]) for rt in self._runtimes())

    def active(self) -> int:
        return sum(rt.active() for rt in self._runtimes())

    async def drain(self, timeout: float, on_step: Callable[[str], None] = lambda s: None) -> bool:
        """Stop accepting, let in-flight work finish, close idle connections. True if all ended."""
        for acceptor in self._acceptors:
            acceptor.close()
        for rt in self._runtimes():
            rt.draining = True
            for pending in list(rt.pending):
                pending.drain()
            for conn in list(rt.connections):
                conn.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.active() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        clean = not self.active()
        for rt in self._runtimes():
            for member in [*rt.connections, *rt.passthroughs]:
                member.abort()
            rt.pool.stop()
        self.runtime.writes.flush()  # the last goodbyes and closes, should the loop end right here
        return clean
