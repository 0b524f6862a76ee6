"""In-memory stand-ins for the edge's unit tests: a transport that records, an observer that
records, and a real ``Runtime`` (the listener's ``Host``) built from a small configuration.

The transport is the only fake: TLS is real (the core engine against a stdlib ``ssl`` peer over
memory BIOs, ``tests/tlspeer.py``), and so are the routes, contexts, pool and deadlines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from nextproxy.config.model import (
    Address,
    CertificateConfig,
    Config,
    PathRoute,
    PemSource,
    SniAction,
    SniRoute,
    Timeouts,
    Upstream,
)
from nextproxy.demo.pki import DemoPki, make_pki
from nextproxy.edge.listener import Runtime, build_runtime

T = TypeVar("T")
PASSTHROUGH_NAME = "pt.localhost"

_PKI: list[DemoPki] = []


def pki() -> DemoPki:
    """One demo PKI for every edge test (minting takes milliseconds, but adds up)."""
    if not _PKI:
        _PKI.append(make_pki())
    return _PKI[0]


class FakeTransport(asyncio.Transport):
    """Records what the code under test does to its transport; nothing goes anywhere."""

    def __init__(self, peer: str = "192.0.2.7") -> None:
        super().__init__()
        self.written = bytearray()
        self.writes = 0
        self.reading = True
        self.closed = False
        self.aborted = False
        self.eof_written = False
        self.protocol: asyncio.BaseProtocol | None = None
        self.high_water: int | None = None
        self._peer = peer

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.written += data
        self.writes += 1

    def take(self) -> bytes:
        """What was written since the last call."""
        data = bytes(self.written)
        self.written.clear()
        return data

    def write_eof(self) -> None:
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high_water = high

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self._peer, 50000) if name == "peername" else default


@dataclass
class RecordingObserver:
    """The edge's ``EdgeObserver``, keeping every fact as (name, arguments)."""

    events: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [args for event, args in self.events if event == name]

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("_"):
            raise AttributeError(name)

        def record(*args: Any, **kwargs: Any) -> None:
            self.events.append((name, args + tuple(kwargs.values())))

        return record


def config(upstream: Address = Address("127.0.0.1", 9), **timeouts: float) -> Config:
    """Routes ``/app`` -> upstream "app" (terminated) and ``pt.localhost`` -> "pt" (passthrough),
    both at ``upstream`` (default: the discard port, where nothing listens on loopback)."""
    demo = pki()
    return Config(
        listen=Address("127.0.0.1", 0),
        admin_listen=Address("127.0.0.1", 0),
        certificates=(CertificateConfig(PemSource(demo.edge.certificate, "edge.pem"), PemSource(demo.edge.key, "edge.key")),),
        upstreams=(Upstream("app", (upstream,)), Upstream("pt", (upstream,))),
        routes=(PathRoute(name="app", prefix="/app", upstream="app", ping_interval=0.05, ping_timeout=0.05),),
        sni_routes=(SniRoute("pt", (PASSTHROUGH_NAME,), SniAction.PASSTHROUGH, "pt"),),
        timeouts=replace(Timeouts(), **timeouts),
        source="tests",
    )


def runtime(cfg: Config | None = None) -> tuple[Runtime, RecordingObserver]:
    observer = RecordingObserver()
    return build_runtime(cfg or config(), observer), observer


def run(coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
    """Run one test coroutine on a fresh asyncio loop, bounded in time."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())
