"""The table (text, Markdown), the JSON file and the SVG chart of the ratios to nginx.

Input is the medians the harness computed: {workload: {system: {metric: value}}}. The SVG is
written by hand (no plotting library): one row per workload, one bar per system, the bar's
length is throughput relative to nginx with one worker, on a log scale so 0.05x and 2x both read.
"""

from __future__ import annotations

import math
from typing import Any

REFERENCE = "nginx-1"
COLORS = {
    "nextproxy": "#d9480f", "nginx": "#2b8a3e", "haproxy": "#1971c2", "mitmproxy": "#7048e8", "direct": "#868e96",
}


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per (workload, system) for the throughput workloads W1-W5."""
    out = []
    for workload, systems in results["workloads"].items():
        ref = systems.get(REFERENCE)
        for name, m in systems.items():
            unit = m["unit"]
            value = m["mb_per_s"] if unit == "MB/s" else m["rate"]
            ratio = (value / (ref["mb_per_s"] if unit == "MB/s" else ref["rate"])) if ref else float("nan")
            cpu_ratio = m["cpu_us_per_op"] / ref["cpu_us_per_op"] if ref else float("nan")
            out.append([
                workload, name, f"{_fmt(value, 1 if value < 100 else 0)} {unit}",
                _fmt(m["cpu_us_per_op"], 1), _fmt(m["p50_ms"], 2), _fmt(m["p99_ms"], 2),
                _fmt(ratio, 2) + "x", _fmt(cpu_ratio, 2) + "x", str(m["errors"]),
            ])
    return out


HEADER = ["workload", "system", "rate", "CPU µs/op", "p50 ms", "p99 ms", "rate/nginx-1", "CPU/nginx-1", "errors"]
IDLE_HEADER = ["workload", "system", "connections", "RSS KiB/conn", "PSS KiB/conn", "PSS/nginx-1", "failed"]


def idle_rows(results: dict[str, Any]) -> list[list[str]]:
    out = []
    for workload, systems in results.get("idle", {}).items():
        ref = systems.get(REFERENCE)
        for name, m in systems.items():
            ratio = m["pss_kib_per_conn"] / ref["pss_kib_per_conn"] if ref else float("nan")
            out.append([workload, name, str(m["connections"]), _fmt(m["rss_kib_per_conn"], 1),
                        _fmt(m["pss_kib_per_conn"], 1), _fmt(ratio, 2) + "x", str(m["failed"])])
    return out


def text_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def svg_chart(results: dict[str, Any]) -> str:
    """Throughput relative to nginx-1 per workload (log scale, 1x marked)."""
    bars: list[tuple[str, str, float]] = []
    for workload, systems in results["workloads"].items():
        ref = systems.get(REFERENCE)
        if not ref:
            continue
        for name, m in systems.items():
            key = "mb_per_s" if m["unit"] == "MB/s" else "rate"
            if ref[key] and m[key]:
                bars.append((workload, name, m[key] / ref[key]))
    for workload, systems in results.get("idle", {}).items():
        ref = systems.get(REFERENCE)
        for name, m in systems.items():
            if ref and m["pss_kib_per_conn"] > 0 and ref["pss_kib_per_conn"] > 0:
                # Memory: less is better, so the bar shows nginx's cost over ours (same direction).
                bars.append((workload + " (1/mem)", name, ref["pss_kib_per_conn"] / m["pss_kib_per_conn"]))
    left, width, bar_h, gap = 330, 560, 14, 10
    lo, hi = math.log10(0.01), math.log10(10.0)

    def x(ratio: float) -> float:
        return left + (min(max(math.log10(ratio), lo), hi) - lo) / (hi - lo) * width

    parts: list[str] = []
    y = 50
    current = None
    for workload, name, ratio in bars:
        if workload != current:
            y += gap
            parts.append(f'<text x="8" y="{y + 11}" font-weight="bold">{_esc(workload)}</text>')
            current = workload
        color = COLORS.get(name.split("-")[0], "#495057")
        parts.append(f'<text x="{left - 6}" y="{y + 11}" text-anchor="end">{_esc(name)}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{x(ratio) - left:.1f}" height="{bar_h}" fill="{color}"/>')
        parts.append(f'<text x="{x(ratio) + 4:.1f}" y="{y + 11}">{ratio:.2f}x</text>')
        y += bar_h + 3
    height = y + 40
    grid = []
    for tick in (0.01, 0.03, 0.1, 0.3, 1, 3, 10):
        gx = x(tick)
        stroke = "#000" if tick == 1 else "#ced4da"
        grid.append(f'<line x1="{gx:.1f}" y1="45" x2="{gx:.1f}" y2="{y + 5}" stroke="{stroke}"/>')
        grid.append(f'<text x="{gx:.1f}" y="{y + 20}" text-anchor="middle">{tick}x</text>')
    title = (f"Throughput relative to nginx (1 worker), log scale; memory rows: nginx KiB/session over ours. "
             f"{_esc(results.get('machine', ''))}")
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 80}" height="{height}" '
        f'font-family="sans-serif" font-size="11">\n<rect width="100%" height="100%" fill="white"/>\n'
        f'<text x="8" y="20" font-size="13" font-weight="bold">nextproxy benchmarks</text>\n'
        f'<text x="8" y="36">{title}</text>\n' + "\n".join(grid + parts) + "\n</svg>\n"
    )


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
