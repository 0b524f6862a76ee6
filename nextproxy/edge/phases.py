"""What a terminated connection does with plaintext: one phase at a time (HTTP, tunnel, WebSocket).

``edge.connection`` keeps TLS, the transport and backpressure; after the handshake it hands every
input to its current phase through the same small interface (client data, upstream data,
upstream lost, drain, deadline) and runs the actions the phase returns. A phase is a thin
adapter over a core object (``HttpSession``, ``WebSocketRelay``) or, for the tunnel, over the
upstream transport itself; a 101 swaps the HTTP phase for one of the other two.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from typing import Protocol

from nextproxy.config.model import PathRoute, SniRoute, Upstream, WebSocketMode
from nextproxy.core.actions import (
    Action,
    CloseClient,
    ConnectUpstream,
    SendToClient,
    SendToUpstream,
    SessionClosed,
    Side,
    StartTunnel,
    StartWebSocket,
)
from nextproxy.core.headers import ClientInfo
from nextproxy.core.http1 import HttpSession
from nextproxy.core.proxyprotocol import Endpoint, build_v2
from nextproxy.core.tls import PeerCertificate
from nextproxy.core.websocket import RelayLimits, WebSocketRelay
from nextproxy.edge.acceptor import out_of_descriptors
from nextproxy.edge.deadline import Deadline, Timer
from nextproxy.edge.host import Group, Host, Member
from nextproxy.edge.upstream import UpstreamConnection, UpstreamSlot


class Shell(Member, Protocol):
    """What a phase (and ``edge.dispatch``) may use of its connection, ``TerminatedConnection``."""

    rt: Host
    peer: str
    closed: bool
    loop: asyncio.AbstractEventLoop
    deadline: Deadline
    """The connection's one deadline: phases and timer facts set it, activity pushes it."""
    upstream: UpstreamSlot
    http: HttpPhase | None
    route_name: str
    request_started: float
    server_name: str | None

    @property
    def client_endpoints(self) -> tuple[Endpoint, Endpoint] | None:
        """The client and the address it connected to (from a PROXY header if one was read), for
        the PROXY v2 header sent to upstreams with ``proxy_protocol = "v2"``."""

    def send_client(self, data: bytes) -> None: ...
    def close_client(self, linger: bool = False) -> bool: ...
    def release(self, reusable: bool) -> None: ...
    def upgrade(self, action: StartTunnel | StartWebSocket) -> None: ...
    def run(self, actions: list[Action]) -> None: ...
    def bug(self, exc: Exception) -> None: ...

    # the pool's UpstreamOwner: upstream bytes go to the connection, which hands them over
    def upstream_data(self, data: bytes) -> None: ...
    def upstream_lost(self, exc: Exception | None) -> None: ...
    def upstream_writing(self, paused: bool) -> None: ...
    def read_room(self) -> int: ...


class Phase(Protocol):
    """The interface every phase offers its connection."""

    name: str
    websocket: bool
    """A WebSocket session (either mode): counted in ``websocket_sessions_active`` from the 101."""
    quiet: float
    """Seconds of silence an IDLE or PING deadline is pushed back to by activity."""

    @property
    def reading_client(self) -> bool:
        """False while more client bytes would only pile up (backpressure toward the client)."""

    @property
    def outlives_client(self) -> bool:
        """True while the upstream still owes something after the client leg is gone."""

    @property
    def finished(self) -> bool:
        """True once nothing is left to relay: the connection closes."""

    def client_data(self, data: bytes) -> list[Action]: ...
    def upstream_data(self, data: bytes) -> list[Action]: ...
    def upstream_lost(self, exc: Exception | None) -> list[Action]:
        """The upstream connection ended: ``exc`` None for a clean EOF, else the reset or read error."""
        ...
    def drain(self) -> list[Action]: ...
    def deadline(self, kind: Timer) -> list[Action]: ...
    def cut(self, reason: str) -> list[Action]:
        """The proxy ends the connection now (the drain deadline): the facts for what was still
        in flight, so that it is logged and counted like every other end."""
        ...
    def client_gone(self) -> list[Action]:
        """The client's connection reset or closed under us (no EOF came first): nothing more
        can be written to it; report what was in flight."""
        ...
    def ended(self) -> SessionClosed | None:
        """The connection is closing, however it ended (called once, last): the session's end
        if the phase still owes it. Only a tunnel does: some of its ends (a TLS error, a bug)
        reach no phase method, and reporting here is what makes it exactly once."""
        ...


