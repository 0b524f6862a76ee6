"""Issue 13's settings: every TOML key and NEXTPROXY_* variable, good values and bad ones.

Bad values are one line naming the key (``ConfigError``); settings that would silently do
nothing (a rate limit on a passthrough route, sources for an API name that is not set) are
errors too, as elsewhere in the configuration.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nextproxy.config import from_environment, from_toml, unknown_variables
from nextproxy.config.model import Address, ListenerPolicy, RateLimitConfig, SniAction
from nextproxy.errors import ConfigError
from tests.config.test_config import BASE, env, error

TOML_HEAD = """
[tls]
certificates = [{ certificate = "x", key = "y" }]
[upstreams.app]
servers = ["127.0.0.1:9"]
[upstreams.api]
servers = ["127.0.0.1:10"]
"""


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nextproxy.toml"
    path.write_text(text + TOML_HEAD)
    return path


ROUTE = '[[routes]]\nname = "app"\npath = "/app"\nupstream = "app"\n'


def test_listen_table_with_proxy_protocol_and_connection_rate(tmp_path: Path) -> None:
    config = from_toml(str(toml(tmp_path, """
listen = [
  { address = "0.0.0.0:8443", proxy_protocol = { trusted = ["10.0.0.0/8", "fd00::/8"] }, new_connections_per_second = 50 },
  "127.0.0.1:9443",
]
""" + ROUTE)))
    assert config.listen == Address("0.0.0.0", 8443) and config.listen_also == (Address("127.0.0.1", 9443),)
    assert config.listener_policies == (ListenerPolicy(Address("0.0.0.0", 8443), ("10.0.0.0/8", "fd00::/8"), 50.0),)
    assert config.listener_policy(Address("127.0.0.1", 9443)) == ListenerPolicy(Address("127.0.0.1", 9443))
    single = from_toml(str(toml(tmp_path, 'listen = { address = "[::1]:8443", new_connections_per_second = 0.5 }\n' + ROUTE)))
    assert single.listen == Address("::1", 8443) and single.listener_policies[0].new_connections_per_second == 0.5


@pytest.mark.parametrize(
    "listen, key, needle",
    [
        ('{ address = "0.0.0.0:8443", proxy_protocol = { trusted = ["10.0.0.1/8"] } }', "listen.proxy_protocol.trusted", "10.0.0.1/8"),
        ('{ address = "0.0.0.0:8443", proxy_protocol = { trusted = ["banana"] } }', "listen.proxy_protocol.trusted", "banana"),
        ('{ address = "0.0.0.0:8443", proxy_protocol = { trusted = [] } }', "listen.proxy_protocol.trusted", "list of networks"),
        ('{ address = "0.0.0.0:8443", proxy_protocol = {} }', "listen.proxy_protocol.trusted", "missing"),
        ('{ address = "0.0.0.0:8443", proxy_protocol = { trusted = ["10.0.0.0/8"], version = 2 } }', "listen.proxy_protocol.version", "unknown key"),
        ('{ address = "0.0.0.0:8443", new_connections_per_second = 0 }', "listen.new_connections_per_second", "> 0"),
        ('{ address = "0.0.0.0:8443", new_connections_per_second = "fast" }', "listen.new_connections_per_second", "number"),
        ('{ address = "0.0.0.0:8443", backlog = 5 }', "listen.backlog", "unknown key"),
        ('{ proxy_protocol = { trusted = ["10.0.0.0/8"] } }', "listen.address", "missing"),
        ('["127.0.0.1:1", { address = "127.0.0.1:2", new_connections_per_second = -1 }]', "listen[1].new_connections_per_second", ""),
        ("[]", "listen", "expected"),
        ("[5]", "listen[0]", "expected"),
    ],
)
def test_bad_listen_tables_name_the_key(tmp_path: Path, listen: str, key: str, needle: str) -> None:
    exc = error(lambda: from_toml(str(toml(tmp_path, f"listen = {listen}\n" + ROUTE))))
    assert exc.key == key and needle in str(exc)


def test_route_and_sni_route_keys(tmp_path: Path) -> None:
    config = from_toml(str(toml(tmp_path, """
[[routes]]
name = "app"
path = "/app"
upstream = "app"
allow_sources = ["203.0.113.0/24", "2001:db8::/32", "192.0.2.7"]
rate_limit = { requests_per_second = 50, burst = 100 }

[[routes]]
name = "app2"
path = "/app2"
upstream = "app"
rate_limit = { requests_per_second = 2.5 }

[[sni_routes]]
name = "pt"
server_names = ["pt.example"]
action = "passthrough"
upstream = "api"
proxy_protocol = "v2"
allow_sources = ["10.0.0.0/8"]

