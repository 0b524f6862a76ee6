"""Configuration: the model (``model``), value parsers (``values``), the NEXTPROXY_* preset
(``preset``) and the TOML loader (``toml``); ``load()`` picks one for a process.

Everything here is frozen data and strict parsing: an unknown key, a bad value or a missing
secret raises ``ConfigError`` naming the variable or key. The model's names are re-exported
for the shell's convenience; ``nextproxy.core`` imports ``nextproxy.config.model`` itself, so
the sans-IO core never pulls the loaders (files, environment) in.
"""

from __future__ import annotations

import os
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

__all__ = [
    "KiB", "MiB", "SECONDS", "Address", "AllowRule", "CertificateConfig", "ClientAuth", "Config",
    "EncodedSlashes", "Limits", "PathRoute", "PemSource", "SniAction", "SniRoute", "Timeouts", "Upstream",
    "UpstreamTls",
    "WebSocketMode", "validate", "from_environment", "from_toml", "load", "unknown_variables",
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


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """NEXTPROXY_* variables the preset does not read: most likely typos, worth a warning."""
    return sorted(k for k in env if k.startswith("NEXTPROXY_") and k not in KNOWN_VARIABLES)
