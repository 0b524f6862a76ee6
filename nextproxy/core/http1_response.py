"""The response side of ``HttpSession``: upstream heads and bodies back to the client, and
what happens when the upstream fails.

Split from ``core/http1.py`` (the client side, exchange start and refusals stay there):
``ResponseSide`` is a base class holding the methods that read an ``UpstreamLeg`` and turn
its responses into client writes. It keeps no state of its own; the attributes it uses are
the session's, declared here for the type checker. Sans-IO like the rest of the session.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nextproxy.config.model import PathRoute, WebSocketMode
from nextproxy.core.actions import (
    Action,
    CloseClient,
    ConnectUpstream,
    ReleaseUpstream,
    RequestCompleted,
    RequestStarted,
    ResponseStarted,
    SendToClient,
    StartTunnel,
    StartWebSocket,
)
from nextproxy.core.buffer import ByteBuffer
from nextproxy.core.chunked import LAST_CHUNK, encode_chunk
from nextproxy.core.codec import CHUNKED, UNTIL_CLOSE, RequestHead, ResponseHead, extension_lines, invalid_switch, trailer_lines
from nextproxy.core.request_body import RequestBody
from nextproxy.core.responses import CONTINUE, client_response, switching_protocols
from nextproxy.core.upstream_leg import UpstreamLeg
from nextproxy.errors import HttpError

# RFC 9110 section 9.2.2: methods a proxy may replay when a reused connection turns out dead.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
NO_BODY = RequestBody(0, 0)
"""Shared: a body of length 0 is closed and never changes."""


@dataclass(slots=True)
class Exchange:
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


class ResponseSide:
    """Upstream responses to the client, and upstream failures, for ``HttpSession``."""

    _exchange: Exchange | None
    _upstream: UpstreamLeg | None
    _buffer: ByteBuffer
    _body: RequestBody
    _closed: bool
    _connecting: bool
    _client_eof: bool
    draining: bool

    if TYPE_CHECKING:  # the client side's methods, defined by HttpSession

        def _pump_client(self) -> list[Action]: ...

        def _refuse(
            self, method: bytes, target: bytes, status: int, reason: str, route: str = ..., *, retry_after: bool = ...
        ) -> list[Action]: ...


    def _response_heads(self, leg: UpstreamLeg, exchange: Exchange) -> list[Action]:
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

    def _switch_protocols(self, leg: UpstreamLeg, exchange: Exchange, head: ResponseHead) -> list[Action]:
        tunnel = exchange.route.websocket is WebSocketMode.TUNNEL
        invalid = invalid_switch(exchange.head, head, tunnel=tunnel)
        if invalid is not None:
            return self._drop_upstream() + self._upstream_error(502, f"upstream sent an invalid 101: {invalid}")
        # A tunnel relays frames untouched: the extensions negotiated end to end (permessage-
        # deflate) work through it, as through nginx and HAProxy.
        data = switching_protocols(head, extension_lines(head.raw) if tunnel and head.extensions else b"")
        exchange.response_status = 101
        from_client, from_upstream = self._buffer.take_all(), leg.buffer.take_all()
        self._exchange = None
        self._upstream = None
        self._closed = True  # the session is done; the relay or tunnel owns both legs now
        completed = self._completed(exchange, 101)
        start: Action
        if tunnel:
            start = StartTunnel(exchange.route, to_upstream=from_client, to_client=from_upstream)
        else:
            start = StartWebSocket(exchange.route, from_client, from_upstream, head.protocol)
        return [ResponseStarted(101), SendToClient(data), completed, start]

    def _start_response(self, leg: UpstreamLeg, exchange: Exchange, head: ResponseHead) -> list[Action]:
        exchange.response_status = head.status
        # A 204 that declares a body (RFC 9110 section 15.3.5 forbids one) may send it anyway:
        # those bytes would be read as the next client's response. Such a connection is closed.
        leg.keep_alive = head.keep_alive and not (head.status == 204 and (head.length > 0 or head.length == CHUNKED))
        # An answer before the request body has ended closes the connection (the rest of the
        # body would have to be read to find the next request): say so (RFC 9112 section 9.6).
        close = not exchange.head.keep_alive or self.draining or self._client_eof or self._body.open
        response = client_response(head, exchange.head, close=close)
        exchange.client_chunked, exchange.client_close = response.chunked, response.close
        actions: list[Action] = [ResponseStarted(head.status, self._body.open), SendToClient(response.data)]
        leg.begin_body(response.length, leg.max_header_size)
        if leg.finished:
            return actions + self._response_done(leg, exchange)
        if leg.buffer:
            actions += self._response_body(leg, exchange, leg.buffer.take_all())
        return actions

    def _response_body(self, leg: UpstreamLeg, exchange: Exchange, data: bytes) -> list[Action]:
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

    def _response_done(self, leg: UpstreamLeg, exchange: Exchange) -> list[Action]:
        if exchange.client_chunked:
            trailer = leg.trailer
            end = b"0\r\n" + trailer_lines(trailer) + b"\r\n" if len(trailer) > 2 else LAST_CHUNK
            actions: list[Action] = [SendToClient(end)]
        else:
            actions = []
        if self._body.open:
            # The upstream answered before the request body ended: its connection cannot be
            # reused, and the next request cannot be found without reading the rest.
            self._closed = True
            self._upstream = None
            self._exchange = None
            return actions + [ReleaseUpstream(reusable=False), self._completed(exchange, exchange.response_status), CloseClient(linger=True)]
        return actions + self._finish_exchange(leg, exchange)

    def _finish_exchange(self, leg: UpstreamLeg, exchange: Exchange) -> list[Action]:
        reusable = leg.recycle()
        self._upstream = None
        self._exchange = None
        actions: list[Action] = [ReleaseUpstream(reusable=reusable), self._completed(exchange, exchange.response_status)]
        if self._buffer:
            self._buffer.skip_empty_lines()
        # The client's EOF (or a drain) that came after this response's head closes the
        # connection now, unless a pipelined request already waits: its response will say close.
        if exchange.client_close or ((self._client_eof or self.draining) and not self._buffer):
            self._closed = True
            actions.append(CloseClient())
            return actions
        if self._buffer:
            actions.append(RequestStarted())  # a pipelined request starts now
            actions += self._pump_client()
        return actions

    def _upstream_eof(self, leg: UpstreamLeg, exchange: Exchange) -> list[Action]:
        if leg.in_body:
            if leg.length == UNTIL_CLOSE:
                leg.end_at_close()
                return self._response_done(leg, exchange)
            return self._upstream_broken("upstream closed the connection mid-body")
        if leg.buffer:
            detail = f"upstream closed the connection mid-head: {leg.buffer.preview()!r}"
            return self._upstream_broken(detail)
        return self._upstream_broken("upstream closed the connection before responding")

    # ------------------------------------------------------------------ upstream failures

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

    def _abort(self, exchange: Exchange, status: int, reason: str) -> list[Action]:
        """Mid-response: the client sees a cut response (no final chunk, closed), never a complete one.

        An upstream failure is logged and counted as a 502, whatever status line already went out.
        """
        self._exchange = None
        self._closed = True
        self._body = NO_BODY
        return [self._completed(exchange, status, reason), CloseClient()]

    def _completed(self, exchange: Exchange, status: int, reason: str = "") -> RequestCompleted:
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
