"""What one listen address checks before a ClientHello is read: PROXY protocol trust and the
per-client new-connection rate (``ListenerPolicy``), with the state those checks keep.

Built once per listen address and configuration (``edge.listener.build_runtime``); the token
buckets live here, so they are per worker and start empty after a reload.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from nextproxy.config.model import ListenerPolicy
from nextproxy.config.values import default_burst
from nextproxy.core.admission import source_allowed
from nextproxy.core.proxyprotocol import Endpoint
from nextproxy.core.ratelimit import KeyedRateLimiter, RateLimit
from nextproxy.core.sources import SourceMatcher, normalise_address


@dataclass(slots=True, eq=False)
class ListenerGate:
    """One listen address's accept-time policy; ``name`` (its address) is the metric label."""

    name: str
    trusted: SourceMatcher | None
    connections: KeyedRateLimiter | None

    @classmethod
    def build(cls, policy: ListenerPolicy) -> ListenerGate:
        trusted = SourceMatcher(policy.proxy_protocol_trusted) if policy.proxy_protocol_trusted is not None else None
        limiter = None
        if policy.new_connections_per_second is not None:
            rate = policy.new_connections_per_second
            limiter = KeyedRateLimiter(RateLimit(rate, default_burst(rate)))
        return cls(str(policy.address), trusted, limiter)

    def must_send_header(self, peer: str) -> bool:
        """The peer is a trusted balancer: its connections must start with a PROXY header."""
        return self.trusted is not None and source_allowed(self.trusted, peer)

    def admits(self, peer: str, now: float) -> bool:
        """One new connection from client ``peer`` at ``now`` is within the listener's rate."""
        return self.connections is None or self.connections.check(peer, now).allowed


def endpoint(sockaddr: object) -> Endpoint | None:
    """A socket address tuple as an ``Endpoint`` (IPv4-mapped and scoped forms normalised)."""
    if not isinstance(sockaddr, tuple) or len(sockaddr) < 2:
        return None
    try:
        return Endpoint(normalise_address(str(sockaddr[0])), int(sockaddr[1]))
    except ValueError:
        return None


def socket_endpoints(transport: asyncio.BaseTransport) -> tuple[Endpoint, Endpoint] | None:
    """A connection's client and local address from its socket, for a PROXY header we send.
    Worked out only when one is sent (parsing both costs ~5 µs a connection)."""
    source, destination = endpoint(transport.get_extra_info("peername")), endpoint(transport.get_extra_info("sockname"))
    return (source, destination) if source is not None and destination is not None else None
