"""A port that is already served fails the start: one line naming the key and address, exit 2.

Real ``python -m nextproxy run`` processes on loopback. Every process runs in its own session
and is killed with its whole group when a bound runs out, so a supervisor that never exits (the
old crash loop) fails its test instead of hanging the suite or leaving workers behind.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.process import free_port

EXIT_WITHIN = 15.0
"""Seconds a failing start may take: spawning workers costs about a second each on 2 busy cores."""


@dataclass
class Outcome:
    code: int | None
    """None: still running when the bound ran out (then killed with its process group)."""
    stdout: str
    stderr: str

    def events(self, name: str) -> list[dict[str, object]]:
        found = []
        for line in self.stdout.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == name:
                found.append(record)
        return found


def environment(env: dict[str, str], workers: int) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NEXTPROXY_")}
    return {**clean, **env, "NEXTPROXY_WORKERS": str(workers), "NEXTPROXY_LOG_FORMAT": "json"}


def kill_group(process: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    """SIGKILL the process and its workers (its own session, started by this test)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(10)


def run_to_exit(env: dict[str, str], workers: int, tmp_path: Path, argv: list[str] | None = None) -> Outcome:
    """Run the proxy until it exits, or EXIT_WITHIN seconds (then kill it and its workers)."""
    out, err = tmp_path / f"out-{time.monotonic_ns()}", tmp_path / f"err-{time.monotonic_ns()}"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            argv or [sys.executable, "-m", "nextproxy", "run"], env=environment(env, workers),
            stdout=stdout, stderr=stderr, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            code: int | None = process.wait(EXIT_WITHIN)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            kill_group(process)
    return Outcome(code, out.read_text(), err.read_text())


def assert_one_line(outcome: Outcome, key: str, address: str) -> None:
    running = f"exit {outcome.code} (None: still running after {EXIT_WITHIN} s)"
    assert outcome.code == 2, f"{running}\n{outcome.stderr[-3000:]}"
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1, outcome.stderr
    assert lines[0].startswith(f"nextproxy: {key}: cannot listen on {address}: "), lines[0]
    assert "Traceback" not in outcome.stderr + outcome.stdout


def assert_free(host: str, port: int) -> None:
    """Nothing of the failed start stays bound (an exclusive bind succeeds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, port))


def toml(tmp_path: Path, pki_files: dict[str, Path], listen: str, admin: str) -> dict[str, str]:
    """The environment of a proxy configured by a TOML file (keys: ``listen``, ``admin_listen``)."""
    config = tmp_path / f"nextproxy-{time.monotonic_ns()}.toml"
    config.write_text(
        f"listen = {listen}\nadmin_listen = {admin}\n"
        f'[tls]\ncertificates = [{{certificate_file = "{pki_files["edge.pem"]}", key_file = "{pki_files["edge.key"]}"}}]\n'
        '[upstreams.app]\nservers = ["127.0.0.1:9"]\n[[routes]]\nname = "app"\npath = "/app"\nupstream = "app"\n'
    )
    return {"NEXTPROXY_CONFIG": str(config)}


def preset(pki_files: dict[str, Path], listen: str, admin: str) -> dict[str, str]:
    """The environment of a proxy on the preset (keys: ``NEXTPROXY_LISTEN``, ``NEXTPROXY_ADMIN_LISTEN``)."""
    return {
        "NEXTPROXY_TLS_CERTIFICATE_FILE": str(pki_files["edge.pem"]),
        "NEXTPROXY_TLS_KEY_FILE": str(pki_files["edge.key"]),
        "NEXTPROXY_LISTEN": listen,
        "NEXTPROXY_ADMIN_LISTEN": admin,
    }


def holder(host: str, port: int) -> socket.socket:
    """Some other program's listener: bound and listening, without SO_REUSEPORT."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, port))
    sock.listen()
    return sock


