"""One terminated edge connection: TLS 1.3, then HTTP/1.1, WebSocket frames or a tunnel.

``accept.Accepted`` reads the ClientHello and hands the transport over; from then on this is the
shell around the sans-IO core: it moves bytes between the transports and the core
objects, runs the actions they return, owns every timeout (one lazy deadline per connection,
so the hot path never re-arms a timer) and applies backpressure: the client is read only while
the session wants bytes and the upstream's write buffer is below its high-water mark, and the
upstream is read only while the client's write buffer is.
"""

from __future__ import annotations

import asyncio
import enum
import ssl
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable, Sequence

from nextproxy.config import Config, PathRoute, SniRoute, Upstream
from nextproxy.core.actions import (
    AuthorizationDenied,
    AwaitResponse,
    CloseClient,
    CloseUpstream,
    ConnectUpstream,
    ReleaseUpstream,
    RequestCompleted,
    ResponseStarted,
    SendToClient,
    SendToUpstream,
    StartTunnel,
    StartWebSocket,
)
from nextproxy.core.clienthello import ClientHello
from nextproxy.core.headers import ClientInfo
from nextproxy.core.http1 import HttpSession
from nextproxy.core.routing import RouteTable
from nextproxy.core.tls import TlsEngine
from nextproxy.core.websocket import MessageRelayed, RelayLimits, SessionClosed, Side, WebSocketRelay
from nextproxy.deadline import Deadline
from nextproxy.errors import TlsError
from nextproxy.upstream import UpstreamConnection, UpstreamPool

if TYPE_CHECKING:
    from nextproxy.accept import Accepted
    from nextproxy.observe import Observer
    from nextproxy.passthrough import Splice
    from nextproxy.tlsconfig import ServerContexts

READ_CHUNK_LIMIT = 256 * 1024
"""High-water mark of each transport's write buffer before the other side is paused."""

@dataclass(slots=True)
class Runtime:
    """Everything a connection needs, swapped as a whole on reload (old connections keep theirs)."""

    config: Config
    routes: RouteTable
    contexts: ServerContexts
    pool: UpstreamPool
    observer: Observer
    pending: set[Accepted] = field(default_factory=set)
    """Connections whose ClientHello is still being read."""
    connections: set[TerminatedConnection] = field(default_factory=set)
    passthroughs: set[Splice] = field(default_factory=set)
    draining: bool = False


class Phase(enum.Enum):
    HANDSHAKE = "handshake"
    HTTP = "http"
    TUNNEL = "tunnel"
    WEBSOCKET = "websocket"
    CLOSED = "closed"


