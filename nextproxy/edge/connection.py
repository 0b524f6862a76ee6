"""One terminated edge connection: TLS 1.3 over the transport, plaintext to the current phase.

``accept.Accepted`` reads the ClientHello and hands the transport over. This class keeps what
every phase shares: the TLS engine, the client transport, one lazy deadline per connection (the
hot path never re-arms a timer) and backpressure: the client is read only while the phase wants
bytes and the upstream's write buffer is below its high-water mark, and the upstream is read
only while the client's write buffer is. Plaintext goes to one phase at a time (``phases``:
HTTP, then maybe a tunnel or WebSocket); the actions it returns run through one table.
"""

from __future__ import annotations

import asyncio
import ssl
from datetime import datetime, timezone
from typing import Any, Callable

from nextproxy.config.model import SniRoute
from nextproxy.core import actions as act
from nextproxy.core.actions import Action
from nextproxy.core.clienthello import ClientHello
from nextproxy.core.headers import ClientInfo
from nextproxy.core.http1 import HttpSession
from nextproxy.core.tls import TlsEngine
from nextproxy.edge.deadline import Deadline, Timer
from nextproxy.edge.host import Group, Host
from nextproxy.edge.phases import HttpPhase, Phase, upgrade
from nextproxy.edge.upstream import UpstreamConnection
from nextproxy.errors import TlsError

READ_CHUNK_LIMIT = 256 * 1024
"""High-water mark of each transport's write buffer before the other side is paused."""


