"""A per-connection deadline that costs nothing to push back.

Connections see activity on every read; re-arming an event-loop timer each time would cost a
heap operation per chunk. Instead the timer stays armed and, when it fires early (the deadline
has moved on since), it re-arms itself for the new time. Moving a deadline *earlier* (a shorter
timeout for the next phase) re-arms at once, so a timer never fires late.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Callable


_NEVER = float("inf")


class Timer(enum.Enum):
    """What a connection is waiting for when its deadline passes."""

    HANDSHAKE = "handshake"
    IDLE = "idle"
    """Quiet: pushed back by every byte (HTTP keep-alive, tunnel, passthrough splice)."""
    HEAD = "head"
    """A partial request head: fixed, more bytes do not push it back."""
    BODY = "body"
    """A request in progress, head received or not: fixed from its first byte (``request_body``),
    so a body trickled a byte at a time cannot hold an upstream connection forever."""
    RESPONSE = "response"
    PING = "ping"
    """WebSocket quiet: ping both legs when it passes."""
    PONG = "pong"
    CLOSING = "closing"
    """A WebSocket session's end has begun: the legs owe their Close replies within this fixed
    bound (``ping_timeout``), which traffic does not push back; then the session is cut."""


class Deadline:
    """When the connection's current phase times out, and what that phase is called."""

    __slots__ = ("_loop", "_on_expiry", "when", "kind", "_handle", "_armed")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expiry: Callable[[Timer], None]) -> None:
        self._loop = loop
        self._on_expiry = on_expiry
        self.when = 0.0
        self.kind: Timer | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._armed = _NEVER
        """When the armed timer fires (``_NEVER`` without one): ``set`` compares with it instead
        of asking the handle (a method call; a new connection sets its deadline six times)."""

    def set(self, seconds: float, kind: Timer) -> None:
        """A new deadline ``seconds`` from now for phase ``kind``."""
        self.when = when = self._loop.time() + seconds
        self.kind = kind
        if when < self._armed:
            if self._handle is not None:
                self._handle.cancel()
            self._armed = when
            self._handle = self._loop.call_at(when, self._fire)

    def push(self, seconds: float) -> None:
        """Activity: the same phase now ends ``seconds`` from now (no timer work)."""
        self.when = self._loop.time() + seconds

    def touch(self, quiet: float) -> None:
        """Activity pushes a quiet deadline (IDLE, PING) ``quiet`` seconds out; the others
        (HANDSHAKE, HEAD, BODY, RESPONSE, PONG) are fixed and stay."""
        if self.kind is Timer.IDLE or self.kind is Timer.PING:
            self.when = self._loop.time() + quiet

    def switch(self, current: Timer, kind: Timer, seconds: float) -> None:
        """``set(seconds, kind)``, but only while the deadline is ``current``."""
        if self.kind is current:
            self.set(seconds, kind)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._armed = _NEVER
        self.kind = None

    def close(self) -> None:
        """Cancel for good and let go of the callback: it is usually a bound method of the
        owner, and that cycle would keep a closed connection in memory until a full garbage
        collection, which then has to walk every live connection too."""
        self.cancel()
        self._on_expiry = _ignore

    def take_over(self, on_expiry: Callable[[Timer], None]) -> Deadline:
        """The same deadline for a new owner: accept hands the ClientHello's to the terminated
        connection, which sets the handshake's on it (one timer per connection, not two)."""
        self._on_expiry = on_expiry
        return self

    def _fire(self) -> None:
        self._handle, self._armed = None, _NEVER
        kind = self.kind
        if kind is None:
            return
        if self._loop.time() < self.when - 0.001:
            self._armed = self.when
            self._handle = self._loop.call_at(self.when, self._fire)
            return
        self.kind = None
        self._on_expiry(kind)


def _ignore(kind: Timer) -> None:
    """The callback of a closed deadline."""
