"""Configuration: the model (``model``), value parsers (``values``), the NEXTPROXY_* preset
(``preset``) and the TOML loader (``toml``); ``load()`` picks one for a process.

Everything here is frozen data and strict parsing: an unknown key, a bad value or a missing
secret raises ``ConfigError`` naming the variable or key. The model's names are re-exported
for the shell's convenience; ``nextproxy.core`` imports ``nextproxy.config.model`` itself, so
the sans-IO core never pulls the loaders (files, environment) in.
"""

from __future__ import annotations

import os
import tomllib
from typing import Mapping

from nextproxy.config.model import (
    KiB,
    MiB,
    SECONDS,
    Address,
    AllowRule,
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
from nextproxy.config.preset import KNOWN_VARIABLES, from_environment
from nextproxy.config.toml import from_toml
from nextproxy.config.values import parse_address
from nextproxy.errors import ConfigError

__all__ = [
    "KiB", "MiB", "SECONDS", "Address", "AllowRule", "CertificateConfig", "ClientAuth", "Config",
    "EncodedSlashes", "Limits", "PathRoute", "PemSource", "SniAction", "SniRoute", "Timeouts", "Upstream",
    "UpstreamTls",
    "WebSocketMode", "validate", "from_environment", "from_toml", "load", "unknown_variables", "admin_endpoint",
]  # fmt: skip


def load(env: Mapping[str, str] | None = None, path: str | None = None) -> Config:
    """The configuration a process runs with: ``path``, else $NEXTPROXY_CONFIG, else the preset."""
    env = os.environ if env is None else env
    if path:
        return from_toml(path, env, named_by="--config")
    path = env.get("NEXTPROXY_CONFIG") or None
    if path:
        return from_toml(path, env)
    return from_environment(env)


def admin_endpoint(env: Mapping[str, str] | None = None, path: str | None = None) -> tuple[Address, bool]:
    """Where the admin port listens, and whether over TLS, read from the same source as ``load``
    but nothing else: ``healthcheck`` must not fail on what only a (re)load needs, such as a
    certificate file rotated away while the proxy serves on the one it loaded."""
    env = os.environ if env is None else env
    named_by = "--config" if path else "NEXTPROXY_CONFIG"
    path = path or env.get("NEXTPROXY_CONFIG") or None
    if not path:
        tls = any(env.get(f"NEXTPROXY_ADMIN_TLS_CERTIFICATE{suffix}") for suffix in ("", "_FILE"))
        return parse_address("NEXTPROXY_ADMIN_LISTEN", env.get("NEXTPROXY_ADMIN_LISTEN", "0.0.0.0:9613"), listen=True), tls
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(named_by, f"cannot read {path!r}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(named_by, f"{path}: not valid TOML: {exc}") from None
    admin = data.get("admin_listen", "0.0.0.0:9613")
    if not isinstance(admin, str):
        raise ConfigError("admin_listen", f"expected host:port text, got {admin!r}")
    return parse_address("admin_listen", admin, listen=True), "admin_tls" in data


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """NEXTPROXY_* variables the preset does not read: most likely typos, worth a warning."""
    return sorted(k for k in env if k.startswith("NEXTPROXY_") and k not in KNOWN_VARIABLES)