class HttpPhase:
    """HTTP/1.1 exchanges through ``HttpSession``; it gets the session its upstream connections
    (pooled at once, else from a task) and owns the response timeout's outcome."""

    name = "http"
    websocket = False
    outlives_client = False
    finished = False

    def __init__(self, session: HttpSession, shell: Shell) -> None:
        self.session = session
        self.quiet = shell.rt.config.timeouts.client_idle
        self._shell = shell

    @classmethod
    def after_handshake(
        cls, shell: Shell, route: SniRoute | None, server_name: str | None, certificate: PeerCertificate | None
    ) -> HttpPhase:
        """The first phase of every terminated connection, once TLS is up."""
        info = ClientInfo(
            address=shell.peer, server_name=server_name, certificate=certificate,
            forward_chain=route.forward_client_cert_chain if route else False,
        )  # fmt: skip
        session = HttpSession(shell.rt.routes, route, info, shell.rt.config.limits)
        # A handshake that ended on a runtime a reload replaced serves one request, upgrades
        # included (a client that connected as the reload ran must not get 503s for it).
        session.draining = shell.rt.draining or shell.rt.retired
        session.refusing_upgrades = shell.rt.draining
        return cls(session, shell)

    @property
    def reading_client(self) -> bool:
        return self.session.reading_client

    def client_data(self, data: bytes) -> list[Action]:
        self.session.now = self._shell.loop.time()  # time is an input: rate limits read it
        return self.session.client_data(data)

    def upstream_data(self, data: bytes) -> list[Action]:
        return self.session.upstream_data(data)

    def upstream_lost(self, exc: Exception | None) -> list[Action]:
        # A reset or read error never ends a body, even one that ends at close: the session
        # cuts such a response short instead of completing it.
        if exc is None:
            return self.session.upstream_data(b"")
        return self.session.upstream_failed(f"upstream connection lost: {exc!r}")

    def drain(self) -> list[Action]:
        return self.session.drain()

    def client_gone(self) -> list[Action]:
        """The client's connection reset or closed under us: report the request in flight."""
        return self.session.client_gone()

    def ended(self) -> SessionClosed | None:
        return None  # every request is reported as it ends (``HttpSession``)

    def deadline(self, kind: Timer) -> list[Action]:
        if kind is Timer.RESPONSE:
            # 504, and back to the keep-alive clock; actions that follow may set another timer.
            self._shell.deadline.set(self.quiet, Timer.IDLE)
            return self.session.upstream_timeout()
        if kind is Timer.BODY:
            shell = self._shell
            conn = shell.upstream.conn
            if shell.upstream.paused and conn is not None and not shell.upstream.client_paused:
                # The body could not be sent because the upstream stopped reading it (its write
                # buffer stayed full): the upstream's stall, not the client's, a 504 as nginx's;
                # unless the client stopped reading the response, which can hold the upstream.
                reason = "upstream stopped reading the request body"
                shell.rt.observer.upstream_error(conn.upstream.name, reason, shell.peer)
                return self.session.upstream_timeout(reason)
            return self.session.body_timed_out(shell.route_name)
        if kind is Timer.HEAD:
            return self.session.head_timed_out()
        # Idle: a keep-alive connection between requests closes quietly. A response in flight
        # made no progress either way for that long: cut, and reported as such.
        if self._shell.upstream.client_paused:
            return self.session.cut("timed out: the client stopped reading the response", 504) + [CloseClient()]
        return self.session.cut("timed out: the upstream stopped sending the response", 504, upstream_fault=True) + [CloseClient()]

    def cut(self, reason: str) -> list[Action]:
        return self.session.cut(reason, 503)

    def connect(self, action: ConnectUpstream) -> None:
        shell, session = self._shell, self.session
        upstream = shell.rt.config.upstream(action.route.upstream)
        if upstream is None:  # validate() rules it out; answered as any unreachable upstream
            shell.run(session.upstream_failed(f"no upstream named {action.route.upstream!r}"))
            return
        if not action.fresh and upstream.proxy_protocol is None:  # PROXY-header connections are never pooled
            conn = shell.rt.pool.take_idle(upstream, shell)
            if conn is not None:  # the common keep-alive case: no task, no await
                shell.upstream.attach(conn)
                shell.run(session.upstream_connected(conn.leg))
                return
        shell.loop.create_task(self._connect_task(upstream))

    async def _connect_task(self, upstream: Upstream) -> None:
        shell, session, observer = self._shell, self.session, self._shell.rt.observer
        try:
            try:
                conn = await shell.rt.pool.connect(upstream, shell, self._preamble(upstream))
            except ssl.SSLError as exc:
                observer.upstream_error(upstream.name, f"TLS to upstream failed: {exc}", shell.peer)
                actions = session.upstream_failed("upstream TLS verification failed")
            except TimeoutError:
                actions = session.upstream_failed("upstream connect timed out", timeout=True)
            except OSError as exc:
                if out_of_descriptors(exc):  # the proxy's shortage: not an upstream fault
                    observer.descriptors_exhausted("upstream", str(exc))
                    actions = session.upstream_failed("proxy out of file descriptors")
                else:
                    observer.upstream_error(upstream.name, f"connect failed: {exc}", shell.peer)
                    actions = session.upstream_failed("upstream unreachable")
            else:
                if shell.closed:
                    shell.rt.pool.release(conn, False)
                    return
                shell.upstream.attach(conn)
                actions = session.upstream_connected(conn.leg)
            if not shell.closed:
                shell.run(actions)
        except Exception as exc:  # a bug: this connection only, never an unretrieved task error
            shell.bug(exc)


    def _preamble(self, upstream: Upstream) -> bytes:
        """The PROXY v2 header for ``upstream`` (empty if it takes none): the client as read at
        accept, and the server name it asked for."""
        endpoints = self._shell.client_endpoints
        if upstream.proxy_protocol is None or endpoints is None:
            return b""
        return build_v2(endpoints[0], endpoints[1], authority=self._shell.server_name)


