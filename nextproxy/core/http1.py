"""HttpSession: one terminated client connection proxied over HTTP/1.1, on our codec for both legs.

Heads go through ``core/codec.py`` (one regex, one loop, the forwarding policy applied on the
way); chunked bodies through ``core/chunked.py``. The upstream half of an exchange lives in
``UpstreamLeg``, which is pooled with its TCP connection. The session returns action lists
(``core/actions.py``); it never touches sockets, clocks or logs. Bodies stream: each read
becomes at most one send, nothing is accumulated. One request is taken from the client's
buffer at a time; a pipelined one waits there (``reading_client`` is False) until the
response before it is done.

Errors that are the client's fault become short plain responses (400, 404, 421, 431, 501, 505);
upstream failures become 502/504 with a generic body, the detail only in ``RequestCompleted``.
A response whose upstream fails mid-body is cut short (no final chunk, connection closed),
never completed. An ``HttpError`` never escapes: it is turned into a response.
"""

from __future__ import annotations

from dataclasses import dataclass

from nextproxy.config.model import Limits, PathRoute, SniRoute, WebSocketMode
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
from nextproxy.core.buffer import ByteBuffer
from nextproxy.core.chunked import LAST_CHUNK, encode_chunk
from nextproxy.core.codec import UNTIL_CLOSE, RequestHead, RequestParser, ResponseHead, trailer_lines
from nextproxy.core.headers import ClientInfo, websocket_accept
from nextproxy.core.request_body import RequestBody
from nextproxy.core.responses import CONTINUE, authorize, client_response, refusal, request_line, switching_protocols
from nextproxy.core.routing import RouteTable
from nextproxy.core.upstream_leg import UpstreamLeg
from nextproxy.errors import HttpError

__all__ = ["HttpSession", "UpstreamLeg", "IDEMPOTENT_METHODS", "NO_ROUTE"]

# RFC 9110 section 9.2.2: methods a proxy may replay when a reused connection turns out dead.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_NO_BODY = RequestBody(0, 0)
"""Shared: a body of length 0 is closed and never changes."""

NO_ROUTE = "-"
"""Route label for requests that matched no route (bounded, unlike the raw path)."""


