"""Stand-in upstreams: small real HTTP/1.1 + WebSocket servers that report what they received.

The demo runs them behind the proxy and the tests use them as upstreams, so both exercise the
same code. One port serves keep-alive HTTP/1.1 (h11) and WebSocket upgrades (wsproto) on any
path; query parameters shape the answer (size, status, delay, drip, close). Bodies are streamed
both ways with backpressure and never buffered whole, so multi-megabyte transfers cost no memory.
These are test fixtures, not production servers: no limits beyond what a test needs, no logging.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import h11
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError

from nextproxy.demo.channels import (
    CLOSE_TIMEOUT,
    READ_SIZE,
    Channel,
    TlsChannel,
    record_server_names,
    tls_facts,
)
from nextproxy.demo.payloads import PATTERN, pattern, pattern_chunks, pattern_sha256
from nextproxy.demo.wsecho import WebSocketEcho

__all__ = ["PATTERN", "BadQuery", "StandIn", "pattern", "pattern_sha256", "start_http_ws", "start_tls_api"]

KiB = 1024
# Bigger than any sane proxy limit, so a proxy test meets the proxy's own 431 first.
MAX_HEAD = 256 * KiB
# ``?drip=S`` sends pieces this small, so a few hundred bytes already take several intervals.
DRIP_PIECE = 256
SSL_HANDSHAKE_TIMEOUT = 10.0

class BadQuery(ValueError):
    """A query parameter the stand-in cannot honour: answered with 400."""


# --------------------------------------------------------------------------- the listening server


class StandIn:
    """One listening stand-in server. ``address`` is the bound address (port 0 resolved)."""

    def __init__(self, name: str, server: asyncio.Server, tls: bool) -> None:
        self.name = name
        self.tls = tls
        host, port = server.sockets[0].getsockname()[:2]
        self.address: tuple[str, int] = (host, port)
        self.connections = 0
        """Connections accepted so far (lets proxy tests check upstream keep-alive reuse)."""
        self.requests = 0
        """HTTP requests answered so far, WebSocket upgrades included."""
        self._server = server
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"<StandIn {self.name} {scheme}://{self.address[0]}:{self.address[1]}>"

    async def close(self) -> None:
        """Stop listening and drop every open connection; bounded in time."""
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=CLOSE_TIMEOUT)
        try:
            await asyncio.wait_for(self._server.wait_closed(), CLOSE_TIMEOUT)
        except (TimeoutError, asyncio.TimeoutError):
            pass

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: ssl.SSLContext | None, report: bool
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        channel = Channel(reader, writer) if tls is None else TlsChannel(reader, writer, tls)
        try:
            facts = None
            if isinstance(channel, TlsChannel):
                async with asyncio.timeout(SSL_HANDSHAKE_TIMEOUT):
                    await channel.handshake()
                facts = tls_facts(channel.tls) if report else None
            await _HttpConnection(self, channel, facts).run()
        except asyncio.CancelledError:
            # Only close() cancels these tasks, and nothing awaits them: ending quietly keeps
            # asyncio from logging the cancellation as an error in its done-callback.
            writer.transport.abort()
        except (OSError, ssl.SSLError, TimeoutError, h11.ProtocolError):
            pass  # a client going away or refused mid-exchange is normal for a test upstream
        finally:
            self._tasks.discard(task)
            await channel.close()


async def _listen(name: str, host: str, port: int, tls: ssl.SSLContext | None, tls_report: bool) -> StandIn:
    holder: list[StandIn] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await holder[0]._handle(reader, writer, tls, tls_report)

    try:
        server = await asyncio.start_server(on_connect, host, port)
    except OSError as exc:
        # The default message ("[Errno 98] error while attempting to bind...") hides which stand-in.
        raise OSError(exc.errno, f"stand-in {name!r} cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    holder.append(StandIn(name, server, tls is not None))
    return holder[0]


async def start_http_ws(host: str, port: int, name: str, tls: ssl.SSLContext | None = None) -> StandIn:
    """HTTP/1.1 + WebSocket stand-in (plain, or TLS with ``tls``) answering as service ``name``."""
    return await _listen(name, host, port, tls, tls_report=False)


async def start_tls_api(host: str, port: int, name: str, tls: ssl.SSLContext) -> StandIn:
    """TLS stand-in whose JSON adds a ``tls`` object: client certificate, SNI, version.

    Installs an SNI-recording callback on ``tls`` (chaining any callback already there).
    """
    record_server_names(tls)
    return await _listen(name, host, port, tls, tls_report=True)


# --------------------------------------------------------------------------- one connection


def _query(target: str) -> dict[str, str]:
    _, _, query = target.partition("?")
    try:
        parsed = parse_qs(query, keep_blank_values=True, strict_parsing=False)
    except ValueError as exc:
        raise BadQuery(str(exc)) from None
    return {key: values[-1] for key, values in parsed.items()}


def _number(params: dict[str, str], key: str, kind: Callable[[str], float], low: float, high: float) -> float | None:
    if key not in params:
        return None
    try:
        value = kind(params[key])
    except ValueError:
        raise BadQuery(f"{key}={params[key]!r} is not a number") from None
    if not low <= value <= high:
        raise BadQuery(f"{key}={params[key]!r} is outside {low}..{high}")
    return value


@dataclass(frozen=True, slots=True)
class _Options:
    """The query parameters that shape a response."""

    status: int = 200
    delay: float = 0.0
    drip: float | None = None
    size: int | None = None
    chunked: bool = False
    close: bool = False

    @classmethod
    def parse(cls, target: str) -> _Options:
        params = _query(target)
        size = _number(params, "bytes", int, 0, 1 << 40)
        return cls(
            status=int(_number(params, "status", int, 200, 599) or 200),
            delay=_number(params, "delay", float, 0.0, 3600.0) or 0.0,
            drip=_number(params, "drip", float, 0.0, 3600.0),
            size=None if size is None else int(size),
            chunked=params.get("chunked") == "1",
            close=params.get("close") == "1",
        )


def _is_websocket(request: h11.Request) -> bool:
    upgrade = connection = False
    for name, value in request.headers:
        if name == b"upgrade" and b"websocket" in value.lower():
            upgrade = True
        elif name == b"connection" and b"upgrade" in value.lower():
            connection = True
    return request.method == b"GET" and upgrade and connection


def _header_list(headers: Any) -> list[list[str]]:
    return [[name.decode("latin-1"), value.decode("latin-1")] for name, value in headers]


class _HttpConnection:
    """Serves requests on one connection until either side closes or a WebSocket ends."""

    def __init__(
        self,
        standin: StandIn,
        channel: Channel,
        tls: dict[str, Any] | None,
    ) -> None:
        self.standin = standin
        self.channel = channel
        self.tls = tls
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)

    async def _send(self, event: Any) -> None:
        data = self.conn.send(event)
        await self.channel.write(data or b"")

    async def _next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.conn.they_are_waiting_for_100_continue:
                await self._send(h11.InformationalResponse(status_code=100, headers=[]))
            self.conn.receive_data(await self.channel.read())

    async def run(self) -> None:
        while True:
            try:
                event = await self._next_event()
            except h11.RemoteProtocolError as exc:
                await self._refuse(exc.error_status_hint, str(exc))
                return
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
            assert isinstance(event, h11.Request), event
            self.standin.requests += 1
            if _is_websocket(event):
                await self._websocket(event)
                return
            try:
                options = _Options.parse(event.target.decode("latin-1"))
            except BadQuery as exc:
                await self._refuse(400, str(exc))
                return
            try:
                await self._respond(event, options)
            except h11.RemoteProtocolError as exc:  # a malformed body, e.g. a bad chunk size
                await self._refuse(exc.error_status_hint, str(exc))
                return
            if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is not h11.DONE:
                return
            self.conn.start_next_cycle()

    async def _refuse(self, status: int, reason: str) -> None:
        """A short JSON error, then close: only possible before our response head went out."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = json.dumps({"service": self.standin.name, "error": reason}).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(body))), ("connection", "close")]
        try:
            await self._send(h11.Response(status_code=status, headers=headers))
            await self._send(h11.Data(data=body))
            await self._send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            pass  # the peer's state makes any answer impossible: just close

    async def _drain_request(self, on_data: Callable[[bytes], Awaitable[None]] | None = None) -> tuple[int, str]:
        """Read the request body to its end, hashing as it goes; returns (length, sha256 hex)."""
        digest = hashlib.sha256()
        length = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                digest.update(event.data)
                length += len(event.data)
                if on_data is not None:
                    await on_data(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return length, digest.hexdigest()
            else:
                raise ConnectionError(f"request body ended by {event!r}")

    async def _send_body(self, pieces: Iterator[bytes], drip: float | None) -> None:
        for piece in pieces:
            if drip is None:
                await self._send(h11.Data(data=piece))
                continue
            for start in range(0, len(piece), DRIP_PIECE):
                await self._send(h11.Data(data=piece[start : start + DRIP_PIECE]))
                await asyncio.sleep(drip)

    def _head(
        self, options: _Options, content_type: str, length: int | None, *extra: tuple[str, str]
    ) -> h11.Response:
        headers = [("content-type", content_type), ("x-standin", self.standin.name), *extra]
        if length is not None:
            headers.append(("content-length", str(length)))
        if options.close:
            headers.append(("connection", "close"))
        return h11.Response(status_code=options.status, headers=headers)

    async def _respond(self, request: h11.Request, options: _Options) -> None:
        path = request.target.split(b"?", 1)[0]
        # HEAD, 204 and 304 carry no body whatever the path asks for (RFC 9110 section 6.4.1).
        bodyless = request.method == b"HEAD" or options.status in (204, 304)
        if options.size is None and b"echo" in path.split(b"/") and not bodyless:
            await self._echo(options)
            return
        length, sha256 = await self._drain_request()
        if options.size is not None:
            length_header = None if options.chunked else options.size
            digest = ("x-body-sha256", pattern_sha256(options.size))
            head = self._head(options, "application/octet-stream", length_header, digest)
            pieces: Iterator[bytes] = pattern_chunks(options.size)
        else:
            report: dict[str, Any] = {
                "service": self.standin.name,
                "method": request.method.decode("latin-1"),
                "path": request.target.decode("latin-1"),
                "http_version": request.http_version.decode("latin-1"),
                "headers": _header_list(request.headers),
                "body_length": length,
                "body_sha256": sha256,
            }
            if self.tls is not None:
                report["tls"] = self.tls
            body = json.dumps(report).encode()
            head = self._head(options, "application/json", None if options.chunked else len(body))
            pieces = iter((body,))
        if options.delay:
            await asyncio.sleep(options.delay)
        await self._send(head)
        if not bodyless:
            await self._send_body(pieces, options.drip)
        await self._send(h11.EndOfMessage())

    async def _echo(self, options: _Options) -> None:
        """Stream the request body back as a chunked response, piece by piece as it arrives."""
        if self.conn.they_are_waiting_for_100_continue:
            # Answer 100 first: a client that sees the final head before it sent the body
            # (curl does) would never send it, and we would wait for it forever.
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        if options.delay:
            await asyncio.sleep(options.delay)
        await self._send(self._head(options, "application/octet-stream", None))

        async def echo(data: bytes) -> None:
            await self._send_body(iter((data,)), options.drip)

        await self._drain_request(echo)
        await self._send(h11.EndOfMessage())

    async def _websocket(self, request: h11.Request) -> None:
        # h11 pauses once the upgrade request is complete; what follows is WebSocket frames.
        while True:
            event = await self._next_event()
            if event is h11.PAUSED:
                break
            if isinstance(event, h11.ConnectionClosed):
                return
        trailing, _ = self.conn.trailing_data
        ws = WSConnection(ConnectionType.SERVER)
        try:
            ws.initiate_upgrade_connection(list(request.headers), request.target)
            upgrade = next(ev for ev in ws.events() if isinstance(ev, Request))
        except (WsRemoteProtocolError, StopIteration) as exc:
            await self._refuse(400, f"bad websocket upgrade: {exc}")
            return
        subprotocol = upgrade.subprotocols[0] if upgrade.subprotocols else None
        await self.channel.write(ws.send(AcceptConnection(subprotocol=subprotocol)))
        info: dict[str, Any] = {
            "service": self.standin.name,
            "path": request.target.decode("latin-1"),
            "headers": _header_list(request.headers),
            "subprotocol": subprotocol,
        }
        if self.tls is not None:
            info["tls"] = self.tls
        await WebSocketEcho(ws, self.channel, json.dumps(info)).run(trailing)
