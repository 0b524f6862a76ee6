"""The live status model: metric samples kept in a bounded ring, plus per-process facts.

Every ``SAMPLE_INTERVAL`` the admin port reads the same registry ``/metrics`` serves (with
workers, the supervisor's merge of every worker's files) into a ``Sample`` of cumulative
totals, and keeps the last ``HISTORY`` of them. Rates, percentiles and sparklines are
differences between samples, so the ring stays bounded (181 samples of a few numbers per
route) and merging across workers costs nothing extra: prometheus-client already merges.

What is not a metric (the last upstream error's text, pooled connections, reload results)
travels as ``Facts``: in one process directly, with workers as one small JSON file per worker
in the metrics directory, rewritten only when it changes, read by the supervisor at render time.
``status_document`` joins both into the dict served as ``/status.json`` and rendered as HTML.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

from prometheus_client.metrics_core import Metric

from nextproxy.config.model import Config, SniAction

SECONDS = 1.0
SAMPLE_INTERVAL = 5 * SECONDS
HISTORY = 15 * 60 * SECONDS
RING_SIZE = int(HISTORY / SAMPLE_INTERVAL) + 1
RATE_WINDOW = 60 * SECONDS
"""Rates and percentiles on the page are over the last minute (or since start, if shorter)."""
MAX_RELOADS = 8
MAX_ERROR_TEXT = 300
FACTS_PREFIX = "status-facts-"


@dataclass(slots=True)
class RouteTotals:
    """Cumulative counters of one route at one instant (all sums over workers)."""

    requests: float = 0.0
    client_errors: float = 0.0
    server_errors: float = 0.0
    bytes_in: float = 0.0
    bytes_out: float = 0.0
    websockets_open: float = 0.0
    passthrough: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)
    """Request duration histogram: upper bound (seconds, inf last) -> cumulative count."""


@dataclass(slots=True)
class Sample:
    at: float
    """Wall-clock Unix time of the sample."""
    routes: dict[str, RouteTotals] = field(default_factory=dict)
    handshakes: dict[str, float] = field(default_factory=dict)
    reloads: dict[str, float] = field(default_factory=dict)
    upstream_up: dict[str, bool] = field(default_factory=dict)


_NO_BUCKETS: dict[float, float] = {}
"""Shared by every stripped sample; never written to (take_sample builds fresh dicts)."""


def _route(sample: Sample, labels: dict[str, str]) -> RouteTotals:
    name = labels.get("route", "-")
    totals = sample.routes.get(name)
    if totals is None:
        totals = sample.routes[name] = RouteTotals()
    return totals


def take_sample(families: Iterable[Metric], at: float) -> Sample:
    """The totals the status page needs out of a registry's ``collect()``."""
    sample = Sample(at)
    for family in families:
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name == "nextproxy_requests_total":
                totals = _route(sample, labels)
                totals.requests += value
                code = labels.get("code", "")
                if code.startswith("4"):
                    totals.client_errors += value
                elif code.startswith("5"):
                    totals.server_errors += value
            elif name == "nextproxy_request_duration_seconds_bucket":
                bound = float(labels.get("le", "+Inf"))
                buckets = _route(sample, labels).buckets
                buckets[bound] = buckets.get(bound, 0.0) + value
            elif name == "nextproxy_bytes_total":
                totals = _route(sample, labels)
                if labels.get("direction") == "client_to_upstream":
                    totals.bytes_in += value
                else:
                    totals.bytes_out += value
            elif name == "nextproxy_websocket_sessions_active":
                _route(sample, labels).websockets_open += value
            elif name == "nextproxy_passthrough_connections_total":
                _route(sample, labels).passthrough += value
            elif name == "nextproxy_tls_handshakes_total":
                result = labels.get("result", "other")
                sample.handshakes[result] = sample.handshakes.get(result, 0.0) + value
            elif name == "nextproxy_config_reloads_total":
                result = labels.get("result", "error")
                sample.reloads[result] = sample.reloads.get(result, 0.0) + value
            elif name == "nextproxy_upstream_up":
                upstream = labels.get("upstream", "-")
                sample.upstream_up[upstream] = sample.upstream_up.get(upstream, False) or value >= 1
    return sample


class Ring:
    """The last ``RING_SIZE`` samples, oldest first.

    Percentiles only ever compare the live sample with one about ``RATE_WINDOW`` old, so older
    samples drop their histogram buckets on the way: about 200 bytes per route per sample
    remain instead of a kilobyte and a half (15 minutes of 100 routes: ~4 MB, not ~25).
    """

    def __init__(self, size: int = RING_SIZE, interval: float = SAMPLE_INTERVAL) -> None:
        self.samples: deque[Sample] = deque(maxlen=size)
        self._keep_buckets = RATE_WINDOW + 2 * interval

    def record(self, sample: Sample) -> None:
        self.samples.append(sample)
        for old in self.samples:
            if old.at >= sample.at - self._keep_buckets:
                break
            for totals in old.routes.values():
                totals.buckets = _NO_BUCKETS

    def baseline(self, now: float, window: float = RATE_WINDOW) -> Sample | None:
        """The newest sample at least ``window`` old, else the oldest one (None if empty)."""
        chosen = None
        for sample in self.samples:
            if sample.at <= now - window or chosen is None:
                chosen = sample
        return chosen


