"""Logs and metrics for what the connections report: one place that turns facts into output.

Logs are JSON lines on stdout (``NEXTPROXY_LOG_FORMAT=text`` for humans): one per request,
passthrough connection and WebSocket session, plus lifecycle events. Nothing is formatted when
its level is disabled, and metric label children are resolved once per route, not per request.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from typing import Any

from prometheus_client import Counter, Gauge

from nextproxy.edge.observer import (
    AuthorizationDenied,
    MessageRelayed,
    RateLimited,
    RequestCompleted,
    SessionClosed,
    Side,
)
from nextproxy.process import metrics
from nextproxy.process.logs import Logger
from nextproxy.process.status import Facts


class Observer:
    """The edge's ``EdgeObserver``: turns its facts into metrics and log lines; owns the
    per-route metric children."""

    def __init__(self, logger: Logger, listener: str = "edge") -> None:
        self.log = logger
        self._active = metrics.CONNECTIONS_ACTIVE.labels(listener=listener)
        self._handshake_ok = metrics.TLS_HANDSHAKE_BY_RESULT["ok"]
        self._tally = metrics.Tally()
        """The hot path's counters (connections, handshakes, requests, bytes), flushed before
        every collection and at most ``metrics.FLUSH_INTERVAL`` after the first increment."""
        self._flush_timer: asyncio.TimerHandle | None = None
        metrics.before_collect(self.flush)
        self._refused = Throttle(logger, "warning", "connections_refused")
        self._paused = Throttle(logger, "warning", "accept_paused")
        self._exhausted = Throttle(logger, "error", "descriptors_exhausted")
        self._handshakes = Throttle(logger, "info", "tls_handshakes_failed")
        self._tls_errors = Throttle(logger, "info", "tls_errors")
        logger.on_drop = metrics.LOG_LINES_DROPPED.inc
        self.facts = Facts()
        """The status page's non-metric facts: last upstream errors here, pools and reloads
        filled in by the lifecycle."""

    def route(self, name: str) -> metrics.RouteMetrics:
        return metrics.route_metrics(name)

    # connections and TLS
    def flush(self) -> None:
        """Hand the tallied increments to prometheus-client (before a collection, at exit).
        Safe from any thread: the timer is left alone, it only finds less to hand over."""
        self._tally.flush()

    def _tick(self) -> None:
        self._flush_timer = None
        self._tally.flush()

    def _count(self, child: Counter | Gauge, amount: float = 1.0) -> None:
        if self._flush_timer is None:  # the first increment since the last tick: arm one
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a script, a test): count at once
                child.inc(amount)
                return
            self._flush_timer = loop.call_later(metrics.FLUSH_INTERVAL, self._tick)
        self._tally.add(child, amount)

    def connection_opened(self) -> None:
        self._count(self._active)

    def connection_closed(self) -> None:
        self._count(self._active, -1.0)

    def connection_refused(self, reason: str = "max_connections") -> None:
        metrics.REFUSED_BY_REASON[reason].inc()
        self._refused.count(reason)

    def accept_paused(self, reason: str) -> None:
        metrics.PAUSED_BY_REASON[reason].inc()
        self._paused.count(reason)

    def descriptors_exhausted(self, where: str, detail: str) -> None:
        metrics.EXHAUSTED_BY_PLACE[where].inc()
        self._exhausted.count(where, detail)

    def handshake(
        self, result: str, detail: str = "", peer: str = "-", port: int | None = None, server_name: str | None = None
    ) -> None:
        if result == "ok":
            self._count(self._handshake_ok)
            return
        metrics.tls_handshake(result)
        # Scanners and floods abandon handshakes by the thousand: the first of each reason in
        # an interval at once, the rest summed into one line per interval (with the last
        # example's fields), never one line each. Every line names the client and the SNI.
        self._handshakes.count(result, fields=_where(peer, port, server_name, reason=result, detail=detail[:300]))

    def tls_error(self, detail: str, peer: str, port: int | None, server_name: str | None) -> None:
        self._tls_errors.count("tls_error", fields=_where(peer, port, server_name, detail=detail[:300]))

    # passthrough
    def passthrough_opened(self, route: str) -> None:
        self.route(route).passthrough_connections.inc()

    def passthrough_closed(self, route: str, to_upstream: int, to_client: int, peer: str, duration: float) -> None:
        children = self.route(route)
        children.bytes_client_to_upstream.inc(to_upstream)
        children.bytes_upstream_to_client.inc(to_client)
        self.log.log(
            "info", "passthrough", route=route, client=peer, duration_s=round(duration, 3),
            bytes_to_upstream=to_upstream, bytes_to_client=to_client,
        )  # fmt: skip

    # HTTP
    def request(self, done: RequestCompleted, duration: float, peer: str) -> None:
        children = self.route(done.route)
        self._count(children.requests(done.status))
        if self._flush_timer is not None:  # armed by the count just made (there is a loop)
            self._tally.observe(children.duration, duration)
        else:
            children.duration.observe(duration)
        if done.bytes_from_client:
            self._count(children.bytes_client_to_upstream, done.bytes_from_client)
        if done.bytes_to_client:
            self._count(children.bytes_upstream_to_client, done.bytes_to_client)
        if self.log.threshold <= 20:
            self.log.log(
                "info", "request", route=done.route, client=peer, method=done.method, path=done.target[:512],
                status=done.status, duration_ms=round(duration * 1000, 2), bytes_in=done.bytes_from_client,
                bytes_out=done.bytes_to_client, **({"reason": done.reason} if done.reason else {}),
            )  # fmt: skip

    def denied(self, denied: AuthorizationDenied, peer: str) -> None:
        self.route(denied.route).denied(denied.reason).inc()
        self.log.log("warning", "authorization_denied", route=denied.route, client=peer, reason=denied.reason, fingerprint=denied.fingerprint)

    def rate_limited(self, limited: RateLimited, peer: str) -> None:
        metrics.RATE_LIMITED.labels(route=limited.route, key=limited.key).inc()
        if self.log.enabled("info"):
            self.log.log("info", "rate_limited", route=limited.route, client=peer, key=limited.key, retry_after=limited.retry_after)

    # accept-time policy: PROXY protocol and connection rates
    def proxy_header(self, listener: str, version: int, command: str) -> None:
        metrics.PROXY_PROTOCOL_HEADERS.labels(listener=listener, version=str(version), command=command).inc()

    def proxy_rejected(self, listener: str, reason: str, detail: str, peer: str) -> None:
        if reason not in metrics.PROXY_PROTOCOL_REASONS:  # labels stay bounded whatever the reader says
            reason = "malformed"
        metrics.PROXY_PROTOCOL_REJECTED.labels(listener=listener, reason=reason).inc()
        if self.log.enabled("info"):  # info, not warning: anyone can make these, and a flood must not flood the log
            self.log.log("info", "proxy_protocol_rejected", listener=listener, client=peer, reason=reason, detail=detail)

    def connections_rate_limited(self, listener: str, peer: str) -> None:
        metrics.CONNECTIONS_RATE_LIMITED.labels(listener=listener).inc()
        if self.log.enabled("info"):
            self.log.log("info", "connection_rate_limited", listener=listener, client=peer)

    def upstream_error(self, name: str, detail: str, peer: str) -> None:
        self.facts.upstream_error(name, time.time(), detail)
        self.log.log("warning", "upstream_error", upstream=name, client=peer, detail=detail)

    def upstream_health(self, name: str, up: bool) -> None:
        metrics.set_upstream_up(name, up)

    # WebSocket
    def ws_opened(self, route: str) -> None:
        self.route(route).websocket_sessions_active.inc()

    def ws_message(self, route: str, message: MessageRelayed) -> None:
        # Tallied like the requests (one per relayed message: prometheus-client's own inc was
        # ~7% of a 32-byte echo's bytecode).
        children = self.route(route)
        if message.direction is Side.CLIENT:
            self._count(children.websocket_messages_client_to_upstream)
        else:
            self._count(children.websocket_messages_upstream_to_client)

    def ws_gone(self, route: str) -> None:
        self.route(route).websocket_sessions_active.dec()

    def ws_closed(self, route: str, closed: SessionClosed, peer: str, duration: float = 0.0) -> None:
        children = self.route(route)
        children.websocket_session_duration.observe(duration)
        children.bytes_client_to_upstream.inc(closed.bytes_from_client)
        children.bytes_upstream_to_client.inc(closed.bytes_from_upstream)
        # One shape for both modes: a tunnel reads no frames, so its code and message counts
        # are null (unknown), never a made-up 1006 or 0.
        self.log.log(
            "info", "websocket_session", route=route, client=peer, mode=closed.mode.value, duration_s=round(duration, 3),
            closed_by=closed.closed_by.value if closed.closed_by else "proxy", code=closed.code, reason=closed.reason,
            messages_from_client=closed.messages_from_client, messages_from_upstream=closed.messages_from_upstream,
            bytes_from_client=closed.bytes_from_client, bytes_from_upstream=closed.bytes_from_upstream,
        )  # fmt: skip

    # bugs
    def bug(self, exc: BaseException, peer: str) -> None:
        self.log.log("error", "internal_error", client=peer, error=repr(exc), traceback="".join(traceback.format_exception(exc))[-4000:])


def _where(peer: str, port: int | None, server_name: str | None, **more: object) -> dict[str, object]:
    """Log fields naming a client: address, port and SNI (the last two only when known)."""
    fields: dict[str, object] = {"client": peer}
    if port is not None:
        fields["client_port"] = port
    if server_name is not None:
        fields["sni"] = server_name
    return {**fields, **more}


class Throttle:
    """At most one line per kind and one summary per ``interval`` for a frequent event.

    The first occurrence of each key (a result, a reason) in an interval is logged at once, so
    an operator sees a new kind of trouble start; repeats are summed into one summary line with
    counts by key and the last detail, written by a timer at the interval's end. Keys come from a
    fixed vocabulary, so a flood costs a handful of lines per interval, not one per event.
    """

    __slots__ = ("_log", "_level", "_event", "interval", "_counts", "_seen", "_detail", "_fields", "_window", "_timer")

    def __init__(self, log: Logger, level: str, event: str, interval: float = 10.0) -> None:
        self._log, self._level, self._event, self.interval = log, level, event, interval
        self._counts: dict[str, int] = {}
        self._seen: set[str] = set()
        self._detail = ""
        self._fields: dict[str, object] = {}
        self._window = -1e9
        self._timer: asyncio.TimerHandle | None = None

    def count(self, key: str, detail: str = "", fields: dict[str, object] | None = None) -> None:
        """``fields`` go into the line of the first occurrence as they are, and into the
        interval's summary as those of its last example."""
        if not self._log.enabled(self._level):
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self._window >= self.interval:
            self._summary()
            self._seen.clear()
            self._window = now
        if key not in self._seen:
            self._seen.add(key)
            self._write({key: 1}, detail, fields or {})
            return
        self._counts[key] = self._counts.get(key, 0) + 1
        if detail:
            self._detail = detail
        if fields:
            self._fields = fields
        if self._timer is None:
            self._timer = loop.call_at(self._window + self.interval, self._summary)

    def _summary(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counts:
            self._write(dict(self._counts), self._detail, self._fields)
            self._counts.clear()
            self._detail = ""
            self._fields = {}

    def _write(self, counts: dict[str, int], detail: str, example: dict[str, object]) -> None:
        fields: dict[str, Any] = {"interval_s": self.interval, "counts": counts}
        if detail:
            fields["last"] = detail[:300]
        self._log.log(self._level, self._event, **fields, **example)