class TunnelPhase:
    """After a 101 on a ``tunnel`` route: raw bytes both ways, half-close passed on.

    No frame is read, so the session is reported by what the shell sees: the bytes each way,
    and the first end (either side's EOF or loss, the idle timeout, the drain deadline), kept
    and logged once by ``ended`` when the connection closes, however that came about."""

    name = "tunnel"
    websocket = True
    reading_client = True
    outlives_client = False
    finished = False

    def __init__(self, upstream: UpstreamConnection | None, quiet: float, shell: Shell) -> None:
        self._upstream = upstream
        self.quiet = quiet
        self._shell = shell
        self.bytes_from_client = 0
        self.bytes_from_upstream = 0
        self._ending: tuple[Side | None, str] | None = None
        """Who ended the session first, and how; None while it runs (the first end is kept)."""

    def start(self, action: StartTunnel) -> list[Action]:
        """The 101's leftovers go first: what the client sent after its request, and the
        upstream's bytes after the 101."""
        self._shell.deadline.set(self.quiet, Timer.IDLE)
        self.bytes_from_client, self.bytes_from_upstream = len(action.to_upstream), len(action.to_client)
        actions: list[Action] = [SendToClient(action.to_client)] if action.to_client else []
        if action.to_upstream:
            actions.append(SendToUpstream(action.to_upstream))
        return actions

    def client_data(self, data: bytes) -> list[Action]:
        # Bytes go straight to the other leg (no action to build and dispatch per chunk: a
        # tunnel relays small messages by the thousand, and a chunk means nothing more here);
        # counting them is one addition, reported once at the end.
        up = self._upstream
        if data:
            if up is not None:
                self.bytes_from_client += len(data)
                up.write(data)  # a no-op once that connection is gone, as the slot's write
            return []
        self._end(Side.CLIENT, "client EOF")
        if up is not None:
            up.half_close()  # the upstream may still answer
        return []

    def upstream_data(self, data: bytes) -> list[Action]:
        if data:
            self.bytes_from_upstream += len(data)
            self._shell.send_client(data)  # sealed and written by run()'s flush
            return []
        self._end(Side.UPSTREAM, "upstream EOF")
        return [CloseClient()]

    def upstream_lost(self, exc: Exception | None) -> list[Action]:
        self._end(Side.UPSTREAM, "upstream EOF" if exc is None else "upstream connection lost")
        return [CloseClient()]

    def client_gone(self) -> list[Action]:
        self._end(Side.CLIENT, "client connection lost")
        return []

    def drain(self) -> list[Action]:
        # A tunnel has no message boundary to stop at, and a Close frame written into a stream
        # the proxy does not parse could land inside a frame: the drain deadline ends it.
        return []

    def cut(self, reason: str) -> list[Action]:
        self._end(None, reason)  # reported by ``ended``, as the connection closes
        return []

    def deadline(self, kind: Timer) -> list[Action]:
        self._end(None, "idle timeout")  # nothing moved either way for ``passthrough_idle``
        return [CloseClient()]

    def _end(self, side: Side | None, reason: str) -> None:
        if self._ending is None:
            self._ending = (side, reason)

    def ended(self) -> SessionClosed:
        """The session as frames mode reports one, with what a tunnel cannot know left None.

        Without a recorded end the connection closed on an error (a TLS error, a bug), which
        has its own log line; the session is still reported, as ended by the proxy."""
        closed_by, reason = self._ending or (None, "closed on an error")
        return SessionClosed(
            closed_by, None, reason, None, None, self.bytes_from_client, self.bytes_from_upstream, WebSocketMode.TUNNEL
        )


