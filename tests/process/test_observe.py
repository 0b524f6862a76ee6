"""process/observe.Observer is the edge's EdgeObserver: every fact the edge reports has a method
with the Protocol's parameters, and a request fact becomes a metric sample and a log line."""

from __future__ import annotations

import inspect
import io
import json

from nextproxy.core.actions import RequestCompleted
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
