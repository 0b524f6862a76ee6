"""The accept path of one listening socket: fast when all is well, careful when it is not.

Two ways to accept, one at a time:

- **native**: uvloop's own server (libuv accepts in C and makes the transport) on a duplicate of
  the listening descriptor. A connection costs ~50 µs less CPU than accepting in Python and
  handing the socket to ``loop.connect_accepted_socket`` (a task, a future and several loop
  turns per connection, measured with a trivial protocol). It is used whenever it can be.
- **polled**: our own loop on the listening socket (``add_reader``, ``accept``), for the two
  situations libuv handles the wrong way for an edge. Past ``limits.max_handshakes`` the socket
  must simply not be read, so new connections wait in the kernel's backlog; and on EMFILE libuv
  accepts and closes whatever waits (its "emfile trick": clients see a reset, no log line),
  where this loop backs off for ``ACCEPT_BACKOFF`` and recovers by itself, counted and logged.

Switching is cheap because both read the same socket: closing the native server closes only its
duplicate descriptor, and the backlog stays. libuv accepts everything pending in one go and calls
the protocols afterwards, so native accepting cannot stop exactly at a cap; it is therefore used
only while fewer than half of ``max_handshakes`` are in progress, and the polled loop, which checks
before every accept, takes the rest of the way (only a burst of more than half the cap arriving
within one loop turn could overshoot it). Native is also left when an accepted descriptor's number
comes within ``HEADROOM`` of the open-file limit, so that EMFILE finds the careful loop (the limit
is read per connection: an operator may lower it on a running process). Polled goes back to native
once handshakes are below a quarter of the cap and descriptors are plentiful. Either way the
per-address and global caps are checked before the connection's protocol exists.
"""

from __future__ import annotations

import asyncio
import errno
import resource
import socket
from typing import Callable, cast

from nextproxy.edge.admission import Admission
from nextproxy.edge.observer import EdgeObserver