# ---------------------------------------------------------------------- per-process facts


@dataclass(slots=True)
class Facts:
    """What one serving process knows that is not a metric. Mutable: its owner updates it."""

    pool: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Upstream name -> (open, idle) pooled connections."""
    errors: dict[str, tuple[float, str]] = field(default_factory=dict)
    """Upstream (or passthrough route) name -> (Unix time, text) of its last error."""
    reloads: deque[tuple[float, bool, str]] = field(default_factory=lambda: deque(maxlen=MAX_RELOADS))
    """(Unix time, succeeded, detail) of recent configuration reloads."""

    def upstream_error(self, name: str, at: float, detail: str) -> None:
        self.errors[name] = (at, detail[:MAX_ERROR_TEXT])

    def reloaded(self, at: float, ok: bool, detail: str) -> None:
        self.reloads.append((at, ok, detail[:MAX_ERROR_TEXT]))

    def to_json(self) -> str:
        return json.dumps({"pool": self.pool, "errors": self.errors, "reloads": list(self.reloads)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Facts:
        """Lenient: a file from another version or half-written must not break the page."""
        raw = json.loads(text)
        facts = cls()
        facts.pool = {str(k): (int(v[0]), int(v[1])) for k, v in raw.get("pool", {}).items()}
        facts.errors = {str(k): (float(v[0]), str(v[1])) for k, v in raw.get("errors", {}).items()}
        facts.reloads.extend((float(a), bool(ok), str(d)) for a, ok, d in raw.get("reloads", []))
        return facts


def facts_path(directory: str, pid: int) -> str:
    return os.path.join(directory, f"{FACTS_PREFIX}{pid}.json")


def write_facts(directory: str, pid: int, text: str) -> None:
    """Atomically (rename), so the supervisor never reads half a file."""
    path = facts_path(directory, pid)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(temporary, path)


def read_facts(directory: str, pids: Iterable[int]) -> list[Facts]:
    """The facts of the given (live) workers; a missing or unreadable file is skipped."""
    found = []
    for pid in pids:
        try:
            with open(facts_path(directory, pid), encoding="utf-8") as source:
                found.append(Facts.from_json(source.read()))
        except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
            continue
    return found


def merge_facts(every: list[Facts]) -> Facts:
    """Pools add up; the newest error per upstream wins; reloads done by several workers at
    once (one SIGHUP) are one row, kept with how many workers reported it."""
    merged = Facts(reloads=deque(maxlen=MAX_RELOADS * 8))
    for facts in every:
        for name, (opened, idle) in facts.pool.items():
            was = merged.pool.get(name, (0, 0))
            merged.pool[name] = (was[0] + opened, was[1] + idle)
        for name, (at, text) in facts.errors.items():
            if name not in merged.errors or merged.errors[name][0] < at:
                merged.errors[name] = (at, text)
        merged.reloads.extend(facts.reloads)
    merged.reloads = deque(sorted(merged.reloads), maxlen=MAX_RELOADS * 8)
    return merged


def group_reloads(reloads: Iterable[tuple[float, bool, str]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for at, ok, detail in sorted(reloads):
        last = rows[-1] if rows else None
        if last is not None and last["ok"] == ok and last["detail"] == detail and at - last["at"] < 5:
            last["processes"] += 1
            continue
        rows.append({"at": at, "ok": ok, "detail": detail, "processes": 1})
    return rows[-MAX_RELOADS:][::-1]


def route_kinds(config: Config) -> dict[str, str]:
    """Route name -> "http" or "passthrough", so traffic lands in the right table."""
    kinds = {route.name: "http" for route in config.routes}
    for sni in config.sni_routes:
        kinds[sni.name] = "passthrough" if sni.action is SniAction.PASSTHROUGH else "http"
    return kinds


# ---------------------------------------------------------------------- arithmetic


def rate(new: float, old: float, seconds: float) -> float:
    """Per second; a counter that went down (a process restarted) counts from zero."""
    if seconds <= 0:
        return 0.0
    return max(0.0, new - old if new >= old else new) / seconds


def quantile(q: float, new: dict[float, float], old: dict[float, float]) -> float | None:
    """``histogram_quantile`` over the difference of two cumulative histograms (seconds)."""
    bounds = sorted(new)
    counts = [max(0.0, new[b] - old.get(b, 0.0)) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bucket: its bound is all we know
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def series(samples: list[Sample], value: Any) -> list[tuple[float, float]]:
    """(time, rate per second) between consecutive samples; the first sample counts as 0."""
    points = [(samples[0].at, 0.0)] if samples else []
    for before, after in zip(samples, samples[1:]):
        points.append((after.at, rate(value(after), value(before), after.at - before.at)))
    return points