class TerminatedConnection(asyncio.Protocol):
    """The protocol of an edge connection after its ClientHello chose termination."""

    def __init__(
        self,
        runtime: Runtime,
        transport: asyncio.Transport,
        peer: str,
        sni_route: SniRoute | None,
        hello: ClientHello,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.rt = runtime
        # Kept, not looked up: on Python 3.11 every get_running_loop() costs a getpid() syscall.
        self._loop = loop
        self.phase = Phase.HANDSHAKE
        self.transport: asyncio.Transport | None = transport
        self.peer = peer
        self._hello: ClientHello | None = hello
        self._server_name = hello.server_name
        self._sni_route = sni_route
        self._engine: TlsEngine | None = None
        self._session: HttpSession | None = None
        self._relay: WebSocketRelay | None = None
        self._route: PathRoute | None = None
        self._up: UpstreamConnection | None = None
        self._reading = True
        self._upstream_write_paused = False
        self._client_write_paused = False
        self._deadline: Deadline | None = None
        self._request_started = 0.0
        self._plaintext: list[bytes] = []
        transport.set_write_buffer_limits(high=READ_CHUNK_LIMIT)
        runtime.connections.add(self)

    def start(self) -> None:
        """Begin the handshake with the bytes the hello reader already took off the socket."""
        hello, self._hello = self._hello, None  # its raw bytes (up to 64 KiB) are not kept
        assert hello is not None
        self._start_tls(self._sni_route, hello)

    # ------------------------------------------------------------------ asyncio callbacks

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return  # lingering after an alert: the bytes are only read so the kernel does not reset
        try:
            self._tls_data(data)
        except Exception as exc:  # the one catch-all: a bug; log it, close this connection only
            self.rt.observer.bug(exc, self.peer)
            self._close(abort=True)

    def eof_received(self) -> bool:
        if self._engine is None:
            self._close()
            return False
        self.data_received(b"")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        relay = self._relay
        if self.phase is Phase.WEBSOCKET and relay is not None and not relay.closed:
            self.transport = None  # let the relay finish the upstream's closing handshake
            self._guarded(lambda: self._run(relay.client_data(b"")))
            return
        self._close()

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run a callback step with the connection's one catch-all: a bug closes this connection.

        data_received and upstream_data write the same try out inline: they run per chunk, where
        a closure per call is a measurable cost."""
        try:
            step()
        except Exception as exc:
            self.rt.observer.bug(exc, self.peer)
            self._close(abort=True)

    def pause_writing(self) -> None:
        self._client_write_paused = True
        if self._up is not None and self._up.transport is not None:
            self._up.transport.pause_reading()

    def resume_writing(self) -> None:
        self._client_write_paused = False
        if self._up is not None and self._up.transport is not None:
            self._up.transport.resume_reading()

    # ------------------------------------------------------------------ upstream callbacks

    def upstream_data(self, data: bytes) -> None:
        try:
            if self.phase is Phase.HTTP and self._session is not None:
                self._touch()
                self._run(self._session.upstream_data(data))
            elif self.phase is Phase.TUNNEL:
                if data:
                    self._send_client(data)
                    self._flush()
                else:
                    self._close()
            elif self.phase is Phase.WEBSOCKET and self._relay is not None:
                self._touch()
                self._run(self._relay.upstream_data(data))
        except Exception as exc:
            self.rt.observer.bug(exc, self.peer)
            self._close(abort=True)

    def upstream_lost(self, exc: Exception | None = None) -> None:
        self._guarded(lambda: self._upstream_lost(exc))

    def _upstream_lost(self, exc: Exception | None) -> None:
        if self.phase is Phase.CLOSED:
            return
        if isinstance(exc, ssl.SSLError) and self._route is not None:
            # In TLS 1.3 an upstream refusing our client certificate only shows up here, after
            # the request was written; name it instead of a bare "closed before responding".
            self.rt.observer.upstream_error(self._route.upstream, f"TLS to upstream failed: {exc}", self.peer)
        self._up = None
        if self._session is not None and self.phase is Phase.HTTP:
            # A reset or read error is not an end of body: the session cuts the response short.
            self._run(self._session.upstream_data(b"") if exc is None else self._session.upstream_failed(f"upstream connection lost: {exc!r}"))
        elif self.phase is Phase.TUNNEL:
            self._close()
        elif self.phase is Phase.WEBSOCKET and self._relay is not None and not self._relay.closed:
            self._run(self._relay.upstream_data(b""))

    def upstream_writing(self, paused: bool) -> None:
        self._upstream_write_paused = paused
        self._update_reading()

    # ------------------------------------------------------------------ TLS + HTTP

    def _start_tls(self, route: SniRoute | None, hello: ClientHello) -> None:
        context = self.rt.contexts.select(route, hello.server_name)
        self._set_deadline(self.rt.config.timeouts.handshake, "handshake")
        try:
            self._engine = TlsEngine(context, now=datetime.now(timezone.utc))
        except TlsError as exc:
            self._tls_failed(exc)
            return
        # Fed through the normal path (not the constructor) so a refusal's alert gets flushed.
        self._tls_data(hello.raw)

    def _tls_data(self, data: bytes) -> None:
        engine = self._engine
        if engine is None:
            return
        try:
            plaintext = engine.receive(data)
        except TlsError as exc:
            self._tls_failed(exc)
            return
        self._after_tls_input(plaintext, eof=not data)

    def _after_tls_input(self, plaintext: bytes = b"", eof: bool = False) -> None:
        engine = self._engine
        assert engine is not None
        if self.phase is Phase.HANDSHAKE:
            if not engine.handshake_complete:
                self._flush()
                if eof:
                    self.rt.observer.handshake("other")
                    self._close()
                return
            self._handshake_done(engine)
        self._flush()  # session tickets go out right after the handshake
        if plaintext:
            self._from_client(plaintext)
        if engine.peer_closed or eof:
            self._from_client(b"")

    def _handshake_done(self, engine: TlsEngine) -> None:
        self.rt.observer.handshake("ok")
        self.phase = Phase.HTTP
        info = ClientInfo(
            address=self.peer,
            server_name=self._server_name,
            certificate=engine.peer_certificate,
            forward_chain=self._sni_route.forward_client_cert_chain if self._sni_route else False,
        )
        self._session = HttpSession(self.rt.routes, self._sni_route, info, self.rt.config.limits)
        if self.rt.draining:
            self._session.draining = True
        self._set_deadline(self.rt.config.timeouts.client_idle, "idle")

    def _tls_failed(self, exc: TlsError) -> None:
        self.rt.observer.handshake(exc.reason if self.phase is Phase.HANDSHAKE else "other", str(exc), self.peer)
        # The alert is already in the engine's out-buffer: flush it, then half-close and linger
        # briefly, or the kernel answers the client's in-flight bytes with a reset and the client
        # never sees the alert.
        self._flush()
        self._close(linger=True)

    def _from_client(self, plaintext: bytes) -> None:
        session = self._session
        if self.phase is Phase.HTTP and session is not None:
            self._touch()
            if session.idle and not session.awaiting_head:
                self._request_started = self._loop.time()
            self._run(session.client_data(plaintext))
            self._bound_request_head(session)
        elif self.phase is Phase.TUNNEL:
            self._tunnel_plain(plaintext)
        elif self.phase is Phase.WEBSOCKET and self._relay is not None:
            self._touch()
            self._run(self._relay.client_data(plaintext))

    def _bound_request_head(self, session: HttpSession) -> None:
        """A partial head gets a fixed deadline that more bytes do not push back."""
        deadline = self._deadline
        if deadline is None or self.phase is not Phase.HTTP:
            return
        if session.awaiting_head:
            if deadline.kind == "idle":
                self._set_deadline(self.rt.config.timeouts.request_head, "head")
        elif deadline.kind == "head":
            self._set_deadline(self.rt.config.timeouts.client_idle, "idle")

    def _tunnel_plain(self, data: bytes) -> None:
        up = self._up
        if up is None:
            return
        self._touch()
        if data:
            up.write(data)
        elif up.transport is not None and up.transport.can_write_eof():
            up.transport.write_eof()

    # ------------------------------------------------------------------ running actions

    def _run(self, actions: Sequence[object]) -> None:
        for action in actions:
            kind = type(action)
            if kind is SendToClient:
                self._send_client(action.data)  # type: ignore[attr-defined]
            elif kind is SendToUpstream:
                if self._up is not None:
                    self._up.write(action.data)  # type: ignore[attr-defined]
            elif kind is ConnectUpstream:
                self._connect(action)  # type: ignore[arg-type]
            elif kind is ReleaseUpstream:
                self._release(action.reusable)  # type: ignore[attr-defined]
            elif kind is AwaitResponse:
                self._set_deadline(self.rt.config.timeouts.upstream_response, "response")
            elif kind is ResponseStarted:
                self._set_deadline(self.rt.config.timeouts.client_idle, "idle")
            elif kind is RequestCompleted:
                self.rt.observer.request(action, self._loop.time() - self._request_started, self.peer)  # type: ignore[arg-type]
            elif kind is CloseClient:
                if self.phase is Phase.WEBSOCKET and self._relay is not None and not self._relay.closed:
                    self._flush()
                    self._close_client_leg()  # the upstream may still owe its close reply
                    continue
                self._close()  # the last records and our close_notify leave in one write
                return
            elif kind is CloseUpstream:
                self._release(False)
            elif kind is StartTunnel:
                self._start_tunnel(action)  # type: ignore[arg-type]
            elif kind is StartWebSocket:
                self._start_websocket(action)  # type: ignore[arg-type]
            elif kind is AuthorizationDenied:
                self.rt.observer.denied(action, self.peer)  # type: ignore[arg-type]
            elif kind is MessageRelayed:
                self.rt.observer.ws_message(self._route_name(), action)  # type: ignore[arg-type]
            elif kind is SessionClosed:
                duration = self._loop.time() - self._request_started
                self.rt.observer.ws_closed(self._route_name(), action, self.peer, duration)  # type: ignore[arg-type]
        self._flush()
        self._update_reading()
        if self._relay is not None and self._relay.closed:
            self._close()

    def _close_client_leg(self) -> None:
        """WebSocket: the client leg is finished or dead; the session ends when the relay says so."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def _route_name(self) -> str:
        return self._route.name if self._route is not None else "-"

    def _send_client(self, data: bytes) -> None:
        if data:
            self._plaintext.append(data)

    def _seal(self) -> None:
        """Encrypt what the batch produced in one SSL_write: a small response (head, body, end)
        becomes one TLS record instead of three, saving CPU here and in the client."""
        pending = self._plaintext
        if pending and self._engine is not None:
            self._engine.send(pending[0] if len(pending) == 1 else b"".join(pending))
        pending.clear()

    def _flush(self) -> None:
        engine, transport = self._engine, self.transport
        if engine is not None and transport is not None and not transport.is_closing():
            self._seal()
            out = engine.data_to_send()
            if out:
                transport.write(out)

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.phase is Phase.CLOSED:
            return
        want = not self._upstream_write_paused
        if self.phase is Phase.HTTP and self._session is not None:
            want = want and self._session.reading_client
        if want != self._reading:
            self._reading = want
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def _connect(self, action: ConnectUpstream) -> None:
        self._route = action.route
        session = self._session
        upstream = self.rt.config.upstream(action.route.upstream)
        if not action.fresh and session is not None:
            conn = self.rt.pool.take_idle(upstream, self)
            if conn is not None:  # the common keep-alive case: no task, no await
                self._use_upstream(conn)
                self._run(session.upstream_connected(conn.leg))
                return
        self._loop.create_task(self._connect_task(upstream))

    def _use_upstream(self, conn: UpstreamConnection) -> None:
        self._up = conn
        if conn.transport is not None and self._client_write_paused:
            conn.transport.pause_reading()

    async def _connect_task(self, upstream: Upstream) -> None:
        try:
            await self._connect_upstream(upstream)
        except Exception as exc:  # a bug: this connection only, never an unretrieved task error
            self.rt.observer.bug(exc, self.peer)
            self._close(abort=True)

    async def _connect_upstream(self, upstream: Upstream) -> None:
        session = self._session
        if session is None:
            return
        try:
            conn = await self.rt.pool.connect(upstream, self)
        except ssl.SSLError as exc:
            self.rt.observer.upstream_error(upstream.name, f"TLS to upstream failed: {exc}", self.peer)
            actions = session.upstream_failed("upstream TLS verification failed")
        except TimeoutError:
            actions = session.upstream_failed("upstream connect timed out", timeout=True)
        except OSError as exc:
            self.rt.observer.upstream_error(upstream.name, f"connect failed: {exc}", self.peer)
            actions = session.upstream_failed("upstream unreachable")
        else:
            if self.phase is Phase.CLOSED:
                self.rt.pool.release(conn, False)
                return
            self._use_upstream(conn)
            actions = session.upstream_connected(conn.leg)
        if self.phase is not Phase.CLOSED:
            self._run(actions)

    def _release(self, reusable: bool) -> None:
        up, self._up = self._up, None
        self._upstream_write_paused = False
        if up is not None:
            if up.transport is not None:
                up.transport.resume_reading()
            self.rt.pool.release(up, reusable and not self.rt.draining)

    def _start_tunnel(self, action: StartTunnel) -> None:
        self.phase = Phase.TUNNEL
        self._session = None
        self._route = action.route
        self._set_deadline(self.rt.config.timeouts.passthrough_idle, "idle")
        if action.to_client:
            self._send_client(action.to_client)
        if action.to_upstream and self._up is not None:
            self._up.write(action.to_upstream)
        self._reading = True
        if self.transport is not None:
            self.transport.resume_reading()

    def _start_websocket(self, action: StartWebSocket) -> None:
        route = action.route
        self.phase = Phase.WEBSOCKET
        self._session = None
        self._route = route
        self._relay = WebSocketRelay(RelayLimits(max_message_size=route.max_message_size))
        self.rt.observer.ws_opened(route.name)
        self._set_deadline(route.ping_interval, "ping")
        actions: list[object] = []
        if action.from_client:
            actions += self._relay.client_data(action.from_client)
        if action.from_upstream:
            actions += self._relay.upstream_data(action.from_upstream)
        self._reading = True
        if self.transport is not None:
            self.transport.resume_reading()
        if actions:
            self._run(actions)

    # ------------------------------------------------------------------ timers

    def _set_deadline(self, seconds: float, kind: str) -> None:
        if self._deadline is None:
            self._deadline = Deadline(self._loop, self._on_deadline)
        self._deadline.set(seconds, kind)

    def _touch(self) -> None:
        """Activity: push the current deadline out (idle and ping phases only)."""
        deadline = self._deadline
        if deadline is None:
            return
        if deadline.kind == "idle":
            timeouts = self.rt.config.timeouts
            deadline.push(timeouts.passthrough_idle if self.phase is Phase.TUNNEL else timeouts.client_idle)
        elif deadline.kind == "ping" and self._route is not None:
            deadline.push(self._route.ping_interval)

    def _cancel_timer(self) -> None:
        """Cancel and drop the deadline: it holds a bound method of this connection, and that
        cycle would keep the closed connection (TLS object, h11 state, buffers) in memory until
        a full garbage collection, which then has to walk every live connection too."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_deadline(self, kind: str) -> None:
        if self.phase is not Phase.CLOSED:
            self._guarded(lambda: self._deadline_passed(kind))

    def _deadline_passed(self, kind: str) -> None:
        if kind == "handshake":
            self.rt.observer.handshake("timeout")
            self._flush()
            self._close()
        elif kind == "response" and self._session is not None:
            self._run(self._session.upstream_timeout())
            if self.phase is not Phase.CLOSED:
                self._set_deadline(self.rt.config.timeouts.client_idle, "idle")
        elif kind in ("ping", "pong") and self._relay is not None and self._route is not None:
            self._keepalive(self._route, waited=kind == "pong")
        else:
            self._close()

    def _keepalive(self, route: PathRoute, *, waited: bool) -> None:
        """After ping_interval of silence ping both legs; a leg that misses ping_timeout is dead."""
        relay = self._relay
        assert relay is not None
        for side in (Side.CLIENT, Side.UPSTREAM):
            if relay.pong_outstanding(side):
                self._run(relay.peer_timed_out(side))
                return
        if waited:  # both answered: back to watching for silence
            self._set_deadline(route.ping_interval, "ping")
            return
        self._run(relay.ping(Side.CLIENT) + relay.ping(Side.UPSTREAM))
        if self.phase is Phase.WEBSOCKET:
            self._set_deadline(route.ping_timeout, "pong")

    # ------------------------------------------------------------------ drain and close

    def drain(self) -> None:
        """Graceful shutdown: finish what is in flight, refuse what is new."""
        if self.phase is Phase.HANDSHAKE:
            self._close()
        elif self.phase is Phase.HTTP and self._session is not None:
            self._run(self._session.drain())
        elif self.phase is Phase.WEBSOCKET and self._relay is not None:
            self._run(self._relay.shutdown())

    def _close(self, *, abort: bool = False, linger: bool = False) -> None:
        if self.phase is Phase.CLOSED and self.transport is None:
            return
        was = self.phase
        self.phase = Phase.CLOSED
        self._cancel_timer()
        if self._up is not None:
            self._release(False)
        if self._relay is not None and self._route is not None:
            self.rt.observer.ws_gone(self._route.name)
            self._relay = None
        transport, self.transport = self.transport, None
        if transport is not None:
            if abort:
                transport.abort()
            elif linger and transport.can_write_eof():
                transport.write_eof()
                self._loop.call_later(0.5, transport.close)
            else:
                engine = self._engine
                if engine is not None:
                    if was in (Phase.HTTP, Phase.TUNNEL, Phase.WEBSOCKET):
                        self._seal()
                        engine.close()
                    out = engine.data_to_send()
                    if out and not transport.is_closing():
                        transport.write(out)
                transport.close()
        if self in self.rt.connections:
            self.rt.connections.discard(self)
            self.rt.observer.connection_closed()
