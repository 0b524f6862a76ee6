"""The built-in preset: ns/mc/sfs path routes and the API names by SNI, from NEXTPROXY_* variables.

The variable names and defaults are a public contract (README "environment preset"); every
secret has an inline form ``X`` and a file form ``X_FILE``, and setting both is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from nextproxy.config.model import (
    Address,
    CertificateConfig,
    ClientAuth,
    Config,
    ListenerPolicy,
    PathRoute,
    RateLimitConfig,
    PemSource,
    SniAction,
    SniRoute,
    Timeouts,
    Upstream,
    UpstreamTls,
    validate,
)
from nextproxy.config.values import (
    LOG_FORMATS,
    LOG_LEVELS,
    check_file,
    default_burst,
    parse_address,
    parse_networks,
    parse_proxy_protocol_out,
    parse_rate,
    parse_allow,
    parse_bool,
    parse_enum,
    parse_host,
    parse_number,
    parse_server_name,
    read_file,
)
from nextproxy.errors import ConfigError

# The preset's routes: what the NEXTPROXY_* variables point at, and what the demo starts.
PRESET_PATH_ROUTES = (
    # (route name, path prefix, upstream host variable, port)
    ("ns-websocket", "/ns/websocket", "NS", 9999),
    ("ns-sigmai", "/ns/sigmai", "NS", 8888),
    ("mc-sigmai", "/mc/sigmai", "MC", 8888),
    ("sfs-sigmai", "/sfs/sigmai", "SFS", 8888),
)
PRESET_API_ROUTES = (("ns-api", "NS", 8080), ("mc-api", "MC", 8080))
MAX_WORKERS = 256
"""Each worker is a process with its own pools: more than this is a typo, not a machine."""

# Every variable the preset reads; anything else starting with NEXTPROXY_ is reported.
KNOWN_VARIABLES = frozenset(
    {
        "NEXTPROXY_CONFIG", "NEXTPROXY_LISTEN", "NEXTPROXY_ADMIN_LISTEN",
        "NEXTPROXY_TLS_CERTIFICATE", "NEXTPROXY_TLS_CERTIFICATE_FILE",
        "NEXTPROXY_TLS_KEY", "NEXTPROXY_TLS_KEY_FILE",
        "NEXTPROXY_ADMIN_TLS_CERTIFICATE", "NEXTPROXY_ADMIN_TLS_CERTIFICATE_FILE",
        "NEXTPROXY_ADMIN_TLS_KEY", "NEXTPROXY_ADMIN_TLS_KEY_FILE",
        "NEXTPROXY_NS_HOST", "NEXTPROXY_MC_HOST", "NEXTPROXY_SFS_HOST",
        "NEXTPROXY_NS_API_SNI", "NEXTPROXY_MC_API_SNI", "NEXTPROXY_API_MODE",
        "NEXTPROXY_API_CLIENT_AUTH", "NEXTPROXY_API_CLIENT_CA_FILE",
        "NEXTPROXY_NS_API_ALLOW", "NEXTPROXY_MC_API_ALLOW", "NEXTPROXY_API_CLIENT_CERT_CHAIN",
        "NEXTPROXY_UPSTREAM_TLS", "NEXTPROXY_UPSTREAM_CA_FILE",
        "NEXTPROXY_UPSTREAM_TLS_CERTIFICATE", "NEXTPROXY_UPSTREAM_TLS_CERTIFICATE_FILE",
        "NEXTPROXY_UPSTREAM_TLS_KEY", "NEXTPROXY_UPSTREAM_TLS_KEY_FILE",
        "NEXTPROXY_WORKERS", "NEXTPROXY_LOG_LEVEL", "NEXTPROXY_LOG_FORMAT",
        "NEXTPROXY_SHUTDOWN_DELAY", "NEXTPROXY_DRAIN_TIMEOUT",
        "NEXTPROXY_PROXY_PROTOCOL_TRUSTED", "NEXTPROXY_NEW_CONNECTIONS_PER_SECOND", "NEXTPROXY_API_PROXY_PROTOCOL",
        "NEXTPROXY_NS_API_ALLOW_SOURCES", "NEXTPROXY_MC_API_ALLOW_SOURCES",
        "NEXTPROXY_API_RATE_LIMIT", "NEXTPROXY_API_RATE_BURST",
    }
)  # fmt: skip


def secret(env: Mapping[str, str], name: str, *, required: bool) -> PemSource | None:
    """Read ``NAME`` (inline PEM) or ``NAME_FILE`` (a path, as Docker/Kubernetes secrets mount)."""
    inline = env.get(name)
    path = env.get(name + "_FILE")
    if inline is not None and path is not None:
        raise ConfigError(name, f"set either {name} or {name}_FILE, not both")
    if path is not None:
        if not path.strip():
            raise ConfigError(name + "_FILE", "is empty")
        return PemSource(read_file(name + "_FILE", path), name + "_FILE", path)
    if inline is not None:
        if not inline.strip():
            raise ConfigError(name, "is empty")
        # Some orchestrators flatten newlines in env values; accept a literal "\n" too.
        return PemSource(inline.replace("\\n", "\n").encode(), name)
    if required:
        raise ConfigError(name, f"missing: set {name} (PEM) or {name}_FILE (path)")
    return None


def _pair(env: Mapping[str, str], prefix: str, *, required: bool) -> CertificateConfig | None:
    cert = secret(env, prefix + "_CERTIFICATE", required=required)
    key = secret(env, prefix + "_KEY", required=required or cert is not None)
    if cert is None and key is not None:
        raise ConfigError(prefix + "_CERTIFICATE", f"missing: {prefix}_KEY is set without it")
    if cert is None or key is None:
        return None
    return CertificateConfig(cert, key)


def from_environment(env: Mapping[str, str]) -> Config:
    """The built-in preset: ns/mc/sfs routes, API names by SNI, values from NEXTPROXY_*."""
    listen = parse_address("NEXTPROXY_LISTEN", env.get("NEXTPROXY_LISTEN", "0.0.0.0:8443"), listen=True)
    admin = parse_address("NEXTPROXY_ADMIN_LISTEN", env.get("NEXTPROXY_ADMIN_LISTEN", "0.0.0.0:9613"), listen=True)
    edge = _pair(env, "NEXTPROXY_TLS", required=True)
    assert edge is not None
    admin_tls = _pair(env, "NEXTPROXY_ADMIN_TLS", required=False)
    hosts = {
        svc: parse_host(f"NEXTPROXY_{svc}_HOST", env.get(f"NEXTPROXY_{svc}_HOST", svc.lower()))
        for svc in ("NS", "MC", "SFS")
    }
    upstream_tls = _upstream_tls(env)
    upstreams: list[Upstream] = []
    routes: list[PathRoute] = []
    for name, prefix, svc, port in PRESET_PATH_ROUTES:
        upstreams.append(Upstream(name, (Address(hosts[svc], port),), upstream_tls))
        routes.append(PathRoute(name=name, prefix=prefix, upstream=name))
    sni_routes = _api_routes(env, hosts, upstream_tls, upstreams)
    if not sni_routes:
        for key in ("NEXTPROXY_API_PROXY_PROTOCOL", "NEXTPROXY_API_RATE_LIMIT"):
            if env.get(key, "").strip():
                raise ConfigError(key, "has no effect unless NEXTPROXY_NS_API_SNI or NEXTPROXY_MC_API_SNI is set")
    timeouts = Timeouts()
    if "NEXTPROXY_SHUTDOWN_DELAY" in env:
        timeouts = replace(timeouts, shutdown_delay=parse_number("NEXTPROXY_SHUTDOWN_DELAY", env["NEXTPROXY_SHUTDOWN_DELAY"]))
    if "NEXTPROXY_DRAIN_TIMEOUT" in env:
        timeouts = replace(timeouts, drain=parse_number("NEXTPROXY_DRAIN_TIMEOUT", env["NEXTPROXY_DRAIN_TIMEOUT"]))
    config = Config(
        listen=listen,
        listener_policies=_listener_policies(env, listen), admin_listen=admin, certificates=(edge,), admin_tls=admin_tls,
        upstreams=tuple(upstreams), routes=tuple(routes), sni_routes=tuple(sni_routes), timeouts=timeouts,
        **process_settings(env),
    )  # fmt: skip
    validate(config)
    return config


def _upstream_tls(env: Mapping[str, str]) -> UpstreamTls | None:
    """Re-encryption to every upstream (NEXTPROXY_UPSTREAM_TLS), or None."""
    if parse_bool("NEXTPROXY_UPSTREAM_TLS", env.get("NEXTPROXY_UPSTREAM_TLS", "false")):
        ca = env.get("NEXTPROXY_UPSTREAM_CA_FILE")
        return UpstreamTls(
            ca_file=check_file("NEXTPROXY_UPSTREAM_CA_FILE", ca) if ca else None,
            client_certificate=_pair(env, "NEXTPROXY_UPSTREAM_TLS", required=False),
            ca_file_key="NEXTPROXY_UPSTREAM_CA_FILE",
        )
    for name in ("NEXTPROXY_UPSTREAM_CA_FILE", "NEXTPROXY_UPSTREAM_TLS_CERTIFICATE",
                 "NEXTPROXY_UPSTREAM_TLS_CERTIFICATE_FILE", "NEXTPROXY_UPSTREAM_TLS_KEY",
                 "NEXTPROXY_UPSTREAM_TLS_KEY_FILE"):  # fmt: skip
        if name in env:
            raise ConfigError(name, "has no effect unless NEXTPROXY_UPSTREAM_TLS=true")
    return None


def _api_mode(env: Mapping[str, str]) -> tuple[SniAction, ClientAuth, bool, str | None]:
    """NEXTPROXY_API_MODE and the settings that only mean something when terminating."""
    mode = parse_enum("NEXTPROXY_API_MODE", SniAction, env.get("NEXTPROXY_API_MODE", "passthrough"))
    client_auth = parse_enum("NEXTPROXY_API_CLIENT_AUTH", ClientAuth, env.get("NEXTPROXY_API_CLIENT_AUTH", "none"))
    forward_chain = parse_bool("NEXTPROXY_API_CLIENT_CERT_CHAIN", env.get("NEXTPROXY_API_CLIENT_CERT_CHAIN", "false"))
    ca_file = env.get("NEXTPROXY_API_CLIENT_CA_FILE") or None
    if mode is SniAction.PASSTHROUGH:
        # The upstream checks certificates itself in passthrough: a setting that would change
        # that is a mistake worth naming, not something to ignore silently.
        for name, active in (
            ("NEXTPROXY_API_CLIENT_AUTH", client_auth is not ClientAuth.NONE),
            ("NEXTPROXY_API_CLIENT_CA_FILE", ca_file is not None),
            ("NEXTPROXY_API_CLIENT_CERT_CHAIN", forward_chain),
        ):
            if active:
                raise ConfigError(name, "has no effect unless NEXTPROXY_API_MODE=terminate")
    if ca_file:
        check_file("NEXTPROXY_API_CLIENT_CA_FILE", ca_file)
    if client_auth is ClientAuth.REQUIRE_CA and not ca_file:
        raise ConfigError("NEXTPROXY_API_CLIENT_CA_FILE", "required when NEXTPROXY_API_CLIENT_AUTH=require-ca")
    return mode, client_auth, forward_chain, ca_file


def _api_routes(
    env: Mapping[str, str], hosts: Mapping[str, str], upstream_tls: UpstreamTls | None, upstreams: list[Upstream]
) -> list[SniRoute]:
    """The API routes by SNI (NEXTPROXY_*_API_SNI); their upstreams are appended to ``upstreams``."""
    mode, client_auth, forward_chain, ca_file = _api_mode(env)
    terminate = mode is SniAction.TERMINATE
    api = _api_policy(env, mode)
    sni_routes: list[SniRoute] = []
    seen_names: dict[str, str] = {}
    for name, svc, port in PRESET_API_ROUTES:
        sni_key, allow_key = f"NEXTPROXY_{svc}_API_SNI", f"NEXTPROXY_{svc}_API_ALLOW"
        raw_sni = env.get(sni_key, "").strip()
        allow_text = env.get(allow_key, "").strip()
        allow = parse_allow(allow_key, [a for a in allow_text.split(",") if a.strip()]) if allow_text else None
        sources_key = f"NEXTPROXY_{svc}_API_ALLOW_SOURCES"
        sources = parse_networks(sources_key, env[sources_key]) if env.get(sources_key, "").strip() else None
        if not raw_sni:
            for key, value in ((allow_key, allow), (sources_key, sources)):
                if value is not None:
                    raise ConfigError(key, f"has no effect unless {sni_key} is set")
            continue
        server_name = parse_server_name(sni_key, raw_sni)
        if server_name in seen_names:
            raise ConfigError(sni_key, f"{server_name!r} is already used by {seen_names[server_name]}")
        seen_names[server_name] = sni_key
        if not terminate and allow is not None:
            raise ConfigError(allow_key, "needs NEXTPROXY_API_MODE=terminate (passthrough never sees certificates)")
        # Passthrough carries the client's TLS to the upstream's own TLS port: never re-encrypted.
        # NEXTPROXY_API_PROXY_PROTOCOL: on the passthrough route, or in terminate mode on the
        # connections to the API server (never pooled across clients).
        upstream_pp = api.proxy_protocol if terminate else None
        upstreams.append(Upstream(name, (Address(hosts[svc], port),), upstream_tls if terminate else None, upstream_pp))
        sni_routes.append(
            SniRoute(
                name=name, server_names=(server_name,), action=mode, upstream=name,
                client_auth=client_auth if terminate else ClientAuth.NONE,
                client_ca_file=ca_file if terminate else None, allow=allow, forward_client_cert_chain=forward_chain,
                allow_sources=sources, proxy_protocol=None if terminate else api.proxy_protocol, rate_limit=api.rate_limit,
            )  # fmt: skip
        )
    return sni_routes


@dataclass(frozen=True, slots=True)
class _ApiPolicy:
    """The NEXTPROXY_API_* switches shared by both API names."""

    proxy_protocol: str | None
    rate_limit: RateLimitConfig | None


def _api_policy(env: Mapping[str, str], mode: SniAction) -> _ApiPolicy:
    """NEXTPROXY_API_PROXY_PROTOCOL and NEXTPROXY_API_RATE_LIMIT / _BURST."""
    raw_pp = env.get("NEXTPROXY_API_PROXY_PROTOCOL", "").strip()
    proxy_protocol = parse_proxy_protocol_out("NEXTPROXY_API_PROXY_PROTOCOL", raw_pp) if raw_pp else None
    raw_rate = env.get("NEXTPROXY_API_RATE_LIMIT", "").strip()
    raw_burst = env.get("NEXTPROXY_API_RATE_BURST", "").strip()
    rate_limit = None
    if raw_rate:
        if mode is SniAction.PASSTHROUGH:
            # Requests are inside the client's TLS in passthrough: there is nothing to count.
            raise ConfigError("NEXTPROXY_API_RATE_LIMIT", "has no effect unless NEXTPROXY_API_MODE=terminate")
        rate = parse_rate("NEXTPROXY_API_RATE_LIMIT", raw_rate)
        burst = parse_number("NEXTPROXY_API_RATE_BURST", raw_burst, minimum=1, integer=True) if raw_burst else default_burst(rate)
        rate_limit = RateLimitConfig(rate, burst)
    elif raw_burst:
        raise ConfigError("NEXTPROXY_API_RATE_BURST", "has no effect unless NEXTPROXY_API_RATE_LIMIT is set")
    return _ApiPolicy(proxy_protocol, rate_limit)


def _listener_policies(env: Mapping[str, str], listen: Address) -> tuple[ListenerPolicy, ...]:
    """NEXTPROXY_PROXY_PROTOCOL_TRUSTED and NEXTPROXY_NEW_CONNECTIONS_PER_SECOND, for the one listener."""
    raw_trusted = env.get("NEXTPROXY_PROXY_PROTOCOL_TRUSTED", "").strip()
    trusted = parse_networks("NEXTPROXY_PROXY_PROTOCOL_TRUSTED", raw_trusted) if raw_trusted else None
    raw_rate = env.get("NEXTPROXY_NEW_CONNECTIONS_PER_SECOND", "").strip()
    rate = parse_rate("NEXTPROXY_NEW_CONNECTIONS_PER_SECOND", raw_rate) if raw_rate else None
    if trusted is None and rate is None:
        return ()
    return (ListenerPolicy(listen, trusted, rate),)


def process_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """Settings of the process, not of the routing: always from the environment."""
    workers = parse_number("NEXTPROXY_WORKERS", env.get("NEXTPROXY_WORKERS", "1"), minimum=1, integer=True, maximum=MAX_WORKERS)
    level = env.get("NEXTPROXY_LOG_LEVEL", "info").strip().lower()
    if level not in LOG_LEVELS:
        raise ConfigError("NEXTPROXY_LOG_LEVEL", f"expected {'|'.join(LOG_LEVELS)}, got {level!r}")
    fmt = env.get("NEXTPROXY_LOG_FORMAT", "json").strip().lower()
    if fmt not in LOG_FORMATS:
        raise ConfigError("NEXTPROXY_LOG_FORMAT", f"expected {'|'.join(LOG_FORMATS)}, got {fmt!r}")
    return {"workers": workers, "log_level": level, "log_format": fmt}
