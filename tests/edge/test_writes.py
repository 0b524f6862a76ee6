"""edge/writes.py: a loop turn's writes leave together at its end, in order, closes after them.

On a real asyncio loop with recording transports; the connection-level test drives a real TLS
client against a TerminatedConnection whose runtime's writes are bound to that loop.
"""

from __future__ import annotations

import asyncio

from nextproxy.edge.writes import BULK, TurnWrites
from tests.edge.fakes import FakeTransport, run, runtime
from tests.edge.test_connection import Client


class Failing(FakeTransport):
    def write(self, data: bytes | bytearray | memoryview) -> None:
        raise RuntimeError("this transport's bug")


def test_writes_wait_for_the_end_of_the_turn_in_order_and_the_close_comes_last() -> None:
    async def scenario() -> tuple[list[object], FakeTransport, FakeTransport]:
        writes, a, b = TurnWrites(), FakeTransport(), FakeTransport()
        writes.bind(asyncio.get_running_loop())
        writes.write(a, b"one ")
        writes.write(b, b"other")
        writes.write(a, b"two")
        writes.close(a)
        during = [a.writes, b.writes, a.closed]
        await asyncio.sleep(0)  # the turn ends: one callback sends everything
        return during, a, b

    during, a, b = run(scenario())
    assert during == [0, 0, False]
    assert (a.take(), a.writes, a.closed) == (b"one two", 2, True)  # FakeTransport refuses a write after close
    assert (b.take(), b.closed) == (b"other", False)


def test_bulk_goes_at_once_after_what_waits_so_the_buffer_counts_it() -> None:
    async def scenario() -> tuple[bytes, bytes, FakeTransport]:
        writes, a = TurnWrites(), FakeTransport()
        writes.bind(asyncio.get_running_loop())
        writes.write(a, b"small")
        writes.write(a, b"x" * BULK)
        now = a.take()
        writes.write(a, [b"piece", b"s"])  # pieces of a sealed bulk write: always at once
        pieces = a.take()
        await asyncio.sleep(0)
        return now, pieces, a

    now, pieces, a = run(scenario())
    assert now == b"small" + b"x" * BULK
    assert pieces == b"pieces"
    assert a.take() == b""


def test_unbound_writes_and_closes_happen_at_once() -> None:
    writes, a = TurnWrites(), FakeTransport()
    writes.write(a, b"now")
    writes.close(a)
    assert (a.take(), a.closed) == (b"now", True)


def test_a_closed_transport_is_skipped_and_a_failing_one_costs_the_others_nothing() -> None:
    errors: list[BaseException] = []

    async def scenario() -> tuple[FakeTransport, FakeTransport]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: errors.append(context["exception"]))
        writes, gone, failing, fine = TurnWrites(), FakeTransport(), Failing(), FakeTransport()
        writes.bind(loop)
        writes.write(gone, b"lost")
        writes.write(failing, b"boom")
        writes.write(fine, b"kept")
        gone.abort()  # reset meanwhile: nowhere to send to
        await asyncio.sleep(0)
        return gone, fine

    gone, fine = run(scenario())
    assert gone.take() == b""
    assert fine.take() == b"kept"
    assert [str(exc) for exc in errors] == ["this transport's bug"]  # reported by the loop, once


def test_a_bound_reporter_gets_each_failure_and_nothing_is_raised() -> None:
    reported: list[Exception] = []

    async def scenario() -> FakeTransport:
        writes, fine = TurnWrites(), FakeTransport()
        writes.bind(asyncio.get_running_loop(), reported.append)  # the listener binds observer.bug
        writes.write(Failing(), b"one")
        writes.write(Failing(), b"two")
        writes.write(fine, b"kept")
        writes.flush()
        return fine

    fine = run(scenario())
    assert fine.take() == b"kept"
    assert [str(exc) for exc in reported] == ["this transport's bug", "this transport's bug"]


def test_a_connection_answers_and_closes_at_the_end_of_the_turn() -> None:
    """Connection: close: the 404, our close_notify and the close all wait for the turn's end,
    and the close follows the records (the recording transport refuses a write after close)."""

    async def scenario() -> tuple[tuple[int, bool], tuple[int, bool], Client]:
        rt, _observer = runtime()
        client = Client(rt)  # the handshake, with writes at once (unbound)
        rt.writes.bind(asyncio.get_running_loop())
        before = client.transport.writes
        client.peer.send(b"GET /nowhere HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        client.conn.data_received(client.peer.data_to_send())
        held = (client.transport.writes - before, client.transport.closed)
        await asyncio.sleep(0)
        sent = (client.transport.writes - before, client.transport.closed)
        client.peer.feed(client.transport.take())
        return held, sent, client

    held, sent, client = run(scenario())
    assert held == (0, False)
    assert sent == (1, True)  # the response and close_notify in one write, then the close
    assert client.peer.received.startswith(b"HTTP/1.1 404 ")
