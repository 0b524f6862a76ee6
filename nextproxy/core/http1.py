"""HttpSession: one terminated client connection proxied over HTTP/1.1, on our codec for both legs.

Heads go through ``core/codec.py`` (one regex, one loop, the forwarding policy applied on the
way); chunked bodies through ``core/chunked.py``. The upstream half of an exchange lives in
``UpstreamLeg``, which is pooled with its TCP connection; what the session does with its
responses and upstream failures is its base class ``ResponseSide`` (``core/http1_response.py``).
The session returns action lists (``core/actions.py``); it never touches sockets, clocks or logs. Bodies stream: each read
becomes at most one send, nothing is accumulated. One request is taken from the client's
buffer at a time; a pipelined one waits there (``reading_client`` is False) until the
response before it is done.

Errors that are the client's fault become short plain responses (400, 404, 405, 421, 431, 501, 505);
upstream failures become 502/504 with a generic body, the detail only in ``RequestCompleted``.
A response whose upstream fails mid-body is cut short (no final chunk, connection closed),
never completed. An ``HttpError`` never escapes: it is turned into a response.
"""

from __future__ import annotations

from nextproxy.config.model import Limits, SniRoute, WebSocketMode
from nextproxy.core.actions import (
    Action,
    AuthorizationDenied,
    AwaitResponse,
    BodyReceived,
    CloseClient,
    CloseUpstream,
    ConnectUpstream,
    HeadReceived,
    HeadStarted,
    ReleaseUpstream,
    RequestCompleted,
    RequestStarted,
    SendToClient,
    SendToUpstream,
)
from nextproxy.core.buffer import ByteBuffer
from nextproxy.core.codec import RequestParser, extension_lines
from nextproxy.core.headers import ClientInfo
from nextproxy.core.http1_response import IDEMPOTENT_METHODS, NO_BODY, Exchange, ResponseSide
from nextproxy.core.request_body import RequestBody
from nextproxy.core.responses import authorize, refusal, request_line
from nextproxy.core.routing import RouteTable, origin_form
from nextproxy.core.upstream_leg import UpstreamLeg
from nextproxy.errors import HttpError

__all__ = ["HttpSession", "UpstreamLeg", "IDEMPOTENT_METHODS", "NO_ROUTE"]

_NO_BODY = NO_BODY

NO_ROUTE = "-"
"""Route label for requests that matched no route (bounded, unlike the raw path)."""
CLIENT_CLOSED = 499
"""Status logged for a request whose client went away before any response started (nginx's)."""


