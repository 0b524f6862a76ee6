"""A bounded soak: mixed traffic through a real proxy process, with a leak check at the end.

    python benchmarks/soak.py [--minutes 10] [--sample 5] [--json out.json]

Runs ``python -m nextproxy run`` (one worker, a TOML configuration in a temporary folder) in
front of the demo stand-ins, and drives, all at once and for the whole run: keep-alive HTTPS
requests, a new TLS connection per request, passthrough connections (TLS end to end to the
stand-in API), wss sessions (a few messages each), bad input (plain HTTP, garbage, a truncated
ClientHello, an abandoned handshake), aborted transfers (a 4 MiB response cut after its first
bytes, a request body cut half-way) and a reload (SIGHUP) every 15 s.

Every ``--sample`` seconds it records the proxy's RSS and open descriptors (/proc), and its
asyncio tasks and edge connections (``/metrics``: ``nextproxy_asyncio_tasks``,
``nextproxy_connections_active``). It exits 1 with one line per problem if any good request
failed, or if a series keeps rising after warm-up: the floor (lowest sample) of the last third
of the samples against the floor of the second third (the first third is warm-up), with a
tolerance per series (``TOLERANCE``). Floors, not medians: a leak lifts the floor, while the
traffic's own buffers (a 4 MiB response, a reload) make RSS swing by 10 MiB and more between
samples, enough to move a median of a dozen samples (a 3-minute run read medians 48.9 and 54.6
MiB in its last two thirds and 48.5 MiB at the end, idle). Everything talks to 127.0.0.1 only,
and every step has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from nextproxy.demo.pki import DemoPki, make_pki, server_ssl_context
from nextproxy.demo.standins import start_http_ws, start_tls_api

NAME = "localhost"
API = "ns-api.localhost"
STEP_TIMEOUT = 10.0
RELOAD_EVERY = 15.0
TOLERANCE = {"rss_kib": (0.05, 2048), "fds": (0.0, 8), "tasks": (0.0, 8), "connections": (0.0, 8)}
"""Per series: (relative, absolute) growth allowed from the second third's floor to the last's."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Tally:
    ok: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def good(self, kind: str) -> None:
        self.ok[kind] = self.ok.get(kind, 0) + 1

    def bad(self, kind: str, detail: str) -> None:
        self.failed[kind] = self.failed.get(kind, 0) + 1
        if len(self.examples) < 10:
            self.examples.append(f"{kind}: {detail}")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of one response framed by Content-Length (what the stand-ins send)."""
    status, body, _ = await read_kept_response(reader)
    return status, body


async def read_kept_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """``read_response``, and whether the response closes the connection (``connection: close``)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
        elif name.strip().lower() == "connection":
            close = "close" in value.lower()
    return status, await reader.readexactly(length), close


def request(path: str, *, close: bool = False, host: str = NAME, body: bytes = b"") -> bytes:
    extra = "connection: close\r\n" if close else ""
    if body:
        extra += f"content-length: {len(body)}\r\n"
    return f"{'POST' if body else 'GET'} {path} HTTP/1.1\r\nhost: {host}\r\n{extra}\r\n".encode() + body


