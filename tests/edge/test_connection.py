"""edge/connection.py on an in-memory transport: real TLS (a stdlib client over memory BIOs
against the core engine), real routes and deadlines; only the socket is a recording fake."""

from __future__ import annotations

import asyncio

import pytest
from collections.abc import Callable

from nextproxy.config.model import Address
from nextproxy.core.actions import RequestCompleted, Side
from nextproxy.core.clienthello import ClientHelloReader
from nextproxy.edge.connection import TerminatedConnection
from nextproxy.edge.deadline import Timer
from nextproxy.edge.host import Group
from nextproxy.edge.listener import Runtime
from tests.edge.fakes import FakeTransport, RecordingObserver, config, run, runtime
from tests.tlspeer import TlsPeer, client_context

GET_NOWHERE = b"GET /nowhere HTTP/1.1\r\nHost: localhost\r\n\r\n"
ROUNDS = 50


class Client:
    """A TLS client talking to one TerminatedConnection through a FakeTransport."""

    def __init__(self, rt: Runtime, *, tls12_only: bool = False) -> None:
        self.peer = TlsPeer(client_context(alpn=("http/1.1",), tls12_only=tls12_only), server_name="localhost")
        hello = ClientHelloReader(rt.config.limits.max_client_hello).feed(self.peer.data_to_send())
        assert hello is not None
        self.transport = FakeTransport()
        self.conn = TerminatedConnection(rt, self.transport, "192.0.2.7", None, hello, asyncio.get_running_loop())
        self.transport.set_protocol(self.conn)
        self.conn.start()
        self.pump()

    def pump(self) -> None:
        """Move bytes both ways until neither side has anything to say (bounded)."""
        for _ in range(ROUNDS):
            self.peer.feed(self.transport.take())
            out = self.peer.data_to_send()
            if not out or self.transport.closed:
                return
            self.conn.data_received(out)

    def send(self, plaintext: bytes) -> None:
        self.peer.send(plaintext)
        self.pump()

    async def wait_for(self, predicate: Callable[[], object], seconds: float = 3.0) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while not predicate() and loop.time() < end:
            await asyncio.sleep(0.01)
            self.pump()


def test_handshake_then_a_404_in_one_write_and_one_request_fact() -> None:
    async def scenario() -> tuple[Client, RecordingObserver, int]:
        rt, observer = runtime()
        client = Client(rt)
        assert client.peer.handshake_done
        writes = client.transport.writes
        client.peer.send(GET_NOWHERE)
        client.conn.data_received(client.peer.data_to_send())
        one_batch = client.transport.writes - writes
        client.pump()
        return client, observer, one_batch

    client, observer, one_batch = run(scenario())
    assert client.peer.received.startswith(b"HTTP/1.1 404 ")
    assert one_batch == 1  # the proxy's own short responses go out as one write
    assert [args[0] for args in observer.named("handshake")] == ["ok"]
    [(done, _duration, peer)] = observer.named("request")
    assert isinstance(done, RequestCompleted) and (done.status, done.target, peer) == (404, "/nowhere", "192.0.2.7")


def _tickets_scenario(first_request_with_finished: bool) -> tuple[list[int], TlsPeer]:
    """A new connection's writes (bytes each) from the client's Finished to the 404, and the client."""

    async def scenario() -> tuple[list[int], TlsPeer]:
        rt, _observer = runtime()
        client = TlsPeer(client_context(alpn=("http/1.1",)), server_name="localhost")
        hello = ClientHelloReader(rt.config.limits.max_client_hello).feed(client.data_to_send())
        assert hello is not None
        transport = FakeTransport()
        conn = TerminatedConnection(rt, transport, "192.0.2.7", None, hello, asyncio.get_running_loop())
        transport.set_protocol(conn)
        conn.start()
        client.feed(transport.take())  # the server's flight; the client's handshake is done
        assert client.handshake_done
        sizes: list[int] = []
        if not first_request_with_finished:
            conn.data_received(client.data_to_send())  # the Finished alone
            tickets = transport.take()
            sizes.append(len(tickets))
            client.feed(tickets)
        client.send(GET_NOWHERE)
        conn.data_received(client.data_to_send())  # (Finished +) request in one read
        out = transport.take()
        sizes.append(len(out))
        client.feed(out)
        return sizes, client

    return run(scenario())


