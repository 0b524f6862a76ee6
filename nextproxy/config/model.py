"""Configuration: frozen dataclasses, loaded from a TOML file or from the NEXTPROXY_* preset.

This module holds the types and the whole-configuration checks; ``values`` parses single
values, ``preset`` builds the preset from the environment and ``toml`` reads files.

The TOML file is the general model (listeners, certificates, SNI routes, path routes,
upstreams, timeouts, limits); the environment preset builds one instance of it. Loading is
strict: an unknown key, a bad value, a missing secret or both forms of one secret raise a
``ConfigError`` whose one-line message names the variable or key. Certificates are read here
(as PEM bytes) but parsed in ``nextproxy.edge.tlscontexts``; this module never imports ``ssl``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from nextproxy.errors import ConfigError

SECONDS = 1.0
KiB = 1024
MiB = 1024 * KiB


class ClientAuth(enum.Enum):
    """Whether a terminated SNI route asks for, and insists on, a client certificate."""

    NONE = "none"
    OPTIONAL = "optional"
    REQUIRE_ANY = "require-any"
    REQUIRE_CA = "require-ca"


class WebSocketMode(enum.Enum):
    """``frames`` relays WebSocket frames with wsproto on both legs; ``tunnel`` splices bytes."""

    FRAMES = "frames"
    TUNNEL = "tunnel"


class EncodedSlashes(enum.Enum):
    """``%2F`` / ``%5C`` inside a routed path: ``forward`` them unchanged (nginx's, HAProxy's and
    Envoy's default), or ``reject`` the request with 400 for upstreams that decode them."""

    FORWARD = "forward"
    REJECT = "reject"


class SniAction(enum.Enum):
    PASSTHROUGH = "passthrough"
    TERMINATE = "terminate"


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PemSource:
    """PEM text and where it came from (so errors and reloads can name it)."""

    pem: bytes
    origin: str
    """The variable or key that supplied it, e.g. ``NEXTPROXY_TLS_KEY_FILE``."""
    path: str | None = None
    """The file it was read from, if any; reloads re-read and poll it."""

    def __repr__(self) -> str:  # never print key material
        return f"PemSource(origin={self.origin!r}, path={self.path!r})"


@dataclass(frozen=True, slots=True)
class CertificateConfig:
    certificate: PemSource
    key: PemSource


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One allow-list entry: ``sha256`` (DER fingerprint), ``spki``, ``dns``, ``uri`` or ``cn``."""

    kind: str
    value: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """Re-encryption to an upstream: TLS 1.3, certificate and host name verified."""

    ca_file: str | None = None
    """CA bundle to verify the upstream with; the system store when unset."""
    client_certificate: CertificateConfig | None = None
    """Presented to upstreams that ask for a client certificate."""
    server_name: str | None = None
    """SNI and verified name; defaults to the server's host."""
    ca_file_key: str = "upstream_tls.ca_file"
    """The setting that named ``ca_file`` (a TOML key or NEXTPROXY_UPSTREAM_CA_FILE), so that a
    bundle OpenSSL refuses when the contexts are built is reported under the user's name for it."""


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """A token bucket per client: ``requests_per_second`` on average, ``burst`` back to back."""

    requests_per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class ListenerPolicy:
    """What a listen address asks of the peers that connect to it (TOML ``listen`` tables)."""

    address: Address
    proxy_protocol_trusted: tuple[str, ...] | None = None
    """Networks (CIDR text) whose connections must start with a PROXY protocol header (v1 or
    v2); their header's source is the client. Every other peer must not send one."""
    new_connections_per_second: float | None = None
    """New connections per second per client address (burst: one second's worth); over it the
    connection is closed at accept."""


PROXY_PROTOCOL_V2 = "v2"
"""The one PROXY protocol version the proxy sends (binary, with AUTHORITY and ALPN TLVs)."""


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    servers: tuple[Address, ...]
    tls: UpstreamTls | None = None
    proxy_protocol: str | None = None
    """``"v2"``: every connection starts with a PROXY v2 header naming the client; such
    connections carry one client each and are never pooled."""


@dataclass(frozen=True, slots=True)
class PathRoute:
    name: str
    """Bounded metric label and log field."""
    prefix: str
    """Matched as a prefix on a segment boundary: ``/a`` matches ``/a``, ``/a/b``, ``/a?q``."""
    upstream: str
    websocket: WebSocketMode = WebSocketMode.FRAMES
    max_message_size: int = 16 * MiB
    ping_interval: float = 20 * SECONDS
    ping_timeout: float = 20 * SECONDS
    allow: tuple[AllowRule, ...] | None = None
    """When set, a request needs a client certificate matching one rule, else 403."""
    encoded_slashes: EncodedSlashes = EncodedSlashes.FORWARD
    """What to do with ``%2F``/``%5C`` in the path (dot segments and targets that would match
    another route once decoded are refused either way)."""
    allow_sources: tuple[str, ...] | None = None
    """When set, only clients from these networks (CIDR text) may use the route, else 403."""
    rate_limit: RateLimitConfig | None = None
    """Requests (and WebSocket upgrades) per client; over it 429 with Retry-After."""


@dataclass(frozen=True, slots=True)
class SniRoute:
    name: str
    server_names: tuple[str, ...]
    action: SniAction
    upstream: str | None = None
    """Passthrough: where the raw TCP goes. Terminate: every path goes there (else the path routes)."""
    client_auth: ClientAuth = ClientAuth.NONE
    client_ca_file: str | None = None
    allow: tuple[AllowRule, ...] | None = None
    forward_client_cert_chain: bool = False
    """Also send the client's intermediates upstream as ``Client-Cert-Chain`` (RFC 9440)."""
    allow_sources: tuple[str, ...] | None = None
    """When set, clients from other networks are refused at accept, before any upstream
    connect: passthrough closes, terminate answers with an ``access_denied`` alert."""
    proxy_protocol: str | None = None
    """Passthrough only: ``"v2"`` sends a PROXY v2 header (client, SNI, ALPN) before the hello."""
    rate_limit: RateLimitConfig | None = None
    """Terminate with an upstream only: the requests limit of the route all paths go to."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    client_hello: float = 10 * SECONDS
    """Time a client may take to send its whole ClientHello."""
    handshake: float = 10 * SECONDS
    """Time from the ClientHello to a finished TLS handshake."""
    connect: float = 5 * SECONDS
    """Upstream TCP (and TLS) connect."""
    upstream_response: float = 60 * SECONDS
    """From the end of the request to the upstream's response head; then 504."""
    client_idle: float = 60 * SECONDS
    """A keep-alive client connection with no request in flight, and any stalled read/write."""
    request_head: float = 30 * SECONDS
    """From a request's first byte to the end of its head, however slowly it trickles in:
    a client cannot hold a connection by sending one header byte at a time (slowloris)."""
    request_body: float = 300 * SECONDS
    """From the end of a request head to the end of its body, however slowly it trickles in;
    then 408 and close (the upstream connection is closed too). A total bound, not an idle one:
    a body sent one byte every few seconds must not hold an upstream connection forever. Raise
    it for large uploads over slow links."""
    passthrough_idle: float = 3600 * SECONDS
    """A passthrough connection with no bytes either way."""
    pool_idle: float = 4 * SECONDS
    """Pooled upstream connections are dropped after this; below Python servers' 5 s."""
    drain: float = 30 * SECONDS
    """On SIGTERM, how long in-flight work may take before we exit anyway."""
    shutdown_delay: float = 0 * SECONDS
    """On SIGTERM, readiness fails at once but listeners stay open this long."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_client_hello: int = 132 * KiB
    """Bytes of ClientHello records, headers included: OpenSSL's 131,396-byte hello fits in full-size records."""
    max_header_size: int = 32 * KiB
    """Request line plus headers; larger gets 431."""
    max_upstream_header_size: int = 64 * KiB
    """Upstream response head; larger gets 502."""
    max_connections: int = 20000
    """Per worker, every connection of the process (those still served by a configuration that a
    reload replaced included); above it new connections are closed at accept."""
    max_connections_per_ip: int = 256
    """Per worker and client address: one address cannot take every slot of ``max_connections``."""
    max_handshakes: int = 512
    """ClientHellos and TLS handshakes in progress, per worker. Above it the listener stops
    accepting, so new connections wait in the kernel's backlog (not in Python memory) and
    established clients keep their latency during a handshake flood."""
    pool_size: int = 64
    """Idle pooled connections kept per upstream server."""


@dataclass(frozen=True, slots=True)
class Config:
    listen: Address
    admin_listen: Address
    certificates: tuple[CertificateConfig, ...]
    upstreams: tuple[Upstream, ...]
    routes: tuple[PathRoute, ...]
    sni_routes: tuple[SniRoute, ...] = ()
    admin_tls: CertificateConfig | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    workers: int = 1
    log_level: str = "info"
    log_format: str = "json"
    source: str = "environment preset"
    listen_also: tuple[Address, ...] = ()
    """More edge addresses serving the same routes (TOML ``listen`` given as a list)."""
    listener_policies: tuple[ListenerPolicy, ...] = ()
    """PROXY protocol and connection-rate settings, for the listen addresses that have any."""
    max_connections_given: bool = False
    """``limits.max_connections`` was set (even to the default): it is then never lowered to fit
    the open-file limit, and a start that cannot honour it is refused instead."""

    def listener_policy(self, address: Address) -> ListenerPolicy:
        """The settings of one listen address (none set: a policy with nothing in it)."""
        for policy in self.listener_policies:
            if policy.address == address:
                return policy
        return ListenerPolicy(address)

    def key_name(self, key: str) -> str:
        """How the user named the top-level setting ``key`` (``listen``, ``admin_listen``): its
        ``NEXTPROXY_`` variable under the environment preset, else the TOML key. Errors found
        after loading (an address in use) must name what the user actually set."""
        return f"NEXTPROXY_{key.upper()}" if self.source == "environment preset" else key

    def upstream(self, name: str) -> Upstream | None:
        """The upstream called ``name``; None if there is none (``validate`` makes sure every
        route's upstream exists, so for a loaded configuration that means a name from elsewhere)."""
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        return None


def allow_list_warnings(config: Config) -> list[str]:
    """Client-certificate allow-lists where no certificate is ever asked for: every request
    gets 403 no_certificate. Legal (a name closed to everyone), but more often a forgotten
    client_auth: ``check`` prints these and ``run`` logs them (``config_warning``)."""
    asking = [s for s in config.sni_routes if s.action is SniAction.TERMINATE and s.client_auth is not ClientAuth.NONE]
    warnings = [
        f"sni_routes.{sni.name}.allow: no client certificate is requested on this name (client_auth is none): "
        "every request is refused"
        for sni in config.sni_routes
        if sni.allow is not None and sni.action is SniAction.TERMINATE and sni.client_auth is ClientAuth.NONE
    ]
    if not any(s.upstream is None for s in asking):  # path routes are reached by such names only
        warnings += [
            f"routes.{route.name}.allow: no connection reaching this route is asked for a client certificate "
            "(set client_auth on a terminating sni_route that serves the path routes): every request is refused"
            for route in config.routes
            if route.allow is not None
        ]
    return warnings


def validate(config: Config) -> None:
    """Checks that need the whole configuration: names resolve and are unique."""
    upstream_names = {u.name for u in config.upstreams}
    if len(upstream_names) != len(config.upstreams):
        raise ConfigError("upstreams", "duplicate upstream name")
    route_names: set[str] = set()
    prefixes: set[str] = set()
    for route in config.routes:
        if route.upstream not in upstream_names:
            raise ConfigError(f"routes.{route.name}.upstream", f"no upstream named {route.upstream!r}")
        if route.name in route_names:
            raise ConfigError(f"routes.{route.name}", "duplicate route name")
        if route.prefix in prefixes:
            raise ConfigError(f"routes.{route.name}.path", f"{route.prefix!r} is already routed")
        route_names.add(route.name)
        prefixes.add(route.prefix)
    server_names: set[str] = set()
    for sni in config.sni_routes:
        if sni.upstream is not None and sni.upstream not in upstream_names:
            raise ConfigError(f"sni_routes.{sni.name}.upstream", f"no upstream named {sni.upstream!r}")
        if sni.name in route_names:
            raise ConfigError(f"sni_routes.{sni.name}", "duplicate route name")
        route_names.add(sni.name)
        for name in sni.server_names:
            if name in server_names:
                raise ConfigError(f"sni_routes.{sni.name}.server_names", f"{name!r} is already routed")
            server_names.add(name)
    edges = (config.listen, *config.listen_also)
    if config.admin_listen in edges and config.admin_listen.port != 0:
        raise ConfigError("admin_listen", f"same address as listen ({config.admin_listen})")
    if len(set(edges)) != len(edges):
        raise ConfigError("listen", "the same address is listed twice")
