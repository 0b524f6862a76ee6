"""The command line as a user runs it: `nextproxy check`, and bad configuration failing cleanly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest



def run(args: list[str], env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NEXTPROXY_")}
    return subprocess.run([sys.executable, "-m", "nextproxy", *args], env={**clean, **env}, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def preset(pki_files: dict[str, Path]) -> dict[str, str]:
    return {
        "NEXTPROXY_TLS_CERTIFICATE_FILE": str(pki_files["edge.pem"]),
        "NEXTPROXY_TLS_KEY_FILE": str(pki_files["edge.key"]),
        "NEXTPROXY_NS_API_SNI": "api.ns.example",
        "NEXTPROXY_LISTEN": f"127.0.0.1:{free_port()}",
        "NEXTPROXY_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
    }


def test_check_prints_the_routing_table(preset: dict[str, str]) -> None:
    result = run(["check"], preset)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for needle in ("sni api.ns.example", "passthrough", "ns-api (ns:8080)", "/ns/websocket", "ns-websocket (ns:9999)",
                   "/ns/sigmai", "/mc/sigmai", "mc-sigmai (mc:8888)", "/sfs/sigmai", "sfs-sigmai (sfs:8888)", "404"):  # fmt: skip
        assert needle in out, out


def test_check_with_a_toml_file(preset: dict[str, str], pki_files: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "nextproxy.toml"
    config.write_text(
        f'listen = "127.0.0.1:0"\n[tls]\ncertificates = [{{certificate_file = "{pki_files["edge.pem"]}", key_file = "{pki_files["edge.key"]}"}}]\n'
        '[upstreams.app]\nservers = ["127.0.0.1:9"]\n[[routes]]\nname = "app"\npath = "/app"\nupstream = "app"\n'
    )
    result = run(["check", "--config", str(config)], {})
    assert result.returncode == 0, result.stderr
    assert "path /app" in result.stdout and "app (127.0.0.1:9)" in result.stdout


@pytest.mark.parametrize(
    "change, message",
    [
        ({"NEXTPROXY_TLS_KEY_FILE": None}, "NEXTPROXY_TLS_KEY: missing"),
        ({"NEXTPROXY_TLS_KEY": "x"}, "NEXTPROXY_TLS_KEY: set either"),
        ({"NEXTPROXY_TLS_CERTIFICATE_FILE": "/nonexistent.pem"}, "NEXTPROXY_TLS_CERTIFICATE_FILE: cannot read"),
        ({"NEXTPROXY_API_MODE": "maybe"}, "NEXTPROXY_API_MODE: expected passthrough|terminate, got 'maybe'"),
        ({"NEXTPROXY_LISTEN": "localhost"}, "NEXTPROXY_LISTEN: expected host:port"),
        ({"NEXTPROXY_TLS_KEY_FILE": "client.key"}, "NEXTPROXY_TLS_KEY_FILE"),
        ({"NEXTPROXY_TLS_CERTIFICATE_FILE": "client.key"}, "NEXTPROXY_TLS_CERTIFICATE_FILE"),
    ],
    ids=["missing", "both-forms", "unreadable", "unknown-mode", "bad-address", "key-mismatch", "not-a-certificate"],
)
@pytest.mark.parametrize("command", ["run", "check"])
def test_bad_configuration_is_one_line_and_exit_2_before_binding(
    preset: dict[str, str], pki_files: dict[str, Path], change: dict[str, str | None], message: str, command: str
) -> None:
    env = dict(preset)
    for key, value in change.items():
        if value is None:
            env.pop(key)
        else:
            env[key] = str(pki_files[value]) if value in pki_files else value
    result = run([command], env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nextproxy: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    host, port = preset["NEXTPROXY_LISTEN"].rsplit(":", 1)
    with socket.socket() as sock:  # nothing was left bound
        sock.bind((host, int(port)))


def test_port_in_use_is_a_clean_error(preset: dict[str, str]) -> None:
    host, port = preset["NEXTPROXY_LISTEN"].rsplit(":", 1)
    with socket.socket() as holder:
        holder.bind((host, int(port)))
        holder.listen()
        result = run(["run"], preset)
    assert result.returncode == 2
    assert "NEXTPROXY_LISTEN: cannot listen on" in result.stderr and "Traceback" not in result.stderr


def test_version_and_help() -> None:
    assert run(["--version"], {}).stdout.startswith("nextproxy ")
    assert "demo" in run(["--help"], {}).stdout


def test_admin_port_in_use_is_a_clean_error(preset: dict[str, str]) -> None:
    host, port = preset["NEXTPROXY_ADMIN_LISTEN"].rsplit(":", 1)
    with socket.socket() as holder:
        holder.bind((host, int(port)))
        holder.listen()
        result = run(["run"], preset)
    assert result.returncode == 2
    assert result.stderr == f"nextproxy: NEXTPROXY_ADMIN_LISTEN: cannot listen on {host}:{port}: Address already in use\n"


def test_demo_on_a_busy_port_names_the_option_before_any_banner() -> None:
    """Found by black-box testing: the demo printed its whole 'try this' banner, then failed
    naming NEXTPROXY_LISTEN, a variable the user never set."""
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        result = run(["demo", "--port", str(port), "--admin-port", str(free_port())], {})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"nextproxy demo: --port {port}: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_healthcheck_follows_the_configured_admin_port(preset: dict[str, str]) -> None:
    import time

    assert run(["healthcheck"], preset).returncode == 1  # nothing is running yet
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NEXTPROXY_")}
    proxy = subprocess.Popen([sys.executable, "-m", "nextproxy", "run"], env={**clean, **preset}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while run(["healthcheck"], preset).returncode != 0:
            assert time.monotonic() < deadline and proxy.poll() is None
            time.sleep(0.2)
        # Found by black-box testing: healthcheck loaded the whole configuration, so a
        # certificate file rotated away under the running proxy (which serves on the one it
        # loaded) made it "unhealthy", with exit 2, which Docker reserves. Only the admin
        # address is read now, and any failure is 1.
        moved = {**preset, "NEXTPROXY_TLS_CERTIFICATE_FILE": preset["NEXTPROXY_TLS_CERTIFICATE_FILE"] + ".gone"}
        assert run(["healthcheck"], moved).returncode == 0
        bad = run(["healthcheck"], {**preset, "NEXTPROXY_ADMIN_LISTEN": "not an address"})
        assert bad.returncode == 1 and bad.stderr.startswith("nextproxy healthcheck: NEXTPROXY_ADMIN_LISTEN: ")
    finally:
        proxy.terminate()
        assert proxy.wait(15) == 0


def test_check_shows_the_edge_policies(preset: dict[str, str]) -> None:
    """Issue 13's settings are visible before anything runs: listener PROXY trust and rate,
    per-route sources, rate limits and PROXY headers."""
    env = {
        **preset, "NEXTPROXY_MC_API_SNI": "api.mc.example", "NEXTPROXY_API_MODE": "terminate",
        "NEXTPROXY_PROXY_PROTOCOL_TRUSTED": "10.0.0.0/8,fd00::/8", "NEXTPROXY_NEW_CONNECTIONS_PER_SECOND": "50",
        "NEXTPROXY_NS_API_ALLOW_SOURCES": "203.0.113.0/24", "NEXTPROXY_API_RATE_LIMIT": "20",
        "NEXTPROXY_API_PROXY_PROTOCOL": "v2",
    }  # fmt: skip
    result = run(["check"], env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "PROXY protocol from 10.0.0.0/8 fd00::/8" in out and "new connections: 50/s per client" in out
    assert "sources 203.0.113.0/24, rate 20/s burst 20" in out
    assert "ns-api (ns:8080) proxy-protocol v2" in out


def test_errors_name_where_the_value_came_from(tmp_path: Path) -> None:
    """A path given with --config is named as --config, not as the variable it did not come
    from; a demo port as --port, not as the NEXTPROXY_LISTEN it becomes."""
    missing = str(tmp_path / "missing.toml")
    result = run(["check", "--config", missing], {})
    assert result.returncode == 2 and result.stderr == f"nextproxy: --config: cannot read {missing!r}: No such file or directory\n"
    result = run(["check"], {"NEXTPROXY_CONFIG": missing})
    assert result.returncode == 2 and result.stderr.startswith("nextproxy: NEXTPROXY_CONFIG: cannot read")
    result = run(["demo", "--port", "70000"], {})
    assert result.returncode == 2 and "argument --port: expected a port 1-65535, got '70000'" in result.stderr
    assert "NEXTPROXY_LISTEN" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("setting, message", [
    ("[limits]\nmax_connections = 100000000000000000000", "limits.max_connections: expected a number <= 2147483647, got 100000000000000000000"),
    ("[timeouts]\nclient_idle = nan", "timeouts.client_idle: expected a number, got nan"),
    ("[timeouts]\nclient_idle = inf", "timeouts.client_idle: expected a number <= 31536000, got inf"),
])  # fmt: skip
def test_absurd_values_are_refused_by_name(preset: dict[str, str], pki_files: dict[str, Path], tmp_path: Path, setting: str, message: str) -> None:
    config = tmp_path / "nextproxy.toml"
    config.write_text(
        f'listen = "127.0.0.1:0"\n[tls]\ncertificates = [{{certificate_file = "{pki_files["edge.pem"]}", key_file = "{pki_files["edge.key"]}"}}]\n'
        '[upstreams.app]\nservers = ["127.0.0.1:9"]\n[[routes]]\nname = "app"\npath = "/app"\nupstream = "app"\n'
        f"{setting}\n"
    )
    result = run(["check", "--config", str(config)], {})
    assert result.returncode == 2 and result.stderr == f"nextproxy: {message}\n", result.stderr


def test_check_into_a_closed_pipe_is_quiet(preset: dict[str, str]) -> None:
    """`nextproxy check | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NEXTPROXY_")}
    check = subprocess.Popen([sys.executable, "-m", "nextproxy", "check"], env={**clean, **preset},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert check.stdout is not None and check.stderr is not None
    check.stdout.close()  # before it writes a byte
    err = check.stderr.read()
    assert check.wait(30) == 1
    assert b"Traceback" not in err and err == b"", err


def test_the_started_line_names_every_listen_address(pki_files: dict[str, Path], tmp_path: Path) -> None:
    """Found by black-box testing: it named the first address only, an IPv6 one unbracketed."""
    import json

    edge, admin = free_port(), free_port()
    config = tmp_path / "nextproxy.toml"
    config.write_text(
        f'listen = ["[::1]:{edge}", "127.0.0.1:{edge}"]\nadmin_listen = "127.0.0.1:{admin}"\n'
        f'[tls]\ncertificates = [{{certificate_file = "{pki_files["edge.pem"]}", key_file = "{pki_files["edge.key"]}"}}]\n'
        '[upstreams.app]\nservers = ["127.0.0.1:9"]\n[[routes]]\nname = "app"\npath = "/app"\nupstream = "app"\n'
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NEXTPROXY_")}
    proxy = subprocess.Popen([sys.executable, "-m", "nextproxy", "run", "--config", str(config)], env={**clean, "NEXTPROXY_LOG_FORMAT": "json"},
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        assert proxy.stdout is not None
        started = None
        for _ in range(20):  # bounded: the line comes within the first few
            event = json.loads(proxy.stdout.readline())
            if event["event"] == "started":
                started = event
                break
        assert started is not None
        assert started["listen"] == f"[::1]:{edge}, 127.0.0.1:{edge}" and started["admin"] == f"127.0.0.1:{admin}"
    finally:
        proxy.terminate()
        proxy.wait(15)


def test_check_names_preset_variables_and_warns_about_unknown_ones(preset: dict[str, str], tmp_path: Path) -> None:
    """Found by black-box testing: a CA bundle OpenSSL refuses was named by its TOML key under
    the preset, and `check` said nothing of a misspelt variable (only `run` logged it)."""
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    result = run(["check"], {**preset, "NEXTPROXY_UPSTREAM_TLS": "true", "NEXTPROXY_UPSTREAM_CA_FILE": str(not_pem)})
    assert result.returncode == 2 and result.stderr.startswith("nextproxy: NEXTPROXY_UPSTREAM_CA_FILE: "), result.stderr
    result = run(["check"], {**preset, "NEXTPROXY_NS_API_SNl": "typo.example"})
    assert result.returncode == 0
    assert result.stderr == "nextproxy check: warning: NEXTPROXY_NS_API_SNl is no nextproxy variable (a typo?)\n"


def test_check_warns_about_an_allow_list_nobody_can_pass(pki_files: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "nextproxy.toml"
    config.write_text(
        f'listen = "127.0.0.1:0"\n[tls]\ncertificates = [{{certificate_file = "{pki_files["edge.pem"]}", key_file = "{pki_files["edge.key"]}"}}]\n'
        '[upstreams.app]\nservers = ["127.0.0.1:9"]\n[[routes]]\nname = "app"\npath = "/app"\nupstream = "app"\nallow = ["cn:x"]\n'
    )
    result = run(["check", "--config", str(config)], {})
    assert result.returncode == 0
    assert result.stderr.startswith("nextproxy check: warning: routes.app.allow: no connection reaching this route is asked")
