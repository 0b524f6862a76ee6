"""Every Prometheus metric nextproxy exports, defined once, plus cheap hot-path handles.

The names and labels below are a public contract (dashboards and alerts depend on them): change
them only with a release note. Label values must stay bounded: route, upstream and certificate
names come from the configuration, never from a request. The request path must not call
``.labels()``; it uses the children that ``route_metrics()`` resolved once per route.

Multiprocess mode: when ``PROMETHEUS_MULTIPROC_DIR`` is set before this module is first imported,
prometheus_client keeps every value in per-process files in that directory, and the admin port
(served once, by the supervisor) merges them through ``registry_for_exposition()``. The directory
must exist, and should be emptied when the supervisor starts. Of nextproxy this module imports
only ``errors`` (the handshake results), which imports nothing.
"""

from __future__ import annotations

import gzip
import os
import threading
import weakref
from bisect import bisect_left
from typing import Callable
from dataclasses import dataclass, field

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import multiprocess
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.process_collector import ProcessCollector

from nextproxy.errors import TLS_HANDSHAKE_FAILURES, TLS_HANDSHAKE_OK

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

# "ok", then every failure reason (errors.TLS_HANDSHAKE_FAILURES documents them); all exist at 0.
TLS_HANDSHAKE_RESULTS = (TLS_HANDSHAKE_OK, *TLS_HANDSHAKE_FAILURES)
LISTENERS = ("edge", "admin")
CLIENT_TO_UPSTREAM = "client_to_upstream"
UPSTREAM_TO_CLIENT = "upstream_to_client"
RELOAD_RESULTS = ("ok", "error")

# Request latencies: sub-millisecond local hops up to the 60 s upstream response timeout.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# WebSocket sessions live from seconds (a failed page load) to a day (a dashboard left open).
SESSION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0)

REQUESTS = Counter(
    "nextproxy_requests_total", "HTTP responses sent to clients, by route and status code.", ["route", "code"]
)
REQUEST_DURATION = Histogram(
    "nextproxy_request_duration_seconds",
    "Time from a request head to the end of its response.",
    ["route"],
    buckets=REQUEST_BUCKETS,
)
# Gauge modes in multiprocess mode ("live*" modes drop a worker's files when it is marked dead):
# - livesum: a dead worker's connections died with it, so only live workers count.
CONNECTIONS_ACTIVE = Gauge(
    "nextproxy_connections_active", "Open client connections, by listener.", ["listener"], multiprocess_mode="livesum"
)
TLS_HANDSHAKES = Counter("nextproxy_tls_handshakes_total", "Edge TLS handshakes, by outcome.", ["result"])
PASSTHROUGH_CONNECTIONS = Counter(
    "nextproxy_passthrough_connections_total", "Connections spliced to an upstream without terminating TLS.", ["route"]
)
WEBSOCKET_SESSIONS_ACTIVE = Gauge(
    "nextproxy_websocket_sessions_active", "Open WebSocket sessions, by route.", ["route"], multiprocess_mode="livesum"
)
WEBSOCKET_MESSAGES = Counter(
    "nextproxy_websocket_messages_total", "WebSocket messages relayed, by route and direction.", ["route", "direction"]
)
WEBSOCKET_SESSION_DURATION = Histogram(
    "nextproxy_websocket_session_duration_seconds",
    "WebSocket session lifetimes, by route.",
    ["route"],
    buckets=SESSION_BUCKETS,
)
BYTES = Counter(
    "nextproxy_bytes_total", "Payload bytes relayed, by route and direction.", ["route", "direction"]
)
# - livemax: an upstream counts as up while any live worker reaches it (each worker probes on its
#   own, so one worker's failed probe is not an outage); a dead worker's last verdict is dropped.
UPSTREAM_UP = Gauge(
    "nextproxy_upstream_up", "1 when the upstream passed its last health check, else 0.", ["upstream"],
    multiprocess_mode="livemax",
)  # fmt: skip
# - livemin: during a reload workers may briefly serve different certificates; the earliest expiry
#   still served is the one to alert on. Plain "min" would keep a replaced certificate's expiry
#   (from a dead worker's file) forever and fire a false alert after every renewal.
CERTIFICATE_EXPIRY = Gauge(
    "nextproxy_certificate_expiry_timestamp_seconds",
    "notAfter of each served certificate, as a Unix timestamp.",
    ["name"],
    multiprocess_mode="livemin",
)
CONFIG_RELOADS = Counter("nextproxy_config_reloads_total", "Configuration reloads, by result.", ["result"])
AUTHORIZATION_DENIED = Counter(
    "nextproxy_authorization_denied_total", "Requests and connections refused by a client-certificate or source-address allow list.", ["route", "reason"]
)
PROXY_PROTOCOL_HEADERS = Counter(
    "nextproxy_proxy_protocol_headers_total",
    "PROXY protocol headers accepted from trusted balancers, by listener, version and command.",
    ["listener", "version", "command"],
)
PROXY_PROTOCOL_REJECTED = Counter(
    "nextproxy_proxy_protocol_rejected_total",
    "Connections closed over their PROXY protocol header (invalid, missing, or from an untrusted peer).",
    ["listener", "reason"],
)
RATE_LIMITED = Counter(
    "nextproxy_rate_limited_total", "Requests and WebSocket upgrades answered 429, by route and key kind (ip, cert).",
    ["route", "key"],
)  # fmt: skip
CONNECTIONS_RATE_LIMITED = Counter(
    "nextproxy_connections_rate_limited_total",
    "Connections closed at accept for exceeding the listener's new_connections_per_second.",
    ["listener"],
)
PROXY_PROTOCOL_REASONS = ("not_proxy_protocol", "malformed", "too_long", "bad_checksum", "truncated", "untrusted", "timeout")