class TerminatedConnection(asyncio.Protocol):
    """The protocol of an edge connection after its ClientHello chose termination."""

    def __init__(
        self, host: Host, transport: asyncio.Transport, peer: str, sni_route: SniRoute | None,
        hello: ClientHello, loop: asyncio.AbstractEventLoop,
    ) -> None:  # fmt: skip
        self.rt = host
        # Kept, not looked up: on Python 3.11 every get_running_loop() costs a getpid() syscall.
        self._loop = loop
        self.transport: asyncio.Transport | None = transport
        self.peer = peer
        self._hello: ClientHello | None = hello
        self._server_name = hello.server_name
        self._sni_route = sni_route
        self._engine: TlsEngine | None = None
        self._phase: Phase | None = None  # None during the handshake, and once closed
        self._http: HttpPhase | None = None  # the phase while it is HTTP: it connects upstreams
        self.closed = False
        self._route_name = "-"
        self._up: UpstreamConnection | None = None
        self._reading = True
        self._upstream_write_paused = False
        self._client_write_paused = False
        self._deadline: Deadline | None = None
        self._request_started = 0.0
        self._plaintext: list[bytes] = []
        transport.set_write_buffer_limits(high=READ_CHUNK_LIMIT)
        host.enter(self, Group.TERMINATED)

    def start(self) -> None:
        """Begin the handshake with the bytes the hello reader already took off the socket."""
        hello, self._hello = self._hello, None  # its raw bytes (up to 128 KiB) are not kept
        assert hello is not None
        self.set_timer(Timer.HANDSHAKE, self.rt.config.timeouts.handshake)
        try:
            self._engine = TlsEngine(self.rt.contexts.select(self._sni_route, hello.server_name), now=datetime.now(timezone.utc))
        except TlsError as exc:
            self._tls_failed(exc)
            return
        self._tls_data(hello.raw)  # fed like any input, so a refusal's alert gets flushed

    # ------------------------------------------------------------------ transport callbacks

    def data_received(self, data: bytes) -> None:
        if self.closed:
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
        phase = self._phase
        if phase is not None and phase.outlives_client:
            self.transport = None  # let the phase finish the upstream's side (its closing handshake)
            self._guarded(lambda: self.run(phase.client_data(b"")))
            return
        self._close()

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run a callback step with the connection's one catch-all: a bug closes this connection.
        data_received and upstream_data write the try out inline: a closure per chunk costs."""
        try:
            step()
        except Exception as exc:
            self.bug(exc)

    def bug(self, exc: Exception) -> None:
        """The one outcome of any exception the core or the shell did not expect."""
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
            phase = self._phase
            if phase is not None:
                self._touch()
                self.run(phase.upstream_data(data))
        except Exception as exc:
            self.rt.observer.bug(exc, self.peer)
            self._close(abort=True)

    def upstream_lost(self, exc: Exception | None = None) -> None:
        self._guarded(lambda: self._upstream_lost(exc))

    def _upstream_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        if isinstance(exc, ssl.SSLError) and self._route_name != "-":
            # In TLS 1.3 an upstream refusing our client certificate only shows up here, after
            # the request was written; name it instead of a bare "closed before responding".
            self.rt.observer.upstream_error(self._route_name, f"TLS to upstream failed: {exc}", self.peer)
        self._up = None
        if self._phase is not None:
            self.run(self._phase.upstream_lost())

    def upstream_writing(self, paused: bool) -> None:
        self._upstream_write_paused = paused
        self._update_reading()

    # ------------------------------------------------------------------ TLS

    def _tls_data(self, data: bytes) -> None:
        engine = self._engine
        if engine is None:
            return
        try:
            plaintext = engine.receive(data)
        except TlsError as exc:
            self._tls_failed(exc)
            return
        if self._phase is None:
            if not engine.handshake_complete:
                self._flush()
                if not data:
                    self.rt.observer.handshake("other")
                    self._close()
                return
            self._handshake_done(engine)
        self._flush()  # session tickets go out right after the handshake
        phase = self._phase
        if plaintext and phase is not None:
            self._touch()
            self.run(phase.client_data(plaintext))
        phase = self._phase
        if (engine.peer_closed or not data) and phase is not None:
            self.run(phase.client_data(b""))

    def _handshake_done(self, engine: TlsEngine) -> None:
        self.rt.observer.handshake("ok")
        route = self._sni_route
        info = ClientInfo(
            address=self.peer, server_name=self._server_name, certificate=engine.peer_certificate,
            forward_chain=route.forward_client_cert_chain if route else False,
        )  # fmt: skip
        session = HttpSession(self.rt.routes, route, info, self.rt.config.limits)
        session.draining = self.rt.draining
        self._phase = self._http = HttpPhase(session, self)
        self.set_timer(Timer.IDLE, self.rt.config.timeouts.client_idle)

    def _tls_failed(self, exc: TlsError) -> None:
        self.rt.observer.handshake(exc.reason if self._phase is None else "other", str(exc), self.peer)
        # The alert is already in the engine's out-buffer: flush it, then half-close and linger
        # briefly, or the kernel answers the client's in-flight bytes with a reset.
        self._flush()
        self._close(linger=True)

    def _seal(self, engine: TlsEngine) -> None:
        """Encrypt what the batch produced in one SSL_write: a small response (head, body, end)
        becomes one TLS record instead of three, saving CPU here and in the client."""
        pending = self._plaintext
        if pending:
            engine.send(pending[0] if len(pending) == 1 else b"".join(pending))
            pending.clear()

    def _flush(self) -> None:
        engine, transport = self._engine, self.transport
        if engine is not None and transport is not None and not transport.is_closing():
            self._seal(engine)
            out = engine.data_to_send()
            if out:
                transport.write(out)

    # ------------------------------------------------------------------ actions

    def run(self, actions: list[Action]) -> None:
        for action in actions:
            if _HANDLERS[type(action)](self, action):
                return  # the connection closed: the rest of the batch has nowhere to go
        self._flush()
        self._update_reading()
        phase = self._phase
        if phase is not None and phase.finished:
            self._close()

    def _send_client(self, action: act.SendToClient) -> None:
        if action.data:
            self._plaintext.append(action.data)

    def _send_upstream(self, action: act.SendToUpstream) -> None:
        if self._up is not None:
            self._up.write(action.data)

    def _close_client(self, action: act.CloseClient) -> bool:
        phase = self._phase
        if phase is not None and phase.outlives_client:
            self._flush()
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.close()  # the session ends when the phase says it is finished
            return False
        self._close()  # the last records and our close_notify leave in one write
        return True

    def _head_started(self, action: act.HeadStarted) -> None:
        if self._deadline is not None and self._deadline.kind is Timer.IDLE:
            self.set_timer(Timer.HEAD, self.rt.config.timeouts.request_head)

    def _head_received(self, action: act.HeadReceived) -> None:
        if self._deadline is not None and self._deadline.kind is Timer.HEAD:
            self.set_timer(Timer.IDLE, self.rt.config.timeouts.client_idle)

    def _update_reading(self) -> None:
        transport, phase = self.transport, self._phase
        if transport is None or self.closed:
            return
        want = not self._upstream_write_paused and (phase is None or phase.reading_client)
        if want != self._reading:
            self._reading = want
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    # ------------------------------------------------------------------ upstream and phase changes

    def attach(self, conn: UpstreamConnection) -> None:
        """The HTTP phase got an upstream connection: it inherits the client's backpressure."""
        self._up = conn
        if conn.transport is not None and self._client_write_paused:
            conn.transport.pause_reading()

    def _release(self, reusable: bool) -> None:
        up, self._up = self._up, None
        self._upstream_write_paused = False
        if up is not None:
            if up.transport is not None:
                up.transport.resume_reading()
            self.rt.pool.release(up, reusable and not self.rt.draining)

    def _connect(self, action: act.ConnectUpstream) -> None:
        self._route_name = action.route.name
        if self._http is not None:
            self._http.connect(action)

    def _upgrade(self, action: act.StartTunnel | act.StartWebSocket) -> None:
        """After a 101: the HTTP phase is done, the client is read again (it was paused while
        the upgrade was pending), and the leftovers each side sent go through the new phase."""
        phase, actions = upgrade(action, self._up, self)
        self._route_name, self._http, self._phase = action.route.name, None, phase
        self._reading = True
        if self.transport is not None:
            self.transport.resume_reading()
        if actions:
            self.run(actions)

    # ------------------------------------------------------------------ timers

    def set_timer(self, kind: Timer, seconds: float) -> None:
        if self._deadline is None:
            self._deadline = Deadline(self._loop, self._on_deadline)
        self._deadline.set(seconds, kind)

    def _touch(self) -> None:
        """Activity pushes a quiet deadline (IDLE, PING) out; HEAD, RESPONSE and PONG stay."""
        deadline, phase = self._deadline, self._phase
        if deadline is not None and phase is not None and (deadline.kind is Timer.IDLE or deadline.kind is Timer.PING):
            deadline.push(phase.quiet)

    def _on_deadline(self, kind: Timer) -> None:
        if not self.closed:
            self._guarded(lambda: self._deadline_passed(kind))

    def _deadline_passed(self, kind: Timer) -> None:
        phase = self._phase
        if phase is None:  # the handshake took too long
            self.rt.observer.handshake("timeout")
            self._flush()
            self._close()
            return
        self.run(phase.deadline(kind))

    # ------------------------------------------------------------------ drain and close

    def drain(self) -> None:
        """Graceful shutdown: finish what is in flight, refuse what is new."""
        if self.closed:
            return
        if self._phase is None:
            self._close()  # still in the handshake
        else:
            self.run(self._phase.drain())

    def abort(self) -> None:
        self._close(abort=True)

    def _close(self, *, abort: bool = False, linger: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        phase, self._phase, self._http = self._phase, None, None
        if self._deadline is not None:
            # Dropped, not only cancelled: it holds a bound method of this connection, a cycle
            # that would keep the closed connection in memory until a full garbage collection.
            self._deadline.cancel()
            self._deadline = None
        if self._up is not None:
            self._release(False)
        if phase is not None and phase.websocket:
            self.rt.observer.ws_gone(self._route_name)
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
                    if phase is not None:
                        self._seal(engine)
                        engine.close()
                    out = engine.data_to_send()
                    if out and not transport.is_closing():
                        transport.write(out)
                transport.close()
        self.rt.leave(self, Group.WEBSOCKET)
        if self.rt.leave(self, Group.TERMINATED):
            self.rt.observer.connection_closed()



_HANDLERS: dict[type, Callable[[TerminatedConnection, Any], bool | None]] = {
    act.SendToClient: TerminatedConnection._send_client,
    act.SendToUpstream: TerminatedConnection._send_upstream,
    act.ConnectUpstream: TerminatedConnection._connect,
    act.ReleaseUpstream: lambda c, a: c._release(a.reusable),
    act.CloseUpstream: lambda c, a: c._release(False),
    act.CloseClient: TerminatedConnection._close_client,
    act.RequestStarted: lambda c, a: setattr(c, "_request_started", c._loop.time()),
    act.HeadStarted: TerminatedConnection._head_started,
    act.HeadReceived: TerminatedConnection._head_received,
    act.AwaitResponse: lambda c, a: c.set_timer(Timer.RESPONSE, c.rt.config.timeouts.upstream_response),
    act.ResponseStarted: lambda c, a: c.set_timer(Timer.IDLE, c.rt.config.timeouts.client_idle),
    act.RequestCompleted: lambda c, a: c.rt.observer.request(a, c._loop.time() - c._request_started, c.peer),
    act.AuthorizationDenied: lambda c, a: c.rt.observer.denied(a, c.peer),
    act.MessageRelayed: lambda c, a: c.rt.observer.ws_message(c._route_name, a),
    act.SessionClosed: lambda c, a: c.rt.observer.ws_closed(c._route_name, a, c.peer, c._loop.time() - c._request_started),
    act.StartTunnel: TerminatedConnection._upgrade,
    act.StartWebSocket: TerminatedConnection._upgrade,
}
"""Every core action's handler, built once; a handler returning True ends the batch (closed)."""