def ready(admin_port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=2)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@pytest.mark.parametrize("first_workers", [1, 2])
def test_a_second_proxy_on_a_served_port_exits_2_and_the_first_keeps_it(
    tmp_path: Path, pki_files: dict[str, Path], first_workers: int
) -> None:
    """Two proxies of the same user on one port: SO_REUSEPORT would let the kernel split the
    traffic between them. The second, with one worker or two, must refuse to start."""
    port, admin = free_port(), free_port()
    env = toml(tmp_path, pki_files, f'"127.0.0.1:{port}"', f'"127.0.0.1:{admin}"')
    first = subprocess.Popen([sys.executable, "-m", "nextproxy", "run"], env=environment(env, first_workers),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not ready(admin):
            assert first.poll() is None and time.monotonic() < deadline, "the first proxy did not start"
            time.sleep(0.1)
        for second_workers in (1, 2):
            second = preset(pki_files, f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")
            assert_one_line(run_to_exit(second, second_workers, tmp_path), "NEXTPROXY_LISTEN", f"127.0.0.1:{port}")
        assert first.poll() is None and ready(admin)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the first one still accepts on its port
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0
    finally:
        kill_group(first)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("where", ["preset-ipv4", "toml-ipv6", "toml-second-of-a-list"])
def test_a_busy_edge_port_is_one_line_and_exit_2(
    tmp_path: Path, pki_files: dict[str, Path], where: str, workers: int
) -> None:
    """Another program holds an edge address: the same line with one worker or two (whose
    supervisor used to restart failing workers forever), for IPv6 and any address of a list."""
    port, admin = free_port(), free_port()
    if where == "preset-ipv4":
        host, key, env = "127.0.0.1", "NEXTPROXY_LISTEN", preset(pki_files, f"127.0.0.1:{port}", f"127.0.0.1:{admin}")
    elif where == "toml-ipv6":
        host, key, env = "::1", "listen", toml(tmp_path, pki_files, f'"[::1]:{port}"', f'"127.0.0.1:{admin}"')
    else:
        other = free_port()
        host, key = "127.0.0.1", "listen"
        env = toml(tmp_path, pki_files, f'["127.0.0.1:{other}", "127.0.0.1:{port}"]', f'"127.0.0.1:{admin}"')
    with holder(host, port):
        outcome = run_to_exit(env, workers, tmp_path)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    assert_one_line(outcome, key, address)
    assert not outcome.events("worker_started")  # found before any worker is spawned
    assert_free("127.0.0.1", admin)
    if where == "toml-second-of-a-list":
        assert_free("127.0.0.1", other)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("source", ["preset", "toml"])
def test_a_busy_admin_port_is_one_line_and_exit_2(
    tmp_path: Path, pki_files: dict[str, Path], source: str, workers: int
) -> None:
    port, admin = free_port(), free_port()
    if source == "preset":
        key, env = "NEXTPROXY_ADMIN_LISTEN", preset(pki_files, f"127.0.0.1:{port}", f"127.0.0.1:{admin}")
    else:
        key, env = "admin_listen", toml(tmp_path, pki_files, f'"127.0.0.1:{port}"', f'"127.0.0.1:{admin}"')
    with holder("127.0.0.1", admin):
        outcome = run_to_exit(env, workers, tmp_path)
    assert_one_line(outcome, key, f"127.0.0.1:{admin}")
    assert not outcome.events("worker_started")
    assert_free("127.0.0.1", port)  # the edge port is not left bound


def test_workers_that_cannot_bind_at_start_end_the_supervisor_without_restarts(
    tmp_path: Path, pki_files: dict[str, Path]
) -> None:
    """Should the port be taken between the supervisor's check and the workers' binds, the
    workers fail at start: the supervisor reports the first one's line and exits 2 instead of
    replacing them forever. The race is made certain by turning the supervisor's check off
    (the spawned workers import a fresh, untouched copy of the module)."""
    port, admin = free_port(), free_port()
    env = preset(pki_files, f"127.0.0.1:{port}", f"127.0.0.1:{admin}")
    argv = [sys.executable, "-c", (
        "import sys; import nextproxy.edge.listener as listener; listener.probe = lambda config: None\n"
        "from nextproxy.cli import main; sys.exit(main(['run']))"
    )]  # fmt: skip
    with holder("127.0.0.1", port):
        outcome = run_to_exit(env, 2, tmp_path, argv)
    assert_one_line(outcome, "NEXTPROXY_LISTEN", f"127.0.0.1:{port}")
    assert len(outcome.events("worker_started")) == 2, outcome.stdout  # none was replaced
    assert_free("127.0.0.1", admin)
