"""Configuration: the preset's defaults are the contract; every bad value is one line naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from nextproxy.config.model import Address, ClientAuth, EncodedSlashes, SniAction, WebSocketMode
from nextproxy.config import from_environment, from_toml, load, unknown_variables
from nextproxy.errors import ConfigError

CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"
BASE = {"NEXTPROXY_TLS_CERTIFICATE": CERT, "NEXTPROXY_TLS_KEY": KEY}


def env(**extra: str) -> dict[str, str]:
    return {**BASE, **{f"NEXTPROXY_{k}": v for k, v in extra.items()}}


def error(call: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        call()  # type: ignore[operator]
    message = str(info.value)
    assert "\n" not in message and message.startswith(info.value.key)
    return info.value


def test_preset_defaults_are_the_contract() -> None:
    config = from_environment(BASE)
    assert config.listen == Address("0.0.0.0", 8443)
    assert config.admin_listen == Address("0.0.0.0", 9613)
    routes = {r.prefix: (r.name, config.upstream(r.upstream).servers) for r in config.routes}
    assert routes == {
        "/ns/websocket": ("ns-websocket", (Address("ns", 9999),)),
        "/ns/sigmai": ("ns-sigmai", (Address("ns", 8888),)),
        "/mc/sigmai": ("mc-sigmai", (Address("mc", 8888),)),
        "/sfs/sigmai": ("sfs-sigmai", (Address("sfs", 8888),)),
    }
    assert all(r.websocket is WebSocketMode.FRAMES for r in config.routes)
    assert config.sni_routes == ()  # API names are not exposed unless set
    assert config.timeouts.client_hello == 10 and config.limits.max_client_hello == 132 * 1024
    assert config.limits.max_header_size == 32 * 1024 and config.timeouts.pool_idle < 5
    assert config.certificates[0].certificate.pem == CERT.encode()
    assert config.certificates[0].certificate.origin == "NEXTPROXY_TLS_CERTIFICATE"


def test_preset_api_names_and_hosts() -> None:
    config = from_environment(
        env(NS_API_SNI="API.NS.example.", MC_API_SNI="api.mc.example", NS_HOST="10.0.0.5", MC_HOST="mc.internal", SFS_HOST="::1")
    )
    sni = {r.name: r for r in config.sni_routes}
    assert sni["ns-api"].server_names == ("api.ns.example",)
    assert sni["ns-api"].action is SniAction.PASSTHROUGH
    assert config.upstream("ns-api").servers == (Address("10.0.0.5", 8080),)
    assert config.upstream("mc-api").servers == (Address("mc.internal", 8080),)
    assert config.upstream("sfs-sigmai").servers == (Address("::1", 8888),)


def test_preset_terminate_mode_with_client_auth(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text(CERT)
    config = from_environment(
        env(NS_API_SNI="api.ns.example", API_MODE="terminate", API_CLIENT_AUTH="require-ca",
            API_CLIENT_CA_FILE=str(ca), NS_API_ALLOW="cn:svc, dns:a.example,sha256:" + "AB" * 32)
    )  # fmt: skip
    route = config.sni_routes[0]
    assert route.action is SniAction.TERMINATE and route.client_auth is ClientAuth.REQUIRE_CA
    assert route.allow is not None and [str(a) for a in route.allow] == ["cn:svc", "dns:a.example", "sha256:" + "ab" * 32]


def test_file_forms(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text(CERT)
    key.write_text(KEY)
    config = from_environment({"NEXTPROXY_TLS_CERTIFICATE_FILE": str(cert), "NEXTPROXY_TLS_KEY_FILE": str(key)})
    assert config.certificates[0].key.path == str(key)
    assert config.certificates[0].key.origin == "NEXTPROXY_TLS_KEY_FILE"


@pytest.mark.parametrize(
    "variables, key, words",
    [
        ({}, "NEXTPROXY_TLS_CERTIFICATE", "missing"),
        ({"NEXTPROXY_TLS_CERTIFICATE": CERT}, "NEXTPROXY_TLS_KEY", "missing"),
        ({**BASE, "NEXTPROXY_TLS_KEY_FILE": "/x"}, "NEXTPROXY_TLS_KEY", "not both"),
        ({"NEXTPROXY_TLS_CERTIFICATE_FILE": "/nonexistent/cert.pem", "NEXTPROXY_TLS_KEY": KEY}, "NEXTPROXY_TLS_CERTIFICATE_FILE", "cannot read"),
        ({**BASE, "NEXTPROXY_API_MODE": "maybe"}, "NEXTPROXY_API_MODE", "passthrough|terminate"),
        ({**BASE, "NEXTPROXY_API_MODE": "terminate", "NEXTPROXY_API_CLIENT_AUTH": "maybe"}, "NEXTPROXY_API_CLIENT_AUTH", "none|optional|require-any|require-ca"),
        ({**BASE, "NEXTPROXY_LISTEN": "0.0.0.0"}, "NEXTPROXY_LISTEN", "host:port"),
        ({**BASE, "NEXTPROXY_LISTEN": "0.0.0.0:99999"}, "NEXTPROXY_LISTEN", "port"),
        ({**BASE, "NEXTPROXY_ADMIN_LISTEN": "::1:9613"}, "NEXTPROXY_ADMIN_LISTEN", "brackets"),
        ({**BASE, "NEXTPROXY_NS_HOST": "bad host!"}, "NEXTPROXY_NS_HOST", "host name"),
        ({**BASE, "NEXTPROXY_NS_API_SNI": "not a name"}, "NEXTPROXY_NS_API_SNI", "server name"),
        ({**BASE, "NEXTPROXY_NS_API_SNI": "a.example", "NEXTPROXY_MC_API_SNI": "A.example"}, "NEXTPROXY_MC_API_SNI", "already used"),
        ({**BASE, "NEXTPROXY_API_MODE": "terminate", "NEXTPROXY_API_CLIENT_AUTH": "require-ca"}, "NEXTPROXY_API_CLIENT_CA_FILE", "required"),
        ({**BASE, "NEXTPROXY_API_CLIENT_AUTH": "optional"}, "NEXTPROXY_API_CLIENT_AUTH", "NEXTPROXY_API_MODE=terminate"),
        ({**BASE, "NEXTPROXY_UPSTREAM_TLS": "perhaps"}, "NEXTPROXY_UPSTREAM_TLS", "true or false"),
        ({**BASE, "NEXTPROXY_UPSTREAM_CA_FILE": "/x"}, "NEXTPROXY_UPSTREAM_CA_FILE", "NEXTPROXY_UPSTREAM_TLS=true"),
        ({**BASE, "NEXTPROXY_WORKERS": "0"}, "NEXTPROXY_WORKERS", ">= 1"),
        ({**BASE, "NEXTPROXY_LOG_LEVEL": "loud"}, "NEXTPROXY_LOG_LEVEL", "debug|info"),
        ({**BASE, "NEXTPROXY_NS_API_SNI": "a.example", "NEXTPROXY_NS_API_ALLOW": "sha1:ab"}, "NEXTPROXY_NS_API_ALLOW", "kind:value"),
        ({**BASE, "NEXTPROXY_NS_API_SNI": "a.example", "NEXTPROXY_NS_API_ALLOW": "cn:x"}, "NEXTPROXY_NS_API_ALLOW", "terminate"),
        ({**BASE, "NEXTPROXY_LISTEN": "127.0.0.1:9613", "NEXTPROXY_ADMIN_LISTEN": "127.0.0.1:9613"}, "admin_listen", "same address"),
    ],
)
def test_bad_environment(variables: dict[str, str], key: str, words: str) -> None:
    exc = error(lambda: from_environment(variables))
    assert exc.key == key
    assert words in exc.reason


def test_unknown_variables_are_reported() -> None:
    assert unknown_variables({**BASE, "NEXTPROXY_NS_HOTS": "x", "PATH": "/bin"}) == ["NEXTPROXY_NS_HOTS"]


TOML = """
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:19613"

