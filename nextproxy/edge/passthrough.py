"""Passthrough: raw TCP between the client and an upstream that does its own TLS.

The ClientHello bytes already read are replayed first, then both directions are spliced with
backpressure (a side whose write buffer is above its high-water mark pauses reading on the other),
half-close is propagated, and an idle timer closes connections that moved no byte either way.
The client transport is handed over with ``set_protocol`` so the hot loop is one callback and
one write per chunk, with no delegation layer. ``start_passthrough`` sets it up for accept: the
upstream servers are tried in turn (failover) and the outcome is reported.
"""

from __future__ import annotations

import asyncio
from typing import Callable, cast

from nextproxy.config.model import Address, SniRoute
from nextproxy.core.clienthello import ClientHello
from nextproxy.edge.acceptor import out_of_descriptors
from nextproxy.edge.deadline import Deadline, Timer
from nextproxy.edge.host import Group, Host
from nextproxy.edge.reads import read_buffer
from nextproxy.edge.upstream import first_that_answers


class _Side(asyncio.BufferedProtocol):
    """One direction's reader; writes what it reads to the other side's transport."""

    def __init__(self, pipe: Splice, direction: int) -> None:
        self.pipe: Splice | None = pipe
        self.direction = direction
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.eof = False
        self.bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only look-alikes.
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return read_buffer()  # 64 KiB reads: see edge.reads

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(read_buffer()[:nbytes]))

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None or peer.eof:
            self._close_pipe()
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()  # half-close: the other direction keeps flowing
            return True
        self._close_pipe()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._close_pipe()

    def _close_pipe(self) -> None:
        if self.pipe is not None:  # None: the splice is closed already
            self.pipe.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.eof:
            self.peer.transport.resume_reading()


class Splice:
    """Both directions of one passthrough connection."""

    CLIENT_TO_UPSTREAM = 0
    UPSTREAM_TO_CLIENT = 1

    def __init__(
        self,
        client: asyncio.Transport,
        idle_timeout: float,
        on_close: Callable[[Splice], None],
    ) -> None:
        self.client = _Side(self, self.CLIENT_TO_UPSTREAM)
        self.client.transport = client
        self.upstream = _Side(self, self.UPSTREAM_TO_CLIENT)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self._idle_timeout = idle_timeout
        self._on_close = on_close
        self._deadline: Deadline | None = None
        self._last_total = 0
        self.closed = False
        self.replayed = 0
        """Bytes replayed to the upstream before the splice began (the PROXY header, the hello)."""
        client.pause_reading()
        client.set_protocol(self.client)

    async def connect(self, server: Address, initial: bytes, connect_timeout: float) -> None:
        """Connect, replay ``initial``, start splicing. Raises OSError/TimeoutError."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(connect_timeout):
            await loop.create_connection(lambda: self.upstream, server.host, server.port)
        if self.closed:
            assert self.upstream.transport is not None
            self.upstream.transport.close()
            return
        assert self.upstream.transport is not None and self.client.transport is not None
        self.upstream.transport.write(initial)
        self.replayed = len(initial)
        self.client.transport.resume_reading()
        self._deadline = Deadline(loop, self._check_idle)
        self._deadline.set(self._idle_timeout, Timer.IDLE)

    def _check_idle(self, kind: Timer) -> None:
        # Lazy: counting bytes is free on the hot path; pushing a deadline per chunk is not.
        total = self.client.bytes + self.upstream.bytes
        if total == self._last_total:
            self.close()
        elif self._deadline is not None:
            self._last_total = total
            self._deadline.set(self._idle_timeout, Timer.IDLE)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        for side in (self.client, self.upstream):
            if side.transport is not None:
                side.transport.close()
        self._on_close(self)
        # The sides point at each other and at this object: unlinked, the splice is freed by
        # reference counting at once instead of waiting for a full garbage collection.
        for side in (self.client, self.upstream):
            side.peer = None
            side.pipe = None

    def drain(self) -> None:
        """Shutdown: a splice has no message boundary to stop at; the drain timeout ends it."""

    def retire(self) -> None:
        """A reload: a splice keeps the upstream it was routed to until it ends."""

    def abort(self) -> None:
        """Drain timeout: cut both sides now."""
        for side in (self.client, self.upstream):
            if side.transport is not None:
                side.transport.abort()
        self.close()


def start_passthrough(
    host: Host, transport: asyncio.Transport, route: SniRoute, hello: ClientHello, peer: str, preamble: bytes = b""
) -> Splice:
    """Take over an accepted connection for ``route``: connect, replay the hello, splice.

    ``preamble`` (the route's PROXY v2 header, if it sends one) goes out before the hello."""

    loop = asyncio.get_running_loop()
    started = loop.time()

    def closed(splice: Splice) -> None:
        host.leave(splice, Group.PASSTHROUGH)
        # The client's bytes include its ClientHello, replayed before the splice (not the PROXY
        # header, which is ours): as nginx's $bytes_received counts it.
        from_client = splice.client.bytes + max(0, splice.replayed - len(preamble))
        host.observer.passthrough_closed(route.name, from_client, splice.upstream.bytes, peer, loop.time() - started)
        host.closed(peer)

    splice = Splice(transport, host.config.timeouts.passthrough_idle, closed)
    host.enter(splice, Group.PASSTHROUGH)
    host.observer.passthrough_opened(route.name)
    loop.create_task(_connect(host, splice, route, preamble + hello.raw, peer))
    return splice


async def _connect(host: Host, splice: Splice, route: SniRoute, initial: bytes, peer: str) -> None:
    """Replay the hello to the first upstream server that answers; else close the client."""
    try:
        upstream = host.config.upstream(route.upstream or "")
        if upstream is None:  # validate() rules it out; treated as an unreachable upstream
            host.observer.upstream_error(route.name, f"no upstream named {route.upstream!r}", peer)
            splice.close()
            return
        timeout = host.config.timeouts.connect
        try:
            await first_that_answers(upstream.servers, lambda server: splice.connect(server, initial, timeout))
        except (OSError, TimeoutError) as exc:
            if out_of_descriptors(exc):  # the proxy's shortage: the upstream's health is unknown
                host.observer.descriptors_exhausted("upstream", str(exc))
            else:
                host.pool.mark(upstream.name, False)
                # Filed under the upstream, as an HTTP route's failure is: its status-page row
                # and its health are the upstream's; the route is in the detail.
                host.observer.upstream_error(upstream.name, f"passthrough connect failed ({route.name}): {exc!r}", peer)
            splice.close()
            return
        host.pool.mark(upstream.name, True)
    except Exception as exc:  # a bug: close this connection, never an unretrieved task error
        host.observer.bug(exc, peer)
        splice.abort()