# Overload protection (issue 12): every limit is counted where it bites.
CONNECTIONS_REFUSED = Counter(
    "nextproxy_connections_refused_total", "Connections closed at accept, by the cap that was reached.", ["reason"]
)
ACCEPT_PAUSES = Counter(
    "nextproxy_accept_paused_total",
    "Times the listener stopped accepting (connections wait in the kernel's backlog), by reason.",
    ["reason"],
)
DESCRIPTORS_EXHAUSTED = Counter(
    "nextproxy_descriptors_exhausted_total", "EMFILE/ENFILE met by the proxy, by where (accept, upstream).", ["where"]
)
LOG_LINES_DROPPED = Counter(
    "nextproxy_log_lines_dropped_total", "Log lines dropped because stdout was not read fast enough."
)
# - livesum: each worker's own loop; a dead worker's tasks died with it.
ASYNCIO_TASKS = Gauge(
    "nextproxy_asyncio_tasks", "asyncio tasks alive in the serving loop (sampled once a second).",
    multiprocess_mode="livesum",
)  # fmt: skip
REFUSAL_REASONS = ("max_connections", "max_connections_per_ip")
PAUSE_REASONS = ("max_handshakes",)
EXHAUSTION_PLACES = ("accept", "upstream")
REFUSED_BY_REASON: dict[str, Counter] = {r: CONNECTIONS_REFUSED.labels(reason=r) for r in REFUSAL_REASONS}
PAUSED_BY_REASON: dict[str, Counter] = {r: ACCEPT_PAUSES.labels(reason=r) for r in PAUSE_REASONS}
EXHAUSTED_BY_PLACE: dict[str, Counter] = {w: DESCRIPTORS_EXHAUSTED.labels(where=w) for w in EXHAUSTION_PLACES}

