"""process/observe.Observer is the edge's EdgeObserver: every fact the edge reports has a method
with the Protocol's parameters, and a request fact becomes a metric sample and a log line."""

from __future__ import annotations

import inspect
import io
import json
import sys

import pytest

from nextproxy.config.model import WebSocketMode
from nextproxy.core.actions import RequestCompleted, SessionClosed, Side
from nextproxy.edge.observer import EdgeObserver
from nextproxy.process.logs import Logger
from nextproxy.process.observe import Observer


def _facts() -> list[str]:
    return [name for name, _ in inspect.getmembers(EdgeObserver, inspect.isfunction) if not name.startswith("_")]


def test_the_observer_answers_every_fact_of_the_edge_protocol() -> None:
    assert len(_facts()) >= 15
    for name in _facts():
        expected = list(inspect.signature(getattr(EdgeObserver, name)).parameters)
        assert list(inspect.signature(getattr(Observer, name)).parameters) == expected, name


def test_a_request_fact_becomes_one_log_line() -> None:
    stream = io.StringIO()
    observer = Observer(Logger("info", "json", stream=stream, buffered=False))
    observer.request(RequestCompleted("observe-test", "GET", "/x", 204, 3, 0), 0.0015, "192.0.2.9")
    [line] = stream.getvalue().splitlines()
    record = json.loads(line)
    assert (record["route"], record["status"], record["client"], record["duration_ms"]) == ("observe-test", 204, "192.0.2.9", 1.5)


def test_frames_and_tunnel_sessions_share_one_log_line_shape() -> None:
    """A tunnel reads no frames: its line has every field a frames line has, with the close
    code and the message counts null (unknown), not invented; and both say their mode."""
    stream = io.StringIO()
    observer = Observer(Logger("info", "json", stream=stream, buffered=False))
    observer.ws_closed("observe-ws", SessionClosed(Side.CLIENT, 1000, "bye", 2, 3, 10, 20), "192.0.2.9", 1.5)
    tunnel = SessionClosed(None, None, "idle timeout", None, None, 40, 50, WebSocketMode.TUNNEL)
    observer.ws_closed("observe-ws", tunnel, "192.0.2.9", 2.0)
    frames, tunneled = (json.loads(line) for line in stream.getvalue().splitlines())
    assert frames.keys() == tunneled.keys()
    assert (frames["mode"], frames["closed_by"], frames["code"], frames["messages_from_client"]) == ("frames", "client", 1000, 2)
    assert (tunneled["mode"], tunneled["closed_by"], tunneled["code"], tunneled["reason"]) == ("tunnel", "proxy", None, "idle timeout")
    assert tunneled["messages_from_client"] is None and tunneled["messages_from_upstream"] is None
    assert (tunneled["bytes_from_client"], tunneled["bytes_from_upstream"], tunneled["duration_s"]) == (40, 50, 2.0)


def _sample(name: str, **labels: str) -> float:
    from nextproxy.process import metrics

    for family in metrics.registry_for_exposition().collect():  # collecting flushes tallies first
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_hot_counters_are_tallied_and_reach_prometheus_before_any_collection_or_within_a_second() -> None:
    """Connections, handshakes, requests and bytes are summed in a dict on the hot path (a
    prometheus-client inc costs ~1.2 µs); a scrape or a status sample flushes them first, and
    the timer does within FLUSH_INTERVAL (so a worker's counts reach the supervisor's merge)."""
    import asyncio

    from nextproxy.process import metrics

    route = "tally-test"
    observer = Observer(Logger("warning", stream=io.StringIO()))

    async def scenario() -> tuple[float, float, float, float]:
        before = _sample("nextproxy_requests_total", route=route, code="200")
        bytes_before = _sample("nextproxy_bytes_total", route=route, direction="upstream_to_client")
        done = RequestCompleted(route, "GET", "/x", 200, 10, 1234)
        for _ in range(3):
            observer.request(done, 0.001, "192.0.2.1")
        child = metrics.route_metrics(route).requests(200)
        untouched = child._value.get() - before  # noqa: SLF001 (prometheus-client's own value)
        scraped = _sample("nextproxy_requests_total", route=route, code="200") - before
        scraped_bytes = _sample("nextproxy_bytes_total", route=route, direction="upstream_to_client") - bytes_before
        observer.request(done, 0.001, "192.0.2.1")
        await asyncio.sleep(metrics.FLUSH_INTERVAL + 0.2)
        timed = child._value.get() - before  # noqa: SLF001
        return untouched, scraped, scraped_bytes, timed

    untouched, scraped, scraped_bytes, timed = asyncio.run(scenario())
    assert untouched == 0  # still in the tally
    assert scraped == 3 and scraped_bytes == 3 * 1234  # a collection flushed it
    assert timed == 4  # the timer flushed the fourth


