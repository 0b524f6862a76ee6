"""The first bytes of every edge connection: read the ClientHello, then hand the socket over.

By SNI the transport goes either to a passthrough ``Splice`` (raw TCP to an upstream that does
its own TLS) or to a ``TerminatedConnection`` (TLS 1.3 + HTTP/WebSocket), with
``transport.set_protocol`` so that neither pays for a delegation layer afterwards. Until then
this protocol owns the accept-time limits: the ClientHello size cap (in the reader) and the
time a client may take to send its hello (the connection caps are checked before it exists, in
``edge.acceptor``).

Before the hello, the listener's gate (``edge.gate``): a trusted balancer's connection must start
with a PROXY protocol header (read under the same hello deadline), whose source then is the
client everywhere (logs, X-Forwarded-For, allow-lists, per-client caps, rate limits); anyone else
sending one is closed. Then the per-client new-connection rate, and after the hello an SNI route's
``allow_sources``: refused before any upstream is contacted.
"""

from __future__ import annotations

import asyncio
from typing import cast

from nextproxy.config.model import SniAction, SniRoute
from nextproxy.core.clienthello import ClientHello, ClientHelloReader
from nextproxy.core.handshake import hello_failure_reason
from nextproxy.core.proxyprotocol import Endpoint, ProxyHeader, ProxyHeaderReader, build_v2, looks_like_proxy_protocol
from nextproxy.edge.connection import TerminatedConnection
from nextproxy.edge.deadline import Deadline, Timer
from nextproxy.edge.gate import ListenerGate, socket_endpoints
from nextproxy.edge.host import Group, Host
from nextproxy.edge.passthrough import start_passthrough
from nextproxy.edge.records import linger_close
from nextproxy.errors import ClientHelloError, HelloAnswer, ProxyProtocolError, TlsAlert

USE_HTTPS = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 42\r\nconnection: close\r\n\r\n"
    b"This port speaks TLS: use https:// instead\n"
)
ACCESS_DENIED = bytes((21, 3, 3, 0, 2, 2, TlsAlert.ACCESS_DENIED))
"""A fatal access_denied alert record: a terminated SNI route's answer to a refused source."""
UNTRUSTED = "untrusted"
TIMEOUT = "timeout"
"""``nextproxy_proxy_protocol_rejected_total`` reasons besides the reader's own."""
NO_GATE = ListenerGate("-", None, None)