def test_session_tickets_ride_with_the_first_response_when_the_request_came_with_the_finished() -> None:
    """Most clients send their first request right behind their Finished: the tickets then go
    out in the response's write, one write (and one client wakeup) fewer per new connection."""
    with_finished, client = _tickets_scenario(first_request_with_finished=True)
    assert len(with_finished) == 1  # tickets and the 404 together
    assert client.received.startswith(b"HTTP/1.1 404 ")
    assert client.obj.session is not None and client.obj.session.has_ticket
    alone, client = _tickets_scenario(first_request_with_finished=False)
    assert len(alone) == 2 and alone[0] > 0  # no request yet: the tickets leave at once
    assert client.received.startswith(b"HTTP/1.1 404 ")
    assert client.obj.session is not None and client.obj.session.has_ticket
    assert with_finished[0] == sum(alone)  # the same records either way


def test_a_partial_head_gets_the_fixed_head_timer() -> None:
    async def scenario() -> tuple[list[Timer | None], Client]:
        rt, _ = runtime(config(request_head=0.1, client_idle=10))
        client = Client(rt)
        kinds = [client.conn.deadline.kind]
        client.send(GET_NOWHERE[:12])
        kinds.append(client.conn.deadline.kind)
        for _ in range(4):  # more bytes, more slowly than the timeout: not pushed back
            await asyncio.sleep(0.04)
            client.send(b"X")
        await client.wait_for(lambda: client.transport.closed)
        return kinds, client

    kinds, client = run(scenario())
    assert kinds == [Timer.IDLE, Timer.HEAD]
    assert client.transport.closed and client.peer.peer_closed  # close_notify, then close


def test_a_complete_head_goes_back_to_the_idle_timer() -> None:
    async def scenario() -> Timer | None:
        rt, _ = runtime(config(request_head=10, client_idle=10))
        client = Client(rt)
        client.send(GET_NOWHERE[:12])
        client.send(GET_NOWHERE[12:])
        return client.conn.deadline.kind

    assert run(scenario()) is Timer.IDLE


def test_an_idle_keep_alive_connection_is_closed_with_close_notify() -> None:
    async def scenario() -> Client:
        rt, _ = runtime(config(client_idle=0.05))
        client = Client(rt)
        await client.wait_for(lambda: client.transport.closed)
        return client

    client = run(scenario())
    assert client.transport.closed and not client.transport.aborted and client.peer.peer_closed


def test_a_handshake_that_takes_too_long_is_counted_and_closed() -> None:
    async def scenario() -> tuple[FakeTransport, RecordingObserver, Runtime]:
        rt, observer = runtime(config(handshake=0.05))
        peer = TlsPeer(client_context(), server_name="localhost")
        hello = ClientHelloReader(65536).feed(peer.data_to_send())
        assert hello is not None
        transport = FakeTransport()
        TerminatedConnection(rt, transport, "192.0.2.7", None, hello, asyncio.get_running_loop(), 50000).start()
        await asyncio.sleep(0.2)  # the client never answers the server's flight
        return transport, observer, rt

    transport, observer, rt = run(scenario())
    assert transport.closed
    assert observer.named("handshake") == [("timeout", "handshake not finished within 0.05 s", "192.0.2.7", 50000, "localhost")]
    assert not rt.connections and len(observer.named("connection_closed")) == 1


@pytest.mark.parametrize("how", ["eof", "reset"])
def test_a_client_hanging_up_mid_handshake_is_named_with_its_address_and_sni(how: str) -> None:
    """Issue 14: this used to log ``client=-`` and an empty detail, counted as ``other``."""

    async def scenario() -> tuple[FakeTransport, RecordingObserver]:
        rt, observer = runtime()
        peer = TlsPeer(client_context(), server_name="localhost")
        hello = ClientHelloReader(65536).feed(peer.data_to_send())
        assert hello is not None
        transport = FakeTransport()
        connection = TerminatedConnection(rt, transport, "192.0.2.7", None, hello, asyncio.get_running_loop(), 50000)
        transport.set_protocol(connection)
        connection.start()
        if how == "eof":
            connection.eof_received()
        else:
            connection.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
        return transport, observer

    transport, observer = run(scenario())
    ((result, detail, client, port, sni),) = observer.named("handshake")
    assert (result, client, port, sni) == ("eof_during_handshake", "192.0.2.7", 50000, "localhost")
    assert detail and (how == "eof" or "reset" in detail)
    assert len(observer.named("connection_closed")) == 1


