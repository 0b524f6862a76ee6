"""The admin port (9613 by default): /livez, /readyz, /metrics, a live status page and /status.json.

HTTP/1.1 over h11 on an asyncio Protocol, optionally inside TLS (a stdlib ``ssl`` context built
by ``tlsconfig``). It reads ``AdminState``, which the server owns and mutates, and never changes
it, except ``last_loop_tick``, which its own heartbeat task advances. Every response is built in
memory and written at once, so no request waits on another task. It must never serve anything
but these read-only pages, never block the event loop on I/O, and never let a client hold more
than a bounded amount of memory or a connection past its request or idle timeout. Probes must get
through a flood: at the connection cap, the least recently served connection with nothing left to
send makes room for the new one (as HAProxy and Envoy shed idle connections under overload).
"""

from __future__ import annotations

import asyncio
import json
import os
import logging
import ssl
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable, cast

import h11

from nextproxy import __version__
from nextproxy.config.model import Config
from nextproxy.edge.tlscontexts import admin_ssl_context
from nextproxy.errors import ConfigError
from nextproxy.process import metrics
from nextproxy.process.status import SAMPLE_INTERVAL, Facts, Ring, take_sample
from nextproxy.process.statuspage import render_page
from nextproxy.process.statusview import status_document

SECONDS = 1.0
KiB = 1024

REQUEST_TIMEOUT = 5 * SECONDS
"""From accepting a connection, or from the first byte of a later request, to that complete request.

Covers the head and the small body alike: a probe or a scrape sends its request in one go, so a
silent or half-sent connection is held this long and no longer (nginx's client_header_timeout)."""
IDLE_TIMEOUT = 30 * SECONDS
"""From finishing a response to the first byte of the next request (keep-alive)."""
TLS_HANDSHAKE_TIMEOUT = 10 * SECONDS
LINGER = 2 * SECONDS
"""After an error response and a half-close, how long the client gets to close its side."""
HEARTBEAT_INTERVAL = 1 * SECONDS
LIVENESS_STALE_AFTER = 5 * SECONDS
MAX_REQUEST_HEAD = 8 * KiB
MAX_REQUEST_BODY = 16 * KiB
"""Nothing here takes a body; a small one is read and dropped so keep-alive survives."""
MAX_CONNECTIONS = 128
"""Past it a new connection evicts an unproductive one (see ``_Site.admit``), or is refused."""

log = logging.getLogger("nextproxy.process.admin")