class Accepted(asyncio.Protocol):
    """An edge connection whose ClientHello is still being read."""

    def __init__(self, host: Host, loop: asyncio.AbstractEventLoop, peer: str, gate: ListenerGate = NO_GATE) -> None:
        """``peer``: the client address ``edge.acceptor`` admitted (counted in ``host.admission``,
        one connection and one handshake): every way out counts it out again exactly once."""
        self.rt = host
        self._loop = loop  # handed in: get_running_loop() costs a getpid() syscall on Python 3.11
        self.transport: asyncio.Transport | None = None
        self.peer = peer
        self.made = False
        self._reader = ClientHelloReader(host.config.limits.max_client_hello)
        self._deadline: Deadline | None = None
        """The ClientHello's time limit; a terminated connection takes it over (one timer each)."""
        self._gate = gate
        self._proxy: ProxyHeaderReader | None = None
        """Set while a trusted balancer's PROXY header is being read."""
        self._first = True
        self._source: Endpoint | None = None
        self._destination: Endpoint | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        rt = self.rt
        self.made = True
        # uvloop's transports are not asyncio.Transport subclasses, only look-alikes.
        self.transport = cast(asyncio.Transport, transport)
        rt.enter(self, Group.PENDING)
        rt.observer.connection_opened()
        if self._gate.must_send_header(self.peer):
            self._proxy = ProxyHeaderReader()
        elif not self._admitted():
            return
        # A total bound, not an idle one: bytes that trickle in do not extend it.
        self._deadline = Deadline(self._loop, self._timed_out)
        self._deadline.set(rt.config.timeouts.client_hello, Timer.HANDSHAKE)

    def port(self) -> int | None:
        """The client's port, for failure lines only: the PROXY header's, else the socket's
        (looked up when needed, not for every connection)."""
        if self._source is not None:
            return self._source.port
        peername = self.transport.get_extra_info("peername") if self.transport is not None else None
        return peername[1] if isinstance(peername, tuple) and len(peername) >= 2 else None

    def _admitted(self) -> bool:
        """The listener's new-connection rate for this client (after its PROXY header, if any)."""
        if self._gate.admits(self.peer, self._loop.time()):
            return True
        self.rt.observer.connections_rate_limited(self._gate.name, self.peer)
        self.close()
        return False

    def _proxy_data(self, reader: ProxyHeaderReader, data: bytes) -> bytes | None:
        """Feed the PROXY header reader; the bytes after a complete header, None to stop here."""
        try:
            header = reader.feed(data)
        except ProxyProtocolError as exc:
            self._proxy_refused(exc.reason, exc.detail)
            return None
        if header is None:
            return None
        self._proxy = None
        if not self._proxied(header):
            return None
        return header.trailing if self._admitted() and header.trailing else None

    def _proxied(self, header: ProxyHeader) -> bool:
        """The header's client is the client from now on, counted against its own per-address
        cap; LOCAL keeps the connection's own address. False: over the cap, closed."""
        self.rt.observer.proxy_header(self._gate.name, header.version, header.command.value)
        if header.source is not None and header.destination is not None:
            client = header.source.host
            refusal = self.rt.admission.rekey(self.peer, client)
            if refusal is not None:
                self.rt.observer.connection_refused(refusal.value)
                self.close()
                return False
            self._source, self._destination = header.source, header.destination
            self.peer = client
        return True

    def _proxy_refused(self, reason: str, detail: str) -> None:
        # The specification: abort at once, without an answer (there is no protocol to answer in).
        self.rt.observer.proxy_rejected(self._gate.name, reason, detail, self.peer)
        self.close()

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return  # lingering after a refusal: bytes are read only so the kernel does not reset
        if self._proxy is not None:
            rest = self._proxy_data(self._proxy, data)
            if rest is None:
                return
            data = rest
        elif self._first and looks_like_proxy_protocol(data):
            self._proxy_refused(UNTRUSTED, "PROXY protocol header from a peer outside the trusted networks")
            return
        self._first = False
        try:
            hello = self._reader.feed(data)
        except ClientHelloError as exc:
            self._refused(exc)
            return
        except Exception as exc:  # a bug: log it, close this connection only
            self.rt.observer.bug(exc, self.peer)
            self.close(abort=True)
            return
        if hello is not None:
            self._hand_over(hello)

    def eof_received(self) -> bool:
        if self._proxy is not None:
            self._proxy_data(self._proxy, b"")  # refused: the connection ended before a header
            return False
        if self.transport is not None:
            try:
                self._reader.feed(b"")  # raises: the hello is unfinished
            except ClientHelloError as exc:
                if exc.answer is HelloAnswer.TLS_LIBRARY:
                    return self._to_openssl().eof_received()
            except Exception as exc:
                self.rt.observer.bug(exc, self.peer)
        self.close()
        return False

    def _to_openssl(self) -> TerminatedConnection:
        """OpenSSL with the default context gets every byte and answers as a plain server would;
        the connection then fails (or, rarely, succeeds) like any handshake."""
        assert self.transport is not None
        return self._terminate(self.transport, None, ClientHello(None, (), False, self._reader.received()))

    def _refused(self, exc: ClientHelloError) -> None:
        """Answer first bytes the reader cannot route by (design.md: the peek only routes)."""
        transport = self.transport
        assert transport is not None
        if exc.answer is HelloAnswer.TLS_LIBRARY:
            self._to_openssl()
            return
        self.rt.observer.handshake(hello_failure_reason(exc), str(exc), self.peer, self.port())
        answer = {HelloAnswer.USE_HTTPS: USE_HTTPS, HelloAnswer.ALERT: exc.alert_record()}.get(exc.answer)
        self._linger_close(answer or b"")

    def _linger_close(self, answer: bytes) -> None:
        """Write ``answer`` (if any), half-close, and drop what still comes for ``LINGER`` seconds."""
        transport = self._let_go()
        assert transport is not None
        if answer:
            transport.write(answer)
        linger_close(transport, self._loop)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None and exc is not None and self._reader.received():
            # A reset in the middle of the ClientHello (a clean EOF goes through eof_received).
            self.rt.observer.handshake("eof_during_handshake", f"connection lost: {exc}", self.peer, self.port())
        self.close()

    def _timed_out(self, kind: Timer) -> None:
        if self._proxy is not None:
            self._proxy_refused(TIMEOUT, "no complete PROXY header within the ClientHello timeout")
            return
        limit = self.rt.config.timeouts.client_hello
        got = len(self._reader.received())
        self.rt.observer.handshake("timeout", f"no ClientHello within {limit:g} s ({got} bytes received)", self.peer, self.port())
        self.close()

    def _hand_over(self, hello: ClientHello) -> None:
        transport = self.transport
        if transport is None:
            return
        route = self.rt.routes.match_sni(hello.server_name)
        if route is not None and route.allow_sources is not None:
            denied = self.rt.routes.admission.sni_refusal(route.name, self.peer)
            if denied is not None:
                self.rt.observer.denied(denied, self.peer)
                # Before any upstream connect. Passthrough has no TLS of its own to answer in.
                self._linger_close(ACCESS_DENIED if route.action is SniAction.TERMINATE else b"")
                return
        if route is not None and route.action is SniAction.PASSTHROUGH:
            self._forget()
            self.rt.admission.handshake_over()  # the upstream does the TLS handshake
            start_passthrough(self.rt, transport, route, hello, self.peer, self._passthrough_preamble(route, hello, transport))
            return
        self._terminate(transport, route, hello)

    def _passthrough_preamble(self, route: SniRoute, hello: ClientHello, transport: asyncio.Transport) -> bytes:
        """The PROXY v2 header a passthrough route sends first: client, SNI, and ALPN when the
        client offered exactly one protocol (the upstream's TLS picks among several itself)."""
        if route.proxy_protocol is None:
            return b""
        endpoints = self._endpoints(transport)
        if endpoints is None:
            return b""
        alpn = hello.alpn[0] if len(hello.alpn) == 1 else None
        return build_v2(endpoints[0], endpoints[1], authority=hello.server_name, alpn=alpn)

    def _endpoints(self, transport: asyncio.Transport) -> tuple[Endpoint, Endpoint] | None:
        """Client and local address for a PROXY header we send: the incoming header's, else the
        socket's."""
        if self._source is not None and self._destination is not None:
            return self._source, self._destination
        return socket_endpoints(transport)

    def _terminate(self, transport: asyncio.Transport, route: SniRoute | None, hello: ClientHello) -> TerminatedConnection:
        deadline, self._deadline = self._deadline, None
        self._forget()
        source, destination = self._source, self._destination
        proxied = (source, destination) if source is not None and destination is not None else None
        connection = TerminatedConnection(self.rt, transport, self.peer, route, hello, self._loop, proxied=proxied, deadline=deadline)
        transport.set_protocol(connection)
        connection.start()
        return connection

    def _forget(self) -> None:
        """This protocol is done with the connection (closed, or handed over)."""
        self.transport = None
        if self._deadline is not None:
            self._deadline.close()
            self._deadline = None
        self.rt.leave(self, Group.PENDING)

    def close(self, *, abort: bool = False) -> None:
        transport = self._let_go()
        if transport is None:
            return
        if abort:
            transport.abort()
        else:
            transport.close()

    def _let_go(self) -> asyncio.Transport | None:
        """Stop owning the connection and count it out exactly once (connection and handshake
        slots); the caller finishes the transport this returns."""
        transport = self.transport
        if transport is None:
            return None
        counted = self.rt.leave(self, Group.PENDING)
        self._forget()
        if counted:
            self.rt.admission.handshake_over()
            self.rt.closed(self.peer)
        return transport

    def drain(self) -> None:
        """Shutdown: a connection that has not even said hello yet is simply closed."""
        self.close()

    def retire(self) -> None:
        """A reload: nothing to do yet; once terminated, its runtime's ``retired`` has it serve
        one request (the handshake's end reads it)."""

    def abort(self) -> None:
        self.close(abort=True)
