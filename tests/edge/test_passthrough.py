"""edge/passthrough.py: the splice on in-memory transports (bytes, half-close, backpressure,
one close), and its idle deadline with a real loopback upstream."""

from __future__ import annotations

import asyncio

from nextproxy.config.model import Address
from nextproxy.edge.passthrough import Splice
from tests.edge.fakes import FakeTransport, run


def _splice(idle: float = 30.0) -> tuple[Splice, FakeTransport, FakeTransport, list[Splice]]:
    closed: list[Splice] = []
    client = FakeTransport()
    splice = Splice(client, idle, closed.append)
    upstream = FakeTransport()
    splice.upstream.connection_made(upstream)  # as create_connection would
    return splice, client, upstream, closed


def test_bytes_flow_both_ways_and_are_counted() -> None:
    async def scenario() -> tuple[bytes, bytes, int, int]:
        splice, client, upstream, _ = _splice()
        splice.client.data_received(b"hello upstream")
        splice.upstream.data_received(b"hi")
        return bytes(upstream.written), bytes(client.written), splice.client.bytes, splice.upstream.bytes

    assert run(scenario()) == (b"hello upstream", b"hi", 14, 2)


def test_a_half_close_is_passed_on_and_the_second_eof_closes_once() -> None:
    async def scenario() -> tuple[bool, bool, bool, bool, int]:
        splice, client, upstream, closed = _splice()
        keep_open = splice.client.eof_received()
        half = upstream.eof_written and not upstream.closed
        splice.upstream.data_received(b"late answer")  # the other direction still flows
        splice.upstream.eof_received()
        splice.upstream.connection_lost(None)
        return keep_open, half, client.closed, upstream.closed, len(closed)

    assert run(scenario()) == (True, True, True, True, 1)


def test_a_full_write_buffer_pauses_reading_on_the_other_side() -> None:
    async def scenario() -> list[bool]:
        splice, client, upstream, _ = _splice()
        client.resume_reading()  # as connect() does once the upstream answered
        splice.client.pause_writing()  # the client's buffer is full: stop reading the upstream
        seen = [upstream.reading, client.reading]
        splice.client.resume_writing()
        splice.upstream.pause_writing()
        seen += [upstream.reading, client.reading]
        return seen

    assert run(scenario()) == [False, True, True, False]


def test_the_client_is_not_read_before_the_upstream_answers() -> None:
    async def scenario() -> bool:
        client = FakeTransport()
        Splice(client, 30, lambda splice: None)
        return client.reading

    assert run(scenario()) is False


def test_a_quiet_splice_is_closed_by_its_deadline_and_a_busy_one_is_not() -> None:
    async def scenario() -> tuple[bytes, bool, bool, bool]:
        loop = asyncio.get_running_loop()
        got = loop.create_future()

        async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got.set_result(await reader.read(100))
            await reader.read()  # until the splice closes
            writer.close()

        server = await asyncio.start_server(upstream, "127.0.0.1", 0)
        address = Address("127.0.0.1", server.sockets[0].getsockname()[1])
        busy, _, _, _ = _splice(idle=0.08)
        quiet, quiet_client, _, quiet_closed = _splice(idle=0.08)
        busy.upstream.transport = None  # connect() makes the real one
        quiet.upstream.transport = None
        await busy.connect(address, b"replayed hello", 2)
        await quiet.connect(address, b"x", 2)
        for _ in range(10):  # 0.2 s of traffic on the busy one only
            await asyncio.sleep(0.02)
            busy.client.data_received(b".")
        busy_open = not busy.closed
        first = await asyncio.wait_for(got, 2)
        busy.close()
        server.close()
        return first, busy_open, quiet.closed and quiet_client.closed, len(quiet_closed) == 1

    first, busy_open, quiet_closed, reported_once = run(scenario())
    assert first in (b"replayed hello", b"x")
    assert busy_open and quiet_closed and reported_once
