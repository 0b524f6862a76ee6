"""The TOML configuration file: the general model (the preset is one instance of it).

Strict: every table is read key by key and whatever is left is an unknown key, an error that
names it (hypercorn silently ignores unknown keys; we do the opposite).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import replace
from typing import Any, Mapping

from nextproxy.config.model import (
    MiB,
    Address,
    ListenerPolicy,
    RateLimitConfig,
    CertificateConfig,
    ClientAuth,
    Config,
    EncodedSlashes,
    Limits,
    PathRoute,
    PemSource,
    SniAction,
    SniRoute,
    Timeouts,
    Upstream,
    UpstreamTls,
    WebSocketMode,
    validate,
)
from nextproxy.config.preset import process_settings
from nextproxy.config.values import (
    ROUTE_NAME,
    check_file,
    default_burst,
    parse_address,
    parse_networks,
    parse_proxy_protocol_out,
    parse_rate,
    parse_allow,
    parse_enum,
    parse_number,
    parse_server_name,
    read_file,
)
from nextproxy.errors import ConfigError

MIN_TIMEOUT = 0.01
"""Seconds; the smallest timeout or ping interval accepted (tests use fractions of a second)."""

class _Table:
    """A TOML table read key by key; whatever is left unread at the end is an unknown key."""

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(path or "config", "expected a table")
        self.data = dict(data)
        self.path = path

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def take(self, name: str, default: Any = None, kind: type | tuple[type, ...] | None = None) -> Any:
        if name not in self.data:
            return default
        value = self.data.pop(name)
        if kind is not None and not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise ConfigError(self.key(name), f"expected {names}, got {value!r}")
        return value

    def require(self, name: str, kind: type | tuple[type, ...] | None = None) -> Any:
        if name not in self.data:
            raise ConfigError(self.key(name), "missing")
        return self.take(name, kind=kind)

    def sub(self, name: str) -> _Table:
        return _Table(self.take(name, {}, dict), self.key(name))

    def done(self) -> None:
        for name in self.data:
            raise ConfigError(self.key(name), "unknown key")


def _toml_pem(table: _Table, name: str, *, required: bool) -> PemSource | None:
    inline = table.take(name, kind=str)
    path = table.take(name + "_file", kind=str)
    if inline is not None and path is not None:
        raise ConfigError(table.key(name), f"set either {name} or {name}_file, not both")
    if path is not None:
        return PemSource(read_file(table.key(name + "_file"), path), table.key(name + "_file"), path)
    if inline is not None:
        return PemSource(inline.encode(), table.key(name))
    if required:
        raise ConfigError(table.key(name), f"missing: set {name} (PEM) or {name}_file (path)")
    return None


def _toml_pair(table: _Table) -> CertificateConfig:
    cert = _toml_pem(table, "certificate", required=True)
    key = _toml_pem(table, "key", required=True)
    table.done()
    assert cert is not None and key is not None
    return CertificateConfig(cert, key)


def _toml_upstream_tls(table: _Table) -> UpstreamTls:
    ca = table.take("ca_file", kind=str)
    cert = _toml_pem(table, "certificate", required=False)
    key = _toml_pem(table, "key", required=cert is not None)
    if key is not None and cert is None:
        raise ConfigError(table.key("certificate"), "missing: key is set without it")
    server_name = table.take("server_name", kind=str)
    table.done()
    return UpstreamTls(
        ca_file=check_file(table.key("ca_file"), ca) if ca else None,
        client_certificate=CertificateConfig(cert, key) if cert and key else None,
        server_name=parse_server_name(table.key("server_name"), server_name) if server_name else None,
        ca_file_key=table.key("ca_file"),
    )


def from_toml(path: str, env: Mapping[str, str] | None = None, *, named_by: str = "NEXTPROXY_CONFIG") -> Config:
    """Load a TOML configuration file. Process settings still come from the environment.
    ``named_by``: where the path came from (``--config`` or the variable), for its errors."""
    raw = read_file(named_by, path)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(named_by, f"{path}: not valid TOML: {exc}") from None
    root = _Table(data, "")
    listen, listen_also, policies = _toml_listen(root.take("listen", "0.0.0.0:8443", (str, list, dict)))
    admin_listen = parse_address("admin_listen", root.take("admin_listen", "0.0.0.0:9613", str), listen=True)

    tls = root.sub("tls")
    cert_list = tls.take("certificates", None, list)
    if not cert_list:
        raise ConfigError("tls.certificates", "missing: at least one certificate/key pair")
    certificates = tuple(_toml_pair(_Table(c, f"tls.certificates[{i}]")) for i, c in enumerate(cert_list))
    tls.done()
    admin_tls = _toml_pair(root.sub("admin_tls")) if "admin_tls" in root.data else None
    default_upstream_tls = (
        _toml_upstream_tls(root.sub("upstream_tls")) if "upstream_tls" in root.data else UpstreamTls()
    )

    upstreams = [
        _toml_upstream(name, _Table(body, f"upstreams.{name}"), default_upstream_tls)
        for name, body in root.take("upstreams", {}, dict).items()
    ]
    routes = tuple(_toml_route(_Table(r, f"routes[{i}]")) for i, r in enumerate(root.take("routes", [], list)))
    sni_routes = tuple(
        _toml_sni_route(_Table(r, f"sni_routes[{i}]")) for i, r in enumerate(root.take("sni_routes", [], list))
    )
    timeouts = _toml_dataclass(root.sub("timeouts"), Timeouts(), integer=False)
    limits_table = root.sub("limits")
    max_connections_given = "max_connections" in limits_table.data
    limits = _toml_dataclass(limits_table, Limits(), integer=True)
    root.done()
    config = Config(
        listen=listen, listen_also=tuple(listen_also), listener_policies=policies,
        admin_listen=admin_listen, certificates=certificates,
        admin_tls=admin_tls, upstreams=tuple(upstreams), routes=routes, sni_routes=sni_routes,
        timeouts=timeouts, limits=limits, max_connections_given=max_connections_given, source=path, **process_settings(env if env is not None else os.environ),
    )  # fmt: skip
    validate(config)
    return config


def _toml_upstream(name: str, table: _Table, default_tls: UpstreamTls) -> Upstream:
    """``[upstreams.NAME]``: servers, and ``tls`` (the ``[upstream_tls]`` defaults) if set."""
    if not ROUTE_NAME.match(name):
        raise ConfigError(table.path, "name must be letters, digits, '-', '_' or '.'")
    servers = table.require("servers", list)
    if not servers:
        raise ConfigError(table.key("servers"), "needs at least one host:port")
    addresses = tuple(parse_address(table.key("servers"), s if isinstance(s, str) else repr(s)) for s in servers)
    use_tls = table.take("tls", False, bool)
    server_name = table.take("server_name", None, str)
    proxy_protocol = _proxy_protocol_out(table)
    table.done()
    upstream_tls = None
    if use_tls:
        upstream_tls = default_tls
        if server_name:
            upstream_tls = replace(upstream_tls, server_name=parse_server_name(table.key("server_name"), server_name))
    return Upstream(name, addresses, upstream_tls, proxy_protocol)


def _route_name(table: _Table) -> str:
    """A route's name is a metric label and a log field: keep it short and plain."""
    name: str = table.require("name", str)
    if not ROUTE_NAME.match(name):
        raise ConfigError(table.key("name"), f"expected letters, digits, '-', '_' or '.', got {name!r}")
    return name


