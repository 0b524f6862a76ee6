"""records.Linger on a recording transport and a real loop: it half-closes, keeps the socket
open while the client is still sending, and closes when the client falls quiet, hangs up, or
its most time has passed."""

from __future__ import annotations

import asyncio

from nextproxy.edge.records import Linger
from tests.edge.fakes import FakeTransport, run

QUIET = 0.05


def test_half_closes_at_once_and_closes_when_the_client_falls_quiet() -> None:
    async def scenario() -> tuple[FakeTransport, bool]:
        transport = FakeTransport()
        Linger(transport, asyncio.get_running_loop(), quiet=QUIET, most=10)
        half_closed_first = transport.eof_written and not transport.closed
        await asyncio.sleep(QUIET * 3)
        return transport, half_closed_first

    transport, half_closed_first = run(scenario())
    assert half_closed_first and transport.closed and not transport.aborted


def test_a_client_still_sending_keeps_it_open_until_most() -> None:
    async def scenario() -> list[bool]:
        transport = FakeTransport()
        linger = Linger(transport, asyncio.get_running_loop(), quiet=QUIET, most=QUIET * 3)
        seen = []
        for _ in range(10):  # bytes every half quiet period, for 10 half-periods (> most)
            linger.heard()
            await asyncio.sleep(QUIET / 2)
            seen.append(transport.closed)
        return seen

    seen = run(scenario())
    assert seen[:3] == [False, False, False]  # held open past the quiet period: still sending
    assert seen[-1] is True  # but not past ``most``


def test_the_clients_hang_up_or_a_cut_ends_it_now() -> None:
    async def scenario() -> tuple[FakeTransport, FakeTransport]:
        loop = asyncio.get_running_loop()
        hung_up, cut = FakeTransport(), FakeTransport()
        Linger(hung_up, loop, quiet=10, most=10).close()
        Linger(cut, loop, quiet=10, most=10).abort()
        return hung_up, cut

    hung_up, cut = run(scenario())
    assert hung_up.closed and not hung_up.aborted and cut.aborted