ACCEPT_BATCH = 64
"""Connections accepted per readiness callback: enough to empty a burst, short enough that one
callback cannot starve established connections."""
ACCEPT_BACKOFF = 0.25
"""Seconds to stop accepting after EMFILE/ENFILE: descriptors free up as connections close."""
EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""Errors that say the process (or the system) is out of descriptors or socket memory."""
HEADROOM = 64
"""Native accepting stops when an accepted descriptor's number is this close to the open-file
limit (polled accepting handles EMFILE without resetting anyone); it resumes below twice this."""
TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})
"""The one connection went away before we took it, or a firewall refused it: try the next."""


def out_of_descriptors(exc: BaseException) -> bool:
    """True for EMFILE/ENFILE and the like: the proxy's own shortage, never the peer's fault."""
    return isinstance(exc, OSError) and exc.errno in EXHAUSTION


ProtocolFactory = Callable[[str], asyncio.Protocol]
"""Makes the protocol of a connection admitted from a client address."""


class Acceptor:
    """Reads one listening socket and hands admitted connections to ``factory``'s protocols."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, factory: ProtocolFactory,
        admission: Admission, observer: Callable[[], EdgeObserver],
        balancer: Callable[[str], bool] = lambda address: False, backlog: int = 1024,
    ) -> None:  # fmt: skip
        self._loop = loop
        self.sock = sock
        self._factory = factory
        self._admission = admission
        self._observer = observer  # the current runtime's: it is swapped on reload
        self._balancer = balancer
        """True for a trusted load balancer's address: no per-address cap until its header."""
        self._backlog = backlog
        self._reading = False
        """Polled accepting is on (``add_reader``)."""
        self._native: asyncio.AbstractServer | None = None
        self._starting = False
        """A native server is being created (``_go_native``)."""
        self._native_ok = type(loop).__module__.startswith("uvloop")
        """Native accepting needs uvloop's server (its EMFILE behaviour is the one handled here)."""
        self._closed = False
        self._backoff: asyncio.TimerHandle | None = None

    @property
    def native(self) -> bool:
        """Accepting through uvloop's server right now (for tests and the curious)."""
        return self._native is not None

    def start(self) -> None:
        self._resume()

    def close(self) -> None:
        """Stop accepting for good and close the socket (drain, exit)."""
        self._closed = True
        self._pause()
        if self._backoff is not None:
            self._backoff.cancel()
        self.sock.close()

    def handshakes_fell(self) -> None:
        """``Admission`` callback: below ``max_handshakes`` again, so accept again."""
        if self._backoff is None:
            self._resume()

    def _native_fits(self, share: int) -> bool:
        """Native accepting may run: uvloop, and fewer handshakes than ``1/share`` of the cap."""
        return self._native_ok and self._admission.handshakes < self._admission.limits.max_handshakes // share

    def _resume(self, polled: bool = False) -> None:
        """Accept again: natively when it fits (and not asked for polled), else polled."""
        if self._closed or self._reading or self._native is not None or self._starting:
            return
        if not polled and self._native_fits(2):
            self._starting = True
            self._loop.create_task(self._go_native())
        else:
            self._reading = True
            self._loop.add_reader(self.sock.fileno(), self._ready)

    async def _go_native(self) -> None:
        try:
            server = await self._loop.create_server(self._native_protocol, sock=self.sock.dup(), backlog=self._backlog)
        except Exception as exc:  # never expected; accepting must go on regardless
            self._starting = False
            self._native_ok = False
            self._observer().bug(exc, "-")
            self._resume()
            return
        self._starting = False
        if self._closed or self._reading or not self._native_fits(2):
            server.close()  # closed, switched or filling up while the server was being made
            self._resume(polled=True)  # which pauses (and says so) if handshakes are full
            return
        self._native = server

    def _pause(self) -> None:
        """Stop reading the listening socket either way (the kernel's backlog holds the rest)."""
        if self._native is not None:
            self._native.close()  # closes the duplicate descriptor only
            self._native = None
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self.sock.fileno())

    # native: uvloop made the transport; admit its client, then hand it to the real protocol

    def _native_protocol(self) -> asyncio.Protocol:
        return _Admit(self)

    def _native_made(self, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "-"
        protocol = self._protocol_for(address, transport.close)
        if protocol is not None:
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
        if self._native is None:
            return  # already switched by an earlier connection of the same burst
        sock = transport.get_extra_info("socket")
        if not self._native_fits(2) or (sock is not None and _near_limit(sock.fileno(), HEADROOM)):
            self._pause()  # the polled loop stops exactly at the cap and survives EMFILE
            self._resume(polled=True)

    # polled: our own accept loop

    def _ready(self) -> None:
        admission = self._admission
        for _ in range(ACCEPT_BATCH):
            if admission.handshakes_full:
                self._pause()
                self._observer().accept_paused("max_handshakes")
                return
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in TRANSIENT:
                    continue
                self._pause()
                self._backoff = self._loop.call_later(ACCEPT_BACKOFF, self._backed_off)
                if exc.errno in EXHAUSTION:
                    self._observer().descriptors_exhausted("accept", str(exc))
                else:  # unknown: still back off rather than spin, and say what it was
                    self._observer().bug(exc, "-")
                return
            plenty = self._native_fits(4) and not _near_limit(conn.fileno(), 2 * HEADROOM)
            self._admitted(conn, str(address[0]))
            if plenty and self._reading:
                self._pause()  # descriptors are plentiful again: back to the fast path
                self._resume()
                return

    def _backed_off(self) -> None:
        self._backoff = None
        if not self._admission.handshakes_full:
            self._resume(polled=True)  # the shortage may last: the polled loop finds out
        # else: handshakes_fell() resumes once one finishes

    def _admitted(self, conn: socket.socket, address: str) -> None:
        # Before any transport exists: a refusal costs an accept and a close. Non-blocking and
        # TCP_NODELAY are the transport's to set (uvloop's and asyncio's both do).
        protocol = self._protocol_for(address, conn.close)
        if protocol is not None:
            self._loop.create_task(self._connect(conn, protocol, address))

    def _protocol_for(self, address: str, drop: Callable[[], None]) -> asyncio.Protocol | None:
        """Admit a connection from ``address`` and make its protocol, or ``drop`` it (refused,
        or the factory failed: then counted out again) and return None."""
        refusal = self._admission.admit(address, capped=not self._balancer(address))
        if refusal is not None:
            drop()
            self._observer().connection_refused(refusal.value)
            return None
        try:
            return self._factory(address)
        except Exception:
            drop()
            self._admission.release(address)
            self._admission.handshake_over()
            raise

    async def _connect(self, conn: socket.socket, protocol: asyncio.Protocol, address: str) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: protocol, conn)
        except Exception as exc:  # the peer reset at once, or fds ran out making the transport
            conn.close()
            if not getattr(protocol, "made", True):  # connection_made never ran: count it out here
                self._admission.release(address)
                self._admission.handshake_over()
            if out_of_descriptors(exc):
                self._observer().descriptors_exhausted("accept", str(exc))


class _Admit(asyncio.Protocol):
    """A native connection's first protocol: only until ``connection_made`` hands it over."""

    __slots__ = ("_acceptor",)

    def __init__(self, acceptor: Acceptor) -> None:
        self._acceptor = acceptor

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only look-alikes.
        self._acceptor._native_made(cast(asyncio.Transport, transport))


def _near_limit(fd: int, headroom: int) -> bool:
    """The descriptor's number is within ``headroom`` of the open-file limit (read each time:
    it can be changed from outside, e.g. with prlimit)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft != resource.RLIM_INFINITY and fd >= soft - headroom
