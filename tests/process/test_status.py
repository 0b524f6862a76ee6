"""The status model: samples from a real prometheus registry, the bounded ring, facts and their merge."""

from __future__ import annotations

import math
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from nextproxy.process import status
from nextproxy.process.status import Facts, Ring, Sample, merge_facts, quantile, rate, read_facts, series, take_sample, write_facts
from nextproxy.process.statuspage import sparkline


def registry() -> tuple[CollectorRegistry, Counter, Histogram, Counter, Gauge, Counter]:
    reg = CollectorRegistry()
    requests = Counter("nextproxy_requests_total", "", ["route", "code"], registry=reg)
    duration = Histogram("nextproxy_request_duration_seconds", "", ["route"], registry=reg, buckets=(0.01, 0.1, 1.0))
    handshakes = Counter("nextproxy_tls_handshakes_total", "", ["result"], registry=reg)
    up = Gauge("nextproxy_upstream_up", "", ["upstream"], registry=reg)
    passthrough = Counter("nextproxy_passthrough_connections_total", "", ["route"], registry=reg)
    return reg, requests, duration, handshakes, up, passthrough


def test_a_sample_sums_codes_buckets_and_results() -> None:
    reg, requests, duration, handshakes, up, passthrough = registry()
    requests.labels("app", "200").inc(7)
    requests.labels("app", "404").inc(2)
    requests.labels("app", "503").inc(1)
    for seconds in (0.005, 0.05, 0.5):
        duration.labels("app").observe(seconds)
    handshakes.labels("ok").inc(4)
    handshakes.labels("timeout").inc()
    up.labels("ns").set(1)
    up.labels("mc").set(0)
    passthrough.labels("api").inc(3)
    sample = take_sample(reg.collect(), 100.0)
    app = sample.routes["app"]
    assert (app.requests, app.client_errors, app.server_errors) == (10, 2, 1)
    assert app.buckets == {0.01: 1, 0.1: 2, 1.0: 3, math.inf: 3}
    assert sample.handshakes == {"ok": 4, "timeout": 1}
    assert sample.upstream_up == {"ns": True, "mc": False}
    assert sample.routes["api"].passthrough == 3


def test_quantile_interpolates_within_the_bucket_of_the_window() -> None:
    old = {0.01: 10.0, 0.1: 10.0, 1.0: 10.0, math.inf: 10.0}  # before the window: all fast
    new = {0.01: 10.0, 0.1: 110.0, 1.0: 110.0, math.inf: 110.0}  # in the window: 100 between 10 and 100 ms
    p50 = quantile(0.5, new, old)
    assert p50 is not None and math.isclose(p50, 0.01 + 0.09 * 0.5)
    assert quantile(0.5, old, old) is None  # nothing in the window
    beyond = quantile(0.99, {0.01: 0.0, math.inf: 5.0}, {})
    assert beyond == 0.01  # past the last finite bound: that bound is all we know


def test_rate_survives_a_counter_reset() -> None:
    assert rate(30, 10, 10) == 2
    assert rate(4, 10, 2) == 2  # the process restarted: counts from zero
    assert rate(5, 1, 0) == 0


def test_the_ring_is_bounded_and_the_baseline_is_a_minute_old() -> None:
    ring = Ring(size=5)
    for at in range(0, 100, 10):
        ring.record(Sample(float(at)))
    assert [s.at for s in ring.samples] == [50, 60, 70, 80, 90]
    base = ring.baseline(now=125, window=60)
    assert base is not None and base.at == 60
    young = ring.baseline(now=95, window=60)
    assert young is not None and young.at == 50  # less than a minute of history: since the start
    assert status.RING_SIZE * status.SAMPLE_INTERVAL >= status.HISTORY


def test_old_samples_drop_their_buckets_but_the_baseline_keeps_them() -> None:
    ring = Ring(interval=5)
    for at in range(0, 300, 5):
        sample = Sample(float(at))
        sample.routes["app"] = status.RouteTotals(requests=at, buckets={0.1: float(at), math.inf: float(at)})
        ring.record(sample)
    newest = ring.samples[-1].at
    base = ring.baseline(now=newest + 5)
    assert base is not None and base.routes["app"].buckets  # about a minute old: kept
    kept = [s.at for s in ring.samples if s.routes["app"].buckets]
    assert min(kept) >= newest - status.RATE_WINDOW - 10 and len(kept) < len(ring.samples)
    assert all(s.routes["app"].requests == s.at for s in ring.samples)  # the counts stay


def test_series_and_sparkline() -> None:
    samples = [Sample(0.0), Sample(5.0), Sample(10.0)]
    for sample, handshakes in zip(samples, (0.0, 10.0, 10.0)):
        sample.handshakes["ok"] = handshakes
    points = series(samples, lambda s: s.handshakes["ok"])
    assert points == [(0.0, 0.0), (5.0, 2.0), (10.0, 0.0)]
    svg = sparkline([[a, v] for a, v in points], "#123456", 'a "title" <b>', span=60)
    assert svg.startswith("<svg") and svg.count("<polyline") == 1
    assert "&quot;title&quot; &lt;b&gt;" in svg and "<b>" not in svg
    assert "-" in sparkline([], "#123456", "empty")


def test_facts_round_trip_merge_and_tolerate_bad_files(tmp_path: Path) -> None:
    one, two = Facts(), Facts()
    one.pool, two.pool = {"ns": (2, 1)}, {"ns": (3, 0), "mc": (1, 1)}
    one.upstream_error("ns", 100.0, "connect failed: refused")
    two.upstream_error("ns", 200.0, "upstream timed out")
    one.reloaded(300.0, True, "a.toml")
    two.reloaded(301.0, True, "a.toml")  # the same SIGHUP, seen by two workers
    two.reloaded(400.0, False, "bad value")
    write_facts(str(tmp_path), 11, one.to_json())
    write_facts(str(tmp_path), 22, two.to_json())
    (tmp_path / f"{status.FACTS_PREFIX}33.json").write_text("{half a fi")
    found = read_facts(str(tmp_path), [11, 22, 33, 44])
    assert len(found) == 2
    merged = merge_facts(found)
    assert merged.pool == {"ns": (5, 1), "mc": (1, 1)}
    assert merged.errors == {"ns": (200.0, "upstream timed out")}
    rows = status.group_reloads(merged.reloads)
    assert [(r["ok"], r["processes"]) for r in rows] == [(False, 1), (True, 2)]  # newest first
    long = Facts()
    long.upstream_error("x", 1.0, "y" * 10_000)
    assert len(long.errors["x"][1]) == status.MAX_ERROR_TEXT
