"""edge/acceptor.py on real loopback sockets under uvloop: what a connection looks like once
the accept loop hands it to its protocol."""

from __future__ import annotations

import asyncio
import os
import resource
import socket

import uvloop
from collections.abc import Callable

from nextproxy.config.model import Limits
from nextproxy.edge.acceptor import HEADROOM, Acceptor
from nextproxy.edge.admission import Admission
from tests.edge.fakes import RecordingObserver


class Probe(asyncio.Protocol):
    """Records the accepted socket's options as the transport saw them at connection_made."""

    def __init__(self, made: asyncio.Future[tuple[int, bool]]) -> None:
        self.made = made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        self.made.set_result((nodelay, os.get_blocking(sock.fileno())))
        transport.close()


def test_accepted_connections_are_non_blocking_with_nagle_off() -> None:
    """The acceptor leaves both settings to the loop's transport (uvloop sets them when it
    opens the socket, asyncio's own loop likewise): setting them here too cost two syscalls
    per connection. The client-facing socket must still have Nagle off, or a small response
    written in two pieces waits for the client's delayed ACK."""

    async def scenario() -> tuple[int, bool]:
        loop = asyncio.get_running_loop()
        listening = socket.create_server(("127.0.0.1", 0))
        listening.setblocking(False)
        made: asyncio.Future[tuple[int, bool]] = loop.create_future()
        admission = Admission(Limits())
        observer = RecordingObserver()
        acceptor = Acceptor(loop, listening, lambda address: Probe(made), admission, lambda: observer)  # type: ignore[arg-type, return-value]
        acceptor.start()
        try:
            client = socket.create_connection(listening.getsockname()[:2])
            try:
                return await asyncio.wait_for(made, 5)
            finally:
                client.close()
        finally:
            acceptor.close()

    nodelay, blocking = uvloop.run(scenario())
    assert nodelay != 0
    assert blocking is False


class Held(asyncio.Protocol):
    """Stands in for ``Accepted``: holds its connection (and its handshake slot) until told."""

    def __init__(self, held: list[asyncio.Transport]) -> None:
        self.held = held

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.held.append(transport)  # type: ignore[arg-type]


async def _connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def _until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not predicate():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.01)


def test_native_accepting_until_half_the_handshake_cap_then_polled_up_to_the_cap_exactly() -> None:
    """libuv accepts a whole burst before any protocol runs, so it cannot stop at a cap; the
    polled loop checks before each accept. Native serves the common case (few handshakes in
    flight); the last half of the cap is polled, and past the cap nothing is read at all."""

    async def scenario() -> list[tuple[bool, int]]:
        loop = asyncio.get_running_loop()
        listening = socket.create_server(("127.0.0.1", 0))
        listening.setblocking(False)
        port = listening.getsockname()[1]
        admission = Admission(Limits(max_handshakes=8))
        held: list[asyncio.Transport] = []
        observer = RecordingObserver()
        acceptor = Acceptor(loop, listening, lambda address: Held(held), admission, lambda: observer)  # type: ignore[arg-type, return-value]
        admission.watch_handshakes(acceptor.handshakes_fell)
        acceptor.start()
        clients: list[socket.socket] = []
        seen: list[tuple[bool, int]] = []
        try:
            await _until(lambda: acceptor.native)
            for count in range(1, 11):
                clients.append(await _connect(port))
                await _until(lambda: len(held) >= min(count, 8))
                await asyncio.sleep(0.02)  # a switch to native takes a task; let it run
                seen.append((acceptor.native, admission.handshakes))
            assert len(held) == 8 and admission.handshakes == 8  # two wait in the backlog
            assert observer.named("accept_paused")
            for transport in held[:7]:
                transport.close()
                admission.release("127.0.0.1")
                admission.handshake_over()
            await _until(lambda: len(held) == 10)  # the two from the backlog
            await asyncio.sleep(0.05)
            seen.append((acceptor.native, admission.handshakes))
            return seen
        finally:
            for sock in clients:
                sock.close()
            acceptor.close()

    seen = uvloop.run(scenario())
    assert [native for native, _ in seen[:3]] == [True, True, True]  # 1..3 in flight: native
    assert seen[3] == (False, 4)  # half the cap reached: polled from here
    assert all(not native and handshakes <= 8 for native, handshakes in seen[3:10])
    assert seen[10] == (True, 3)  # handshakes fell: native again for the two from the backlog


def test_near_the_open_file_limit_accepting_turns_polled_and_returns_when_descriptors_are_plenty() -> None:
    """On EMFILE libuv accepts and closes whatever waits (clients see a reset); the polled loop
    backs off and leaves them in the backlog. So native accepting stops as soon as an accepted
    descriptor comes within HEADROOM of the limit, read per connection (prlimit may lower it)."""

    async def scenario() -> list[bool]:
        loop = asyncio.get_running_loop()
        listening = socket.create_server(("127.0.0.1", 0))
        listening.setblocking(False)
        port = listening.getsockname()[1]
        admission = Admission(Limits())
        held: list[asyncio.Transport] = []
        observer = RecordingObserver()
        acceptor = Acceptor(loop, listening, lambda address: Held(held), admission, lambda: observer)  # type: ignore[arg-type, return-value]
        acceptor.start()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        clients: list[socket.socket] = []
        modes: list[bool] = []
        try:
            await _until(lambda: acceptor.native)
            modes.append(acceptor.native)
            probe = os.open("/dev/null", os.O_RDONLY)  # the lowest free descriptor number
            os.close(probe)
            resource.setrlimit(resource.RLIMIT_NOFILE, (probe + HEADROOM, hard))
            clients.append(await _connect(port))
            await _until(lambda: len(held) == 1)
            modes.append(acceptor.native)  # that descriptor was within HEADROOM: polled now
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            clients.append(await _connect(port))
            await _until(lambda: len(held) == 2)
            await asyncio.sleep(0.05)
            modes.append(acceptor.native)  # plenty again: native
            return modes
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for sock in clients:
                sock.close()
            for transport in held:
                transport.close()
            acceptor.close()

    assert uvloop.run(scenario()) == [True, False, True]
