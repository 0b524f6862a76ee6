"""edge/acceptor.py on real loopback sockets under uvloop: what a connection looks like once
the accept loop hands it to its protocol."""

from __future__ import annotations

import asyncio
import os
import socket

import uvloop

from nextproxy.config.model import Limits
from nextproxy.edge.acceptor import Acceptor
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