def test_a_corrupt_record_after_the_handshake_is_a_tls_error_not_a_handshake_result() -> None:
    async def scenario() -> tuple[Client, RecordingObserver]:
        rt, observer = runtime()
        client = Client(rt)
        assert client.peer.handshake_done
        client.conn.data_received(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # application data nobody encrypted
        return client, observer

    client, observer = run(scenario())
    assert [args[0] for args in observer.named("handshake")] == ["ok"]
    ((detail, peer, port, sni),) = observer.named("tls_error")
    assert detail and (peer, sni) == ("192.0.2.7", "localhost")
    assert client.transport.closed or client.transport.eof_written


def test_a_tls12_client_gets_the_alert_and_a_half_close() -> None:
    async def scenario() -> tuple[Client, RecordingObserver]:
        rt, observer = runtime()
        return Client(rt, tls12_only=True), observer

    client, observer = run(scenario())
    assert client.peer.error is not None and "VERSION" in str(client.peer.error).upper()
    assert client.transport.eof_written  # lingers so the client reads the alert, no reset
    assert observer.named("handshake")[0][0] != "ok"


def test_an_unreachable_upstream_is_a_502_and_an_upstream_error() -> None:
    async def scenario() -> tuple[Client, RecordingObserver]:
        rt, observer = runtime(config(upstream=Address("127.0.0.1", 1), connect=1))
        client = Client(rt)
        client.send(b"GET /app/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await client.wait_for(lambda: client.peer.received)
        return client, observer

    client, observer = run(scenario())
    assert client.peer.received.startswith(b"HTTP/1.1 502 ")
    assert observer.named("upstream_error") and observer.named("request")[0][0].status == 502


def test_backpressure_from_the_upstream_pauses_the_client() -> None:
    async def scenario() -> list[bool]:
        rt, _ = runtime()
        client = Client(rt)
        seen = [client.transport.reading]
        client.conn.upstream_writing(True)
        seen.append(client.transport.reading)
        client.conn.upstream_writing(False)
        seen.append(client.transport.reading)
        return seen

    assert run(scenario()) == [True, False, True]


def test_drain_closes_an_idle_connection_and_the_registry_forgets_it() -> None:
    async def scenario() -> tuple[Client, Runtime, int]:
        rt, _ = runtime()
        client = Client(rt)
        registered = len(rt.connections)
        client.conn.drain()
        client.pump()
        return client, rt, registered

    client, rt, registered = run(scenario())
    assert registered == 1 and not rt.connections and not rt.groups[Group.WEBSOCKET]
    assert client.transport.closed and client.peer.peer_closed


def test_a_bug_closes_this_connection_only_and_is_reported() -> None:
    async def scenario() -> tuple[Client, RecordingObserver]:
        rt, observer = runtime()
        client = Client(rt)
        assert client.conn.http is not None
        client.conn.http.session = None  # a planted bug: the next read raises AttributeError
        client.send(GET_NOWHERE)
        return client, observer

    client, observer = run(scenario())
    assert client.transport.aborted
    [(exc, peer)] = observer.named("bug")
    assert isinstance(exc, AttributeError) and peer == "192.0.2.7"


def test_a_bug_while_closing_still_gives_the_slots_back() -> None:
    """``closed`` is set first, so nothing would come back to free the connection's slots if
    its close raised half-way: they are freed whatever happens, and its socket is aborted."""
    async def scenario() -> tuple[Client, Runtime, RecordingObserver]:
        rt, observer = runtime()
        client = Client(rt)
        assert rt.connections
        client.conn._writes = None  # type: ignore[assignment]  # a planted bug in the goodbye
        client.conn.drain()
        return client, rt, observer

    client, rt, observer = run(scenario())
    assert not rt.connections and not rt.groups[Group.TERMINATED] and client.transport.aborted
    [(exc, _)] = observer.named("bug")
    assert isinstance(exc, AttributeError)


def test_a_large_batch_is_sealed_in_pieces_and_written_in_one_call() -> None:
    """OpenSSL's BIO is kept small (SEAL_PIECE of plaintext at a time), but the pieces' records
    reach the transport together (one writelines: one writev under uvloop), not a write each."""
    from nextproxy.edge.records import SEAL_PIECE, write_records

    async def scenario() -> tuple[int, Client, int]:
        rt, _observer = runtime()
        client = Client(rt)
        engine = client.conn._engine  # noqa: SLF001 (the connection's own engine, after a real handshake)
        assert engine is not None
        before = client.transport.writes
        size = 3 * SEAL_PIECE + 1234
        write_records(engine, client.transport, [b"a" * (size - 1), b"b"], rt.writes)
        writes = client.transport.writes - before
        client.peer.feed(client.transport.take())
        return writes, client, size

    writes, client, size = run(scenario())
    assert writes == 1
    assert bytes(client.peer.received) == b"a" * (size - 1) + b"b"


def _tunnel(rt: Runtime) -> Client:
    """A connection switched to a tunnel (as a 101 on a ``tunnel`` route does), over an
    upstream connection on a recording transport."""
    from nextproxy.config.model import Upstream
    from nextproxy.core.actions import StartTunnel
    from nextproxy.edge.upstream import UpstreamConnection

    client = Client(rt)
    upstream = UpstreamConnection(Upstream("app", (Address("127.0.0.1", 9),)), Address("127.0.0.1", 9), 65536)
    upstream.connection_made(FakeTransport())
    upstream.owner = client.conn
    client.conn.upstream.attach(upstream)
    client.conn.upgrade(StartTunnel(rt.config.routes[0], to_upstream=b"", to_client=b""))
    return client


@pytest.mark.parametrize("end", ["corrupt record", "client reset", "drain deadline"])
def test_a_tunnel_session_is_reported_once_however_the_connection_ends(end: str) -> None:
    """Ends that reach the tunnel through the connection, not a phase method alone: a TLS error,
    the client's transport lost, the drain deadline's abort. Each closes the connection once,
    and that close reports the session once and counts it out once."""

    async def scenario() -> tuple[RecordingObserver, Runtime]:
        rt, observer = runtime()
        client = _tunnel(rt)
        client.send(b"through")
        if end == "corrupt record":
            client.conn.data_received(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
        elif end == "client reset":
            client.conn.connection_lost(ConnectionResetError())
        else:
            client.conn.abort()
        client.conn.connection_lost(None)  # the transport's own report, after any close
        return observer, rt

    observer, rt = run(scenario())
    [(route, closed, peer, _duration)] = observer.named("ws_closed")
    assert (route, peer, closed.code, closed.bytes_from_client) == ("app", "192.0.2.7", None, len(b"through"))
    expected = {
        "corrupt record": (None, "closed on an error"),
        "client reset": (Side.CLIENT, "client connection lost"),
        "drain deadline": (None, "the drain deadline ended it"),
    }
    assert (closed.closed_by, closed.reason) == expected[end]
    assert observer.named("ws_opened") == observer.named("ws_gone") == [("app",)]
    assert not rt.groups[Group.WEBSOCKET] and not rt.connections


def _frames(rt: Runtime) -> Client:
    """A connection switched to a frames-mode WebSocket session (a 101 on a ``frames`` route)."""
    from nextproxy.config.model import Upstream
    from nextproxy.core.actions import StartWebSocket
    from nextproxy.edge.upstream import UpstreamConnection

    client = Client(rt)
    upstream = UpstreamConnection(Upstream("app", (Address("127.0.0.1", 9),)), Address("127.0.0.1", 9), 65536)
    upstream.connection_made(FakeTransport())
    upstream.owner = client.conn
    client.conn.upstream.attach(upstream)
    client.conn.upgrade(StartWebSocket(rt.config.routes[0], b"", b"", None))
    return client


@pytest.mark.parametrize("end", ["corrupt record", "drain deadline"])
def test_a_frames_session_is_reported_once_however_the_connection_ends(end: str) -> None:
    """A TLS error closes the connection under a live relay: its session still leaves one
    line (1006, "closed on an error"), as the drain deadline's abort does (with its own)."""

    async def scenario() -> tuple[RecordingObserver, Runtime]:
        rt, observer = runtime()
        client = _frames(rt)
        if end == "corrupt record":
            client.conn.data_received(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
        else:
            client.conn.abort()
        client.conn.connection_lost(None)
        return observer, rt

    observer, rt = run(scenario())
    [(route, closed, _peer, _duration)] = observer.named("ws_closed")
    assert route == "app" and closed.code == 1006 and closed.closed_by is None
    assert closed.reason == ("closed on an error" if end == "corrupt record" else "aborted")
    assert observer.named("ws_opened") == observer.named("ws_gone") == [("app",)]
    assert not rt.groups[Group.WEBSOCKET] and not rt.connections
