"""Parsers for single configuration values; each error names its key in one line.

Shared by the environment preset (``config_env``) and the TOML loader (``config_toml``).
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
from pathlib import Path
from typing import Any

from nextproxy.config.model import Address, AllowRule
from nextproxy.errors import ConfigError

HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$")
SERVER_NAME_RE = re.compile(r"^(\*\.)?[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")
ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")


def parse_host(key: str, value: str) -> str:
    """A host name or IP literal (IPv6 without brackets)."""
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not HOSTNAME_RE.match(text):
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
    if not SERVER_NAME_RE.match(name) or len(name) > 253:
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


MAX_WHOLE = 2**31 - 1
"""Counts and sizes fit a C int: a cap of 1e20 connections says nothing a cap of 2^31 does not."""
MAX_SECONDS = 365 * 86400.0
"""A year, the most any number of seconds (or rate) may be: more is a typo, and the event loop's
timers cannot hold every float (1e300, inf)."""


def parse_number(key: str, value: object, *, minimum: float = 0, integer: bool = False, maximum: float | None = None) -> Any:
    """A number from TOML or an environment variable, within ``minimum`` and ``maximum`` (by
    default ``MAX_WHOLE`` or ``MAX_SECONDS``)."""
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
    if value != value:  # NaN passes every comparison below
        raise ConfigError(key, f"expected a number, got {value!r}")
    if value < minimum:
        raise ConfigError(key, f"expected a number >= {minimum}, got {value!r}")
    if maximum is None:
        maximum = MAX_WHOLE if integer else MAX_SECONDS
    if value > maximum:
        shown = int(maximum) if maximum == int(maximum) else maximum  # 2147483647, not 2.14748e+09
        raise ConfigError(key, f"expected a number <= {shown}, got {value!r}")
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


def parse_networks(key: str, entries: object) -> tuple[str, ...]:
    """A non-empty list of networks (``10.0.0.0/8``, ``fd00::/8``, or one address), normalised.

    Strict, as ``ipaddress.ip_network(strict=True)``: host bits set (``10.0.0.1/8``) are an
    error, since that is more often a typo for a host or a smaller network than a wish.
    """
    if isinstance(entries, str):
        entries = [part for part in entries.split(",") if part.strip()]
    if not isinstance(entries, (list, tuple)) or not entries:
        raise ConfigError(key, f"expected a list of networks (CIDR), got {entries!r}")
    networks = []
    for raw in entries:
        if not isinstance(raw, str):
            raise ConfigError(key, f"expected a network (CIDR) as text, got {raw!r}")
        try:
            networks.append(str(ipaddress.ip_network(raw.strip(), strict=True)))
        except ValueError as exc:
            raise ConfigError(key, f"expected a network such as 10.0.0.0/8 or fd00::/8, got {raw!r} ({exc})") from None
    return tuple(networks)


def parse_rate(key: str, value: object) -> float:
    """A positive, finite rate per second."""
    rate = parse_number(key, value, maximum=float("inf"))
    if not 0 < rate < float("inf"):
        raise ConfigError(key, f"expected a number > 0, got {value!r}")
    return float(rate)


def default_burst(rate: float) -> int:
    """One second's worth of events, at least one: the bucket refills in about a second."""
    return max(1, math.ceil(rate))


def parse_proxy_protocol_out(key: str, value: object) -> str:
    """The PROXY protocol version the proxy sends: only ``v2`` (v1 cannot carry the SNI)."""
    if isinstance(value, str) and value.strip().lower() == "v2":
        return "v2"
    raise ConfigError(key, f"expected v2, got {value!r}")
