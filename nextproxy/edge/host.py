"""What a connection sees of the listener that accepted it: a small Protocol, not the listener.

The listener (``edge.listener.Runtime``) owns the registry of live connections and the facts
they share (configuration, routes, TLS contexts, upstream pool, observer, draining). Accept,
passthrough and terminated connections reach it only through ``Host``, so none of them imports
the listener and the listener can import all of them without a cycle.
"""

from __future__ import annotations

import enum
from typing import Protocol

from nextproxy.config.model import Config
from nextproxy.core.routing import RouteTable
from nextproxy.edge.admission import Admission
from nextproxy.edge.observer import EdgeObserver
from nextproxy.edge.tlscontexts import ServerContexts
from nextproxy.edge.upstream import UpstreamPool
from nextproxy.edge.writes import TurnWrites


class Group(enum.Enum):
    """Which registry set a connection is counted in."""

    PENDING = "pending"
    """Its ClientHello is still being read."""
    TERMINATED = "terminated"
    WEBSOCKET = "websocket"
    """A terminated connection relaying a WebSocket session, frames or tunnel (also counted as
    TERMINATED)."""
    PASSTHROUGH = "passthrough"

    # Members are singletons, so identity hashes them as well as Enum's own __hash__, which is
    # a Python function (hash of the name): six of those per connection in the registry's dict.
    __hash__ = object.__hash__


class Member(Protocol):
    """A live connection as the listener handles it on shutdown."""

    def drain(self) -> None:
        """Finish what is in flight, refuse what is new."""

    def abort(self) -> None:
        """The drain timeout passed: cut it now."""

    def retire(self) -> None:
        """A reload replaced this member's configuration: an HTTP connection closes after its
        exchange in flight (no more keep-alive on it); anything else goes on as it is."""


class Host(Protocol):
    """The listener's shared facts and its connection registry."""

    @property
    def config(self) -> Config: ...
    @property
    def routes(self) -> RouteTable: ...
    @property
    def contexts(self) -> ServerContexts: ...
    @property
    def pool(self) -> UpstreamPool: ...
    @property
    def observer(self) -> EdgeObserver: ...
    @property
    def draining(self) -> bool: ...
    @property
    def retired(self) -> bool:
        """A reload replaced this runtime: connections it still admits serve one request."""

    @property
    def writes(self) -> TurnWrites:
        """This turn's writes (``edge.writes``): a terminated connection's go through it."""

    @property
    def admission(self) -> Admission:
        """The process-wide counts (shared by every runtime a reload made)."""

    def closed(self, peer: str) -> None:
        """A connection admitted from ``peer`` ended: counted out of the caps, reported once."""

    def enter(self, member: Member, group: Group) -> None: ...

    def leave(self, member: Member, group: Group) -> bool:
        """Remove ``member`` from ``group``; True if it was there (so it is counted once)."""