def _toml_route(table: _Table) -> PathRoute:
    name = _route_name(table)
    prefix = table.require("path", str)
    if not prefix.startswith("/") or any(c in prefix for c in "?#% \\") or "/./" in prefix + "/" or "/../" in prefix + "/":
        raise ConfigError(table.key("path"), f"expected an absolute path without query, '%', dots or spaces, got {prefix!r}")
    if len(prefix) > 1:
        prefix = prefix.rstrip("/")
    route = PathRoute(
        name=name,
        prefix=prefix,
        upstream=table.require("upstream", str),
        websocket=parse_enum(table.key("websocket"), WebSocketMode, table.take("websocket", "frames")),
        max_message_size=parse_number(table.key("max_message_size"), table.take("max_message_size", 16 * MiB), minimum=1, integer=True),
        ping_interval=parse_number(table.key("ping_interval"), table.take("ping_interval", 20.0), minimum=MIN_TIMEOUT),
        ping_timeout=parse_number(table.key("ping_timeout"), table.take("ping_timeout", 20.0), minimum=MIN_TIMEOUT),
        allow=parse_allow(table.key("allow"), table.take("allow", kind=list)) if "allow" in table.data else None,
        encoded_slashes=parse_enum(table.key("encoded_slashes"), EncodedSlashes, table.take("encoded_slashes", "forward")),
        allow_sources=_allow_sources(table),
        rate_limit=_rate_limit(table),
    )
    table.done()
    return route