class HttpSession(ResponseSide):
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
        self._exchange: Exchange | None = None
        self._upstream: UpstreamLeg | None = None
        self._connecting = False
        self._closed = False
        self.draining = False
        """Close after the current exchange (its response says so): shutdown, or a reload that
        replaced this connection's configuration."""
        self.refusing_upgrades = False
        """New upgrades get 503: at shutdown the session would be cut at once, after a reload it
        would live on the replaced configuration."""
        self.awaiting_head = False
        """Part of a request head is buffered (reported as HeadStarted, then HeadReceived)."""
        self.now = 0.0
        """Monotonic seconds, set by the shell before it feeds client bytes (rate limits)."""

    # ------------------------------------------------------------------ properties for the shell

    @property
    def reading_client(self) -> bool:
        """False once client bytes pile up that cannot be used yet (a pipelined request, a body
        while the upstream connects), and after the session closed.

        Not already when a request is in flight: most clients send nothing until the answer,
        and pausing then resuming the socket for every request cost two transport calls and two
        epoll changes (W1: 3-14% of the proxy's CPU per request). What comes meanwhile (at most
        one read) waits in the buffer; EOF and resets are seen at once.
        """
        if self._closed:
            return False
        if not self._buffer:
            return True  # nothing piled up (asked after every batch: the cheap answer first)
        return not (self._connecting or (self._exchange is not None and not self._body.open))

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
            if starts and data[0] == 13 and not self._buffer.skip_empty_lines():
                # Only empty lines (ignored, RFC 9112 section 2.2): they start the head's fixed
                # clock all the same, or a CRLF per client_idle would hold the connection forever.
                if self.awaiting_head:
                    return []
                self.awaiting_head = True
                return [RequestStarted(), HeadStarted()]
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
        forward = head.forward
        if head.upgrade and exchange.route.websocket is WebSocketMode.TUNNEL:
            # The codec strips the extension offer (the frame relay could not apply one); a
            # tunnel relays frames untouched, so the upstream gets the client's offer.
            forward = extension_lines(head.raw) + forward
        actions: list[Action] = [SendToUpstream(line + forward)]
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

    def body_timed_out(self, route_name: str) -> list[Action]:
        """A request did not arrive whole within ``timeouts.request_body``: both legs close (the
        upstream connection the trickled body held is freed). With no response started the
        client gets a 408; a response already on its way is cut short, and logged with the
        status that went out and this reason (the client stalled, not the upstream)."""
        reason = "request body timed out"
        exchange = self._exchange
        if exchange is not None and exchange.response_status:
            return self.cut(reason, 408) + [CloseClient()]
        self._closed = True
        if exchange is None:  # the head itself never completed
            done = RequestCompleted(route_name, "-", "-", 408, 0, 0, reason)
        else:
            done = self._completed(exchange, 408, reason)
        return [SendToClient(refusal(408, reason, keep=False)), done, CloseUpstream(), CloseClient()]

    def upstream_timeout(self, reason: str = "upstream timed out") -> list[Action]:
        """The response head did not arrive within the response timeout (or the upstream stopped
        reading the request body, which then could not arrive within its own)."""
        return self._drop_upstream() + self._upstream_error(504, reason)

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

    def client_gone(self) -> list[Action]:
        """The client's connection is gone (a reset, or closed under us): nothing more goes to
        it. The exchange in flight is reported as nginx's 499 when no response had started."""
        return self.cut("client closed the connection", CLIENT_CLOSED)

    def cut(self, reason: str, status: int, *, upstream_fault: bool = False) -> list[Action]:
        """The connection ends under the exchange in flight (the client left, a timeout, the end
        of a drain): the exchange ends here and is reported, with the status that went out (its
        bytes cut short), else ``status``; with ``status`` anyway when the upstream is at fault,
        as a reset mid-body is a 502: the client never got that response whole. Its upstream
        connection is not reused, since the answer was not read to its end."""
        self._closed = True
        exchange, self._exchange = self._exchange, None
        if exchange is None:
            return []
        self._connecting = False
        if exchange.response_status and not upstream_fault:
            status = exchange.response_status
        return self._drop_upstream() + [self._completed(exchange, status, reason)]

    def head_timed_out(self) -> list[Action]:
        """A request head did not arrive whole within its deadline (a slowloris): 408, logged
        like any refused head, and the connection closes (RFC 9110 section 15.5.9).

        Only empty lines (an extra CRLF after a POST body, or its CR and LF in two reads) are
        no request: the connection was idle in all but name, and closes quietly as at the end
        of ``client_idle`` (nginx and HAProxy send nothing either). An unsolicited 408 there
        could be read as the answer to a request the client sends as it arrives."""
        if not self._buffer.skip_empty_lines():
            self._closed = True
            return [CloseClient()]
        return self._refuse(b"", b"", 408, "request head timed out", linger=False)

    def drain(self) -> list[Action]:
        """Shutdown, or a reload that replaced this connection's configuration: close now if
        idle, else after the exchange in flight. New upgrades get 503: a WebSocket session
        started now would keep the replaced configuration (an allow-list revoked by the reload
        included) for as long as it lives.

        A request whose head has begun to arrive is in flight too: it is answered (with
        ``connection: close``) as nginx's old workers answer one, its head's clock bounding it;
        closing under it would lose a request the client has sent part of."""
        self.draining = True
        self.refusing_upgrades = True
        if self.idle and not self._connecting and not self._buffer.skip_empty_lines():
            self._closed = True
            return [CloseClient()]
        return []

    # ------------------------------------------------------------------ client leg

    def _pump_client(self) -> list[Action]:
        """Take the next request head from the buffer, if it is all there."""
        actions: list[Action] = []
        after_refusal = False
        while self._exchange is None and not self._closed and not self._connecting:
            if after_refusal:
                if not self._buffer.skip_empty_lines():
                    break
                # The next pipelined request behind a refusal that kept the connection starts
                # now: its own timers (head, body) and duration, not the quiet timer's.
                actions.append(RequestStarted())
            after_refusal = True
            try:
                raw = self._buffer.take_head(self._limits.max_header_size, request=True)
            except HttpError as exc:
                actions += self._refuse(b"", b"", exc.status, exc.reason)
                break
            if raw is None:
                if self._buffer:  # else only empty lines came (a CR, then its LF): no head yet
                    self._await_head(True, actions)
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
        if target[0] != 47:  # not "/": absolute-form becomes origin-form, its authority the Host
            rewritten = origin_form(raw, target)
            if rewritten is not None:
                return self._start_exchange(rewritten)
        self._set_request_body(head.length)  # known now, so a refusal can skip the body
        # A refusal keeps the connection only if the request would; an HTTP/1.0 one never (its
        # short answers carry no connection: keep-alive, so the client would close anyway).
        keep = head.keep_alive and head.version == b"1.1"
        if head.misdirected:
            return self._refuse(method, target, 421, "misdirected request", keep_alive=keep)
        try:
            route = self._routes.match_path(self._sni_route, target)
        except HttpError as exc:
            return self._refuse(method, target, exc.status, exc.reason, keep_alive=keep)
        if route is None:
            return self._refuse(method, target, 404, "no route for this path", keep_alive=keep)
        allow = route.allow if route.allow is not None else (self._sni_route.allow if self._sni_route else None)
        if allow is not None:
            denied = authorize(self._client_info.certificate, route.name, allow)
            if denied is not None:
                return [denied] + self._refuse(method, target, 403, denied.reason, route.name, keep_alive=keep)
        if head.upgrade and self.refusing_upgrades:
            return self._refuse(method, target, 503, "shutting down", route.name, retry_after=True, keep_alive=keep)
        refused = self._routes.admission.check(route, self._client_info, self.now)
        if refused is not None:  # allow_sources (403) and rate_limit (429), upgrades included
            return [refused.fact] + self._refuse(
                method, target, refused.status, refused.reason, route.name, retry_after=refused.retry_after, keep_alive=keep
            )
        self._exchange = Exchange(route=route, head=head)
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

    def _end_request(self, exchange: Exchange) -> list[Action]:
        """The request body is complete: the upstream's answer is now awaited, or, if it has
        started already, the quiet timer takes over from the body's."""
        return [AwaitResponse()] if exchange.response_status == 0 else [BodyReceived()]

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

    # ------------------------------------------------------------------ failures

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
        keep_alive: bool = False,
        linger: bool = True,
    ) -> list[Action]:
        """The proxy's own short answer, in one write; keeps the connection when it safely can
        and the request asked for it (``keep_alive``: HTTP/1.1 without Connection: close).

        Closing, it lingers (``CloseClient.linger``) if the client may still be sending: a body
        not read, or bytes behind the refused request; unless ``linger`` is False (a timeout:
        a client that slow gets no more time)."""
        self._exchange = None
        self._connecting = False
        unread = self._body.open or bool(self._buffer)
        keep = (
            keep_alive and status in (403, 404, 421, 429, 503) and not self.draining and not self._client_eof
            and self._skip_request_body()
        )  # fmt: skip
        completed = RequestCompleted(route, method.decode("ascii", "replace"), target.decode("ascii", "replace"), status, 0, 0, reason)
        actions: list[Action] = [SendToClient(refusal(status, reason, keep=keep, retry_after=retry_after)), completed]
        if not keep:  # when kept, the caller (_pump_client's loop) reads the next request
            self._closed = True
            actions.append(CloseClient(linger=linger and unread))
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
