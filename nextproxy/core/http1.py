"""HttpSession: one terminated client connection proxied over HTTP/1.1, on h11 for both legs.

The client leg is an h11 server connection owned by the session; the upstream leg is an h11 client
connection owned by ``UpstreamLeg``, which lives as long as the upstream TCP connection so that a
pooled connection keeps (and cycles) its h11 state instead of re-creating it. The session returns
action lists (``core/actions.py``); it never touches sockets, clocks or logs. Bodies stream: each
``Data`` event becomes one send, nothing is accumulated.

Errors that are the client's fault become short plain responses (400, 404, 421, 431...);
upstream failures become 502/504. An ``HttpError`` never escapes: it is turned into a response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from h11._headers import Headers as H11Headers  # the type h11 hands us trailers in

import h11

from nextproxy.config.model import AllowRule, Limits, PathRoute, SniRoute, WebSocketMode
from nextproxy.core.actions import (
    Action,
    AuthorizationDenied,
    AwaitResponse,
    CloseClient,
    ConnectUpstream,
    HeadReceived,
    HeadStarted,
    ReleaseUpstream,
    RequestCompleted,
    RequestStarted,
    ResponseStarted,
    SendToClient,
    SendToUpstream,
    StartTunnel,
    StartWebSocket,
)
from nextproxy.core.headers import (
    ClientInfo,
    check_request,
    is_upgrade_request,
    response_headers,
    upstream_request_headers,
    websocket_accept,
)
from nextproxy.core.routing import RouteTable
from nextproxy.errors import HttpError

# RFC 9110 section 9.2.2: methods a proxy may replay when a reused connection turns out dead.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    421: b"Misdirected Request",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}
_END = h11.EndOfMessage()
"""Events are immutable; one shared end-of-message without trailers saves a construction."""
Trailers = Union["H11Headers", list[tuple[bytes, bytes]]]

NO_ROUTE = "-"
"""Route label for requests that matched no route (bounded, unlike the raw path)."""


class UpstreamLeg:
    """The upstream half of an exchange: an h11 client connection pooled with its TCP connection."""

    __slots__ = ("conn", "authority", "exchanges")

    def __init__(self, authority: str, max_header_size: int) -> None:
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_size)
        self.authority = authority
        """``host:port``; the Host header for HTTP/1.0 clients that sent none."""
        self.exchanges = 0
        """Completed exchanges; above zero means a reused (pooled) connection."""

    @property
    def reusable(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    def recycle(self) -> None:
        self.exchanges += 1
        self.conn.start_next_cycle()


def new_upstream_leg(authority: str, max_header_size: int) -> UpstreamLeg:
    """The upstream half kept with each pooled connection: the shell's pool holds it without
    looking inside, so only the core builds it."""
    return UpstreamLeg(authority, max_header_size)


@dataclass(slots=True)
class _Exchange:
    """One request in flight, from its head to the end of its response."""

    route: PathRoute
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    http_version: bytes
    upgrade: bool
    has_body: bool
    client_key: bytes = b""
    retried: bool = False
    request_sent: bool = False
    response_status: int = 0
    upstream_bytes: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class HttpSession:
    """Drives one client connection: requests in, upstream exchanges out, responses back."""

    def __init__(
        self, routes: RouteTable, sni_route: SniRoute | None, client: ClientInfo, limits: Limits
    ) -> None:
        self._routes = routes
        self._sni_route = sni_route
        self._client_info = client
        self._limits = limits
        self._client = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_size)
        self._exchange: _Exchange | None = None
        self._upstream: UpstreamLeg | None = None
        self._connecting = False
        self._closed = False
        self.draining = False
        """Set by the shell on shutdown: no new upgrades (503), close after the current exchange."""
        self.awaiting_head = False
        """Part of a request head is buffered (reported as HeadStarted, then HeadReceived)."""

    # ------------------------------------------------------------------ properties for the shell

    @property
    def reading_client(self) -> bool:
        """False while more client bytes would only pile up in h11 (pipelining, connecting)."""
        if self._closed or self._connecting:
            return False
        if self._exchange is None:
            return True
        return self._client.their_state is h11.SEND_BODY

    @property
    def idle(self) -> bool:
        """No exchange in flight and nothing half-received: the keep-alive timer may run."""
        return self._exchange is None and self._client.their_state is h11.IDLE

    # ------------------------------------------------------------------ inputs

    def client_data(self, data: bytes) -> list[Action]:
        """Bytes from the client; ``b""`` is EOF."""
        if self._closed:
            return []
        if data and self._exchange is None and not self.awaiting_head and self._client.their_state is h11.IDLE:
            return [RequestStarted(), *self._receive_client(data)]
        return self._receive_client(data)

    def _receive_client(self, data: bytes) -> list[Action]:
        try:
            self._client.receive_data(data)
        except h11.RemoteProtocolError as exc:
            return self._client_error(exc)
        return self._pump_client()

    def upstream_connected(self, leg: UpstreamLeg) -> list[Action]:
        exchange = self._exchange
        if exchange is None or not self._connecting:
            return [ReleaseUpstream(reusable=leg.reusable)]
        self._connecting = False
        self._upstream = leg
        headers = exchange.headers
        if exchange.http_version == b"1.0" and not any(name == b"host" for name, _ in headers):
            headers = [(b"host", leg.authority.encode("ascii"))] + headers
        # _parsed=True: every name and value came out of h11's parser or from our own header
        # policy (which only emits printable values), so h11's per-header regexes would only
        # re-check them; they were a sixth of the CPU of a small request (measured with cProfile).
        out = leg.conn.send(h11.Request(method=exchange.method, target=exchange.target, headers=headers, _parsed=True))
        exchange.request_sent = True
        actions: list[Action] = [SendToUpstream(out or b"")]
        if not exchange.has_body:
            actions += self._end_request()
        actions += self._pump_client()
        return actions

    def upstream_failed(self, reason: str, *, timeout: bool = False) -> list[Action]:
        """Connecting failed or timed out, or the connection broke before the response head."""
        self._connecting = False
        self._upstream = None
        status = 504 if timeout else 502
        return self._upstream_error(status, reason)

    def upstream_timeout(self) -> list[Action]:
        """The response head did not arrive within the response timeout."""
        return self._drop_upstream() + self._upstream_error(504, "upstream timed out")

    def upstream_data(self, data: bytes) -> list[Action]:
        """Bytes from the upstream; ``b""`` is EOF."""
        leg = self._upstream
        if leg is None:
            return []
        if self._exchange is not None:
            self._exchange.upstream_bytes += len(data)
        try:
            leg.conn.receive_data(data)
        except h11.RemoteProtocolError:
            return self._upstream_broken("upstream sent data after closing")
        return self._pump_upstream(leg)

    def drain(self) -> list[Action]:
        """Shutdown: close now if idle, else after the exchange in flight."""
        self.draining = True
        if self.idle and not self._connecting:
            self._closed = True
            return [CloseClient()]
        return []

    # ------------------------------------------------------------------ client leg

    def _pump_client(self) -> list[Action]:
        actions: list[Action] = []
        while not self._closed and not self._connecting:
            try:
                event = self._client.next_event()
            except h11.RemoteProtocolError as exc:
                actions += self._client_error(exc)
                break
            if event is h11.NEED_DATA:
                # Only a partial head in an idle cycle: copying h11's buffer to find out is rare.
                awaiting = (
                    self._exchange is None and self._client.their_state is h11.IDLE and bool(self._client.trailing_data[0])
                )
                if awaiting is not self.awaiting_head:
                    self.awaiting_head = awaiting
                    actions.append(HeadStarted() if awaiting else HeadReceived())
                break
            if event is h11.PAUSED:
                break
            if self.awaiting_head:
                self.awaiting_head = False
                actions.append(HeadReceived())
            # Exact type checks: h11's events derive from an ABC, whose isinstance() is slow.
            kind = type(event)
            if kind is h11.Request:
                actions += self._start_exchange(event)  # type: ignore[arg-type]
            elif kind is h11.Data:
                actions += self._forward_body(event)  # type: ignore[arg-type]
            elif kind is h11.EndOfMessage:
                actions += self._end_request(event.headers)  # type: ignore[union-attr]
            elif kind is h11.ConnectionClosed:
                if self._exchange is None:
                    self._closed = True
                    actions.append(CloseClient())
                break
        return actions

    def _start_exchange(self, request: h11.Request) -> list[Action]:
        method, target, headers = request.method, request.target, list(request.headers)
        # h11 only bounds an *incomplete* head; a complete one that arrived in a single read
        # can be larger, so the limit is enforced here as well.
        size = len(method) + len(target) + sum(len(n) + len(v) + 4 for n, v in headers)
        if size > self._limits.max_header_size:
            return self._refuse(method, b"", 431, "request header fields too large")
        try:
            check_request(method, target, headers, self._client_info)
            route = self._routes.match_path(self._sni_route, target)
        except HttpError as exc:
            return self._refuse(method, target, exc.status, exc.reason)
        if route is None:
            return self._refuse(method, target, 404, "no route for this path")
        allow = route.allow if route.allow is not None else (self._sni_route.allow if self._sni_route else None)
        if allow is not None:
            denied = self._authorize(route.name, allow)
            if denied is not None:
                return [denied] + self._refuse(method, target, 403, denied.reason, route.name)
        upgrade = is_upgrade_request(method, headers)
        if upgrade and self.draining:
            return self._refuse(method, target, 503, "shutting down", route.name, retry_after=True)
        has_body = any(
            name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0")
            for name, value in headers
        )
        key = next((value for name, value in headers if name == b"sec-websocket-key"), b"")
        self._exchange = _Exchange(
            route=route,
            method=method,
            target=target,
            headers=upstream_request_headers(headers, self._client_info, upgrade=upgrade),
            http_version=request.http_version,
            upgrade=upgrade,
            has_body=has_body,
            client_key=key,
        )
        self._connecting = True
        return [ConnectUpstream(route)]

    def _forward_body(self, event: h11.Data) -> list[Action]:
        exchange, leg = self._exchange, self._upstream
        if exchange is None or leg is None:
            return []
        exchange.bytes_in += len(event.data)
        if leg.conn.our_state is not h11.SEND_BODY:
            return []  # the upstream already answered and stopped reading: drop the rest
        return [SendToUpstream(leg.conn.send(h11.Data(data=event.data)) or b"")]

    def _end_request(self, trailers: Trailers | None = None) -> list[Action]:
        leg, exchange = self._upstream, self._exchange
        if leg is None or exchange is None:
            return []
        actions: list[Action] = []
        if leg.conn.our_state is h11.SEND_BODY:
            # Trailers pass through as h11's own Headers object: no re-validation.
            out = leg.conn.send(h11.EndOfMessage(headers=trailers) if trailers else _END)
            actions.append(SendToUpstream(out or b""))
        if exchange.response_status == 0:
            actions.append(AwaitResponse())
        return actions

    def _authorize(self, route: str, allow: tuple[AllowRule, ...]) -> AuthorizationDenied | None:
        """Allow-list check. Name rules need a verified chain: anyone can self-sign any name."""
        cert = self._client_info.certificate
        if cert is None:
            return AuthorizationDenied(route, "no_certificate", "-")
        for rule in allow:
            if rule.kind == "sha256" and rule.value == cert.sha256:
                return None
            if rule.kind == "spki" and rule.value == cert.spki_sha256:
                return None
            if cert.verified and (
                (rule.kind == "dns" and rule.value in cert.dns_names)
                or (rule.kind == "uri" and rule.value in cert.uris)
                or (rule.kind == "cn" and rule.value == cert.common_name)
            ):
                return None
        reason = "not_allowed" if cert.verified else "not_allowed_unverified"
        return AuthorizationDenied(route, reason, cert.sha256)

    # ------------------------------------------------------------------ upstream leg

    def _pump_upstream(self, leg: UpstreamLeg) -> list[Action]:
        actions: list[Action] = []
        while self._upstream is leg:
            try:
                event = leg.conn.next_event()
            except h11.RemoteProtocolError as exc:
                exchange = self._exchange
                if exchange is not None and exchange.upstream_bytes == 0:
                    actions += self._upstream_broken("upstream closed the connection before responding")
                else:
                    actions += self._upstream_broken(f"invalid response from upstream: {exc}")
                break
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            kind = type(event)
            if kind is h11.Data:
                exchange = self._exchange
                if exchange is not None:
                    data = event.data  # type: ignore[union-attr]
                    exchange.bytes_out += len(data)
                    actions.append(SendToClient(self._client.send(event) or b""))  # type: ignore[arg-type]
            elif kind is h11.Response:
                actions += self._start_response(event)  # type: ignore[arg-type]
            elif kind is h11.EndOfMessage:
                actions += self._finish_exchange(leg, event.headers)  # type: ignore[union-attr]
            elif kind is h11.InformationalResponse:
                actions += self._informational(leg, event)  # type: ignore[arg-type]
            elif kind is h11.ConnectionClosed:
                actions += self._upstream_broken("upstream closed the connection")
                break
        return actions

    def _informational(self, leg: UpstreamLeg, event: h11.InformationalResponse) -> list[Action]:
        exchange = self._exchange
        if exchange is None:
            return []
        if event.status_code == 101:
            return self._switch_protocols(leg, exchange, event)
        if event.status_code == 100 and self._client.client_is_waiting_for_100_continue:
            return [SendToClient(self._client.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")]
        return []  # other 1xx (102, 103) are optional hints: not forwarded

    def _switch_protocols(
        self, leg: UpstreamLeg, exchange: _Exchange, event: h11.InformationalResponse
    ) -> list[Action]:
        accept = next((v for n, v in event.headers if n == b"sec-websocket-accept"), b"")
        if not exchange.upgrade or accept != websocket_accept(exchange.client_key):
            return self._drop_upstream() + self._upstream_error(502, "upstream sent an invalid 101")
        headers = response_headers(list(event.headers), upgrade=True)
        head = self._client.send(h11.InformationalResponse(status_code=101, headers=headers, reason=event.reason))
        exchange.response_status = 101
        subprotocol = next((v.decode("ascii", "replace") for n, v in event.headers if n == b"sec-websocket-protocol"), None)
        from_client, _ = self._client.trailing_data
        from_upstream, _ = leg.conn.trailing_data
        self._exchange = None
        self._upstream = None
        self._closed = True  # the session is done; the relay or tunnel owns both legs now
        completed = self._completed(exchange, 101)
        start: Action
        if exchange.route.websocket is WebSocketMode.TUNNEL:
            start = StartTunnel(exchange.route, to_upstream=bytes(from_client), to_client=bytes(from_upstream))
        else:
            start = StartWebSocket(exchange.route, bytes(from_client), bytes(from_upstream), subprotocol)
        return [ResponseStarted(101), SendToClient(head or b""), completed, start]

    def _start_response(self, event: h11.Response) -> list[Action]:
        exchange = self._exchange
        if exchange is None:
            return []
        exchange.response_status = event.status_code
        headers = response_headers(list(event.headers), upgrade=False)
        if self.draining:
            headers.append((b"connection", b"close"))
        head = self._client.send(
            h11.Response(status_code=event.status_code, headers=headers, reason=event.reason, _parsed=True)
        )
        return [ResponseStarted(event.status_code), SendToClient(head or b"")]

    def _finish_exchange(self, leg: UpstreamLeg, trailers: Trailers) -> list[Action]:
        exchange = self._exchange
        if exchange is None:
            return []
        end = h11.EndOfMessage(headers=trailers) if trailers else _END
        actions: list[Action] = [SendToClient(self._client.send(end) or b"")]
        reusable = leg.reusable
        if reusable:
            leg.recycle()
        self._upstream = None
        self._exchange = None
        actions.append(ReleaseUpstream(reusable=reusable))
        actions.append(self._completed(exchange, exchange.response_status))
        actions += self._next_cycle()
        return actions

    def _next_cycle(self) -> list[Action]:
        """After a response: keep the client connection for the next request, or close it."""
        client = self._client
        if client.our_state is h11.DONE and client.their_state is h11.DONE and not self.draining:
            client.start_next_cycle()
            buffered, closed = client.trailing_data
            if not buffered and not closed:
                # The usual keep-alive case: nothing pipelined, so asking h11 for the next
                # event would only parse an empty buffer (a few µs per request).
                self.awaiting_head = False
                return []
            return self._pump_client()
        if client.our_state is h11.DONE and client.their_state is h11.SEND_BODY:
            pass  # the upstream answered before the body ended: we cannot find the next request
        self._closed = True
        return [CloseClient()]

    # ------------------------------------------------------------------ failures

    def _upstream_broken(self, reason: str) -> list[Action]:
        """The upstream connection failed: retry once, answer 502, or cut the client short."""
        exchange, leg = self._exchange, self._upstream
        self._upstream = None
        actions: list[Action] = [ReleaseUpstream(reusable=False)]
        if exchange is None:
            return actions
        if (
            exchange.response_status == 0
            and leg is not None
            and leg.exchanges > 0
            and not exchange.retried
            and not exchange.has_body
            and exchange.method in IDEMPOTENT_METHODS
        ):
            # A pooled connection the upstream had closed while idle: replay once on a fresh one.
            exchange.retried = True
            self._connecting = True
            return actions + [ConnectUpstream(exchange.route, fresh=True)]
        return actions + self._upstream_error(502, reason)

    def _drop_upstream(self) -> list[Action]:
        if self._upstream is None:
            return []
        self._upstream = None
        return [ReleaseUpstream(reusable=False)]

    def _upstream_error(self, status: int, reason: str) -> list[Action]:
        exchange = self._exchange
        if exchange is None:
            return []
        if exchange.response_status != 0:
            # Mid-response: the client sees a truncated body (never a silently short one).
            self._exchange = None
            self._closed = True
            return [self._completed(exchange, exchange.response_status, reason), CloseClient()]
        return self._refuse(exchange.method, exchange.target, status, reason, exchange.route.name)

    def _client_error(self, exc: h11.RemoteProtocolError) -> list[Action]:
        status = exc.error_status_hint if exc.error_status_hint in _REASONS else 400
        reason = "request header fields too large" if status == 431 else "malformed request"
        exchange = self._exchange
        if exchange is not None and exchange.response_status != 0:
            self._closed = True
            return [self._completed(exchange, exchange.response_status, reason), CloseClient()]
        actions = self._drop_upstream()
        target = exchange.target if exchange else b""
        method = exchange.method if exchange else b""
        return actions + self._refuse(method, target, status, reason, exchange.route.name if exchange else NO_ROUTE)

    def _refuse(
        self,
        method: bytes,
        target: bytes,
        status: int,
        reason: str,
        route: str = NO_ROUTE,
        *,
        retry_after: bool = False,
    ) -> list[Action]:
        """The proxy's own short answer, in one write; keeps the connection when it safely can."""
        body = reason.encode("ascii", "replace") + b"\n"
        self._exchange = None
        self._connecting = False
        keep = status in (403, 404, 421, 503) and not self.draining and self._skip_request_body()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ]
        if retry_after:
            headers.append((b"retry-after", b"1"))
        if not keep:
            headers.append((b"connection", b"close"))
        completed = RequestCompleted(route, method.decode("ascii", "replace"), target.decode("ascii", "replace"), status, 0, 0, reason)
        try:
            data = self._client.send(h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b"")))
            data = (data or b"") + (self._client.send(h11.Data(data=body)) or b"")
            data += self._client.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            # h11 cannot frame a response now (e.g. the client's bytes were not HTTP at all).
            head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))
            data = head + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
            if keep:
                data += b"connection: close\r\n"
            data += b"\r\n" + body
            keep = False
        actions: list[Action] = [SendToClient(data), completed]
        if keep:
            actions += self._next_cycle()
        else:
            self._closed = True
            actions.append(CloseClient())
        return actions

    def _skip_request_body(self) -> bool:
        """Discard the refused request's body if it is already here; True if the request is done.

        A body we did not read would be parsed as the next request, so when it is not all
        buffered we close the connection instead of waiting for it.
        """
        client = self._client
        while client.their_state is h11.SEND_BODY:
            try:
                event = client.next_event()
            except h11.RemoteProtocolError:
                return False
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return False
        return client.their_state is h11.DONE

    def _completed(self, exchange: _Exchange, status: int, reason: str = "") -> RequestCompleted:
        return RequestCompleted(
            exchange.route.name,
            exchange.method.decode("ascii", "replace"),
            exchange.target.decode("ascii", "replace"),
            status,
            exchange.bytes_in,
            exchange.bytes_out,
            reason,
        )
