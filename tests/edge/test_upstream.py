"""edge/upstream.py: failover order, the keep-alive pool's checks before reuse, and the slot that
carries backpressure between a client connection and its upstream (in-memory transports)."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import replace

import pytest

from nextproxy.config.model import Address, Limits, Upstream
from nextproxy.edge.upstream import UpstreamConnection, UpstreamPool, UpstreamSlot, first_that_answers
from tests.edge.fakes import FakeTransport, config, run

A, B, C = Address("127.0.0.1", 1), Address("127.0.0.1", 2), Address("127.0.0.1", 3)
UPSTREAM = Upstream("app", (A, B))


def _connection(server: Address = A) -> tuple[UpstreamConnection, FakeTransport]:
    conn = UpstreamConnection(UPSTREAM, server, 65536)
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, transport


def _pool(**limits: int) -> UpstreamPool:
    cfg = config()
    return UpstreamPool(replace(cfg, upstreams=(UPSTREAM,), limits=replace(Limits(), **limits)), {})


class Owner:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def upstream_data(self, data: bytes) -> None:
        self.data.append(data)

    def upstream_lost(self, exc: Exception | None) -> None:
        self.data.append(b"<lost>")

    def upstream_writing(self, paused: bool) -> None:
        pass


def test_failover_tries_servers_in_order_until_one_answers() -> None:
    tried: list[Address] = []

    async def attempt(server: Address) -> Address:
        tried.append(server)
        if server is not C:
            raise ConnectionRefusedError(server.port)
        return server

    assert run(first_that_answers((A, B, C), attempt)) is C
    assert tried == [A, B, C]


def test_failover_raises_the_last_error_and_never_retries_tls() -> None:
    async def refused(server: Address) -> None:
        raise ConnectionRefusedError(server.port)

    with pytest.raises(ConnectionRefusedError, match="3"):
        run(first_that_answers((A, B, C), refused))
    tried: list[Address] = []

    async def bad_tls(server: Address) -> None:
        tried.append(server)
        raise ssl.SSLError("certificate verify failed")

    with pytest.raises(ssl.SSLError):
        run(first_that_answers((A, B), bad_tls))
    assert tried == [A]  # a configuration problem: failing over would hide it


def test_a_released_connection_is_reused_and_owned_again() -> None:
    async def scenario() -> tuple[bool, bool]:
        pool = _pool()
        conn, _ = _connection()
        pool.release(conn, True)
        owner = Owner()
        again = pool.take_idle(UPSTREAM, owner)
        return again is conn, again is not None and again.owner is owner

    assert run(scenario()) == (True, True)


def test_a_closed_or_unreusable_connection_never_goes_back_into_use() -> None:
    async def scenario() -> tuple[UpstreamConnection | None, bool, UpstreamConnection | None]:
        pool = _pool()
        closed, transport = _connection()
        pool.release(closed, True)
        transport.close()  # the upstream went away while idle
        after_close = pool.take_idle(UPSTREAM, Owner())
        refused, refused_transport = _connection()
        pool.release(refused, False)
        return after_close, refused_transport.closed, pool.take_idle(UPSTREAM, Owner())

    after_close, refused_closed, none = run(scenario())
    assert after_close is None and refused_closed and none is None


def test_a_pooled_connection_serves_only_the_upstream_that_made_it() -> None:
    """Two upstreams may name one server with different TLS settings (plain and TLS, or another
    server_name): a connection made, and verified, for one must never carry the other's requests."""
    plain = Upstream("plain", (A,))
    tls = Upstream("tls", (A,))

    async def scenario() -> tuple[UpstreamConnection | None, UpstreamConnection | None]:
        pool = UpstreamPool(replace(config(), upstreams=(plain, tls)), {})
        conn = UpstreamConnection(plain, A, 65536)
        conn.connection_made(FakeTransport())
        pool.release(conn, True)
        return pool.take_idle(tls, Owner()), pool.take_idle(plain, Owner())

    other, same = run(scenario())
    assert other is None and same is not None and same.upstream is plain


def test_a_probe_that_finds_an_upstream_down_says_why_once() -> None:
    """An upstream no request went to would otherwise be down with no error on record (the
    status page's last_error, the log)."""
    import socket

    refusing = socket.socket()  # bound, never listening: connections to it are refused
    refusing.bind(("127.0.0.1", 0))
    port = refusing.getsockname()[1]
    dead = Upstream("dead", (Address("127.0.0.1", port),))
    reasons: list[tuple[str, str]] = []

    async def scenario() -> dict[str, bool]:
        pool = UpstreamPool(replace(config(), upstreams=(dead,)), {}, on_probe_down=lambda n, d: reasons.append((n, d)))
        for _ in range(3):
            await pool._probe(dead)
        return pool.health

    try:
        assert run(scenario()) == {"dead": False}
    finally:
        refusing.close()
    [(name, detail)] = reasons  # the transition, not every probe
    assert name == "dead" and detail.startswith(f"health check: 127.0.0.1:{port}: [Errno 111]"), detail


def test_bytes_from_an_idle_connection_close_it() -> None:
    async def scenario() -> tuple[bool, UpstreamConnection | None]:
        pool = _pool()
        conn, transport = _connection()
        pool.release(conn, True)
        conn.data_received(b"HTTP/1.1 408 Request Timeout\r\n\r\n")  # nobody asked: state unknown
        return transport.closed, pool.take_idle(UPSTREAM, Owner())

    assert run(scenario()) == (True, None)


def test_the_pool_keeps_at_most_pool_size_idle_connections_per_server() -> None:
    async def scenario() -> list[bool]:
        pool = _pool(pool_size=1)
        first, first_transport = _connection()
        second, second_transport = _connection()
        pool.release(first, True)
        pool.release(second, True)
        return [first_transport.closed, second_transport.closed]

    assert run(scenario()) == [False, True]


def test_the_slot_passes_the_clients_backpressure_to_the_upstream_and_back() -> None:
    async def scenario() -> list[bool]:
        pool = _pool()
        slot = UpstreamSlot()
        slot.client_writing(True)  # the client's buffer filled before any upstream existed
        conn, transport = _connection()
        slot.attach(conn)
        seen = [transport.reading]
        slot.client_writing(False)
        seen.append(transport.reading)
        slot.client_writing(True)
        slot.paused = True
        slot.release(pool, True)  # back in the pool: read again, so an idle close is noticed
        seen += [transport.reading, slot.paused, slot.conn is None]
        return seen

    assert run(scenario()) == [False, True, True, False, True]


def test_an_owned_connection_hands_data_and_loss_to_its_owner() -> None:
    async def scenario() -> list[bytes]:
        conn, _ = _connection()
        owner = Owner()
        conn.owner = owner
        conn.data_received(b"abc")
        conn.connection_lost(None)
        return owner.data

    assert run(scenario()) == [b"abc", b"<lost>"]
