"""Integration fixtures: a real proxy with real stand-in upstreams on loopback."""

from __future__ import annotations

from typing import Iterator

import pytest

from nextproxy.demo import DemoPki
from tests.integration.harness import Edge


@pytest.fixture(scope="module")
def edge(pki: DemoPki) -> Iterator[Edge]:
    running = Edge.start(pki)
    try:
        yield running
    finally:
        running.close()
