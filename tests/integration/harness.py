"""A real proxy and real stand-in upstreams on loopback, driven from blocking test code.

The proxy and the stand-ins run on an event loop in a background thread (uvloop, as in
production, or asyncio's own loop); tests use ordinary blocking clients (http.client, ssl
sockets, curl), so nothing in a test can accidentally block the loop it is testing.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import socket
import ssl
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Coroutine, TypeVar

from nextproxy.config.model import (
    Address,
    CertificateConfig,
    ClientAuth,
    Config,
    Limits,
    PathRoute,
    PemSource,
    SniAction,
    SniRoute,
    Timeouts,
    Upstream,
    UpstreamTls,
    WebSocketMode,
)
from nextproxy.core.headers import websocket_accept
from nextproxy.demo.pki import DemoPki, Pem, server_ssl_context
from nextproxy.process.logs import Logger
from nextproxy.process.observe import Observer
from nextproxy.edge.listener import ProxyServer, bind, build_runtime
from nextproxy.demo.standins import StandIn, start_http_ws, start_tls_api

T = TypeVar("T")
SERVER_NAME = "localhost"
API_NAME = "ns-api.localhost"
TERMINATED_API_NAME = "mc-api.localhost"
PATH_ROUTES = (
    ("ns-websocket", "/ns/websocket"),
    ("ns-sigmai", "/ns/sigmai"),
    ("mc-sigmai", "/mc/sigmai"),
    ("sfs-sigmai", "/sfs/sigmai"),
)


class LoopThread:
    """An event loop running in a daemon thread; ``call`` runs a coroutine there and waits."""

    def __init__(self, use_uvloop: bool = True) -> None:
        if use_uvloop:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.call(cancel_all(), timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()


def pem_source(data: bytes, origin: str) -> PemSource:
    return PemSource(data, origin)


_REFUSING: list[socket.socket] = []


def refusing_port() -> socket.socket:
    """A loopback port that refuses connections for the rest of the test run: bound, never
    listening, and kept bound (a port merely closed again can be handed to the next bind(0) of
    a stand-in in the same run, which then answers)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _REFUSING.append(sock)
    return sock


def dead_server_first(upstream: str) -> Callable[[Config], Config]:
    """A ``mutate`` for ``Edge.start``: ``upstream`` gets a first server that refuses connections."""
    dead = Address(*refusing_port().getsockname())

    def mutate(config: Config) -> Config:
        upstreams = tuple(replace(u, servers=(dead, *u.servers)) if u.name == upstream else u for u in config.upstreams)
        return replace(config, upstreams=upstreams)

    return mutate


def point_route_at(address: tuple[str, int], upstream: str = "sfs-sigmai") -> Callable[[Config], Config]:
    """A ``mutate`` for ``Edge.start``: ``upstream``'s one server is ``address``."""

    def mutate(config: Config) -> Config:
        upstreams = tuple(replace(u, servers=(Address(*address),)) if u.name == upstream else u for u in config.upstreams)
        return replace(config, upstreams=upstreams)

    return mutate


