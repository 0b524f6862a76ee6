"""A real `python -m nextproxy run` process with stand-in upstreams, for process-level tests."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from nextproxy.demo.pki import DemoPki, server_ssl_context
from nextproxy.demo.standins import StandIn, start_http_ws, start_tls_api
from nextproxy.demo.wsclient import WsClient, connect
from tests.integration.harness import LoopThread

NAME = "localhost"
API = "ns-api.localhost"
DENIED = "mc-api.localhost"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Upstreams:
    """Stand-ins on a background loop, shared by every process test in this module."""

    def __init__(self, pki: DemoPki) -> None:
        self.thread = LoopThread()

        async def boot() -> dict[str, StandIn]:
            return {
                "app": await start_http_ws("127.0.0.1", 0, "app"),
                "api": await start_tls_api("127.0.0.1", 0, "api", server_ssl_context(pki.upstream, pki.ca.certificate)),
            }

        self.standins = self.thread.call(boot())

    def address(self, name: str) -> str:
        host, port = self.standins[name].address
        return f"{host}:{port}"

    def close(self) -> None:
        async def stop() -> None:
            for standin in self.standins.values():
                await standin.close()

        self.thread.call(stop())
        self.thread.stop()


class Proxy:
    """A `python -m nextproxy run` subprocess with its own config folder and collected stdout."""

    def __init__(self, folder: Path, pki: DemoPki, upstreams: Upstreams, *, workers: int = 1, drain: float = 10, route_options: str = "",
                 shutdown_delay: float = 0, admin_tls: bool = False, extra: str = "", read_stdout: bool = True) -> None:  # fmt: skip
        """``extra``: TOML appended after ``[timeouts]`` (keys of it, then more tables).
        ``read_stdout=False``: nobody reads the proxy's stdout (a stalled log reader)."""
        self.folder = folder
        self.pki = pki
        self.cert, self.key = folder / "edge.pem", folder / "edge.key"
        self.cert.write_bytes(pki.edge.certificate)
        self.key.write_bytes(pki.edge.key)
        self.port, self.admin = free_port(), free_port()
        config = folder / "nextproxy.toml"
        config.write_text(f"""
listen = "127.0.0.1:{self.port}"
admin_listen = "127.0.0.1:{self.admin}"
[tls]
certificates = [{{ certificate_file = "{self.cert}", key_file = "{self.key}" }}]
[upstreams.app]
servers = ["{upstreams.address('app')}"]
[upstreams.api]
servers = ["{upstreams.address('api')}"]
[[routes]]
name = "app"
path = "/app"
upstream = "app"
{route_options}
[[sni_routes]]
name = "api"
server_names = ["{API}"]
action = "passthrough"
upstream = "api"
[[sni_routes]]
name = "guarded"
server_names = ["{DENIED}"]
action = "terminate"
upstream = "app"
allow = ["cn:nobody"]
[timeouts]
drain = {drain}
shutdown_delay = {shutdown_delay}
{extra}
""" + (f'[admin_tls]\ncertificate_file = "{self.cert}"\nkey_file = "{self.key}"\n' if admin_tls else ""))
        self.config_file = config
        self.admin_tls = admin_tls
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTPROXY_")}
        env.update(NEXTPROXY_CONFIG=str(config), NEXTPROXY_WORKERS=str(workers), NEXTPROXY_LOG_FORMAT="json")
        self.process = subprocess.Popen([sys.executable, "-m", "nextproxy", "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read if read_stdout else lambda: None, daemon=True)
        self._reader.start()
        self.context = ssl.create_default_context(cadata=pki.ca.certificate.decode())
        self.wait_for(lambda: self.get("/readyz")[0] == 200, 20, "ready")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in list(self.lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == name:
                found.append(record)
        return found

    def wait_for(self, check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except OSError:
                pass
            assert self.process.poll() is None or what == "exit", "".join(self.lines)[-3000:]
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n" + "".join(self.lines)[-3000:])

    def get(self, path: str) -> tuple[int, bytes]:
        conn: http.client.HTTPConnection
        if self.admin_tls:
            context = ssl.create_default_context(cadata=self.pki.ca.certificate.decode())
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            conn = http.client.HTTPSConnection("localhost", self.admin, timeout=5, context=context)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=5)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        _, body = self.get("/metrics")
        samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def https(self, path: str, server_name: str = NAME, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        tls = (context or self.context).wrap_socket(sock, server_hostname=server_name)
        conn = http.client.HTTPSConnection(server_name, self.port, timeout=10)
        conn.sock = tls
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def peer_certificate(self) -> bytes:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            with context.wrap_socket(sock, server_hostname=NAME) as tls:
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                return der

    def websocket(self) -> WsClient:
        return connect(f"wss://{NAME}:{self.port}/app/ws", address=("127.0.0.1", self.port), context=self.context)

    def memory_kib(self, field: str = "VmRSS") -> int:
        """VmRSS (now) or VmHWM (peak) of the proxy process, from /proc."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} for {self.process.pid}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self._reader.join(5)