class Soak:
    def __init__(self, folder: Path, pki: DemoPki, minutes: float, sample_every: float) -> None:
        self.folder, self.pki = folder, pki
        self.end = time.monotonic() + minutes * 60
        self.sample_every = sample_every
        self.tally = Tally()
        self.samples: list[dict[str, float]] = []
        self.context = ssl.create_default_context(cadata=pki.ca.certificate.decode())
        self.port, self.admin = free_port(), free_port()
        self.process: subprocess.Popen[bytes] | None = None

    # the proxy
    def start_proxy(self, app: str, api: str) -> None:
        cert, key = self.folder / "edge.pem", self.folder / "edge.key"
        cert.write_bytes(self.pki.edge.certificate)
        key.write_bytes(self.pki.edge.key)
        config = self.folder / "nextproxy.toml"
        config.write_text(f"""
listen = "127.0.0.1:{self.port}"
admin_listen = "127.0.0.1:{self.admin}"
[tls]
certificates = [{{ certificate_file = "{cert}", key_file = "{key}" }}]
[upstreams.app]
servers = ["{app}"]
[upstreams.api]
servers = ["{api}"]
[[routes]]
name = "app"
path = "/app"
upstream = "app"
[[sni_routes]]
name = "api"
server_names = ["{API}"]
action = "passthrough"
upstream = "api"
[timeouts]
client_hello = 2
handshake = 2
""")
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTPROXY_")}
        env.update(NEXTPROXY_CONFIG=str(config), NEXTPROXY_LOG_LEVEL="warning")
        log = open(self.folder / "proxy.log", "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "nextproxy", "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz", timeout=2).status == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("soak: the proxy did not become ready:\n" + (self.folder / "proxy.log").read_text()[-2000:])

    async def tls(self, server_name: str = NAME) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port, ssl=self.context, server_hostname=server_name)

    # traffic: each loop runs until the end, every step bounded by STEP_TIMEOUT
    async def keep_alive(self) -> None:
        """As an HTTP client keeps a connection: a new one after a response that says close (a
        reload ends keep-alive on the replaced configuration), and one retry on a new one when a
        kept connection closes before any byte of the answer, the race every keep-alive client
        meets at a server's idle close (RFC 9112 section 9.3.1; browsers and curl do it)."""
        writer: asyncio.StreamWriter | None = None
        try:
            while time.monotonic() < self.end:
                fresh = writer is None
                if writer is None:
                    reader, writer = await self.tls()
                writer.write(request("/app/keepalive"))
                try:
                    status, _, close = await asyncio.wait_for(read_kept_response(reader), STEP_TIMEOUT)
                except asyncio.IncompleteReadError as exc:
                    if fresh or exc.partial:
                        raise
                    writer.close()
                    writer = None  # closed while idle: the request goes again, on a new one
                    continue
                self._check("keep-alive", status == 200, f"status {status}")
                if close:
                    writer.close()
                    writer = None
                await asyncio.sleep(0.01)
        finally:
            if writer is not None:
                writer.close()

    async def loop_of(self, kind: str, step: object, pause: float) -> None:
        while time.monotonic() < self.end:
            try:
                await asyncio.wait_for(step(), STEP_TIMEOUT)  # type: ignore[operator]
            except Exception as exc:  # a good request that failed
                self.tally.bad(kind, repr(exc))
            await asyncio.sleep(pause)

    async def new_connection(self) -> None:
        reader, writer = await self.tls()
        writer.write(request("/app/new", close=True))
        status, _ = await read_response(reader)
        writer.close()
        self._check("new-connection", status == 200, f"status {status}")

    async def passthrough(self) -> None:
        reader, writer = await self.tls(API)
        writer.write(request("/passthrough", close=True, host=API))
        status, body = await read_response(reader)
        writer.close()
        self._check("passthrough", status == 200 and b'"service": "api"' in body, f"status {status}")

    async def websocket(self) -> None:
        from nextproxy.demo.wsclient import connect

        def session() -> None:
            ws = connect(f"wss://{NAME}:{self.port}/app/ws", address=("127.0.0.1", self.port), context=self.context)
            try:
                for i in range(5):
                    ws.send(f"soak {i}")
                    got = ws.recv()
                    assert got.data == f"soak {i}", got
            finally:
                ws.close()

        await asyncio.get_running_loop().run_in_executor(None, session)
        self.tally.good("websocket")

    async def bad_input(self) -> None:
        """Refused or abandoned on purpose: only the proxy's survival is checked, not an answer."""
        for payload in (b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", os.urandom(300), b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.write(payload)
            try:
                await asyncio.wait_for(reader.read(4096), 0.3)
            except TimeoutError:
                pass  # an unfinished hello: we leave; the proxy's client_hello timeout ends it
            writer.close()
        self.tally.good("bad-input")

    async def aborted(self) -> None:
        reader, writer = await self.tls()
        writer.write(request("/app/big?bytes=4194304"))
        await reader.readexactly(4096)
        writer.transport.abort()  # cut mid-response
        reader, writer = await self.tls()
        writer.write(b"POST /app/upload HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100000\r\n\r\n" + b"x" * 50000)
        await writer.drain()
        writer.transport.abort()  # cut mid-request-body
        self.tally.good("aborted")

    async def reloads(self) -> None:
        while time.monotonic() < self.end:
            await asyncio.sleep(RELOAD_EVERY)
            assert self.process is not None
            self.process.send_signal(signal.SIGHUP)
            self.tally.good("reload")

    def _check(self, kind: str, ok: bool, detail: str) -> None:
        if ok:
            self.tally.good(kind)
        else:
            self.tally.bad(kind, detail)

    # sampling
    async def sampler(self) -> None:
        loop = asyncio.get_running_loop()
        while time.monotonic() < self.end:
            await asyncio.sleep(self.sample_every)
            sample = await loop.run_in_executor(None, self.sample)
            self.samples.append(sample)
            print(" ".join(f"{k}={v:g}" for k, v in sample.items()), flush=True)

    def sample(self) -> dict[str, float]:
        assert self.process is not None
        pid = self.process.pid
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=5).read().decode()
        values = {}
        for line in text.splitlines():
            if line.startswith(("nextproxy_asyncio_tasks ", 'nextproxy_connections_active{listener="edge"}')):
                values[line.split()[0]] = float(line.split()[1])
        return {
            "t": round(time.monotonic(), 1), "rss_kib": rss, "fds": fds,
            "tasks": values.get("nextproxy_asyncio_tasks", -1.0),
            "connections": values.get('nextproxy_connections_active{listener="edge"}', -1.0),
        }  # fmt: skip

    async def run(self) -> None:
        jobs = [self.keep_alive() for _ in range(4)]
        jobs += [self.loop_of("new-connection", self.new_connection, 0.02) for _ in range(2)]
        jobs += [
            self.loop_of("passthrough", self.passthrough, 0.05), self.loop_of("websocket", self.websocket, 0.2),
            self.loop_of("bad-input", self.bad_input, 0.2), self.loop_of("aborted", self.aborted, 0.3),
            self.reloads(), self.sampler(),
        ]  # fmt: skip
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                self.tally.bad("driver", repr(result))