def _toml_sni_route(table: _Table) -> SniRoute:
    name = _route_name(table)
    names = table.require("server_names", list)
    if not names:
        raise ConfigError(table.key("server_names"), "needs at least one name")
    server_names = tuple(parse_server_name(table.key("server_names"), str(n)) for n in names)
    action = parse_enum(table.key("action"), SniAction, table.require("action"))
    upstream = table.take("upstream", None, str)
    client_auth = parse_enum(table.key("client_auth"), ClientAuth, table.take("client_auth", "none"))
    ca_file = table.take("client_ca_file", None, str)
    allow = parse_allow(table.key("allow"), table.take("allow", kind=list)) if "allow" in table.data else None
    forward_chain = table.take("forward_client_cert_chain", False, bool)
    allow_sources = _allow_sources(table)
    proxy_protocol = _proxy_protocol_out(table)
    rate_limit = _rate_limit(table)
    table.done()
    if proxy_protocol is not None and action is not SniAction.PASSTHROUGH:
        raise ConfigError(table.key("proxy_protocol"), "only a passthrough route sends it here; for terminate set it on the upstream")
    if rate_limit is not None and (action is not SniAction.TERMINATE or upstream is None):
        raise ConfigError(table.key("rate_limit"), "needs action = \"terminate\" with an upstream (else set it on the path routes)")
    if action is SniAction.PASSTHROUGH:
        if upstream is None:
            raise ConfigError(table.key("upstream"), "missing: a passthrough route needs an upstream")
        if client_auth is not ClientAuth.NONE or ca_file or allow is not None:
            raise ConfigError(table.key("action"), "passthrough never sees certificates: client_auth, client_ca_file and allow need action = \"terminate\"")
    if client_auth is ClientAuth.REQUIRE_CA and not ca_file:
        raise ConfigError(table.key("client_ca_file"), "required when client_auth = \"require-ca\"")
    if ca_file:
        check_file(table.key("client_ca_file"), ca_file)
    return SniRoute(
        name, server_names, action, upstream, client_auth, ca_file, allow, forward_chain, allow_sources, proxy_protocol, rate_limit
    )


def _toml_listen(value: str | list[Any] | dict[str, Any]) -> tuple[Address, list[Address], tuple[ListenerPolicy, ...]]:
    """``listen``: ``"host:port"``, a table ``{ address, proxy_protocol, new_connections_per_second }``,
    or a list of either. Returns the first address, the others, and the policies that set anything."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError("listen", "expected host:port or a list of them, got []")
    policies: list[ListenerPolicy] = []
    for index, item in enumerate(items):
        key = "listen" if not isinstance(value, list) else f"listen[{index}]"
        if isinstance(item, str):
            policies.append(ListenerPolicy(parse_address(key, item, listen=True)))
        elif isinstance(item, dict):
            policies.append(_toml_listener(_Table(item, key)))
        else:
            raise ConfigError(key, f"expected host:port or a table, got {item!r}")
    addresses = [policy.address for policy in policies]
    kept = tuple(p for p in policies if p.proxy_protocol_trusted is not None or p.new_connections_per_second is not None)
    return addresses[0], addresses[1:], kept


def _toml_listener(table: _Table) -> ListenerPolicy:
    address = parse_address(table.key("address"), table.require("address", str), listen=True)
    trusted = None
    if "proxy_protocol" in table.data:
        pp = table.sub("proxy_protocol")
        trusted = parse_networks(pp.key("trusted"), pp.require("trusted", list))
        pp.done()
    rate = table.take("new_connections_per_second")
    table.done()
    per_second = parse_rate(table.key("new_connections_per_second"), rate) if rate is not None else None
    return ListenerPolicy(address, trusted, per_second)


def _allow_sources(table: _Table) -> tuple[str, ...] | None:
    if "allow_sources" not in table.data:
        return None
    return parse_networks(table.key("allow_sources"), table.take("allow_sources", kind=list))


def _proxy_protocol_out(table: _Table) -> str | None:
    if "proxy_protocol" not in table.data:
        return None
    return parse_proxy_protocol_out(table.key("proxy_protocol"), table.take("proxy_protocol"))


def _rate_limit(table: _Table) -> RateLimitConfig | None:
    """``rate_limit = { requests_per_second = 50, burst = 100 }``; burst defaults to one second's worth."""
    if "rate_limit" not in table.data:
        return None
    limit = table.sub("rate_limit")
    rate = parse_rate(limit.key("requests_per_second"), limit.require("requests_per_second"))
    burst_value = limit.take("burst")
    limit.done()
    burst = default_burst(rate) if burst_value is None else parse_number(limit.key("burst"), burst_value, minimum=1, integer=True)
    return RateLimitConfig(rate, burst)


def _toml_dataclass(table: _Table, defaults: Any, *, integer: bool) -> Any:
    values = {}
    for name in list(table.data):
        if name not in type(defaults).__dataclass_fields__:
            raise ConfigError(table.key(name), "unknown key")
        # A zero timeout would close every connection at once and a zero limit refuse everything;
        # only shutdown_delay may be 0 (no delay).
        minimum = 0 if name == "shutdown_delay" else (1 if integer else MIN_TIMEOUT)
        values[name] = parse_number(table.key(name), table.take(name), integer=integer, minimum=minimum)
    return replace(defaults, **values)