@dataclass(slots=True)
class _Exchange:
    """One request in flight, from its head to the end of its response."""

    route: PathRoute
    head: RequestHead
    retried: bool = False
    response_status: int = 0
    client_chunked: bool = False
    """The response goes to the client chunked (re-framed)."""
    client_close: bool = False
    """The client connection closes after this response."""
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
        self._parser = RequestParser(client)
        self._buffer = ByteBuffer()
        """Client bytes not yet consumed: a partial head, or what was pipelined behind a request."""
        self._body = _NO_BODY
        """The body of the request in flight (or being skipped)."""
        self._client_eof = False
        self._exchange: _Exchange | None = None
        self._upstream: UpstreamLeg | None = None
        self._connecting = False
        self._closed = False
        self.draining = False
        """Set by the shell on shutdown: no new upgrades (503), close after the current exchange."""
        self.awaiting_head = False
        """Part of a request head is buffered (reported as HeadStarted, then HeadReceived)."""
        self.now = 0.0
        """Monotonic seconds, set by the shell before it feeds client bytes (rate limits)."""

    # ------------------------------------------------------------------ properties for the shell

    @property
    def reading_client(self) -> bool:
        """False while more client bytes would only pile up (pipelining, connecting)."""
        if self._closed or self._connecting:
            return False
        return self._exchange is None or self._request_open

    @property
    def idle(self) -> bool:
        """No exchange in flight: the keep-alive timer may run."""
        return self._exchange is None

    @property
    def _request_open(self) -> bool:
        return self._body.open

    # ------------------------------------------------------------------ inputs

    def client_data(self, data: bytes) -> list[Action]:
        """Bytes from the client; ``b""`` is EOF."""
        if self._closed:
            return []
        if not data:
            return self._client_closed()
        if self._exchange is not None and self._request_open and not self._connecting and not self._buffer:
            return self._request_body(data)
        if self._exchange is None and not self._connecting:
            starts = not self._buffer
            self._buffer.add(data)
            # A request's duration is counted from its first byte, not from its complete head.
            return [RequestStarted(), *self._pump_client()] if starts else self._pump_client()
        self._buffer.add(data)
        if self._request_open and not self._connecting:
            return self._request_body(self._buffer.take_all())
        return []

    def upstream_connected(self, leg: UpstreamLeg) -> list[Action]:
        exchange = self._exchange
        if exchange is None or not self._connecting:
            return [ReleaseUpstream(reusable=leg.reusable)]
        self._connecting = False
        self._upstream = leg
        leg.start()
        head = exchange.head
        line = head.method + b" " + head.target + b" HTTP/1.1\r\n"
        if not head.has_host:
            line += b"host: " + leg.authority.encode("ascii") + b"\r\n"
        actions: list[Action] = [SendToUpstream(line + head.forward)]
        if not self._request_open:
            actions.append(AwaitResponse())
        elif self._buffer:
            actions += self._request_body(self._buffer.take_all())
        return actions

    def upstream_failed(self, reason: str, *, timeout: bool = False) -> list[Action]:
        """Connecting failed or timed out, or the connection broke (reset, read error).

        A connection that breaks is never an end of body, even for a body that ends at close:
        a response in progress is cut short, not completed.
        """
        if self._upstream is not None:
            return self._upstream_broken(reason)
        self._connecting = False
        return self._upstream_error(504 if timeout else 502, reason)

    def upstream_timeout(self) -> list[Action]:
        """The response head did not arrive within the response timeout."""
        return self._drop_upstream() + self._upstream_error(504, "upstream timed out")

    def upstream_data(self, data: bytes) -> list[Action]:
        """Bytes from the upstream; ``b""`` is a clean EOF."""
        leg, exchange = self._upstream, self._exchange
        if leg is None or exchange is None:
            return []
        if not data:
            return self._upstream_eof(leg, exchange)
        if leg.in_body:
            return self._response_body(leg, exchange, data)
        leg.buffer.add(data)
        return self._response_heads(leg, exchange)

    def drain(self) -> list[Action]:
        """Shutdown: close now if idle, else after the exchange in flight."""
        self.draining = True
        if self.idle and not self._connecting:
            self._closed = True
            return [CloseClient()]
        return []

    # ------------------------------------------------------------------ client leg

    def _pump_client(self) -> list[Action]:
        """Take the next request head from the buffer, if it is all there."""
        actions: list[Action] = []
        while self._exchange is None and not self._closed and not self._connecting:
            try:
                raw = self._buffer.take_head(self._limits.max_header_size, request=True)
            except HttpError as exc:
                actions += self._refuse(b"", b"", exc.status, exc.reason)
                break
            if raw is None:
                self._await_head(bool(self._buffer), actions)
                break
            self._await_head(False, actions)
            actions += self._start_exchange(raw)
        return actions

    def _await_head(self, awaiting: bool, actions: list[Action]) -> None:
        """Report a partial head starting or ending: the shell bounds how long the rest may take."""
        if awaiting is not self.awaiting_head:
            self.awaiting_head = awaiting
            actions.append(HeadStarted() if awaiting else HeadReceived())

    def _start_exchange(self, raw: bytes) -> list[Action]:
        try:
            head = self._parser.parse(raw)
        except HttpError as exc:
            method, target = request_line(raw)
            return self._refuse(method, target, exc.status, exc.reason)
        method, target = head.method, head.target
        self._set_request_body(head.length)  # known now, so a refusal can skip the body
        if head.misdirected:
            return self._refuse(method, target, 421, "misdirected request")
        try:
            route = self._routes.match_path(self._sni_route, target)
        except HttpError as exc:
            return self._refuse(method, target, exc.status, exc.reason)
        if route is None:
            return self._refuse(method, target, 404, "no route for this path")
        allow = route.allow if route.allow is not None else (self._sni_route.allow if self._sni_route else None)
        if allow is not None:
            denied = authorize(self._client_info.certificate, route.name, allow)
            if denied is not None:
                return [denied] + self._refuse(method, target, 403, denied.reason, route.name)
        if head.upgrade and self.draining:
            return self._refuse(method, target, 503, "shutting down", route.name, retry_after=True)
        refused = self._routes.admission.check(route, self._client_info, self.now)
        if refused is not None:  # allow_sources (403) and rate_limit (429), upgrades included
            return [refused.fact] + self._refuse(method, target, refused.status, refused.reason, route.name, retry_after=refused.retry_after)
        self._exchange = _Exchange(route=route, head=head)
        self._connecting = True
        return [ConnectUpstream(route)]

    def _set_request_body(self, length: int) -> None:
        self._body = RequestBody(length, self._limits.max_header_size) if length else _NO_BODY

    def _request_body(self, data: bytes) -> list[Action]:
        """Forward request body bytes as they come; keep what follows the body for later."""
        exchange = self._exchange
        assert exchange is not None
        exchange.head.expect_continue = False  # the client stopped waiting for our 100
        try:
            sends, decoded, rest = self._body.take(data)
        except HttpError as exc:
            return self._client_error(exc)
        if rest:
            self._buffer.put_back(rest)
        exchange.bytes_in += decoded
        out: list[Action] = [SendToUpstream(piece) for piece in sends] if self._upstream_wants_body() else []
        if not self._body.open:
            out += self._end_request(exchange)
        return out

    def _upstream_wants_body(self) -> bool:
        leg = self._upstream
        return leg is not None and not leg.finished

    def _end_request(self, exchange: _Exchange) -> list[Action]:
        """The request body is complete: the upstream's answer is now awaited."""
        return [AwaitResponse()] if exchange.response_status == 0 else []

    def _client_closed(self) -> list[Action]:
        self._client_eof = True
        exchange = self._exchange
        if exchange is None:
            if self._buffer:
                return self._refuse(b"", b"", 400, "incomplete request head")
            self._closed = True
            return [CloseClient()]
        if self._request_open:
            return self._client_error(HttpError(400, "client closed before the request body ended"))
        return []  # the request is complete: answer it, then close

    # ------------------------------------------------------------------ upstream leg

    def _response_heads(self, leg: UpstreamLeg, exchange: _Exchange) -> list[Action]:
        """Parse buffered response heads (1xx first, then the final one)."""
        actions: list[Action] = []
        while self._upstream is leg and not leg.in_body:
            try:
                head = leg.next_head()
            except HttpError as exc:
                detail = f"invalid response from upstream: {exc.reason}"
                return actions + self._drop_upstream() + self._upstream_error(502, detail)
            if head is None:
                return actions
            status = head.status
            if status >= 200:
                return actions + self._start_response(leg, exchange, head)
            if status == 101:
                return actions + self._switch_protocols(leg, exchange, head)
            if status == 100 and exchange.head.expect_continue and exchange.response_status == 0:
                exchange.head.expect_continue = False
                actions.append(SendToClient(CONTINUE))
            # other 1xx (102, 103) are optional hints: not forwarded
        return actions

    def _switch_protocols(self, leg: UpstreamLeg, exchange: _Exchange, head: ResponseHead) -> list[Action]:
        if not exchange.head.upgrade or head.accept != websocket_accept(exchange.head.websocket_key):
            return self._drop_upstream() + self._upstream_error(502, "upstream sent an invalid 101")
        data = switching_protocols(head)
        exchange.response_status = 101
        from_client, from_upstream = self._buffer.take_all(), leg.buffer.take_all()
        self._exchange = None
        self._upstream = None
        self._closed = True  # the session is done; the relay or tunnel owns both legs now
        completed = self._completed(exchange, 101)
        start: Action
        if exchange.route.websocket is WebSocketMode.TUNNEL:
            start = StartTunnel(exchange.route, to_upstream=from_client, to_client=from_upstream)
        else:
            start = StartWebSocket(exchange.route, from_client, from_upstream, head.protocol)
        return [ResponseStarted(101), SendToClient(data), completed, start]

    def _start_response(self, leg: UpstreamLeg, exchange: _Exchange, head: ResponseHead) -> list[Action]:
        exchange.response_status = head.status
        leg.keep_alive = head.keep_alive
        close = not exchange.head.keep_alive or self.draining or self._client_eof
        response = client_response(head, exchange.head, close=close)
        exchange.client_chunked, exchange.client_close = response.chunked, response.close
        actions: list[Action] = [ResponseStarted(head.status), SendToClient(response.data)]
        leg.begin_body(response.length, leg.max_header_size)
        if leg.finished:
            return actions + self._response_done(leg, exchange)
        if leg.buffer:
            actions += self._response_body(leg, exchange, leg.buffer.take_all())
        return actions

    def _response_body(self, leg: UpstreamLeg, exchange: _Exchange, data: bytes) -> list[Action]:
        try:
            pieces = leg.body(data)
        except HttpError as exc:
            return self._upstream_broken(f"invalid response body from upstream: {exc.reason}")
        actions: list[Action] = []
        chunked = exchange.client_chunked
        for piece in pieces:
            exchange.bytes_out += len(piece)
            actions.append(SendToClient(encode_chunk(piece) if chunked else piece))
        if leg.finished:
            actions += self._response_done(leg, exchange)
        return actions

    def _response_done(self, leg: UpstreamLeg, exchange: _Exchange) -> list[Action]:
        if exchange.client_chunked:
            trailer = leg.trailer
            end = b"0\r\n" + trailer_lines(trailer) + b"\r\n" if len(trailer) > 2 else LAST_CHUNK
            actions: list[Action] = [SendToClient(end)]
        else:
            actions = []
        if self._request_open:
            # The upstream answered before the request body ended: its connection cannot be
            # reused, and the next request cannot be found without reading the rest.
            self._closed = True
            self._upstream = None
            self._exchange = None
            return actions + [ReleaseUpstream(reusable=False), self._completed(exchange, exchange.response_status), CloseClient()]
        return actions + self._finish_exchange(leg, exchange)

    def _finish_exchange(self, leg: UpstreamLeg, exchange: _Exchange) -> list[Action]:
        reusable = leg.recycle()
        self._upstream = None
        self._exchange = None
        actions: list[Action] = [ReleaseUpstream(reusable=reusable), self._completed(exchange, exchange.response_status)]
        if exchange.client_close:
            self._closed = True
            actions.append(CloseClient())
            return actions
        if self._buffer:
            actions.append(RequestStarted())  # a pipelined request starts now
            actions += self._pump_client()
        return actions

    def _upstream_eof(self, leg: UpstreamLeg, exchange: _Exchange) -> list[Action]:
        if leg.in_body:
            if leg.length == UNTIL_CLOSE:
                leg.end_at_close()
                return self._response_done(leg, exchange)
            return self._upstream_broken("upstream closed the connection mid-body")
        if leg.buffer:
            detail = f"upstream closed the connection mid-head: {leg.buffer.preview()!r}"
            return self._upstream_broken(detail)
        return self._upstream_broken("upstream closed the connection before responding")

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
            and not leg.buffer
            and not exchange.retried
            and exchange.head.length == 0
            and exchange.head.method in IDEMPOTENT_METHODS
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
            return self._abort(exchange, 502, f"upstream failed after a {exchange.response_status} head: {reason}")
        return self._refuse(exchange.head.method, exchange.head.target, status, reason, exchange.route.name)

    def _abort(self, exchange: _Exchange, status: int, reason: str) -> list[Action]:
        """Mid-response: the client sees a cut response (no final chunk, closed), never a complete one.

        An upstream failure is logged and counted as a 502, whatever status line already went out.
        """
        self._exchange = None
        self._closed = True
        self._body = _NO_BODY
        return [self._completed(exchange, status, reason), CloseClient()]

    def _client_error(self, exc: HttpError) -> list[Action]:
        exchange = self._exchange
        if exchange is not None and exchange.response_status != 0:
            return self._drop_upstream() + self._abort(exchange, exchange.response_status, exc.reason)
        self._body = _NO_BODY
        actions = self._drop_upstream()
        method = exchange.head.method if exchange else b""
        target = exchange.head.target if exchange else b""
        return actions + self._refuse(method, target, exc.status, exc.reason, exchange.route.name if exchange else NO_ROUTE)

    def _refuse(
        self,
        method: bytes,
        target: bytes,
        status: int,
        reason: str,
        route: str = NO_ROUTE,
        *,
        retry_after: int = 0,
    ) -> list[Action]:
        """The proxy's own short answer, in one write; keeps the connection when it safely can."""
        self._exchange = None
        self._connecting = False
        keep = status in (403, 404, 421, 429, 503) and not self.draining and not self._client_eof and self._skip_request_body()
        completed = RequestCompleted(route, method.decode("ascii", "replace"), target.decode("ascii", "replace"), status, 0, 0, reason)
        actions: list[Action] = [SendToClient(refusal(status, reason, keep=keep, retry_after=retry_after)), completed]
        if not keep:  # when kept, the caller (_pump_client's loop) reads the next request
            self._closed = True
            actions.append(CloseClient())
        return actions

    def _skip_request_body(self) -> bool:
        """Discard the refused request's body if it is already here; True if the request is done.

        A body we did not read would be parsed as the next request, so when it is not all
        buffered we close the connection instead of waiting for it.
        """
        rest = self._body.skip(self._buffer.take_all())
        self._body = _NO_BODY
        if rest is None:
            return False
        self._buffer.put_back(rest)
        return True

    def _completed(self, exchange: _Exchange, status: int, reason: str = "") -> RequestCompleted:
        head = exchange.head
        return RequestCompleted(
            exchange.route.name,
            head.method.decode("ascii", "replace"),
            head.target.decode("ascii", "replace"),
            status,
            exchange.bytes_in,
            exchange.bytes_out,
            reason,
        )

