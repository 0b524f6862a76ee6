"""One terminated edge connection: TLS 1.3 over the transport, plaintext to the current phase.

After ``accept`` hands the transport over, this keeps what every phase shares: the TLS engine,
the client transport, one lazy deadline (the hot path never re-arms a timer) and backpressure:
the client is read only while the phase wants bytes and the upstream's write buffer has room,
and the upstream only while the client's has (``upstream.UpstreamSlot``). Plaintext goes to one
phase at a time (``phases``); the actions it returns run through one table (``dispatch``).
"""

from __future__ import annotations

import asyncio
import ssl
from datetime import datetime, timezone
from typing import Callable

from nextproxy.config.model import ClientAuth, SniRoute
from nextproxy.core.actions import Action, RequestCompleted, SessionClosed, StartTunnel, StartWebSocket
from nextproxy.core.clienthello import ClientHello
from nextproxy.core.proxyprotocol import Endpoint
from nextproxy.core.tls import TlsEngine
from nextproxy.edge.deadline import Deadline, Timer
from nextproxy.edge.dispatch import HANDLERS
from nextproxy.edge.gate import socket_endpoints
from nextproxy.edge.host import Group, Host
from nextproxy.edge.phases import HttpPhase, Phase, upgrade
from nextproxy.edge.reads import READ_CHUNK_LIMIT, read_buffer, read_room
from nextproxy.edge.records import Linger, linger_close, peer_port, write_goodbye, write_records
from nextproxy.edge.upstream import UpstreamSlot
from nextproxy.errors import TlsError