CONTRACT_METRIC_NAMES = (
    "nextproxy_requests_total",
    "nextproxy_request_duration_seconds",
    "nextproxy_connections_active",
    "nextproxy_tls_handshakes_total",
    "nextproxy_passthrough_connections_total",
    "nextproxy_websocket_sessions_active",
    "nextproxy_websocket_messages_total",
    "nextproxy_websocket_session_duration_seconds",
    "nextproxy_bytes_total",
    "nextproxy_upstream_up",
    "nextproxy_certificate_expiry_timestamp_seconds",
    "nextproxy_config_reloads_total",
    "nextproxy_authorization_denied_total",
    "nextproxy_connections_refused_total",
    "nextproxy_accept_paused_total",
    "nextproxy_descriptors_exhausted_total",
    "nextproxy_log_lines_dropped_total",
    "nextproxy_asyncio_tasks",
)
POLICY_METRIC_NAMES = (
    "nextproxy_proxy_protocol_headers_total",
    "nextproxy_proxy_protocol_rejected_total",
    "nextproxy_rate_limited_total",
    "nextproxy_connections_rate_limited_total",
)
"""Labelled by listener address or route: their series appear with the first event."""

# Children for the fixed label sets, resolved at import so that every series exists (at 0) from
# the first scrape; rate() and absent() alerts misbehave on series that appear late.
EDGE_CONNECTIONS = CONNECTIONS_ACTIVE.labels(listener="edge")
ADMIN_CONNECTIONS = CONNECTIONS_ACTIVE.labels(listener="admin")
TLS_HANDSHAKE_BY_RESULT: dict[str, Counter] = {r: TLS_HANDSHAKES.labels(result=r) for r in TLS_HANDSHAKE_RESULTS}
CONFIG_RELOAD_BY_RESULT: dict[str, Counter] = {r: CONFIG_RELOADS.labels(result=r) for r in RELOAD_RESULTS}


def tls_handshake(result: str) -> None:
    """Count one edge handshake; an unknown result is counted as ``other`` to keep labels bounded."""
    TLS_HANDSHAKE_BY_RESULT.get(result, TLS_HANDSHAKE_BY_RESULT["other"]).inc()


def config_reload(ok: bool) -> None:
    CONFIG_RELOAD_BY_RESULT["ok" if ok else "error"].inc()


_UPSTREAMS: set[str] = set()
_CERTIFICATES: set[str] = set()
"""The label values these gauges were given, so that a reload can forget the ones it removed."""


def set_upstream_up(upstream: str, up: bool) -> None:
    _UPSTREAMS.add(upstream)
    UPSTREAM_UP.labels(upstream=upstream).set(1 if up else 0)


def set_certificate_expiry(name: str, not_after: float) -> None:
    _CERTIFICATES.add(name)
    CERTIFICATE_EXPIRY.labels(name=name).set(not_after)


def forget_removed(upstreams: set[str], certificates: set[str]) -> None:
    """After a reload: the series of upstreams and certificates the configuration no longer has
    go. A removed upstream's ``up 0`` would alert forever, and a replaced certificate's old
    expiry would page for a renewal already done.

    With workers (multiprocess mode) prometheus-client keeps every value a process wrote in its
    file: such series stay until the worker restarts (README, "Metrics")."""
    for name in _UPSTREAMS - upstreams:
        UPSTREAM_UP.remove(name)
    for name in _CERTIFICATES - certificates:
        CERTIFICATE_EXPIRY.remove(name)
    _UPSTREAMS.intersection_update(upstreams)
    _CERTIFICATES.intersection_update(certificates)


