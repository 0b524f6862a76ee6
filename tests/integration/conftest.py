"""Integration fixtures: a real proxy with real stand-in upstreams on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from nextproxy.demo.pki import DemoPki
from tests.integration.harness import Edge
from tests.integration.process import Proxy, Upstreams


@pytest.fixture(scope="module")
def edge(pki: DemoPki) -> Iterator[Edge]:
    running = Edge.start(pki)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def upstreams(pki: DemoPki) -> Iterator[Upstreams]:
    running = Upstreams(pki)
    yield running
    running.close()


@pytest.fixture
def proxy(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> Iterator[Proxy]:
    running = Proxy(tmp_path, pki, upstreams)
    yield running
    running.stop()
