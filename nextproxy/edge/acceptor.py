"""Our own accept loop on a listening socket: it can pause, and it survives running out of fds.

``loop.create_server`` cannot pause accepting, and uvloop's server (libuv) meets EMFILE by
accepting and closing whatever waits in the backlog (the "emfile trick": resets, no log line),
or by closing the listening socket for good when that fails. Reading the listening socket
ourselves gives the two behaviours an edge needs:

- past ``limits.max_handshakes`` (``Admission``) the socket is simply not read: new connections
  wait in the kernel's backlog, costing no Python memory and no event-loop time, and
  established clients keep their latency during a handshake flood;
- on EMFILE/ENFILE (and ENOBUFS/ENOMEM) accepting backs off for ``ACCEPT_BACKOFF`` and then
  retries: no spinning on a readable socket it cannot accept from, no crash, and recovery on its
  own when descriptors free up. Each occurrence is reported (counted, logged once per interval).

Each accepted socket becomes a transport through ``loop.connect_accepted_socket`` (a task per
connection, as asyncio's own selector loop does); the per-address and global caps are checked
before that, so a refused connection costs one accept and one close.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Callable

from nextproxy.edge.admission import Admission
from nextproxy.edge.observer import EdgeObserver

ACCEPT_BATCH = 64
"""Connections accepted per readiness callback: enough to empty a burst, short enough that one
callback cannot starve established connections."""
ACCEPT_BACKOFF = 0.25
"""Seconds to stop accepting after EMFILE/ENFILE: descriptors free up as connections close."""
EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""Errors that say the process (or the system) is out of descriptors or socket memory."""
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
        balancer: Callable[[str], bool] = lambda address: False,
    ) -> None:  # fmt: skip
        self._loop = loop
        self.sock = sock
        self._factory = factory
        self._admission = admission
        self._observer = observer  # the current runtime's: it is swapped on reload
        self._balancer = balancer
        """True for a trusted load balancer's address: no per-address cap until its header."""
        self._reading = False
        self._closed = False
        self._backoff: asyncio.TimerHandle | None = None

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
        if not self._reading and self._backoff is None and not self._closed:
            self._resume()

    def _resume(self) -> None:
        if not self._reading and not self._closed:
            self._reading = True
            self._loop.add_reader(self.sock.fileno(), self._ready)

    def _pause(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self.sock.fileno())

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
            self._admitted(conn, str(address[0]))

    def _backed_off(self) -> None:
        self._backoff = None
        if not self._admission.handshakes_full:
            self._resume()
        # else: handshakes_fell() resumes once one finishes

    def _admitted(self, conn: socket.socket, address: str) -> None:
        refusal = self._admission.admit(address, capped=not self._balancer(address))
        if refusal is not None:
            conn.close()  # before any transport or protocol exists: a refusal costs next to nothing
            self._observer().connection_refused(refusal.value)
            return
        # Non-blocking and TCP_NODELAY are the transport's to set: uvloop's does both when it
        # opens the socket (asyncio's too). Setting them here as well cost two syscalls.
        try:
            protocol = self._factory(address)
        except Exception:
            conn.close()
            self._admission.release(address)
            self._admission.handshake_over()
            raise
        self._loop.create_task(self._connect(conn, protocol, address))

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
