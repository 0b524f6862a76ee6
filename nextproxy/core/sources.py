"""Source-address matching for ``allow_sources`` lists and PROXY protocol ``trusted`` networks.

A dual-stack listener reports IPv4 clients as IPv4-mapped IPv6 (``::ffff:203.0.113.7``);
an operator writes ``203.0.113.0/24``. Both are normalised to plain IPv4 before matching, so
one list works whatever socket family the listener uses, and a mapped address can never slip
past an IPv4 rule (or an IPv6 rule for ``::ffff:0:0/96`` past an IPv4 client).

Pure computation over ``ipaddress``: no I/O, no DNS (a list holds networks, never names).
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

IpAddress = IPv4Address | IPv6Address
IpNetwork = IPv4Network | IPv6Network

_MAPPED = IPv6Network("::ffff:0:0/96")


def normalise_address(address: str | IpAddress) -> IpAddress:
    """The address with an IPv4-mapped IPv6 form turned into IPv4 and any %scope dropped.

    Raises ValueError for text that is not an IP address.
    """
    ip = ip_address(address.split("%", 1)[0]) if isinstance(address, str) else address
    if isinstance(ip, IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:
            return IPv6Address(int(ip))
    return ip


def normalise_network(network: str | IpNetwork) -> IpNetwork:
    """The network, with ``::ffff:a.b.c.d/96+n`` turned into ``a.b.c.d/n``.

    Text must be strict (no host bits set: ``10.0.0.1/8`` is refused, as it is usually a typo
    for a host or a smaller network). Raises ValueError.
    """
    net = ip_network(network, strict=True) if isinstance(network, str) else network
    if isinstance(net, IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        mapped = net.network_address.ipv4_mapped
        assert mapped is not None  # inside ::ffff:0:0/96 by the check above
        return IPv4Network((mapped, net.prefixlen - 96))
    return net


class SourceMatcher:
    """Does an address fall in any of a fixed set of networks?

    An empty matcher matches nothing: "allow nobody" must be said on purpose, so callers
    represent "no restriction" by having no matcher at all.
    """

    __slots__ = ("networks", "_v4", "_v6")

    def __init__(self, networks: Iterable[str | IpNetwork]) -> None:
        self.networks: tuple[IpNetwork, ...] = tuple(normalise_network(n) for n in networks)
        # Integer ranges: a few comparisons per network instead of building objects per check.
        self._v4 = tuple(_span(n) for n in self.networks if isinstance(n, IPv4Network))
        self._v6 = tuple(_span(n) for n in self.networks if isinstance(n, IPv6Network))

    def __contains__(self, address: str | IpAddress) -> bool:
        """True if ``address`` (normalised) is inside one of the networks.

        An IPv4 client also matches an IPv6 network that contains its mapped form (``::/0``
        means every client). Text that is not an address matches nothing.
        """
        try:
            ip = normalise_address(address)
        except ValueError:
            return False
        value = int(ip)
        if isinstance(ip, IPv4Address):
            if any(low <= value <= high for low, high in self._v4):
                return True
            value |= 0xFFFF << 32  # the mapped form, for IPv6 rules that cover it
        return any(low <= value <= high for low, high in self._v6)

    def __repr__(self) -> str:
        return f"SourceMatcher({[str(n) for n in self.networks]!r})"


def _span(network: IpNetwork) -> tuple[int, int]:
    return int(network.network_address), int(network.broadcast_address)
