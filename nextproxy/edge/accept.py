"""The first bytes of every edge connection: read the ClientHello, then hand the socket over.

By SNI the transport goes either to a passthrough ``Splice`` (raw TCP to an upstream that does
its own TLS) or to a ``TerminatedConnection`` (TLS 1.3 + HTTP/WebSocket), with
``transport.set_protocol`` so that neither pays for a delegation layer afterwards. Until then
this protocol owns the accept-time limits: the ClientHello size cap (in the reader) and the
time a client may take to send its hello (the connection caps are checked before it exists, in
``edge.acceptor``).
"""

from __future__ import annotations

import asyncio
from typing import cast

from nextproxy.config.model import SniAction, SniRoute
from nextproxy.core.clienthello import ClientHello, ClientHelloReader
from nextproxy.edge.connection import TerminatedConnection
from nextproxy.edge.host import Group, Host
from nextproxy.edge.passthrough import start_passthrough
from nextproxy.errors import ClientHelloError, HelloAnswer

USE_HTTPS = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 42\r\nconnection: close\r\n\r\n"
    b"This port speaks TLS: use https:// instead\n"
)
LINGER = 0.5
"""After refusing, keep reading (and dropping) this long before closing, as after a failed
handshake: closing at once makes the kernel reset in-flight bytes, and the answer is lost."""


class Accepted(asyncio.Protocol):
    """An edge connection whose ClientHello is still being read."""

    def __init__(self, host: Host, loop: asyncio.AbstractEventLoop, peer: str) -> None:
        """``peer``: the client address ``edge.acceptor`` admitted (counted in ``host.admission``,
        one connection and one handshake): every way out counts it out again exactly once."""
        self.rt = host
        self._loop = loop  # handed in: get_running_loop() costs a getpid() syscall on Python 3.11
        self.transport: asyncio.Transport | None = None
        self.peer = peer
        self.made = False
        self._reader = ClientHelloReader(host.config.limits.max_client_hello)
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        rt = self.rt
        self.made = True
        # uvloop's transports are not asyncio.Transport subclasses, only look-alikes.
        self.transport = cast(asyncio.Transport, transport)
        rt.enter(self, Group.PENDING)
        rt.observer.connection_opened()
        # A total bound, not an idle one: bytes that trickle in do not extend it.
        self._timer = self._loop.call_later(rt.config.timeouts.client_hello, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return  # lingering after a refusal: bytes are read only so the kernel does not reset
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
        self.rt.observer.bad_hello(exc, self.peer)
        counted = self.rt.leave(self, Group.PENDING)
        self._forget()
        answer = {HelloAnswer.USE_HTTPS: USE_HTTPS, HelloAnswer.ALERT: exc.alert_record()}.get(exc.answer)
        if answer:
            transport.write(answer)
        if transport.can_write_eof():
            transport.write_eof()
            self._loop.call_later(LINGER, transport.close)
        else:
            transport.close()
        if counted:
            self.rt.admission.handshake_over()
            self.rt.closed(self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def _timed_out(self) -> None:
        self._timer = None
        self.rt.observer.handshake("timeout")
        self.close()

    def _hand_over(self, hello: ClientHello) -> None:
        transport = self.transport
        if transport is None:
            return
        self._forget()
        route = self.rt.routes.match_sni(hello.server_name)
        if route is not None and route.action is SniAction.PASSTHROUGH:
            self.rt.admission.handshake_over()  # the upstream does the TLS handshake
            start_passthrough(self.rt, transport, route, hello, self.peer)
            return
        self._terminate(transport, route, hello)

    def _terminate(self, transport: asyncio.Transport, route: SniRoute | None, hello: ClientHello) -> TerminatedConnection:
        self._forget()
        connection = TerminatedConnection(self.rt, transport, self.peer, route, hello, self._loop)
        transport.set_protocol(connection)
        connection.start()
        return connection

    def _forget(self) -> None:
        """This protocol is done with the connection (closed, or handed over)."""
        self.transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.rt.leave(self, Group.PENDING)

    def close(self, *, abort: bool = False) -> None:
        transport = self.transport
        if transport is None:
            return
        counted = self.rt.leave(self, Group.PENDING)
        self._forget()
        if abort:
            transport.abort()
        else:
            transport.close()
        if counted:
            self.rt.admission.handshake_over()
            self.rt.closed(self.peer)

    def drain(self) -> None:
        """Shutdown: a connection that has not even said hello yet is simply closed."""
        self.close()

    def abort(self) -> None:
        self.close(abort=True)
