"""Configuration: frozen dataclasses, loaded from a TOML file or from the NEXTPROXY_* preset.

The TOML file is the general model (listeners, certificates, SNI routes, path routes,
upstreams, timeouts, limits); the environment preset builds one instance of it. Loading is
strict: an unknown key, a bad value, a missing secret or both forms of one secret raise a
``ConfigError`` whose one-line message names the variable or key. Certificates are read here
(as PEM bytes) but parsed in ``tlsconfig``; this module never imports ``ssl``.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

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


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    servers: tuple[Address, ...]
    tls: UpstreamTls | None = None


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
    max_client_hello: int = 64 * KiB
    max_header_size: int = 32 * KiB
    """Request line plus headers; larger gets 431."""
    max_upstream_header_size: int = 64 * KiB
    """Upstream response head; larger gets 502."""
    max_connections: int = 20000
    """Per worker; the listener stops accepting above it."""
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

    def upstream(self, name: str) -> Upstream:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        raise KeyError(name)


# --------------------------------------------------------------------------- value parsers

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$")
_SERVER_NAME = re.compile(r"^(\*\.)?[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")
_ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("json", "text")


def parse_host(key: str, value: str) -> str:
    """A host name or IP literal (IPv6 without brackets)."""
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not _HOSTNAME.match(text):
        raise ConfigError(key, f"expected a host name or IP address, got {value!r}")
    return text.rstrip(".").lower()


def parse_address(key: str, value: str, default_port: int | None = None, *, listen: bool = False) -> Address:
    """``host:port``, ``[v6]:port``, or ``host`` when a default port is given.

    Port 0 (any free port) is accepted only for ``listen`` addresses; tests rely on it.
    """
    text = value.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(key, f"expected host:port, got {value!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(key, f"expected host:port, got {value!r}")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise ConfigError(key, f"expected host:port (IPv6 in brackets), got {value!r}")
    if not port_text:
        if default_port is None:
            raise ConfigError(key, f"expected host:port, got {value!r}")
        port = default_port
    else:
        if not port_text.isdigit() or not (0 if listen else 1) <= int(port_text) < 65536:
            raise ConfigError(key, f"expected a port 1-65535, got {value!r}")
        port = int(port_text)
    if not host:
        raise ConfigError(key, f"expected host:port, got {value!r}")
    return Address(parse_host(key, host), port)


def parse_server_name(key: str, value: str) -> str:
    """An SNI name as the ClientHello parser reports it: lower case, no trailing dot."""
    name = value.strip().lower().rstrip(".")
    if not _SERVER_NAME.match(name) or len(name) > 253:
        raise ConfigError(key, f"expected a DNS server name, got {value!r}")
    return name


def parse_bool(key: str, value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(key, f"expected true or false, got {value!r}")


def parse_enum(key: str, enum_type: type[enum.Enum], value: object) -> Any:
    choices = "|".join(str(member.value) for member in enum_type)
    if isinstance(value, str):
        for member in enum_type:
            if member.value == value.strip().lower():
                return member
    raise ConfigError(key, f"expected {choices}, got {value!r}")


def parse_allow(key: str, entries: list[str] | tuple[str, ...]) -> tuple[AllowRule, ...]:
    """``sha256:<hex>``, ``spki:<hex or base64>``, ``dns:<name>``, ``uri:<uri>``, ``cn:<name>``."""
    rules = []
    for raw in entries:
        if not isinstance(raw, str) or ":" not in raw:
            raise ConfigError(key, f"expected kind:value (sha256, spki, dns, uri, cn), got {raw!r}")
        kind, value = raw.strip().split(":", 1)
        kind = kind.lower()
        if kind not in ("sha256", "spki", "dns", "uri", "cn") or not value:
            raise ConfigError(key, f"expected kind:value (sha256, spki, dns, uri, cn), got {raw!r}")
        if kind == "sha256":
            value = value.replace(":", "").lower()
            if not re.fullmatch(r"[0-9a-f]{64}", value):
                raise ConfigError(key, f"sha256 needs 64 hex digits, got {raw!r}")
        elif kind == "spki":
            value = _normalize_spki(key, raw, value)
        elif kind == "dns":
            value = value.lower().rstrip(".")
        rules.append(AllowRule(kind, value))
    return tuple(rules)


def _normalize_spki(key: str, raw: str, value: str) -> str:
    """SPKI pins come as hex or as base64 (HPKP style); store them as lower-case hex."""
    import base64
    import binascii

    hexed = value.replace(":", "").lower()
    if re.fullmatch(r"[0-9a-f]{64}", hexed):
        return hexed
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != 32:
        raise ConfigError(key, f"spki needs a SHA-256 as 64 hex digits or base64, got {raw!r}")
    return digest.hex()


def _number(key: str, value: object, *, minimum: float = 0, integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str):
            try:
                value = int(value) if integer else float(value)
            except ValueError:
                raise ConfigError(key, f"expected a number, got {value!r}") from None
        else:
            raise ConfigError(key, f"expected a number, got {value!r}")
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(key, f"expected a whole number, got {value!r}")
    if value < minimum:
        raise ConfigError(key, f"expected a number >= {minimum}, got {value!r}")
    return value


def read_file(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path!r}: {exc.strerror or exc}") from None


def check_file(key: str, path: str) -> str:
    """A path that must be readable now (a CA bundle), checked before anything binds."""
    read_file(key, path)
    return path


# --------------------------------------------------------------------------- environment preset

PRESET_PATH_ROUTES = (
    # (route name, path prefix, upstream host variable, port)
    ("ns-websocket", "/ns/websocket", "NS", 9999),
    ("ns-sigmai", "/ns/sigmai", "NS", 8888),
    ("mc-sigmai", "/mc/sigmai", "MC", 8888),
    ("sfs-sigmai", "/sfs/sigmai", "SFS", 8888),
)
PRESET_API_ROUTES = (("ns-api", "NS", 8080), ("mc-api", "MC", 8080))

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

    def get(name: str, default: str) -> str:
        return env.get(name, default)

    listen = parse_address("NEXTPROXY_LISTEN", get("NEXTPROXY_LISTEN", "0.0.0.0:8443"), listen=True)
    admin = parse_address("NEXTPROXY_ADMIN_LISTEN", get("NEXTPROXY_ADMIN_LISTEN", "0.0.0.0:9613"), listen=True)
    edge = _pair(env, "NEXTPROXY_TLS", required=True)
    assert edge is not None
    admin_tls = _pair(env, "NEXTPROXY_ADMIN_TLS", required=False)
    hosts = {
        svc: parse_host(f"NEXTPROXY_{svc}_HOST", get(f"NEXTPROXY_{svc}_HOST", svc.lower()))
        for svc in ("NS", "MC", "SFS")
    }

    upstream_tls: UpstreamTls | None = None
    if parse_bool("NEXTPROXY_UPSTREAM_TLS", get("NEXTPROXY_UPSTREAM_TLS", "false")):
        ca = env.get("NEXTPROXY_UPSTREAM_CA_FILE")
        upstream_tls = UpstreamTls(
            ca_file=check_file("NEXTPROXY_UPSTREAM_CA_FILE", ca) if ca else None,
            client_certificate=_pair(env, "NEXTPROXY_UPSTREAM_TLS", required=False),
        )
    else:
        for name in ("NEXTPROXY_UPSTREAM_CA_FILE", "NEXTPROXY_UPSTREAM_TLS_CERTIFICATE",
                     "NEXTPROXY_UPSTREAM_TLS_CERTIFICATE_FILE", "NEXTPROXY_UPSTREAM_TLS_KEY",
                     "NEXTPROXY_UPSTREAM_TLS_KEY_FILE"):  # fmt: skip
            if name in env:
                raise ConfigError(name, "has no effect unless NEXTPROXY_UPSTREAM_TLS=true")

    upstreams: list[Upstream] = []
    routes: list[PathRoute] = []
    for name, prefix, svc, port in PRESET_PATH_ROUTES:
        upstreams.append(Upstream(name, (Address(hosts[svc], port),), upstream_tls))
        routes.append(PathRoute(name=name, prefix=prefix, upstream=name))

    mode = parse_enum("NEXTPROXY_API_MODE", SniAction, get("NEXTPROXY_API_MODE", "passthrough"))
    client_auth = parse_enum(
        "NEXTPROXY_API_CLIENT_AUTH", ClientAuth, get("NEXTPROXY_API_CLIENT_AUTH", "none")
    )
    forward_chain = parse_bool("NEXTPROXY_API_CLIENT_CERT_CHAIN", get("NEXTPROXY_API_CLIENT_CERT_CHAIN", "false"))
    ca_file = env.get("NEXTPROXY_API_CLIENT_CA_FILE") or None
    if ca_file:
        check_file("NEXTPROXY_API_CLIENT_CA_FILE", ca_file)
    if client_auth is ClientAuth.REQUIRE_CA and not ca_file:
        raise ConfigError("NEXTPROXY_API_CLIENT_CA_FILE", "required when NEXTPROXY_API_CLIENT_AUTH=require-ca")
    sni_routes: list[SniRoute] = []
    seen_names: dict[str, str] = {}
    for name, svc, port in PRESET_API_ROUTES:
        sni_key = f"NEXTPROXY_{svc}_API_SNI"
        allow_key = f"NEXTPROXY_{svc}_API_ALLOW"
        raw_sni = env.get(sni_key, "").strip()
        allow_text = env.get(allow_key, "").strip()
        allow = parse_allow(allow_key, [a for a in allow_text.split(",") if a.strip()]) if allow_text else None
        if not raw_sni:
            if allow is not None:
                raise ConfigError(allow_key, f"has no effect unless {sni_key} is set")
            continue
        server_name = parse_server_name(sni_key, raw_sni)
        if server_name in seen_names:
            raise ConfigError(sni_key, f"{server_name!r} is already used by {seen_names[server_name]}")
        seen_names[server_name] = sni_key
        if mode is SniAction.PASSTHROUGH and allow is not None:
            raise ConfigError(allow_key, "needs NEXTPROXY_API_MODE=terminate (passthrough never sees certificates)")
        # Passthrough carries the client's TLS to the upstream's own TLS port: never re-encrypted.
        api_tls = upstream_tls if mode is SniAction.TERMINATE else None
        upstreams.append(Upstream(name, (Address(hosts[svc], port),), api_tls))
        sni_routes.append(
            SniRoute(
                name=name,
                server_names=(server_name,),
                action=mode,
                upstream=name,
                client_auth=client_auth if mode is SniAction.TERMINATE else ClientAuth.NONE,
                client_ca_file=ca_file if mode is SniAction.TERMINATE else None,
                allow=allow,
                forward_client_cert_chain=forward_chain,
            )
        )

    timeouts = Timeouts()
    if "NEXTPROXY_SHUTDOWN_DELAY" in env:
        timeouts = replace(timeouts, shutdown_delay=_number("NEXTPROXY_SHUTDOWN_DELAY", env["NEXTPROXY_SHUTDOWN_DELAY"]))
    if "NEXTPROXY_DRAIN_TIMEOUT" in env:
        timeouts = replace(timeouts, drain=_number("NEXTPROXY_DRAIN_TIMEOUT", env["NEXTPROXY_DRAIN_TIMEOUT"]))
    config = Config(
        listen=listen,
        admin_listen=admin,
        certificates=(edge,),
        admin_tls=admin_tls,
        upstreams=tuple(upstreams),
        routes=tuple(routes),
        sni_routes=tuple(sni_routes),
        timeouts=timeouts,
        **_process_settings(env),
    )
    validate(config)
    return config


def _process_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """Settings of the process, not of the routing: always from the environment."""
    workers = _number("NEXTPROXY_WORKERS", env.get("NEXTPROXY_WORKERS", "1"), minimum=1, integer=True)
    level = env.get("NEXTPROXY_LOG_LEVEL", "info").strip().lower()
    if level not in _LOG_LEVELS:
        raise ConfigError("NEXTPROXY_LOG_LEVEL", f"expected {'|'.join(_LOG_LEVELS)}, got {level!r}")
    fmt = env.get("NEXTPROXY_LOG_FORMAT", "json").strip().lower()
    if fmt not in _LOG_FORMATS:
        raise ConfigError("NEXTPROXY_LOG_FORMAT", f"expected {'|'.join(_LOG_FORMATS)}, got {fmt!r}")
    return {"workers": workers, "log_level": level, "log_format": fmt}


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """NEXTPROXY_* variables we do not read: most likely typos, worth a warning."""
    return sorted(k for k in env if k.startswith("NEXTPROXY_") and k not in KNOWN_VARIABLES)


# --------------------------------------------------------------------------- TOML


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
    )


def from_toml(path: str, env: Mapping[str, str] | None = None) -> Config:
    """Load a TOML configuration file. Process settings still come from the environment."""
    raw = read_file("NEXTPROXY_CONFIG", path)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("NEXTPROXY_CONFIG", f"{path}: not valid TOML: {exc}") from None
    root = _Table(data, "")
    listen = parse_address("listen", root.take("listen", "0.0.0.0:8443", str), listen=True)
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

    upstreams = []
    for name, body in root.take("upstreams", {}, dict).items():
        table = _Table(body, f"upstreams.{name}")
        if not _ROUTE_NAME.match(name):
            raise ConfigError(table.path, "name must be letters, digits, '-', '_' or '.'")
        servers = table.require("servers", list)
        if not servers:
            raise ConfigError(table.key("servers"), "needs at least one host:port")
        addresses = tuple(parse_address(table.key("servers"), s if isinstance(s, str) else repr(s)) for s in servers)
        use_tls = table.take("tls", False, bool)
        server_name = table.take("server_name", None, str)
        table.done()
        upstream_tls = None
        if use_tls:
            upstream_tls = default_upstream_tls
            if server_name:
                upstream_tls = replace(upstream_tls, server_name=parse_server_name(table.key("server_name"), server_name))
        upstreams.append(Upstream(name, addresses, upstream_tls))

    routes = tuple(_toml_route(_Table(r, f"routes[{i}]")) for i, r in enumerate(root.take("routes", [], list)))
    sni_routes = tuple(
        _toml_sni_route(_Table(r, f"sni_routes[{i}]")) for i, r in enumerate(root.take("sni_routes", [], list))
    )
    timeouts = _toml_dataclass(root.sub("timeouts"), Timeouts(), integer=False)
    limits = _toml_dataclass(root.sub("limits"), Limits(), integer=True)
    root.done()
    config = Config(
        listen=listen,
        admin_listen=admin_listen,
        certificates=certificates,
        admin_tls=admin_tls,
        upstreams=tuple(upstreams),
        routes=routes,
        sni_routes=sni_routes,
        timeouts=timeouts,
        limits=limits,
        source=path,
        **_process_settings(env if env is not None else os.environ),
    )
    validate(config)
    return config


def _toml_route(table: _Table) -> PathRoute:
    name = table.require("name", str)
    if not _ROUTE_NAME.match(name):
        raise ConfigError(table.key("name"), f"expected letters, digits, '-', '_' or '.', got {name!r}")
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
        max_message_size=_number(table.key("max_message_size"), table.take("max_message_size", 16 * MiB), minimum=1, integer=True),
        ping_interval=_number(table.key("ping_interval"), table.take("ping_interval", 20.0)),
        ping_timeout=_number(table.key("ping_timeout"), table.take("ping_timeout", 20.0)),
        allow=parse_allow(table.key("allow"), table.take("allow", kind=list)) if "allow" in table.data else None,
    )
    table.done()
    return route


def _toml_sni_route(table: _Table) -> SniRoute:
    name = table.require("name", str)
    if not _ROUTE_NAME.match(name):
        raise ConfigError(table.key("name"), f"expected letters, digits, '-', '_' or '.', got {name!r}")
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
    table.done()
    if action is SniAction.PASSTHROUGH:
        if upstream is None:
            raise ConfigError(table.key("upstream"), "missing: a passthrough route needs an upstream")
        if client_auth is not ClientAuth.NONE or ca_file or allow is not None:
            raise ConfigError(table.key("action"), "passthrough never sees certificates: client_auth, client_ca_file and allow need action = \"terminate\"")
    if client_auth is ClientAuth.REQUIRE_CA and not ca_file:
        raise ConfigError(table.key("client_ca_file"), "required when client_auth = \"require-ca\"")
    if ca_file:
        check_file(table.key("client_ca_file"), ca_file)
    return SniRoute(name, server_names, action, upstream, client_auth, ca_file, allow, forward_chain)


def _toml_dataclass(table: _Table, defaults: Any, *, integer: bool) -> Any:
    values = {}
    for name in list(table.data):
        if name not in type(defaults).__dataclass_fields__:
            raise ConfigError(table.key(name), "unknown key")
        values[name] = _number(table.key(name), table.take(name), integer=integer, minimum=0)
    return replace(defaults, **values)


# --------------------------------------------------------------------------- cross-checks


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
    if config.listen == config.admin_listen and config.listen.port != 0:
        raise ConfigError("admin_listen", f"same address as listen ({config.listen})")


def load(env: Mapping[str, str] | None = None, path: str | None = None) -> Config:
    """The configuration a process runs with: ``path``, else $NEXTPROXY_CONFIG, else the preset."""
    env = os.environ if env is None else env
    path = path or env.get("NEXTPROXY_CONFIG") or None
    if path:
        return from_toml(path, env)
    return from_environment(env)
