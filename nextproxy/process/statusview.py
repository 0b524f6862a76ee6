"""The status document: ring + live sample + facts + admin state -> one JSON-able dict.

``/status.json`` serves it as is and the HTML page renders nothing else, so the two always
agree. Figures are plain numbers (seconds, bytes, per-second rates); formatting is the page's.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Callable, Protocol

from nextproxy.process.status import (
    HISTORY,
    RATE_WINDOW,
    SAMPLE_INTERVAL,
    Facts,
    Ring,
    RouteTotals,
    Sample,
    group_reloads,
    quantile,
    rate,
    series,
)



class StatusState(Protocol):
    """What the document reads of ``admin.AdminState`` (a Protocol: admin imports this module)."""

    version: str
    ready: bool
    not_ready_reason: str
    started_at: float
    config_source: str
    connections_active: int
    websocket_sessions_active: int
    routes: list[tuple[str, str, str]]
    upstreams: dict[str, bool]
    certificates: list[tuple[str, float]]
    route_kinds: dict[str, str]
    ring: Ring

CERTIFICATE_WARNING_DAYS = 14


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _points(history: list[tuple[float, float]]) -> list[list[float]]:
    return [[round(at, 3), round(value, 4)] for at, value in history]


def status_document(state: StatusState, live: Sample, facts: Facts, now: float) -> dict[str, Any]:
    history = [*state.ring.samples, live]
    base = state.ring.baseline(live.at) or live
    http_rows, passthrough_rows = _route_rows(state.route_kinds, history, base, live)
    return {
        "version": state.version,
        "ready": state.ready,
        "not_ready_reason": "" if state.ready else state.not_ready_reason,
        "started_at": iso(state.started_at),
        "uptime_seconds": max(0.0, now - state.started_at),
        "config_source": state.config_source,
        "generated_at": iso(now),
        "sample_interval_seconds": SAMPLE_INTERVAL,
        "history_seconds": HISTORY,
        "history_covered_seconds": max(0.0, live.at - history[0].at),
        "rate_window_seconds": min(RATE_WINDOW, max(0.0, live.at - base.at)),
        "connections_active": state.connections_active,
        "websocket_sessions_active": state.websocket_sessions_active,
        "routes": http_rows,
        "passthrough": passthrough_rows,
        "tls_handshakes": _handshake_rows(history, live),
        "upstreams": _upstream_rows(state.upstreams, live, facts, now),
        "reloads": {
            "ok": live.reloads.get("ok", 0.0),
            "error": live.reloads.get("error", 0.0),
            "recent": [{**row, "at": iso(row["at"])} for row in group_reloads(facts.reloads)],
        },
        "certificates": [
            {"name": name, "not_after": iso(not_after), "days_left": round((not_after - now) / 86400, 2),
             "warning": (not_after - now) / 86400 < CERTIFICATE_WARNING_DAYS}
            for name, not_after in state.certificates
        ],  # fmt: skip
        "route_table": [{"match": m, "action": a, "target": t} for m, a, t in state.routes],
    }


def _of_route(name: str, field: Callable[[RouteTotals], float]) -> Callable[[Sample], float]:
    return lambda sample: field(sample.routes.get(name, RouteTotals()))


def _route_rows(
    kinds: dict[str, str], history: list[Sample], base: Sample, live: Sample
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """HTTP routes (and the unrouted "-") and passthrough routes, configured ones even if idle."""
    seconds = live.at - base.at
    http_rows, passthrough_rows = [], []
    for name in sorted(set(live.routes) | set(kinds)):
        now, then = live.routes.get(name, RouteTotals()), base.routes.get(name, RouteTotals())
        if kinds.get(name) == "passthrough":
            passthrough_rows.append({
                "route": name,
                "connections_total": now.passthrough,
                "connections_per_second": rate(now.passthrough, then.passthrough, seconds),
                "bytes_in": now.bytes_in,
                "bytes_out": now.bytes_out,
                "history": _points(series(history, _of_route(name, lambda t: t.passthrough))),
            })  # fmt: skip
            continue
        http_rows.append({
            "route": name,
            "requests_total": now.requests,
            "requests_per_second": rate(now.requests, then.requests, seconds),
            "client_errors_per_second": rate(now.client_errors, then.client_errors, seconds),
            "server_errors_per_second": rate(now.server_errors, then.server_errors, seconds),
            "client_errors_total": now.client_errors,
            "server_errors_total": now.server_errors,
            "p50_seconds": quantile(0.5, now.buckets, then.buckets),
            "p99_seconds": quantile(0.99, now.buckets, then.buckets),
            "bytes_in": now.bytes_in,
            "bytes_out": now.bytes_out,
            "websocket_sessions_open": now.websockets_open,
            "history": _points(series(history, _of_route(name, lambda t: t.requests))),
        })  # fmt: skip
    return http_rows, passthrough_rows


def _handshake_rows(history: list[Sample], live: Sample) -> list[dict[str, Any]]:
    """``ok`` first, then every failure reason seen since start (the rest are all zero)."""
    rows = []
    for result in sorted(live.handshakes, key=lambda r: (r != "ok", r)):
        total = live.handshakes[result]
        if result != "ok" and total <= 0:
            continue
        rows.append({
            "result": result,
            "total": total,
            "in_history": max(0.0, total - history[0].handshakes.get(result, 0.0)),
            "history": _points(series(history, lambda s, r=result: s.handshakes.get(r, 0.0))),
        })  # fmt: skip
    return rows


def _last_error(facts: Facts, name: str, now: float) -> dict[str, Any] | None:
    error = facts.errors.get(name)
    if error is None:
        return None
    return {"at": iso(error[0]), "age_seconds": max(0.0, now - error[0]), "detail": error[1]}


def _upstream_rows(configured: dict[str, bool], live: Sample, facts: Facts, now: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in sorted(set(configured) | set(live.upstream_up) | set(facts.pool)):
        opened, idle = facts.pool.get(name, (0, 0))
        up = live.upstream_up.get(name, configured.get(name, True))
        rows.append({"name": name, "up": up, "open": opened, "idle": idle, "last_error": _last_error(facts, name, now)})
    # Errors under names that are no configured upstream (a reload removed it, or a route named
    # an upstream that does not exist).
    for name in sorted(set(facts.errors) - set(r["name"] for r in rows)):
        rows.append({"name": name, "up": None, "open": None, "idle": None, "last_error": _last_error(facts, name, now)})
    return rows