def verdict(samples: list[dict[str, float]], tally: Tally) -> list[str]:
    """Problems found: failed good requests, and series still rising after warm-up."""
    problems = [f"{n} good {kind} requests failed" for kind, n in tally.failed.items()]
    problems += tally.examples if tally.failed else []
    if len(samples) < 6:
        return problems + [f"only {len(samples)} samples: run longer"]
    third = len(samples) // 3
    for series, (relative, absolute) in TOLERANCE.items():
        middle = min(s[series] for s in samples[third : 2 * third])
        last = min(s[series] for s in samples[2 * third :])
        if last > middle * (1 + relative) + absolute:
            problems.append(f"{series} keeps rising: floor {middle:g} in the second third, {last:g} in the last")
    return problems


def table(samples: list[dict[str, float]], tally: Tally, minutes: float) -> str:
    third = len(samples) // 3
    rows = ["| series | first third | second third | last third | max |", "|---|---|---|---|---|"]
    for series in TOLERANCE:
        parts = [samples[:third], samples[third : 2 * third], samples[2 * third :]]
        cells = [f"{statistics.median(s[series] for s in part):g} / {min(s[series] for s in part):g}" for part in parts]
        rows.append(f"| {series} | " + " | ".join(cells) + f" | {max(s[series] for s in samples):g} |")
    done = ", ".join(f"{kind} {n}" for kind, n in sorted(tally.ok.items()))
    return f"{minutes:g} minutes, {len(samples)} samples (median / floor per third)\n\n" + "\n".join(rows) + f"\n\ncompleted: {done}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--json", help="write samples and counts here")
    args = parser.parse_args(argv)
    pki = make_pki()
    with tempfile.TemporaryDirectory(prefix="nextproxy-soak-") as tmp:

        async def boot_and_run() -> Soak:
            app = await start_http_ws("127.0.0.1", 0, "app")
            api = await start_tls_api("127.0.0.1", 0, "api", server_ssl_context(pki.upstream, pki.ca.certificate))
            soak = Soak(Path(tmp), pki, args.minutes, args.sample)
            address = lambda s: "%s:%d" % s.address  # noqa: E731
            soak.start_proxy(address(app), address(api))
            try:
                await soak.run()
            finally:
                assert soak.process is not None
                soak.process.send_signal(signal.SIGTERM)
                try:
                    soak.process.wait(30)
                except subprocess.TimeoutExpired:
                    soak.process.kill()
                await app.close()
                await api.close()
            return soak

        import uvloop

        soak = uvloop.run(boot_and_run())
    print(table(soak.samples, soak.tally, args.minutes))
    if args.json:
        Path(args.json).write_text(json.dumps({"samples": soak.samples, "ok": soak.tally.ok, "failed": soak.tally.failed}, indent=1))
    problems = verdict(soak.samples, soak.tally)
    for problem in problems:
        print(f"soak: FAIL: {problem}")
    if not problems:
        print("soak: ok (no good request failed; nothing keeps rising after warm-up)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
