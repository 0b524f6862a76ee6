"""edge/accept.py on an in-memory client transport: the connection cap, plaintext HTTP, the hello
timeout, and the hand-over by SNI (termination, or passthrough to a real loopback upstream)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from nextproxy.config.model import Address, Limits
from nextproxy.edge.accept import USE_HTTPS, Accepted
from nextproxy.edge.records import LINGER
from nextproxy.edge.connection import TerminatedConnection
from nextproxy.edge.listener import Runtime
from tests.edge.fakes import PASSTHROUGH_NAME, FakeTransport, RecordingObserver, config, run, runtime
from tests.tlspeer import TlsPeer, client_context


def _accept(rt: Runtime) -> tuple[Accepted, FakeTransport]:
    assert rt.admission.admit("192.0.2.7") is None  # what edge.acceptor does before the protocol exists
    accepted = Accepted(rt, asyncio.get_running_loop(), "192.0.2.7")
    transport = FakeTransport()
    accepted.connection_made(transport)
    return accepted, transport


def _hello(server_name: str) -> bytes:
    return TlsPeer(client_context(), server_name=server_name).data_to_send()


def test_closing_before_the_hello_counts_the_connection_and_its_handshake_out() -> None:
    """The caps themselves are checked in edge.acceptor, before a protocol exists
    (tests/integration/test_overload.py); here: every way out of accept counts out once."""

    async def scenario() -> tuple[Runtime, RecordingObserver, list[int]]:
        rt, observer = runtime(replace(config(), limits=Limits(max_connections=1)))
        accepted, _ = _accept(rt)
        assert rt.admission.admit("192.0.2.8") is not None  # the one slot is taken
        counts = [rt.admission.total, rt.admission.handshakes]
        accepted.close()
        accepted.close()  # twice: counted out once
        return rt, observer, counts + [rt.admission.total, rt.admission.handshakes]

    rt, observer, counts = run(scenario())
    assert counts == [1, 1, 0, 0] and rt.admission.per_address == {}
    assert len(observer.named("connection_closed")) == 1 and not rt.pending


def test_plaintext_http_gets_a_hint_then_a_half_close_and_a_linger() -> None:
    async def scenario() -> tuple[FakeTransport, Runtime, bool]:
        rt, _ = runtime()
        accepted, transport = _accept(rt)
        accepted.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        closed_at_once = transport.closed
        await asyncio.sleep(LINGER + 0.1)
        return transport, rt, closed_at_once

    transport, rt, closed_at_once = run(scenario())
    assert bytes(transport.written) == USE_HTTPS and transport.eof_written and not rt.pending
    # Closing at once would let the kernel reset unread request bytes and lose the answer.
    assert not closed_at_once and transport.closed


def test_a_client_that_never_says_hello_is_timed_out() -> None:
    async def scenario() -> tuple[FakeTransport, RecordingObserver, Runtime]:
        rt, observer = runtime(config(client_hello=0.05))
        _, transport = _accept(rt)
        await asyncio.sleep(0.2)
        return transport, observer, rt

    transport, observer, rt = run(scenario())
    assert transport.closed
    ((result, detail, peer, port),) = observer.named("handshake")
    assert (result, peer, port) == ("timeout", "192.0.2.7", 50000)
    assert detail == "no ClientHello within 0.05 s (0 bytes received)"
    assert not rt.pending and len(observer.named("connection_closed")) == 1


def test_a_hello_for_a_terminated_name_hands_the_transport_to_a_connection() -> None:
    async def scenario() -> tuple[FakeTransport, Runtime]:
        rt, _ = runtime()
        accepted, transport = _accept(rt)
        hello = _hello("localhost")
        accepted.data_received(hello[:10])  # split: the reader is incremental
        accepted.data_received(hello[10:])
        return transport, rt

    transport, rt = run(scenario())
    assert isinstance(transport.protocol, TerminatedConnection)
    assert not rt.pending and len(rt.connections) == 1
    assert transport.written.startswith(b"\x16\x03")  # the server's first flight, already out


def test_a_passthrough_hello_is_replayed_to_the_first_server_that_answers() -> None:
    async def scenario() -> tuple[bytes, Runtime, RecordingObserver]:
        received = asyncio.get_running_loop().create_future()

        async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.set_result(await reader.read(65536))
            writer.close()

        server = await asyncio.start_server(upstream, "127.0.0.1", 0)
        live = Address("127.0.0.1", server.sockets[0].getsockname()[1])
        base = config(upstream=live, connect=1)
        dead_first = replace(base.upstreams[1], servers=(Address("127.0.0.1", 1), live))
        rt, observer = runtime(replace(base, upstreams=(base.upstreams[0], dead_first)))
        accepted, _ = _accept(rt)
        hello = _hello(PASSTHROUGH_NAME)
        accepted.data_received(hello)
        got = await asyncio.wait_for(received, 5)
        server.close()
        assert got == hello
        for splice in list(rt.passthroughs):
            splice.abort()  # ended (as a drain deadline would): the session is reported
        return got, rt, observer

    hello, rt, observer = run(scenario())
    assert observer.named("passthrough_opened") == [("pt",)]
    assert rt.pool.health["pt"] is True
    # The replayed hello counts as the client's bytes to the upstream (it was 0 before).
    assert observer.named("passthrough_closed")[0][:3] == ("pt", len(hello), 0)


def test_an_unreachable_passthrough_upstream_closes_the_client_and_marks_it_down() -> None:
    async def scenario() -> tuple[FakeTransport, Runtime, RecordingObserver]:
        rt, observer = runtime(config(upstream=Address("127.0.0.1", 1), connect=1))
        accepted, transport = _accept(rt)
        accepted.data_received(_hello(PASSTHROUGH_NAME))
        for _ in range(200):
            if transport.closed:
                break
            await asyncio.sleep(0.01)
        return transport, rt, observer

    transport, rt, observer = run(scenario())
    assert transport.closed and rt.pool.health["pt"] is False
    assert observer.named("upstream_error") and not rt.passthroughs
    assert observer.named("passthrough_closed")[0][:3] == ("pt", 0, 0)


def test_a_reset_inside_the_client_hello_is_eof_during_handshake() -> None:
    async def scenario() -> RecordingObserver:
        rt, observer = runtime()
        accepted, _ = _accept(rt)
        accepted.data_received(_hello("localhost")[:20])  # a hello cut short, then a reset
        accepted.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
        silent, _ = _accept(rt)
        silent.connection_lost(ConnectionResetError(104, "Connection reset by peer"))  # said nothing: no failure
        return observer

    observer = run(scenario())
    ((result, detail, peer, port),) = observer.named("handshake")
    assert (result, peer, port) == ("eof_during_handshake", "192.0.2.7", 50000) and "reset" in detail