class TerminatedConnection(asyncio.BufferedProtocol):
    """The protocol of an edge connection after its ClientHello chose termination.

    A BufferedProtocol for 64 KiB reads (``edge.reads``): a 256 KiB read of a large upload went
    whole into OpenSSL's incoming memory BIO, which then kept that size for good."""

    def __init__(
        self, host: Host, transport: asyncio.Transport, peer: str, sni_route: SniRoute | None,
        hello: ClientHello, loop: asyncio.AbstractEventLoop, port: int | None = None, *,
        proxied: tuple[Endpoint, Endpoint] | None = None, deadline: Deadline | None = None,
    ) -> None:  # fmt: skip
        """``proxied``: the client and the address it connected to, from the PROXY header the
        connection started with (its source port is then ``port``). ``deadline``: accept's,
        taken over (its timer is re-armed only if the handshake's limit comes sooner)."""
        self.rt = host
        self.loop = loop  # kept: on Python 3.11 every get_running_loop() costs a getpid() syscall
        self.transport: asyncio.Transport | None = transport
        self.peer = peer
        self.port = proxied[0].port if proxied is not None else port
        self._hello: ClientHello | None = hello
        self.server_name = hello.server_name
        self._proxied = proxied
        self._sni_route = sni_route
        self._engine: TlsEngine | None = None
        self._phase: Phase | None = None  # None during the handshake, and once closed
        self.http: HttpPhase | None = None  # the phase while it is HTTP: it connects upstreams
        self.closed = False
        self.route_name = "-"
        self.upstream = UpstreamSlot()
        self._reading = True
        self.deadline = Deadline(loop, self._on_deadline) if deadline is None else deadline.take_over(self._on_deadline)
        self.request_started = 0.0
        self._plaintext: list[bytes] = []
        self._tickets_wait = False
        """The session tickets OpenSSL wrote after the handshake wait for the first bytes to the
        client (``_flush``); closing, a failure or an alert sends them at once."""
        self._writes = host.writes
        transport.set_write_buffer_limits(high=READ_CHUNK_LIMIT)
        self._handshaking = True
        """Counted in ``host.admission.handshakes`` (taken over from ``accept``) until it ends."""
        self._linger: Linger | None = None
        """Closed, but still dropping what the client sends (``records.Linger``): the connection
        keeps its slot until its socket closes."""
        host.enter(self, Group.TERMINATED)

    def start(self) -> None:
        """Begin the handshake with the bytes the hello reader already took off the socket."""
        hello, self._hello = self._hello, None  # its raw bytes (up to 128 KiB) are not kept
        assert hello is not None
        self.deadline.set(self.rt.config.timeouts.handshake, Timer.HANDSHAKE)
        context = self.rt.contexts.select(self._sni_route, hello.server_name)
        try:
            # The clock is read only where a client certificate may be verified against it.
            now = datetime.now(timezone.utc) if context.client_auth is not ClientAuth.NONE else None
            self._engine = TlsEngine(context, now=now)
        except TlsError as exc:
            self._tls_failed(exc)
            return
        self._tls_data(hello.raw)  # fed like any input, so a refusal's alert gets flushed

    @property
    def client_endpoints(self) -> tuple[Endpoint, Endpoint] | None:
        """For PROXY headers to upstreams that ask for one: the incoming header's addresses,
        else the socket's (looked up only then)."""
        if self._proxied is None and self.transport is not None:
            self._proxied = socket_endpoints(self.transport)
        return self._proxied

    def get_buffer(self, sizehint: int) -> memoryview:
        return read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        # No copy of our own: the engine copies the bytes into OpenSSL's BIO before the next read.
        self.data_received(read_buffer(nbytes))

    def data_received(self, data: bytes | memoryview) -> None:
        if self.closed:
            # Lingering (after an alert, or an answer the client's body is still coming to): the
            # bytes are only read so that the kernel does not reset the connection.
            if self._linger is not None:
                self._linger.heard()
            return
        try:
            self._tls_data(data)
        except Exception as exc:  # the one catch-all: a bug; log it, close this connection only
            self.bug(exc)

    def eof_received(self) -> bool:
        if self._linger is not None:  # the client is done sending, so are we (our writes are out)
            self._linger.close()
            return False
        if self._engine is None:
            self._close()
            return False
        self.data_received(b"")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:  # the lingering close is over: the slot is free now
            self._linger = None
            self._leave()
            return
        if self._phase is None and not self.closed and self._engine is not None:
            # A reset (no EOF first) in the middle of the handshake.
            self._handshake_failed("eof_during_handshake", f"connection lost: {exc}" if exc else "connection lost")
        phase = self._phase
        if phase is not None and phase.outlives_client:
            self.transport = None  # let the phase finish the upstream's side (its closing handshake)
            self._guarded(lambda: self.run(phase.client_data(b"")))
            return
        if phase is not None and not self.closed:
            self.transport = None  # gone: what was in flight is reported, nothing is written
            self._guarded(lambda: self.run(phase.client_gone()))
        self._close()

    def _guarded(self, step: Callable[[], None]) -> None:
        """The one catch-all, for callbacks (the per-chunk ones inline it: a closure costs)."""
        try:
            step()
        except Exception as exc:
            self.bug(exc)

    def bug(self, exc: Exception) -> None:
        """The one outcome of any exception the core or the shell did not expect."""
        self.rt.observer.bug(exc, self.peer)
        self._close(abort=True)

    def pause_writing(self) -> None:
        self.upstream.client_writing(True)

    def resume_writing(self) -> None:
        self.upstream.client_writing(False)

    # upstream callbacks (the pool's UpstreamOwner)

    def upstream_data(self, data: bytes) -> None:
        try:
            phase = self._phase
            if phase is not None:
                self.deadline.touch(phase.quiet)
                self.run(phase.upstream_data(data))
        except Exception as exc:
            self.bug(exc)

    def upstream_lost(self, exc: Exception | None = None) -> None:
        if self.closed:
            return
        if isinstance(exc, ssl.SSLError) and self.route_name != "-":
            # In TLS 1.3 an upstream refusing our client certificate only shows up here, after
            # the request was written; name it instead of a bare "closed before responding".
            self.rt.observer.upstream_error(self.route_name, f"TLS to upstream failed: {exc}", self.peer)
        self.upstream.conn = None
        phase = self._phase
        if phase is not None:
            self._guarded(lambda: self.run(phase.upstream_lost(exc)))

    def read_room(self) -> int:
        return read_room(self.transport)

    def upstream_writing(self, paused: bool) -> None:
        self.upstream.paused = paused
        self._update_reading()

    # TLS

    def _tls_data(self, data: bytes | memoryview) -> None:
        engine = self._engine
        if engine is None:
            return
        try:
            # EOF goes to OpenSSL too: mid-handshake it answers as a plain server would.
            plaintext = engine.receive(data) if data else engine.end_of_stream()
        except TlsError as exc:
            # OpenSSL's view of an EOF mid-handshake ("unexpected eof", or decode_error for a
            # truncated hello) is detail; the reason is what happened: the client hung up.
            self._tls_failed(exc, None if data or engine.handshake_complete else "eof_during_handshake")
            return
        if self._phase is None:
            if not engine.handshake_complete:
                self._flush()
                if not data:
                    self._handshake_failed("eof_during_handshake", "the client closed before the handshake finished")
                    self._close()
                return
            self._handshake_done(engine)
            if plaintext:
                # The first request came with the Finished (browsers, curl, wrk, most libraries):
                # an answer is on its way, and the session tickets ride in its write instead of a
                # write (and a client wakeup) of their own.
                self._tickets_wait = True
            else:
                self._flush()  # the session tickets: nothing else is about to be written
        elif not plaintext:
            self._flush()  # whatever OpenSSL answered by itself (run() flushes after a phase)
        phase = self._phase
        if plaintext and phase is not None:
            self.deadline.touch(phase.quiet)
            self.run(phase.client_data(plaintext))
        phase = self._phase
        if (engine.peer_closed or not data) and phase is not None:
            self.run(phase.client_data(b""))

    def _handshake_over(self) -> None:
        if self._handshaking:
            self._handshaking = False
            self.rt.admission.handshake_over()

    def _handshake_done(self, engine: TlsEngine) -> None:
        self._handshake_over()
        self.rt.observer.handshake("ok")
        certificate = engine.peer_certificate
        self._phase = self.http = HttpPhase.after_handshake(self, self._sni_route, self.server_name, certificate)
        self.deadline.set(self.rt.config.timeouts.client_idle, Timer.IDLE)

    def _tls_failed(self, exc: TlsError, reason: str | None = None) -> None:
        if self._phase is None:
            self._handshake_failed(reason or exc.reason, exc.detail)
        else:  # the handshake was counted as ok; this is no second handshake result
            self.rt.observer.tls_error(exc.detail, self.peer, self._port(), self.server_name)
        # The alert is already in the engine's out-buffer: flush it, then half-close and linger
        # briefly, or the kernel answers the client's in-flight bytes with a reset.
        self._flush()
        self._close(alert=True)

    def _handshake_failed(self, reason: str, detail: str) -> None:
        self.rt.observer.handshake(reason, detail, self.peer, self._port(), self.server_name)

    def _port(self) -> int | None:
        """The client's port for failure lines: a PROXY header's, else the socket's (looked up
        only when a line needs it)."""
        return self.port if self.port is not None else peer_port(self.transport)

    def _flush(self) -> None:
        engine, transport = self._engine, self.transport
        if self._tickets_wait:
            if not self._plaintext and engine is not None and engine.error is None:
                return  # only the tickets are pending: they go with the response
            self._tickets_wait = False
        if not self._plaintext and (engine is None or not engine.may_have_output):
            return  # most flushes of a request: its head went upstream, nothing for the client
        if engine is not None and transport is not None and not transport.is_closing():
            write_records(engine, transport, self._plaintext, self._writes)

    # actions (``dispatch.HANDLERS`` calls back into the methods below)

    def run(self, actions: list[Action]) -> None:
        for action in actions:
            if HANDLERS[type(action)](self, action):
                return  # the connection closed: the rest of the batch has nowhere to go
        self._flush()
        self._update_reading()
        phase = self._phase
        if phase is not None and phase.finished:
            self._close()

    def send_client(self, data: bytes) -> None:
        if data:
            self._plaintext.append(data)

    def close_client(self, linger: bool = False) -> bool:
        phase = self._phase
        if phase is not None and phase.outlives_client:
            self._flush()
            transport = self.transport
            if transport is not None and not transport.is_closing():
                self._writes.close(transport)  # the session ends when the phase says it is finished
            return False
        self._close(linger=linger)  # the last records and our close_notify leave in one write
        return True

    def release(self, reusable: bool) -> None:
        self.upstream.release(self.rt.pool, reusable and not self.rt.draining)

    def upgrade(self, action: StartTunnel | StartWebSocket) -> None:
        """After a 101: the HTTP phase is done, the client is read again (it was paused while
        the upgrade was pending), and the leftovers each side sent go through the new phase."""
        phase, actions = upgrade(action, self.upstream.conn, self)
        self.route_name, self.http, self._phase = action.route.name, None, phase
        self._reading = True
        if self.transport is not None:
            self.transport.resume_reading()
        if actions:
            self.run(actions)

    def _update_reading(self) -> None:
        transport, phase = self.transport, self._phase
        if transport is None or self.closed:
            return
        want = not self.upstream.paused and (phase is None or phase.reading_client)
        if want != self._reading:
            self._reading = want
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def _on_deadline(self, kind: Timer) -> None:
        phase = self._phase
        if phase is not None:
            self._guarded(lambda: self.run(phase.deadline(kind)))
        elif not self.closed:  # the handshake took too long
            limit = self.rt.config.timeouts.handshake
            self._handshake_failed("timeout", f"handshake not finished within {limit:g} s")
            self._flush()
            self._close()

    def drain(self) -> None:
        """Graceful shutdown: finish what is in flight, refuse what is new."""
        phase = self._phase
        if self.closed:
            return
        # Guarded: one connection's bug must not stop the shutdown (nor the others' drains).
        if phase is None:
            self._guarded(self._close)  # still in the handshake
        else:
            self._guarded(lambda: self.run(phase.drain()))

    def retire(self) -> None:
        """A reload: an HTTP connection closes after its exchange in flight (or now, if idle).
        Still in the handshake, it serves one request (``HttpPhase.after_handshake``); after an
        upgrade it keeps going, on the configuration it started with."""
        http = self.http
        if http is not None and not self.closed:
            # As a drain: finish the exchange in flight, then close; refuse new upgrades. Guarded:
            # one connection's bug must not stop a reload.
            self._guarded(lambda: self.run(http.drain()))

    def abort(self) -> None:
        """The drain deadline passed: what was still in flight is reported (logged and counted
        as every other end), then the connection is reset."""
        if self._linger is not None:
            self._linger.abort()  # its slot is freed by connection_lost
            return
        phase = self._phase
        if phase is not None and not self.closed:
            for action in phase.cut("the drain deadline ended it"):
                if type(action) is RequestCompleted or type(action) is SessionClosed:
                    HANDLERS[type(action)](self, action)  # the facts only: the reset follows
        self._close(abort=True)

    def _close(self, *, abort: bool = False, alert: bool = False, linger: bool = False) -> None:
        """``alert``: a TLS alert is out, half-close and wait ``LINGER``; ``linger``: the goodbye
        as always, then a ``Linger`` while the client may still be sending."""
        if self.closed:
            return
        self.closed = True
        phase, self._phase, self.http = self._phase, None, None
        websocket = phase is not None and phase.websocket
        transport, self.transport = self.transport, None
        try:
            self.deadline.close()
            self.release(False)
            if websocket and phase is not None:
                ended = phase.ended()
                if ended is not None:  # a tunnel's one report, whichever way it ended
                    HANDLERS[SessionClosed](self, ended)
                self.rt.observer.ws_gone(self.route_name)
            if transport is not None:
                if abort:
                    self._writes.flush()  # what this turn wrote still goes first, as before an abort
                    transport.abort()
                elif alert:
                    self._writes.flush()  # the alert before the half-close
                    linger_close(transport, self.loop)
                elif self._engine is not None:
                    write_goodbye(self._engine, transport, self._plaintext, self._writes, established=phase is not None, close=not linger)
                    if linger and not transport.is_closing():
                        self._writes.flush()  # the answer and close_notify before the half-close
                        self._linger = Linger(transport, self.loop)
                else:
                    self._writes.close(transport)
        except BaseException:
            self._linger = None
            if transport is not None:
                transport.abort()  # nor its socket
            raise
        finally:
            # Whatever failed above (a bug; none is known), the connection's slots are given
            # back: ``closed`` is already set, so nothing would ever come back to free them.
            self._handshake_over()
            if websocket:  # only a WebSocket phase (either mode) joins that group (``phases.upgrade``)
                self.rt.leave(self, Group.WEBSOCKET)
            if self._linger is None:
                self._leave()

    def _leave(self) -> None:
        if self.rt.leave(self, Group.TERMINATED):
            self.rt.closed(self.peer)