[tls]
certificates = [{ certificate = '''CERT''', key = '''KEY''' }]

[upstreams.app]
servers = ["127.0.0.1:8001", "[::1]:8002"]

[upstreams.api]
servers = ["127.0.0.1:8443"]
tls = true
server_name = "api.internal"

[[routes]]
name = "app"
path = "/app/"
upstream = "app"
websocket = "tunnel"
max_message_size = 1024

[[sni_routes]]
name = "api"
server_names = ["api.example", "*.api.example"]
action = "passthrough"
upstream = "api"

[timeouts]
connect = 1.5

[limits]
max_header_size = 8192
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "nextproxy.toml"
    path.write_text(text.replace("CERT", CERT).replace("KEY", KEY))
    return str(path)


def test_toml(tmp_path: Path) -> None:
    config = from_toml(write(tmp_path, TOML), {})
    assert config.listen == Address("127.0.0.1", 0)
    assert config.upstream("app").servers == (Address("127.0.0.1", 8001), Address("::1", 8002))
    assert config.routes[0].prefix == "/app" and config.routes[0].websocket is WebSocketMode.TUNNEL
    assert config.upstream("api").tls is not None and config.upstream("api").tls.server_name == "api.internal"  # type: ignore[union-attr]
    assert config.sni_routes[0].server_names == ("api.example", "*.api.example")
    assert config.timeouts.connect == 1.5 and config.timeouts.client_hello == 10
    assert config.limits.max_header_size == 8192
    assert config.routes[0].encoded_slashes is EncodedSlashes.FORWARD