@dataclass(slots=True, eq=False)
class RouteMetrics:
    """The label children of one route, resolved once; per-request use is attribute access.

    ``requests(code)`` and ``denied(reason)`` cache a child per value on first use, so a request
    costs one dict lookup instead of ``.labels()`` (a lock, label validation and tuple building).
    """

    route: str
    duration: Histogram = field(init=False)
    bytes_client_to_upstream: Counter = field(init=False)
    bytes_upstream_to_client: Counter = field(init=False)
    passthrough_connections: Counter = field(init=False)
    websocket_sessions_active: Gauge = field(init=False)
    websocket_messages_client_to_upstream: Counter = field(init=False)
    websocket_messages_upstream_to_client: Counter = field(init=False)
    websocket_session_duration: Histogram = field(init=False)
    _requests: dict[int, Counter] = field(init=False, default_factory=dict)
    _denied: dict[str, Counter] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        route = self.route
        self.duration = REQUEST_DURATION.labels(route=route)
        self.bytes_client_to_upstream = BYTES.labels(route=route, direction=CLIENT_TO_UPSTREAM)
        self.bytes_upstream_to_client = BYTES.labels(route=route, direction=UPSTREAM_TO_CLIENT)
        self.passthrough_connections = PASSTHROUGH_CONNECTIONS.labels(route=route)
        self.websocket_sessions_active = WEBSOCKET_SESSIONS_ACTIVE.labels(route=route)
        self.websocket_messages_client_to_upstream = WEBSOCKET_MESSAGES.labels(route=route, direction=CLIENT_TO_UPSTREAM)
        self.websocket_messages_upstream_to_client = WEBSOCKET_MESSAGES.labels(route=route, direction=UPSTREAM_TO_CLIENT)
        self.websocket_session_duration = WEBSOCKET_SESSION_DURATION.labels(route=route)

    def requests(self, code: int) -> Counter:
        child = self._requests.get(code)
        if child is None:
            child = self._requests[code] = REQUESTS.labels(route=self.route, code=str(code))
        return child

    def denied(self, reason: str) -> Counter:
        """``reason`` must come from a fixed vocabulary (e.g. ``no_certificate``, ``not_allowed``)."""
        child = self._denied.get(reason)
        if child is None:
            child = self._denied[reason] = AUTHORIZATION_DENIED.labels(route=self.route, reason=reason)
        return child


_ROUTES: dict[str, RouteMetrics] = {}


def route_metrics(route: str) -> RouteMetrics:
    """The shared ``RouteMetrics`` for a configured route name (created on first call)."""
    metrics = _ROUTES.get(route)
    if metrics is None:
        metrics = _ROUTES[route] = RouteMetrics(route)
    return metrics


class Tally:
    """Increments from the hot path, summed in a dict and handed to prometheus-client later.

    Each ``inc`` on a prometheus-client child costs ~1.2 µs (two observability checks and a
    lock); a new connection made six of them and a keep-alive request three. Here an increment
    is one dict update, and ``flush`` gives each child what it has not been given yet in one
    ``inc``. Flushed before every collection in this process (``registry_for_exposition``:
    scrapes, the status page's samples) and by the owner's timer (a worker's counts reach the
    supervisor's merge within ``FLUSH_INTERVAL``). Histogram observations are kept as their sum
    and a count per bucket (``observe``): a request's duration cost a Python loop over the
    buckets and two locked increments, ~110 of a keep-alive request's ~3,600 bytecode
    instructions.

    One thread adds (the event loop's); a flush may run on any (a collection in an embedding
    application, the tests' in-thread proxy). So ``add`` takes no lock: only the adding thread
    writes the running totals, and a flush reads a copy of them and hands over the difference
    to what it handed before. Taking the lock was over a third of each ``add``'s bytecode, and
    a new connection makes five.
    """

    __slots__ = ("_totals", "_handed", "_observed", "_lock")

    def __init__(self) -> None:
        self._totals: dict[Counter | Gauge, float] = {}
        """Per child: everything added since this tally began (written by the adding thread only)."""
        self._handed: dict[Counter | Gauge, float] = {}
        """Per child: how much of its total the flushes have handed over (under the lock)."""
        self._observed: dict[Histogram, list[float]] = {}
        """Per histogram child: the observations' sum, then how many fell in each bucket."""
        self._lock = threading.Lock()
        """Flushes against each other, and the histogram entries they take away."""

    def add(self, child: Counter | Gauge, amount: float = 1.0) -> None:
        totals = self._totals
        totals[child] = totals.get(child, 0.0) + amount

    def observe(self, child: Histogram, amount: float) -> None:
        """``child.observe(amount)``, later. The bucket is the first whose upper bound is at
        least ``amount``, as prometheus-client picks it (the last bound is +Inf)."""
        bounds = child._upper_bounds  # noqa: SLF001 (prometheus-client's own, read-only here)
        index = bisect_left(bounds, amount)
        with self._lock:
            entry = self._observed.get(child)
            if entry is None:
                entry = self._observed[child] = [0.0] * (1 + len(bounds))
            entry[0] += amount
            entry[1 + index] += 1

    def flush(self) -> None:
        with self._lock:
            # One copy made in C, which no add can interleave with. The totals are exact as long
            # as they stay below 2**53 (counts, and bytes up to 9 PB per process).
            totals = list(self._totals.items())
            handed = self._handed
            for child, total in totals:
                amount = total - handed.get(child, 0.0)
                if amount:
                    handed[child] = total
                    child.inc(amount)
            observed, self._observed = self._observed, {}
        for histogram, entry in observed.items():
            histogram._sum.inc(entry[0])  # noqa: SLF001
            for bucket, count in zip(histogram._buckets, entry[1:]):  # noqa: SLF001
                if count:
                    bucket.inc(count)


