"""The status page: the status document as one self-contained HTML page with inline SVG sparklines.

No script, no external asset (the admin port's CSP forbids both), a meta refresh every sample
interval. Every value that reaches the page goes through ``html.escape`` (``_e``), numbers
included, so a route name, an upstream's error text or a reload message can never become markup.
"""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

from nextproxy.process.status import HISTORY, SAMPLE_INTERVAL

SPARK_WIDTH = 180
SPARK_HEIGHT = 30
MIN_SPAN = 60.0
"""A young process's sparklines span what it has seen (at least a minute), not an empty 15 min."""

_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d232a;background:#f3f5f8}
header{background:#1d2633;color:#fff;padding:.9em 2em;display:flex;gap:1.2em;align-items:center;flex-wrap:wrap}
header h1{font-size:1.25em;margin:0;font-weight:650}header .meta{color:#b8c2cf;font-size:.9em}
main{padding:1.2em 2em 2em}
h2{font-size:1.02em;margin:1.6em 0 .5em;color:#3a4553;text-transform:uppercase;letter-spacing:.04em}
h2 small{text-transform:none;letter-spacing:0;color:#6b7683;font-weight:400}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:.8em}
.tile{background:#fff;border:1px solid #dde2e8;border-radius:8px;padding:.7em 1em}
.tile b{display:block;font-size:1.6em;font-variant-numeric:tabular-nums}.tile span{color:#6b7683;font-size:.85em}
table{border-collapse:collapse;background:#fff;border:1px solid #dde2e8;border-radius:8px;min-width:40%}
td,th{padding:.38em .8em;text-align:left;border-bottom:1px solid #edf0f3;vertical-align:middle}
th{background:#f7f8fa;color:#4a5563;font-weight:600;font-size:.85em;white-space:nowrap}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.name{font-weight:600;white-space:nowrap}td.detail{color:#5b6470;max-width:40em;word-break:break-word}
.badge{display:inline-block;padding:.05em .65em;border-radius:1em;color:#fff;font-weight:600;font-size:.85em}
.up{background:#1a7f37}.down{background:#cf222e}.warn{background:#bf8700}.idle{background:#8c959f}
.bad{color:#cf222e;font-weight:600}.soso{color:#9a6700;font-weight:600}.dim{color:#8c959f}
svg.spark{display:block}
"""

_COLOURS = {"requests": "#0969da", "passthrough": "#8250df", "ok": "#1a7f37", "failure": "#cf222e"}


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _badge(text: str, kind: str) -> str:
    return f'<span class="badge {_e(kind)}">{_e(text)}</span>'


def render_page(doc: dict[str, Any]) -> str:
    """The whole page for one status document (see ``statusview.status_document``)."""
    ready = _badge("ready", "up") if doc["ready"] else _badge(f"not ready: {doc['not_ready_reason']}", "down")
    refresh = int(SAMPLE_INTERVAL)
    span = min(HISTORY, max(MIN_SPAN, doc["history_covered_seconds"]))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{refresh}">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>nextproxy status</title><style>{_CSS}</style></head><body>
<header><h1>nextproxy {_e(doc["version"])}</h1>{ready}
<span class="meta">up {_e(_duration(doc["uptime_seconds"]))} &middot; since {_e(_when(doc["started_at"]))} &middot;
config {_e(doc["config_source"] or "-")} &middot; {_e(_when(doc["generated_at"]))} &middot; refreshes every {refresh} s</span></header>
<main>
{_tiles(doc)}
<h2>Routes <small>rates and percentiles over the last {_e(_duration(doc["rate_window_seconds"]))};
sparklines over the last {_e(_duration(span))}</small></h2>
{_routes(doc["routes"], span)}
<h2>Passthrough</h2>
{_passthrough(doc["passthrough"], span)}
<h2>TLS handshakes <small>by result; sparklines over the last {_e(_duration(span))}</small></h2>
{_handshakes(doc["tls_handshakes"], span)}
<h2>Upstreams</h2>
{_upstreams(doc["upstreams"])}
<h2>Configuration reloads</h2>
{_reloads(doc["reloads"])}
<h2>Certificates</h2>
{_certificates(doc["certificates"])}
<h2>Routing table</h2>
{_table(["Match", "Action", "Target"], [[_e(r["match"]), _e(r["action"]), _e(r["target"])] for r in doc["route_table"]])}
</main></body></html>
"""


def _tiles(doc: dict[str, Any]) -> str:
    rps = sum(r["requests_per_second"] for r in doc["routes"])
    failed = sum(h["in_history"] for h in doc["tls_handshakes"] if h["result"] != "ok")
    ok = sum(h["in_history"] for h in doc["tls_handshakes"] if h["result"] == "ok")
    pooled = [u for u in doc["upstreams"] if u["up"] is not None]
    up = sum(1 for u in pooled if u["up"])
    tiles = [
        (_number(doc["connections_active"]), "open connections", ""),
        (_number(doc["websocket_sessions_active"]), "WebSocket sessions", ""),
        (_rate(rps), "requests / s", ""),
        (_number(ok), f"handshakes ok, last {int(HISTORY // 60)} min", ""),
        (_number(failed), f"handshakes failed, last {int(HISTORY // 60)} min", "bad" if failed else ""),
        (f"{up}/{len(pooled)}", "upstreams up", "bad" if up < len(pooled) else ""),
    ]
    cells = "".join(f'<div class="tile"><b class="{cls}">{_e(v)}</b><span>{_e(label)}</span></div>' for v, label, cls in tiles)
    return f'<div class="tiles">{cells}</div>'


def _routes(rows: list[dict[str, Any]], span: float) -> str:
    head = ["Route", "Requests / s", "req/s", "4xx/s", "5xx/s", "p50", "p99", "in", "out", "WS open", "requests"]
    body = []
    for r in rows:
        name = _e(r["route"]) + (' <span class="dim">(no route)</span>' if r["route"] == "-" else "")
        body.append([
            name, sparkline(r["history"], _COLOURS["requests"], f"{r['route']}: requests per second", span),
            _e(_rate(r["requests_per_second"])),
            _flag(_rate(r["client_errors_per_second"]), r["client_errors_per_second"], "soso"),
            _flag(_rate(r["server_errors_per_second"]), r["server_errors_per_second"], "bad"),
            _e(_latency(r["p50_seconds"])), _e(_latency(r["p99_seconds"])),
            _e(_bytes(r["bytes_in"])), _e(_bytes(r["bytes_out"])),
            _e(_number(r["websocket_sessions_open"])), _e(_number(r["requests_total"])),
        ])  # fmt: skip
    return _table(head, body, numeric_from=2) if body else '<p class="dim">No HTTP routes yet.</p>'


def _passthrough(rows: list[dict[str, Any]], span: float) -> str:
    head = ["Route", "Connections / s", "conn/s", "connections", "in", "out"]
    body = [
        [_e(r["route"]), sparkline(r["history"], _COLOURS["passthrough"], f"{r['route']}: connections per second", span),
         _e(_rate(r["connections_per_second"])), _e(_number(r["connections_total"])),
         _e(_bytes(r["bytes_in"])), _e(_bytes(r["bytes_out"]))]
        for r in rows
    ]  # fmt: skip
    return _table(head, body, numeric_from=2) if body else '<p class="dim">No passthrough routes.</p>'


def _handshakes(rows: list[dict[str, Any]], span: float) -> str:
    head = ["Result", "Per second", f"last {int(HISTORY // 60)} min", "since start"]
    body = []
    for h in rows:
        ok = h["result"] == "ok"
        colour = _COLOURS["ok"] if ok else _COLOURS["failure"]
        label = _badge(h["result"], "up") if ok else _badge(h["result"], "down" if h["in_history"] else "idle")
        body.append([label, sparkline(h["history"], colour, f"{h['result']} per second", span),
                     _e(_number(h["in_history"])), _e(_number(h["total"]))])  # fmt: skip
    return _table(head, body, numeric_from=2)


def _upstreams(rows: list[dict[str, Any]]) -> str:
    head = ["Upstream", "Health", "open", "idle", "Last error"]
    body = []
    for u in rows:
        health = "-" if u["up"] is None else _badge("up", "up") if u["up"] else _badge("down", "down")
        error = u["last_error"]
        last = '<span class="dim">none</span>' if error is None else (
            f'<span class="bad">{_e(_ago(error["age_seconds"]))}</span> '
            f'<span class="dim">({_e(_when(error["at"]))})</span><br>{_e(error["detail"])}'
        )  # fmt: skip
        body.append([_e(u["name"]), health, _e(_dash(u["open"])), _e(_dash(u["idle"])), last])
    return _table(head, body, numeric_from=2, detail_last=True)


def _reloads(reloads: dict[str, Any]) -> str:
    ok, failed = _number(reloads["ok"]), _number(reloads["error"])
    summary = f'<p>{_badge("ok " + ok, "up")} {_badge("failed " + failed, "down" if reloads["error"] else "idle")}</p>'
    rows = [
        [_e(_when(r["at"])), _badge("ok", "up") if r["ok"] else _badge("failed", "down"), _e(r["processes"]), _e(r["detail"])]
        for r in reloads["recent"]
    ]
    if not rows:
        return summary + '<p class="dim">No reload since start.</p>'
    return summary + _table(["When", "Result", "processes", "Detail"], rows, numeric_from=2, detail_last=True)


def _certificates(rows: list[dict[str, Any]]) -> str:
    body = []
    for c in rows:
        days = c["days_left"]
        whole = str(int(abs(days)))
        left = _badge(f"expired {whole} days ago", "down") if days < 0 else _badge(whole, "warn") if c["warning"] else _e(whole)
        body.append([_e(c["name"]), _e(_when(c["not_after"])), left])
    return _table(["Certificate", "Expires", "Days left"], body, numeric_from=2)


def _table(head: Sequence[str], rows: list[list[str]], numeric_from: int = 99, detail_last: bool = False) -> str:
    """Cells in ``rows`` are already escaped HTML; columns from ``numeric_from`` on align right."""

    def cls(i: int, count: int) -> str:
        if i == 0:
            return ' class="name"'
        if detail_last and i == count - 1:
            return ' class="detail"'
        return ' class="n"' if i >= numeric_from else ""

    header = "".join(f"<th{cls(i, len(head)) if i else ''}>{_e(h)}</th>" for i, h in enumerate(head))
    lines = "".join("<tr>" + "".join(f"<td{cls(i, len(r))}>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{header}</tr>{lines}</table>"


def sparkline(points: list[list[float]], colour: str, title: str, span: float = HISTORY) -> str:
    """An inline SVG of (time, value) points over the last ``span`` seconds, newest at the right."""
    if not points:
        return '<span class="dim">-</span>'
    newest = points[-1][0]
    top = max(max(v for _, v in points), 1e-9)
    coords = []
    for at, value in points:
        x = SPARK_WIDTH - (newest - at) / span * (SPARK_WIDTH - 2) - 1
        y = SPARK_HEIGHT - 2 - (value / top) * (SPARK_HEIGHT - 6)
        coords.append(f"{max(1.0, x):.1f},{y:.1f}")
    line = " ".join(coords)
    first_x, last_x = coords[0].split(",")[0], coords[-1].split(",")[0]
    area = f"{first_x},{SPARK_HEIGHT - 2} {line} {last_x},{SPARK_HEIGHT - 2}"
    peak = f"peak {_rate(top if top > 1e-9 else 0)}/s"
    return (
        f'<svg class="spark" width="{SPARK_WIDTH}" height="{SPARK_HEIGHT}" viewBox="0 0 {SPARK_WIDTH} {SPARK_HEIGHT}" '
        f'role="img" aria-label="{_e(title)}"><title>{_e(title)}, {_e(peak)}</title>'
        f'<line x1="0" y1="{SPARK_HEIGHT - 1.5}" x2="{SPARK_WIDTH}" y2="{SPARK_HEIGHT - 1.5}" stroke="#e3e7ec"/>'
        f'<polygon points="{area}" fill="{_e(colour)}" fill-opacity="0.15"/>'
        f'<polyline points="{line}" fill="none" stroke="{_e(colour)}" stroke-width="1.5"/>'
        f'<circle cx="{last_x}" cy="{coords[-1].split(",")[1]}" r="2" fill="{_e(colour)}"/></svg>'
    )


# ---------------------------------------------------------------------- formatting


def _when(iso: str) -> str:
    """2026-12-04T06:47:44Z -> 2026-12-04 06:47:44 UTC (the JSON keeps ISO 8601)."""
    return iso.replace("T", " ").replace("Z", " UTC")


def _flag(text: str, value: float, kind: str) -> str:
    return f'<span class="{kind}">{_e(text)}</span>' if value > 0 else _e(text)


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.1f}"


def _dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def _rate(value: float) -> str:
    if value <= 0:
        return "0"
    if value < 10:
        return f"{value:.2f}"
    return f"{value:,.1f}" if value < 1000 else f"{value / 1000:,.1f}k"


def _latency(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def _bytes(count: float) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{int(seconds)} s ago"
    if seconds < 5400:
        return f"{int(seconds // 60)} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _duration(seconds: float) -> str:
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs} s"