def test_toml_encoded_slashes(tmp_path: Path) -> None:
    config = from_toml(write(tmp_path, TOML.replace("max_message_size = 1024", 'max_message_size = 1024\nencoded_slashes = "reject"')), {})
    assert config.routes[0].encoded_slashes is EncodedSlashes.REJECT
    path = write(tmp_path, TOML.replace("max_message_size = 1024", 'max_message_size = 1024\nencoded_slashes = "decode"'))
    exc = error(lambda: from_toml(path, {}))
    assert exc.key == "routes[0].encoded_slashes" and "forward|reject" in exc.reason


def test_toml_listen_may_be_a_list(tmp_path: Path) -> None:
    config = from_toml(write(tmp_path, TOML.replace('listen = "127.0.0.1:0"', 'listen = ["127.0.0.1:0", "[::1]:0"]')), {})
    assert config.listen == Address("127.0.0.1", 0) and config.listen_also == (Address("::1", 0),)
    path = write(tmp_path, TOML.replace('listen = "127.0.0.1:0"', 'listen = ["127.0.0.1:8443", "127.0.0.1:8443"]'))
    assert "twice" in error(lambda: from_toml(path, {})).reason
    path = write(tmp_path, TOML.replace('listen = "127.0.0.1:0"', "listen = []"))
    assert error(lambda: from_toml(path, {})).key == "listen"


def test_config_variable_replaces_the_preset(tmp_path: Path) -> None:
    path = write(tmp_path, TOML)
    config = load({"NEXTPROXY_CONFIG": path, "NEXTPROXY_NS_HOST": "ignored"})
    assert config.source == path and {r.name for r in config.routes} == {"app"}


@pytest.mark.parametrize(
    "edit, key, words",
    [
        (("listen =", "lisen ="), "lisen", "unknown key"),
        (("connect = 1.5", "connect = 1.5\nconect = 2"), "timeouts.conect", "unknown key"),
        (("connect = 1.5", "connect = 0"), "timeouts.connect", ">= 0.01"),
        (("max_header_size = 8192", "max_header_size = 0"), "limits.max_header_size", ">= 1"),
        (("max_message_size = 1024", "max_message_size = 1024\nping_interval = 0"), "routes[0].ping_interval", ">= 0.01"),
        (("connect = 1.5", 'connect = "soon"'), "timeouts.connect", "number"),
        (("max_header_size = 8192", "max_header_size = 1.5"), "limits.max_header_size", "whole number"),
        (('websocket = "tunnel"', 'websocket = "bytes"'), "routes[0].websocket", "frames|tunnel"),
        (('upstream = "app"', 'upstream = "nope"'), "routes.app.upstream", "no upstream"),
        (('path = "/app/"', 'path = "app"'), "routes[0].path", "absolute path"),
        (('action = "passthrough"', 'action = "forward"'), "sni_routes[0].action", "passthrough|terminate"),
        (('servers = ["127.0.0.1:8001", "[::1]:8002"]', 'servers = ["127.0.0.1"]'), "upstreams.app.servers", "host:port"),
        (("[tls]", "[tls]\nextra = 1"), "tls.extra", "unknown key"),
        (("key = '''KEY'''", "key_file = '/nonexistent'"), "tls.certificates[0].key_file", "cannot read"),
        (("key = '''KEY'''", "key = '''KEY''', key_file = '/x'"), "tls.certificates[0].key", "not both"),
        (("listen =", "listen = [\n"), "NEXTPROXY_CONFIG", "not valid TOML"),
    ],
)
def test_bad_toml(tmp_path: Path, edit: tuple[str, str], key: str, words: str) -> None:
    path = write(tmp_path, TOML.replace(*edit))
    exc = error(lambda: from_toml(path, {}))
    assert exc.key == key, str(exc)
    assert words in exc.reason


def test_an_allow_list_where_no_certificate_is_asked_for_is_warned_about(tmp_path: Path) -> None:
    """Found by black-box testing: such a list refuses every request (403 no_certificate) and
    `check` said nothing. Legal (a name closed to everyone), so a warning, not an error."""
    from nextproxy.config.model import allow_list_warnings

    allowed = TOML.replace("max_message_size = 1024", 'max_message_size = 1024\nallow = ["cn:x"]')
    [warning] = allow_list_warnings(from_toml(write(tmp_path, allowed), {}))
    assert warning.startswith("routes.app.allow: no connection reaching this route is asked for a client certificate")
    gated = allowed.replace('action = "passthrough"\nupstream = "api"', 'action = "terminate"\nallow = ["cn:x"]')
    warnings = allow_list_warnings(from_toml(write(tmp_path, gated), {}))
    assert [w.split(":")[0] for w in warnings] == ["sni_routes.api.allow", "routes.app.allow"]
    asking = allowed.replace('action = "passthrough"\nupstream = "api"', 'action = "terminate"\nclient_auth = "optional"')
    assert allow_list_warnings(from_toml(write(tmp_path, asking), {})) == []
