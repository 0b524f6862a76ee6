"""Who may come in: the process-wide connection count, per client address, and handshakes.

One ``Admission`` per process, shared by every runtime a reload creates: the caps count every
connection the process holds, not only the current configuration's (a reload used to double
the effective ``max_connections``, and certificate-file changes reload too). The per-address
count keeps one client from taking every slot; the handshake count lets the acceptor stop
accepting while too many ClientHellos and TLS handshakes are in progress, so that a flood waits
in the kernel's backlog instead of in Python memory and in the event loop's time.
"""

from __future__ import annotations

import enum
from typing import Callable

from nextproxy.config.model import Limits


class Refusal(enum.Enum):
    """Why a new connection was closed at accept; also the log's and the metric's label."""

    MAX_CONNECTIONS = "max_connections"
    MAX_CONNECTIONS_PER_IP = "max_connections_per_ip"


class Admission:
    """Counts of what is admitted; the limits are swapped on reload, the counts carry over."""

    __slots__ = ("limits", "total", "per_address", "handshakes", "_on_handshakes")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = 0
        self.per_address: dict[str, int] = {}
        self.handshakes = 0
        """ClientHellos being read plus TLS handshakes not finished."""
        self._on_handshakes: Callable[[], None] = _nothing
        """Called when the handshake count falls below the cap (the acceptor resumes)."""

    def watch_handshakes(self, callback: Callable[[], None]) -> None:
        self._on_handshakes = callback

    def admit(self, address: str, *, capped: bool = True) -> Refusal | None:
        """Count a new connection from ``address`` in, or say why it must be refused.

        ``capped=False`` for a trusted load balancer: its connections carry many clients, each
        counted against the per-address cap once its PROXY header names it (``rekey``)."""
        limits = self.limits
        if self.total >= limits.max_connections:
            return Refusal.MAX_CONNECTIONS
        count = self.per_address.get(address, 0)
        if capped and count >= limits.max_connections_per_ip:
            return Refusal.MAX_CONNECTIONS_PER_IP
        self.per_address[address] = count + 1
        self.total += 1
        self.handshakes += 1
        return None

    def rekey(self, old: str, new: str) -> Refusal | None:
        """Count an admitted connection under ``new`` (the client a PROXY header named) instead of
        ``old`` (the balancer), or say why the client is over its cap (it stays under ``old``)."""
        if old == new:
            return None
        count = self.per_address.get(new, 0)
        if count >= self.limits.max_connections_per_ip:
            return Refusal.MAX_CONNECTIONS_PER_IP
        self._uncount(old)
        self.per_address[new] = count + 1
        return None

    def release(self, address: str) -> None:
        """A counted connection closed (called exactly once per ``admit`` that returned None)."""
        self.total -= 1
        self._uncount(address)

    def _uncount(self, address: str) -> None:
        count = self.per_address.get(address, 0) - 1
        if count > 0:
            self.per_address[address] = count
        else:
            self.per_address.pop(address, None)  # the map holds only addresses with connections

    def handshake_over(self) -> None:
        """A connection admitted by ``admit`` finished (or abandoned) its hello and handshake."""
        self.handshakes -= 1
        if self.handshakes < self.limits.max_handshakes:
            self._on_handshakes()

    @property
    def handshakes_full(self) -> bool:
        return self.handshakes >= self.limits.max_handshakes


def _nothing() -> None:
    """The handshake callback before an acceptor watches."""