[[sni_routes]]
name = "tls"
server_names = ["tls.example"]
action = "terminate"
upstream = "api"
allow_sources = ["10.0.0.0/8"]
rate_limit = { requests_per_second = 5, burst = 10 }
""")))
    routes = {r.name: r for r in config.routes}
    assert routes["app"].allow_sources == ("203.0.113.0/24", "2001:db8::/32", "192.0.2.7/32")
    assert routes["app"].rate_limit == RateLimitConfig(50.0, 100)
    assert routes["app2"].rate_limit == RateLimitConfig(2.5, 3)  # burst: one second's worth, rounded up
    sni = {r.name: r for r in config.sni_routes}
    assert sni["pt"].proxy_protocol == "v2" and sni["pt"].allow_sources == ("10.0.0.0/8",)
    assert sni["tls"].rate_limit == RateLimitConfig(5.0, 10)


def test_upstream_proxy_protocol(tmp_path: Path) -> None:
    path = tmp_path / "n.toml"
    path.write_text('[tls]\ncertificates = [{ certificate = "x", key = "y" }]\n[upstreams.app]\nservers = ["127.0.0.1:9"]\nproxy_protocol = "V2"\n' + ROUTE)
    assert from_toml(str(path)).upstream("app").proxy_protocol == "v2"  # type: ignore[union-attr]
    path.write_text('[tls]\ncertificates = [{ certificate = "x", key = "y" }]\n[upstreams.app]\nservers = ["127.0.0.1:9"]\nproxy_protocol = "v1"\n' + ROUTE)
    exc = error(lambda: from_toml(str(path)))
    assert exc.key == "upstreams.app.proxy_protocol" and "expected v2" in str(exc)


@pytest.mark.parametrize(
    "body, key, needle",
    [
        ('allow_sources = ["10.0.0.0/33"]', "routes[0].allow_sources", "10.0.0.0/33"),
        ('allow_sources = "10.0.0.0/8"', "routes[0].allow_sources", "expected list"),
        ("rate_limit = { requests_per_second = 0 }", "routes[0].rate_limit.requests_per_second", "> 0"),
        ("rate_limit = { requests_per_second = nan }", "routes[0].rate_limit.requests_per_second", "expected a number, got nan"),
        ("rate_limit = { burst = 5 }", "routes[0].rate_limit.requests_per_second", "missing"),
        ("rate_limit = { requests_per_second = 5, burst = 0 }", "routes[0].rate_limit.burst", ">= 1"),
        ("rate_limit = { requests_per_second = 5, burst = 1.5 }", "routes[0].rate_limit.burst", "whole number"),
        ("rate_limit = { requests_per_second = 5, per = \"ip\" }", "routes[0].rate_limit.per", "unknown key"),
        ('proxy_protocol = "v2"', "routes[0].proxy_protocol", "unknown key"),
    ],
)
def test_bad_route_keys_name_the_key(tmp_path: Path, body: str, key: str, needle: str) -> None:
    exc = error(lambda: from_toml(str(toml(tmp_path, ROUTE + body + "\n"))))
    assert exc.key == key and needle in str(exc)


@pytest.mark.parametrize(
    "body, key, needle",
    [
        ('action = "terminate"\nupstream = "api"\nproxy_protocol = "v2"', "sni_routes[0].proxy_protocol", "passthrough"),
        ('action = "passthrough"\nupstream = "api"\nproxy_protocol = 2', "sni_routes[0].proxy_protocol", "expected v2"),
        ('action = "passthrough"\nupstream = "api"\nrate_limit = { requests_per_second = 1 }', "sni_routes[0].rate_limit", "terminate"),
        ('action = "terminate"\nrate_limit = { requests_per_second = 1 }', "sni_routes[0].rate_limit", "upstream"),
        ('action = "passthrough"\nupstream = "api"\nallow_sources = ["::1/64"]', "sni_routes[0].allow_sources", "::1/64"),
    ],
)
def test_bad_sni_route_keys_name_the_key(tmp_path: Path, body: str, key: str, needle: str) -> None:
    text = ROUTE + '[[sni_routes]]\nname = "s"\nserver_names = ["s.example"]\n' + body + "\n"
    exc = error(lambda: from_toml(str(toml(tmp_path, text))))
    assert exc.key == key and needle in str(exc)


# ----------------------------------------------------------------------- environment preset


def test_preset_listener_variables() -> None:
    config = from_environment(env(PROXY_PROTOCOL_TRUSTED="10.0.0.0/8, fd00::/8", NEW_CONNECTIONS_PER_SECOND="20"))
    assert config.listener_policies == (ListenerPolicy(Address("0.0.0.0", 8443), ("10.0.0.0/8", "fd00::/8"), 20.0),)
    assert from_environment(BASE).listener_policies == ()
    assert unknown_variables(env(PROXY_PROTOCOL_TRUSTED="10.0.0.0/8", NEW_CONNECTIONS_PER_SECOND="1")) == []


def test_preset_api_switches_in_passthrough() -> None:
    config = from_environment(env(
        NS_API_SNI="api.ns.example", MC_API_SNI="api.mc.example", API_PROXY_PROTOCOL="v2",
        NS_API_ALLOW_SOURCES="203.0.113.0/24,2001:db8::/32",
    ))  # fmt: skip
    sni = {r.name: r for r in config.sni_routes}
    assert sni["ns-api"].action is SniAction.PASSTHROUGH and sni["ns-api"].proxy_protocol == "v2"
    assert sni["ns-api"].allow_sources == ("203.0.113.0/24", "2001:db8::/32")
    assert sni["mc-api"].allow_sources is None and sni["mc-api"].proxy_protocol == "v2"
    assert config.upstream("ns-api").proxy_protocol is None  # type: ignore[union-attr]


def test_preset_api_switches_in_terminate() -> None:
    config = from_environment(env(
        NS_API_SNI="api.ns.example", API_MODE="terminate", API_PROXY_PROTOCOL="v2",
        API_RATE_LIMIT="10", API_RATE_BURST="30",
    ))  # fmt: skip
    (ns,) = config.sni_routes
    assert ns.proxy_protocol is None and ns.rate_limit == RateLimitConfig(10.0, 30)
    assert config.upstream("ns-api").proxy_protocol == "v2"  # type: ignore[union-attr]
    assert from_environment(env(NS_API_SNI="a.example", API_MODE="terminate", API_RATE_LIMIT="0.5")).sni_routes[0].rate_limit == RateLimitConfig(0.5, 1)


@pytest.mark.parametrize(
    "extra, key, needle",
    [
        ({"PROXY_PROTOCOL_TRUSTED": "10.0.0.1/8"}, "NEXTPROXY_PROXY_PROTOCOL_TRUSTED", "10.0.0.1/8"),
        ({"PROXY_PROTOCOL_TRUSTED": "10.0.0.0/8,nope"}, "NEXTPROXY_PROXY_PROTOCOL_TRUSTED", "nope"),
        ({"NEW_CONNECTIONS_PER_SECOND": "0"}, "NEXTPROXY_NEW_CONNECTIONS_PER_SECOND", "> 0"),
        ({"NEW_CONNECTIONS_PER_SECOND": "lots"}, "NEXTPROXY_NEW_CONNECTIONS_PER_SECOND", "number"),
        ({"NS_API_SNI": "a.example", "API_PROXY_PROTOCOL": "v1"}, "NEXTPROXY_API_PROXY_PROTOCOL", "expected v2"),
        ({"API_PROXY_PROTOCOL": "v2"}, "NEXTPROXY_API_PROXY_PROTOCOL", "no effect"),
        ({"NS_API_ALLOW_SOURCES": "10.0.0.0/8"}, "NEXTPROXY_NS_API_ALLOW_SOURCES", "NEXTPROXY_NS_API_SNI"),
        ({"MC_API_SNI": "a.example", "MC_API_ALLOW_SOURCES": "10.0.0.0/99"}, "NEXTPROXY_MC_API_ALLOW_SOURCES", "10.0.0.0/99"),
        ({"NS_API_SNI": "a.example", "API_RATE_LIMIT": "5"}, "NEXTPROXY_API_RATE_LIMIT", "NEXTPROXY_API_MODE=terminate"),
        ({"NS_API_SNI": "a.example", "API_MODE": "terminate", "API_RATE_LIMIT": "-1"}, "NEXTPROXY_API_RATE_LIMIT", ""),
        ({"NS_API_SNI": "a.example", "API_MODE": "terminate", "API_RATE_LIMIT": "5", "API_RATE_BURST": "0"}, "NEXTPROXY_API_RATE_BURST", ">= 1"),
        ({"NS_API_SNI": "a.example", "API_MODE": "terminate", "API_RATE_BURST": "5"}, "NEXTPROXY_API_RATE_BURST", "NEXTPROXY_API_RATE_LIMIT"),
    ],
)
def test_bad_preset_variables_name_the_variable(extra: dict[str, str], key: str, needle: str) -> None:
    exc = error(lambda: from_environment(env(**extra)))
    assert exc.key == key and needle in str(exc)


def test_config_error_is_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        from_environment(env(PROXY_PROTOCOL_TRUSTED="x"))
    assert str(info.value).startswith("NEXTPROXY_PROXY_PROTOCOL_TRUSTED: ")