class WebSocketPhase:
    """After a 101 on a ``frames`` route: WebSocket messages through ``WebSocketRelay``, with
    keepalive pings on both legs after ``ping_interval`` of silence."""

    name = "websocket"
    websocket = True
    reading_client = True

    def __init__(self, route: PathRoute, shell: Shell) -> None:
        self.relay = WebSocketRelay(RelayLimits(max_message_size=route.max_message_size), os.urandom)
        self.route = route
        self.quiet = route.ping_interval
        self._shell = shell
        self._closing = False
        """The CLOSING deadline is set (once): a peer that never answers our Close, or keeps
        sending without closing, cannot hold the session, its slots and its upstream forever."""

    def _bounded(self, actions: list[Action]) -> list[Action]:
        """Once the session's end has begun, the rest of it gets a fixed deadline."""
        if self.relay.ending is not None and not self._closing and not self.relay.closed:
            self._closing = True
            self._shell.deadline.set(self.route.ping_timeout, Timer.CLOSING)
        return actions

    def start(self, action: StartWebSocket) -> list[Action]:
        """Frames that arrived with the upgrade (either side) are relayed first."""
        self._shell.deadline.set(self.route.ping_interval, Timer.PING)
        actions = self.relay.client_data(action.from_client) if action.from_client else []
        if action.from_upstream:
            actions += self.relay.upstream_data(action.from_upstream)
        return self._bounded(actions)  # a Close may have come with the upgrade

    @property
    def outlives_client(self) -> bool:
        return not self.relay.closed  # the upstream may still owe its close reply

    @property
    def finished(self) -> bool:
        return self.relay.closed

    def client_data(self, data: bytes) -> list[Action]:
        relay = self.relay
        actions = relay.client_data(data)
        return actions if relay.ending is None else self._bounded(actions)  # one test per message

    def upstream_data(self, data: bytes) -> list[Action]:
        relay = self.relay
        actions = relay.upstream_data(data)
        return actions if relay.ending is None else self._bounded(actions)

    def upstream_lost(self, exc: Exception | None) -> list[Action]:
        return [] if self.relay.closed else self._bounded(self.relay.upstream_data(b""))

    def client_gone(self) -> list[Action]:
        # A live relay outlives the client and gets its EOF instead (``outlives_client``).
        return self._bounded(self.relay.client_data(b""))

    def ended(self) -> SessionClosed | None:
        """Normally None: the relay reports its end itself, as an action. A connection closed
        under a live relay (a TLS error, a bug) ends the session here, so that it still leaves
        its line, as a tunnel's does."""
        if self.relay.closed:
            return None
        return next((a for a in self.relay.abort("closed on an error") if isinstance(a, SessionClosed)), None)

    def drain(self) -> list[Action]:
        return self._bounded(self.relay.shutdown())

    def cut(self, reason: str) -> list[Action]:
        return self.relay.abort()  # the session's end, with the code that began it (the drain's 1001)

    def deadline(self, kind: Timer) -> list[Action]:
        """After ping_interval of silence ping both legs; a leg that misses ping_timeout is dead.
        A closing handshake still unfinished at its deadline is cut (both legs, reported)."""
        if kind is Timer.CLOSING:
            return self.relay.abort("closing handshake timed out")
        if kind is not Timer.PING and kind is not Timer.PONG:
            return [CloseClient()]
        relay = self.relay
        for side in (Side.CLIENT, Side.UPSTREAM):
            if relay.pong_outstanding(side):
                return self._bounded(relay.peer_timed_out(side))
        if kind is Timer.PONG:
            # Both answered: the next ping ping_interval after this one (this deadline was set
            # ping_timeout after it), not ping_interval from now: an idle session is pinged every
            # ping_interval, as documented, where it was every ping_interval + ping_timeout (40 s
            # by default: long enough for a NAT or balancer idle timeout of 30 s to cut it).
            self._shell.deadline.set(max(0.0, self.route.ping_interval - self.route.ping_timeout), Timer.PING)
            return []
        self._shell.deadline.set(self.route.ping_timeout, Timer.PONG)
        return relay.ping(Side.CLIENT) + relay.ping(Side.UPSTREAM)


def upgrade(action: StartTunnel | StartWebSocket, upstream: UpstreamConnection | None, shell: Shell) -> tuple[Phase, list[Action]]:
    """The phase a 101 switches to, and the actions for the leftovers that came with it.

    Either mode is a WebSocket session from here on: counted now, and counted out when the
    connection closes (``TerminatedConnection._close``, which runs once)."""
    shell.rt.enter(shell, Group.WEBSOCKET)
    shell.rt.observer.ws_opened(action.route.name)
    if isinstance(action, StartTunnel):
        tunnel = TunnelPhase(upstream, shell.rt.config.timeouts.passthrough_idle, shell)
        return tunnel, tunnel.start(action)
    websocket = WebSocketPhase(action.route, shell)
    return websocket, websocket.start(action)