class RawUpstream:
    """A blocking socket server on loopback, for upstreams that misbehave in ways the asyncio
    stand-ins cannot (cut a body, answer a 101 wrongly): each connection with a whole request
    head goes to ``answer``, one at a time, on a thread. Health probes (connect, send nothing,
    close) are skipped."""

    def __init__(self, timeout: float = 5) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.address: tuple[str, int] = self.listener.getsockname()
        self.requests: list[bytes] = []
        self.stopped = False
        self._timeout = timeout
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def answer(self, conn: socket.socket, head: bytes) -> None:
        raise NotImplementedError

    @staticmethod
    def websocket_101(head: bytes, fields: bytes = b"") -> bytes:
        """A valid 101 for the WebSocket upgrade ``head`` (``fields``: more header lines)."""
        lines = head.split(b"\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in lines if line.lower().startswith(b"sec-websocket-key:"))
        return (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + websocket_accept(key) + b"\r\n" + fields + b"\r\n"
        )

    def _serve(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(self._timeout)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if b"\r\n\r\n" in data:
                    self.requests.append(data)
                    try:
                        self.answer(conn, data)
                    except OSError:  # the proxy hung up, or a timeout: on to the next connection
                        pass

    def close(self) -> None:
        self.stopped = True
        self.listener.close()
        self._thread.join(5)


@dataclass
class Edge:
    """A running proxy with its stand-ins. Build with ``Edge.start(...)``; ``close()`` when done."""

    thread: LoopThread
    pki: DemoPki
    config: Config
    server: ProxyServer
    standins: dict[str, StandIn]
    log: io.StringIO
    port: int = 0
    stopped: dict[str, StandIn] = field(default_factory=dict)

    # ----------------------------------------------------------------- construction

    @classmethod
    def start(
        cls,
        pki: DemoPki,
        *,
        use_uvloop: bool = True,
        client_auth: ClientAuth = ClientAuth.NONE,
        client_ca_file: str | None = None,
        timeouts: Timeouts | None = None,
        limits: Limits | None = None,
        websocket: WebSocketMode = WebSocketMode.FRAMES,
        route_options: dict[str, Any] | None = None,
        upstream_tls: UpstreamTls | None = None,
        certificates: tuple[CertificateConfig, ...] | None = None,
        mutate: Callable[[Config], Config] | None = None,
        upstream_requires_client_cert: bool | None = None,
        upstream_reports_tls: bool = False,
    ) -> Edge:
        """Start a proxy and its stand-ins.

        With ``upstream_tls`` the HTTP stand-ins speak TLS (``pki.upstream``, client CA ``pki.ca``);
        they require a client certificate when ``upstream_requires_client_cert`` is true (default:
        exactly when ``upstream_tls.client_certificate`` is set), and with ``upstream_reports_tls``
        their JSON carries a ``tls`` object (version, SNI, client certificate hash).
        """
        thread = LoopThread(use_uvloop)
        log = io.StringIO()

        async def boot() -> tuple[Config, ProxyServer, dict[str, StandIn]]:
            standins: dict[str, StandIn] = {}
            require_cert = upstream_requires_client_cert
            if require_cert is None:
                require_cert = upstream_tls is not None and upstream_tls.client_certificate is not None
            http_tls = server_ssl_context(pki.upstream, pki.ca.certificate, require_client_cert=require_cert) if upstream_tls else None
            start_http = start_tls_api if http_tls is not None and upstream_reports_tls else start_http_ws
            for name, _ in PATH_ROUTES:
                standins[name] = await start_http("127.0.0.1", 0, name, http_tls)  # type: ignore[arg-type]
            api_tls = server_ssl_context(pki.upstream, pki.ca.certificate, require_client_cert=False)
            standins["ns-api"] = await start_tls_api("127.0.0.1", 0, "ns-api", api_tls)
            standins["mc-api"] = await start_http("127.0.0.1", 0, "mc-api", http_tls)  # type: ignore[arg-type]
            upstreams = [
                Upstream(name, (Address(*standins[name].address),), upstream_tls if name != "ns-api" else None)
                for name in standins
            ]
            options = route_options or {}
            routes = tuple(
                PathRoute(name=name, prefix=prefix, upstream=name, websocket=websocket, **options)
                for name, prefix in PATH_ROUTES
            )
            sni = (
                SniRoute("ns-api", (API_NAME,), SniAction.PASSTHROUGH, "ns-api"),
                SniRoute("mc-api", (TERMINATED_API_NAME,), SniAction.TERMINATE, "mc-api", client_auth, client_ca_file),
            )  # fmt: skip
            config = Config(
                listen=Address("127.0.0.1", 0),
                admin_listen=Address("127.0.0.1", 0),
                certificates=certificates or (CertificateConfig(pem_source(pki.edge.certificate, "edge.pem"), pem_source(pki.edge.key, "edge.key")),),
                upstreams=tuple(upstreams),
                routes=routes,
                sni_routes=sni,
                timeouts=timeouts or Timeouts(connect=2, upstream_response=10, client_idle=10),
                limits=limits or Limits(),
                source="tests",
            )
            if mutate is not None:
                config = mutate(config)
            observer = Observer(Logger("info", "json", stream=log, buffered=False))
            server = ProxyServer(build_runtime(config, observer))
            await server.start(bind(config.listen, "listen"))
            return config, server, standins

        config, server, standins = thread.call(boot())
        edge = cls(thread, pki, config, server, standins, log)
        edge.port = server.address[1]
        return edge

    def close(self) -> None:
        async def shutdown() -> None:
            await self.server.drain(0.5)
            for standin in list(self.standins.values()):
                await standin.close()

        try:
            self.thread.call(shutdown(), timeout=10)
        finally:
            self.thread.stop()

    # ----------------------------------------------------------------- upstream control

    def stop_upstream(self, name: str) -> tuple[str, int]:
        standin = self.standins[name]
        self.thread.call(standin.close())
        return standin.address

    def restart_upstream(self, name: str) -> None:
        host, port = self.standins[name].address

        async def again() -> StandIn:
            return await start_http_ws(host, port, name)

        self.standins[name] = self.thread.call(again())

    # ----------------------------------------------------------------- clients

    def client_context(self, client: Pem | None = None, *, alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=self.pki.ca.certificate.decode())
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        if alpn:
            context.set_alpn_protocols(list(alpn))
        if client is not None:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                cert, key = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
                cert.write_bytes(client.certificate)
                key.write_bytes(client.key)
                context.load_cert_chain(cert, key)
        return context

    def https(self, server_name: str = SERVER_NAME, context: ssl.SSLContext | None = None, timeout: float = 10) -> http.client.HTTPSConnection:
        """An HTTPS connection to the proxy on 127.0.0.1, sending ``server_name`` as SNI and Host."""
        conn = http.client.HTTPSConnection(server_name, self.port, context=context or self.client_context(), timeout=timeout)
        port = self.port

        def connect() -> None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            conn.sock = conn._context.wrap_socket(sock, server_hostname=server_name)  # type: ignore[attr-defined]

        conn.connect = connect  # type: ignore[method-assign]
        return conn

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                server_name: str = SERVER_NAME) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        conn = self.https(server_name)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def tls_socket(self, server_name: str | None = SERVER_NAME, context: ssl.SSLContext | None = None, timeout: float = 10) -> ssl.SSLSocket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return (context or self.client_context()).wrap_socket(sock, server_hostname=server_name)

    def raw_socket(self, timeout: float = 10) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def logs(self) -> str:
        return self.log.getvalue()