@dataclass(slots=True)
class AdminState:
    """What the server tells the admin port. Shared and mutable: the server updates it in place."""

    ready: bool = False
    not_ready_reason: str = "starting"
    """Shown by /readyz while not ready: ``starting``, ``draining``, ``reloading``..."""
    started_at: float = field(default_factory=time.time)
    """Wall-clock Unix time, shown as a date; uptime is measured from it."""
    last_loop_tick: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` of the heartbeat's last run; /livez fails when it grows old."""
    routes: list[tuple[str, str, str]] = field(default_factory=list)
    """(match, action, target) rows, as ``RouteTable.describe()`` returns them."""
    upstreams: dict[str, bool] = field(default_factory=dict)
    certificates: list[tuple[str, float]] = field(default_factory=list)
    """(name, notAfter as a Unix timestamp)."""
    connections_active: int = 0
    websocket_sessions_active: int = 0
    version: str = __version__
    config_source: str = ""
    route_kinds: dict[str, str] = field(default_factory=dict)
    """Route name -> "http" or "passthrough" (``status.route_kinds``)."""
    ring: Ring = field(default_factory=Ring)
    """Metric samples of the last minutes, recorded by the admin port's sampler."""
    facts: Callable[[], Facts] = Facts
    """What the serving processes know beyond metrics (pools, last errors, reloads)."""


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
HTML_TYPE = "text/html; charset=utf-8"
# The status page has no script and no external resource; a CSP makes any injection inert.
HTML_HEADERS = (("content-security-policy", "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"),)


async def start_configured_admin(config: Config, state: AdminState) -> asyncio.Server:
    """``start_admin`` on ``config``'s address and TLS. An address it cannot listen on (in use,
    another proxy's included) is a ConfigError naming ``admin_listen``: one line and exit 2 at
    start, with one process or with workers, never a traceback."""
    admin_tls = admin_ssl_context(config.admin_tls) if config.admin_tls else None
    address = config.admin_listen
    try:
        return await start_admin(address.host, address.port, state, admin_tls)
    except OSError as exc:
        # asyncio's own message repeats the address: the errno's text says it once.
        reason = f"cannot listen on {address}: {os.strerror(exc.errno) if exc.errno else exc}"
        raise ConfigError(config.key_name("admin_listen"), reason) from None


async def start_admin(
    host: str,
    port: int,
    state: AdminState,
    ssl_context: ssl.SSLContext | None = None,
    *,
    heartbeat_interval: float = HEARTBEAT_INTERVAL,
    stale_after: float = LIVENESS_STALE_AFTER,
    sample_interval: float = SAMPLE_INTERVAL,
    request_timeout: float = REQUEST_TIMEOUT,
    idle_timeout: float = IDLE_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
) -> asyncio.Server:
    """Listen on ``host:port`` and serve ``state``; heartbeat and sampler stop after ``server.close()``."""
    site = _Site(state, stale_after, request_timeout, idle_timeout, max_connections)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _AdminProtocol(site),
        host,
        port,
        ssl=ssl_context,
        ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if ssl_context is not None else None,
    )
    state.last_loop_tick = time.monotonic()
    state.ring.record(take_sample(metrics.registry_for_exposition().collect(), time.time()))
    for job, name in ((_heartbeat(server, state, heartbeat_interval), "heartbeat"), (_sampler(server, state, sample_interval), "sampler")):
        task = loop.create_task(job, name=f"nextproxy-admin-{name}")
        # The loop keeps only weak references to tasks; hold this one until it ends.
        _HEARTBEATS.add(task)
        task.add_done_callback(_HEARTBEATS.discard)
    return server


_HEARTBEATS: set[asyncio.Task[None]] = set()


async def _heartbeat(server: asyncio.Server, state: AdminState, interval: float) -> None:
    """Advance ``last_loop_tick`` through the timer queue, which /livez then checks.

    Answering /livez at all proves this loop reads sockets; a loop blocked for good does not
    answer and the probe's own timeout catches it. The tick adds what an answer cannot show: a
    heartbeat (or any task machinery) that has died, and timers that no longer fire. On the
    plain asyncio loop it also reports a stall just after it ends (I/O callbacks run before
    overdue timers in the same iteration); uvloop runs timers first, so there it does not.
    With workers this loop is the supervisor's: /livez speaks for the supervisor, and a wedged
    worker is the supervisor's to detect and replace.
    """
    while True:  # start_admin made the first tick
        await asyncio.sleep(interval)
        if not server.is_serving():
            return
        state.last_loop_tick = time.monotonic()


async def _sampler(server: asyncio.Server, state: AdminState, interval: float) -> None:
    """Every ``interval``, the merged metrics into the status ring (bounded: see ``status``)."""
    while True:
        await asyncio.sleep(interval)
        if not server.is_serving():
            return
        try:
            state.ring.record(take_sample(metrics.registry_for_exposition().collect(), time.time()))
        except Exception:  # a worker's half-written file, say: skip one sample, keep sampling
            log.exception("status sample failed")


class _Site:
    """The pages, keyed by path; each builds a complete ``Reply`` from the current state."""

    def __init__(
        self, state: AdminState, stale_after: float, request_timeout: float, idle_timeout: float, max_connections: int
    ) -> None:
        self.state = state
        self.stale_after = stale_after
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.connections: dict[_AdminProtocol, None] = {}
        """Open connections, least recently served first (a dict keeps insertion order)."""
        self.pages: dict[str, Callable[[h11.Request], Reply]] = {
            "/livez": self.livez,
            "/readyz": self.readyz,
            "/metrics": self.metrics_page,
            "/": self.status_page,
            "/status.json": self.status_json,
        }

    def admit(self, connection: _AdminProtocol) -> bool:
        """Count ``connection`` in, evicting an unproductive one at the cap; False = refuse it.

        A flood of silent connections must not lock a liveness probe out (a failed probe restarts
        the pod). So the victim is the least recently served connection with nothing left to
        send: silent, half-sent or idle between requests; failing that, one whose client stopped
        reading its responses. Only connections still flushing a response are never evicted. The
        newcomer goes to the back of the queue, so it outlives the older flood around it. The
        scan runs only at the cap and over at most ``max_connections`` entries.
        """
        if len(self.connections) >= self.max_connections:
            stalled: _AdminProtocol | None = None
            victim: _AdminProtocol | None = None
            for candidate in self.connections:
                if not candidate.sending():
                    victim = candidate
                    break
                if stalled is None and candidate.stalled():
                    stalled = candidate
            if victim is None:
                victim = stalled
            if victim is None:
                return False
            victim.evict()
        self.connections[connection] = None
        metrics.ADMIN_CONNECTIONS.inc()
        return True

    def release(self, connection: _AdminProtocol) -> None:
        if connection in self.connections:
            del self.connections[connection]
            metrics.ADMIN_CONNECTIONS.dec()

    def served(self, connection: _AdminProtocol) -> None:
        """Move ``connection`` to the back of the eviction queue: it has just been useful."""
        if connection in self.connections:
            del self.connections[connection]
            self.connections[connection] = None

    def handle(self, request: h11.Request) -> Reply:
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        page = self.pages.get(path)
        if page is None:
            return Reply(404, TEXT, b"not found\n")
        if request.method not in (b"GET", b"HEAD"):
            return Reply(405, TEXT, b"method not allowed\n", (("allow", "GET, HEAD"),))
        return page(request)

    def livez(self, request: h11.Request) -> Reply:
        age = time.monotonic() - self.state.last_loop_tick
        if age > self.stale_after:
            return Reply(503, TEXT, f"stale: event loop timers last ran {age:.1f} s ago\n".encode())
        return Reply(200, TEXT, b"ok\n")

    def readyz(self, request: h11.Request) -> Reply:
        if self.state.ready:
            return Reply(200, JSON, b'{"ready": true}\n')
        body = {"ready": False, "reason": self.state.not_ready_reason}
        return Reply(503, JSON, json.dumps(body).encode() + b"\n")

    def metrics_page(self, request: h11.Request) -> Reply:
        accept = _header(request, b"accept")
        rendered = metrics.exposition(accept, _header(request, b"accept-encoding"))
        headers: tuple[tuple[str, str], ...] = (("vary", "accept, accept-encoding"),)
        if rendered.content_encoding is not None:
            headers += (("content-encoding", rendered.content_encoding),)
        return Reply(200, rendered.content_type, rendered.body, headers)

    def document(self) -> dict[str, object]:
        now = time.time()
        live = take_sample(metrics.registry_for_exposition().collect(), now)
        return status_document(self.state, live, self.state.facts(), now)

    def status_page(self, request: h11.Request) -> Reply:
        return Reply(200, HTML_TYPE, render_page(self.document()).encode(), HTML_HEADERS)

    def status_json(self, request: h11.Request) -> Reply:
        return Reply(200, JSON, json.dumps(self.document(), indent=1).encode() + b"\n")


def _header(request: h11.Request, name: bytes) -> str:
    return ", ".join(value.decode("latin-1") for key, value in request.headers if key == name)


class _AdminProtocol(asyncio.Protocol):
    """One admin connection: h11 in, whole responses out, pipelining in order."""

    def __init__(self, site: _Site) -> None:
        self._site = site
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._request: h11.Request | None = None
        self._body_size = 0
        self._writing_paused = False
        self._closing = False
        # Idle since a response, no byte of the next request yet: the idle timeout applies.
        self._between_requests = False

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it: no isinstance.
        self._transport = transport = cast(asyncio.Transport, transport)
        if not self._site.admit(self):
            transport.abort()
            return
        self._arm_timer(self._site.request_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._site.release(self)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # lingering after an error: drain and drop
        if self._between_requests:
            # A slow client may take its time to start, not to finish: IDLE + REQUEST at most.
            self._between_requests = False
            self._arm_timer(self._site.request_timeout)
        self._h11.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        if not self._closing:
            self._h11.receive_data(b"")
            # The client has stopped sending, so finishing its pipelined requests is bounded.
            self._process(ignore_pause=True)
        return False  # let the transport close once our responses are flushed

    def pause_writing(self) -> None:
        # A client that pipelines without reading: stop reading until it catches up.
        self._writing_paused = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
            self._process()

    # ------------------------------------------------------------------ request handling

    def _process(self, *, ignore_pause: bool = False) -> None:
        transport = self._transport
        while transport is not None and not self._closing and not transport.is_closing():
            if self._writing_paused and not ignore_pause:
                return
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(exc.error_status_hint, "bad request")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._request, self._body_size = event, 0
                if self._h11.they_are_waiting_for_100_continue:
                    transport.write(self._h11.send(h11.InformationalResponse(status_code=100, headers=[])))
            elif isinstance(event, h11.Data):
                self._body_size += len(event.data)
                if self._body_size > MAX_REQUEST_BODY:
                    self._fail(413, "request body too large")
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._respond()
            elif isinstance(event, h11.ConnectionClosed):
                transport.close()
                return

    def _respond(self) -> None:
        assert self._transport is not None and self._request is not None
        request, self._request = self._request, None
        try:
            reply = self._site.handle(request)
        except Exception:  # a bug in a page: log it, answer 500, keep the port up
            log.exception("admin page %r failed", request.target)
            reply = Reply(500, TEXT, b"internal error\n")
        headers = [
            ("content-type", reply.content_type),
            ("content-length", str(len(reply.body))),
            ("cache-control", "no-store"),
            ("x-content-type-options", "nosniff"),
            *reply.headers,
        ]
        phrase = HTTPStatus(reply.status).phrase.encode()  # h11 writes none by itself
        out = self._h11.send(h11.Response(status_code=reply.status, headers=headers, reason=phrase))
        if request.method != b"HEAD":
            out += self._h11.send(h11.Data(data=reply.body))
        out += self._h11.send(h11.EndOfMessage())
        self._transport.write(out)
        if self._h11.our_state is h11.MUST_CLOSE:
            self._transport.close()
            return
        self._h11.start_next_cycle()
        self._site.served(self)
        if self._h11.trailing_data[0]:  # the next (pipelined) request has begun
            self._arm_timer(self._site.request_timeout)
        else:
            self._between_requests = True
            self._arm_timer(self._site.idle_timeout)

    def _fail(self, status: int, reason: str) -> None:
        """Answer a broken request in one write, half-close, and give the client LINGER to leave.

        Closing at once, with request bytes still unread, makes the kernel send a reset that can
        overtake the response, so the client would never see why it was refused.
        """
        assert self._transport is not None
        self._closing = True
        phrase = {400: "Bad Request", 413: "Content Too Large", 431: "Request Header Fields Too Large"}
        body = f"{reason}\n".encode()
        self._transport.write(
            f"HTTP/1.1 {status} {phrase.get(status, 'Error')}\r\ncontent-type: {TEXT}\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body
        )
        if self._transport.can_write_eof():
            self._transport.write_eof()
            self._arm_timer(LINGER)
        else:  # TLS: close() sends close_notify after the buffered response
            self._transport.close()

    # ------------------------------------------------------------------ eviction (``_Site.admit``)

    def sending(self) -> bool:
        """Is a response still queued? Requests are answered at once, so this is the only work."""
        return self._transport is not None and self._transport.get_write_buffer_size() > 0

    def stalled(self) -> bool:
        """Is the client not reading what we send (past the high-water mark)?"""
        return self._writing_paused

    def evict(self) -> None:
        """Close now to make room; the slot is free at once, before ``connection_lost`` runs."""
        self._site.release(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is None:
            return
        if self.sending():
            self._transport.abort()  # close() would wait for a client that does not read
        else:
            self._transport.close()  # a FIN: a keep-alive client sees a clean close and reconnects

    def _arm_timer(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._timed_out)

    def _timed_out(self) -> None:
        if self._transport is None:
            return
        # close() would wait forever for a client that does not read; abort() does not.
        if self._writing_paused or self._closing:
            self._transport.abort()
        else:
            self._transport.close()