FLUSH_INTERVAL = 1.0
"""Seconds a tallied increment may wait before it is handed to prometheus-client."""
_BEFORE_COLLECT: list[weakref.WeakMethod[Callable[[], None]]] = []


def before_collect(flush: Callable[[], None]) -> None:
    """Run the bound method ``flush`` before every collection in this process (a ``Tally``'s
    owner registers; held weakly, so an owner that is gone is simply skipped)."""
    _BEFORE_COLLECT[:] = [ref for ref in _BEFORE_COLLECT if ref() is not None]
    _BEFORE_COLLECT.append(weakref.WeakMethod(flush))


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_DIR_VARIABLE) or None


def registry_for_exposition() -> CollectorRegistry:
    """What ``/metrics`` serves: the default registry, or a merge of every worker's files.

    In multiprocess mode a fresh registry per scrape is prometheus_client's documented pattern:
    ``MultiProcessCollector`` re-reads the directory on each collect and holds no state. Process
    metrics (``process_*``) then describe the supervisor only: prometheus_client cannot merge
    them across processes, and each worker's are not exported.
    """
    for ref in _BEFORE_COLLECT:
        flush = ref()
        if flush is not None:
            flush()
    path = multiprocess_dir()
    if path is None:
        return REGISTRY
    registry = CollectorRegistry()
    # prometheus_client's multiprocess module has no annotations (hence the ignores below).
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    ProcessCollector(registry=registry)
    return registry


def mark_process_dead(pid: int) -> None:
    """Forget a worker that exited (its live* gauges vanish); a no-op outside multiprocess mode.

    Counters and histograms of dead workers stay in the directory on purpose: dropping them
    would make totals go backwards, which Prometheus reads as a counter reset.
    """
    path = multiprocess_dir()
    if path is not None:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class Exposition:
    body: bytes
    content_type: str
    content_encoding: str | None


def exposition(accept: str, accept_encoding: str = "") -> Exposition:
    """Render ``registry_for_exposition()`` as the scraper asked.

    The Prometheus text format by default, OpenMetrics when ``Accept`` names
    ``application/openmetrics-text`` (prometheus_client's own negotiation, so name escaping and
    versions follow the library), gzip when ``Accept-Encoding`` allows it (Prometheus always does).
    """
    encoder, content_type = choose_encoder(accept)
    body = encoder(registry_for_exposition())
    if gzip_accepted(accept_encoding):
        # Level 6: most of level 9's saving on repetitive metric text at a fraction of the CPU.
        return Exposition(gzip.compress(body, compresslevel=6), content_type, "gzip")
    return Exposition(body, content_type, None)