def test_tallied_histogram_observations_equal_prometheus_clients_own() -> None:
    """``Tally.observe`` keeps a sum and a count per bucket and hands them over at the flush:
    the samples must be exactly what ``Histogram.observe`` makes, bucket bounds included (an
    observation equal to a bound counts in that bound's bucket, as ``le`` says)."""
    from prometheus_client import CollectorRegistry, Histogram

    from nextproxy.process.metrics import Tally

    registry = CollectorRegistry()
    buckets = (0.005, 0.01, 0.1, 1.0, 10.0)
    direct = Histogram("direct_seconds", "direct", ["route"], buckets=buckets, registry=registry)
    tallied = Histogram("tallied_seconds", "tallied", ["route"], buckets=buckets, registry=registry)
    values = [0.0, 0.004, 0.005, 0.0050001, 0.01, 0.09, 0.1, 1.0, 2.5, 10.0, 10.5, 1e9, 0.003]
    tally = Tally()
    for route in ("a", "b"):
        for value in values if route == "a" else values[:4]:
            direct.labels(route=route).observe(value)
            tally.observe(tallied.labels(route=route), value)
    still_tallied = [s.value for f in registry.collect() if f.name == "tallied_seconds" for s in f.samples if s.name.endswith("_count")]
    assert still_tallied == [0.0, 0.0]
    tally.flush()
    tally.flush()  # a second flush finds nothing more

    def samples(prefix: str) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
        return sorted(
            (s.name.removeprefix(prefix), tuple(sorted(s.labels.items())), s.value)
            for family in registry.collect() if family.name == prefix
            for s in family.samples if not s.name.endswith("_created")
        )  # fmt: skip

    direct_samples, tallied_samples = samples("direct_seconds"), samples("tallied_seconds")
    assert len(direct_samples) == 2 * (len(buckets) + 1 + 2)  # buckets and +Inf, count, sum
    assert [s[:2] for s in direct_samples] == [s[:2] for s in tallied_samples]
    # The sum is added up in another order (once per flush): equal up to rounding.
    assert [s[2] for s in tallied_samples] == pytest.approx([s[2] for s in direct_samples], rel=1e-12)


def test_tally_loses_no_increment_to_flushes_on_another_thread() -> None:
    """The loop's thread adds without a lock while another thread flushes (a collection in an
    embedding application): every increment reaches the counter exactly once, and the gauge
    ends where its ups and downs leave it."""
    import threading

    from prometheus_client import CollectorRegistry, Counter, Gauge

    from nextproxy.process.metrics import Tally

    registry = CollectorRegistry()
    counter = Counter("tally_race", "race", registry=registry)
    gauge = Gauge("tally_race_active", "race", registry=registry)
    tally = Tally()
    stop = threading.Event()
    flushes = 0

    def flusher() -> None:
        nonlocal flushes
        while not stop.is_set():
            tally.flush()
            flushes += 1

    thread = threading.Thread(target=flusher)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    try:
        thread.start()
        for i in range(200_000):
            tally.add(counter)
            tally.add(gauge, 1.0 if i % 3 else -1.0)
    finally:
        stop.set()
        thread.join(10)
        sys.setswitchinterval(previous)
    tally.flush()
    assert flushes > 10  # the flushes did run in between
    assert registry.get_sample_value("tally_race_total") == 200_000
    assert registry.get_sample_value("tally_race_active") == 200_000 - 2 * 66_667
