"""WebSocket sessions in ``tunnel`` mode are counted and logged like frames-mode sessions.

Real TLS clients, real stand-in upstreams (or a raw socket server where an upstream must reset),
loopback only. Each end a tunnel can have (the client closes, the upstream closes, either one
resets, the idle timeout, the drain deadline) must move ``websocket_sessions_active`` up at the
101 and back down exactly once, observe one session duration, count the tunnel's bytes both
ways, and leave exactly one ``websocket_session`` line, shaped as frames mode's.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, TextMessage

from nextproxy.config.model import Timeouts, WebSocketMode
from nextproxy.demo.pki import DemoPki
from nextproxy.process import metrics
from tests.integration.harness import SERVER_NAME, Edge, RawUpstream, point_route_at
from tests.integration.test_upstream_cut import ROUTE
from tests.integration.test_websocket import open_ws

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
WAIT = 5.0
"""Seconds any single wait in these tests may take."""


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def sample(name: str, **labels: str) -> float:
    return metrics.registry_for_exposition().get_sample_value(name, labels) or 0.0


@dataclass(frozen=True)
class RouteNumbers:
    """The route's session metrics at one moment."""

    active: float
    sessions: float
    to_upstream: float
    to_client: float

    @classmethod
    def now(cls, route: str = ROUTE) -> RouteNumbers:
        return cls(
            sample("nextproxy_websocket_sessions_active", route=route),
            sample("nextproxy_websocket_session_duration_seconds_count", route=route),
            sample("nextproxy_bytes_total", route=route, direction="client_to_upstream"),
            sample("nextproxy_bytes_total", route=route, direction="upstream_to_client"),
        )


class TunnelClient:
    """A wss session opened by hand, counting every byte after the two upgrade heads: exactly
    what the proxy relays through the tunnel, so its byte counters can be held to it."""

    def __init__(self, edge: Edge, path: str = "/sfs/sigmai/tunnel") -> None:
        self.sock = edge.tls_socket()
        self.sock.settimeout(WAIT)
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {SERVER_NAME}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY.decode()}\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(65536)
            assert chunk, f"closed during the upgrade: {head!r}"
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        self.ws = Connection(ConnectionType.CLIENT)  # frame level: the handshake is done
        self.sent = 0
        self.received = len(rest)
        self.ws.receive_data(rest)

    def send(self, event: Event) -> None:
        data = self.ws.send(event)
        self.sock.sendall(data)
        self.sent += len(data)

    def next_event(self) -> Event:
        while True:
            for event in self.ws.events():
                return event
            chunk = self.sock.recv(65536)
            assert chunk, "the connection closed"
            self.received += len(chunk)
            self.ws.receive_data(chunk)

    def echo(self, text: str) -> None:
        self.send(TextMessage(data=text))
        event = self.next_event()
        assert isinstance(event, TextMessage) and event.data == text, event

    def read_until_closed(self) -> bytes:
        """Everything the proxy still sends, until it closes the connection (a reset counts)."""
        data = b""
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
        except TimeoutError:
            raise AssertionError(f"still open after {WAIT} s") from None
        except OSError:  # a reset, or ssl.SSLError: closed all the same
            pass
        self.received += len(data)
        return data

    def reset(self) -> None:
        """Close with SO_LINGER 0: a RST, as a crashed client or a middlebox would."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def session_lines(edge: Edge) -> list[dict[str, object]]:
    return [json.loads(x) for x in edge.logs().splitlines() if '"websocket_session"' in x]


def ended(edge: Edge, before: RouteNumbers, client: TunnelClient) -> dict[str, object]:
    """Waits for the session's end, checks the metrics it must have moved; returns its line."""
    wait_for(lambda: bool(session_lines(edge)), "the websocket_session line")
    wait_for(lambda: RouteNumbers.now().active == before.active, "the active gauge to go back down")
    time.sleep(0.1)  # a second line, were there one, would come in the same turn
    [line] = session_lines(edge)
    after = RouteNumbers.now()
    assert after.active == before.active
    assert after.sessions == before.sessions + 1
    assert after.to_upstream - before.to_upstream == client.sent == line["bytes_from_client"]
    assert after.to_client - before.to_client == client.received == line["bytes_from_upstream"]
    assert (line["route"], line["mode"], line["code"]) == (ROUTE, "tunnel", None)
    assert line["messages_from_client"] is None and line["messages_from_upstream"] is None  # frames are not read
    assert line["duration_s"] >= 0  # type: ignore[operator]
    return line


@pytest.fixture
def tunnel(pki: DemoPki) -> Iterator[Edge]:
    edge = Edge.start(pki, websocket=WebSocketMode.TUNNEL)
    try:
        yield edge
    finally:
        edge.close()


def opened(edge: Edge) -> tuple[RouteNumbers, TunnelClient]:
    before = RouteNumbers.now()
    client = TunnelClient(edge)
    assert RouteNumbers.now().active == before.active + 1  # counted from the 101 on
    client.echo("through the tunnel")
    return before, client


def test_the_client_closing_its_connection_ends_a_tunnel_session_once(tunnel: Edge) -> None:
    """The client goes away without a closing handshake (a closed tab, a lost app): its EOF
    is passed on as a half-close, the upstream closes in turn, and the session was the client's
    to end."""
    before, client = opened(tunnel)
    client.sock.close()
    line = ended(tunnel, before, client)
    assert (line["closed_by"], line["reason"]) == ("client", "client EOF")


def test_a_closing_handshake_started_by_the_client_is_logged_once(tunnel: Edge) -> None:
    """The usual end: the client's Close, the upstream's answer, and the upstream closes TCP
    first, as RFC 6455 section 7.1.1 asks of servers. The proxy sees no frames, only which
    connection ended first, so that is what ``closed_by`` names."""
    before, client = opened(tunnel)
    client.send(CloseConnection(code=1000, reason="bye"))
    event = client.next_event()
    assert isinstance(event, CloseConnection) and (event.code, event.reason) == (1000, "bye")
    assert client.read_until_closed() == b""  # the client waits for the server's TCP close
    line = ended(tunnel, before, client)
    assert (line["closed_by"], line["reason"]) == ("upstream", "upstream EOF")
    client.sock.close()


def test_the_upstream_ending_a_tunnel_session_counts_and_logs_it_once(tunnel: Edge) -> None:
    before, client = opened(tunnel)
    client.send(TextMessage(data="close:4000:upstream says bye"))  # the stand-in starts the close
    event = client.next_event()
    assert isinstance(event, CloseConnection) and (event.code, event.reason) == (4000, "upstream says bye")
    client.send(event.response())
    assert client.ws.state is ConnectionState.CLOSED
    assert client.read_until_closed() == b""  # the upstream's EOF closes the client
    line = ended(tunnel, before, client)
    assert (line["closed_by"], line["reason"]) == ("upstream", "upstream EOF")
    client.sock.close()


def test_a_client_reset_ends_a_tunnel_session_once(tunnel: Edge) -> None:
    before, client = opened(tunnel)
    client.reset()
    line = ended(tunnel, before, client)
    assert (line["closed_by"], line["reason"]) == ("client", "client connection lost")


def test_the_idle_timeout_ends_a_tunnel_session_once(pki: DemoPki) -> None:
    edge = Edge.start(pki, websocket=WebSocketMode.TUNNEL, timeouts=Timeouts(connect=2, upstream_response=10, client_idle=10, passthrough_idle=0.3))
    try:
        before, client = opened(edge)
        assert client.read_until_closed() == b""  # closed without a Close frame
        line = ended(edge, before, client)
        assert (line["closed_by"], line["reason"]) == ("proxy", "idle timeout")
        client.sock.close()
    finally:
        edge.close()


def test_the_drain_deadline_cuts_a_tunnel_session_without_a_close_frame_and_logs_it(tunnel: Edge) -> None:
    """A tunnel has no message boundary the proxy could see: at drain it keeps relaying, and at
    the deadline it is closed with no Close frame (nginx does the same at
    worker_shutdown_timeout). It is still logged, with the proxy's reason and no close code."""
    before, client = opened(tunnel)
    drained: dict[str, bool] = {}

    def drain() -> None:
        drained["clean"] = tunnel.thread.call(tunnel.server.drain(1.5), timeout=10)

    thread = threading.Thread(target=drain)
    thread.start()
    try:
        wait_for(lambda: tunnel.server.runtime.draining, "the drain to start")
        client.echo("still relayed while draining")
        assert client.read_until_closed() == b""  # no Close 1001: the proxy cannot frame one
    finally:
        thread.join(10)
    assert drained == {"clean": False}
    line = ended(tunnel, before, client)
    assert (line["closed_by"], line["reason"]) == ("proxy", "the drain deadline ended it")
    client.sock.close()


class ResettingUpstream(RawUpstream):
    """Answers one WebSocket upgrade with a valid 101, reads one chunk, then resets (RST)."""

    def __init__(self) -> None:
        super().__init__(timeout=WAIT)

    def answer(self, conn: socket.socket, head: bytes) -> None:
        conn.sendall(self.websocket_101(head))
        conn.recv(65536)  # the client's first message, relayed
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # then a RST


def test_an_upstream_reset_ends_a_tunnel_session_once(pki: DemoPki) -> None:
    upstream = ResettingUpstream()
    edge = Edge.start(pki, websocket=WebSocketMode.TUNNEL, mutate=point_route_at(upstream.address))
    try:
        before = RouteNumbers.now()
        client = TunnelClient(edge)
        client.send(BytesMessage(data=b"then the upstream resets"))
        assert client.read_until_closed() == b""
        line = ended(edge, before, client)
        assert (line["closed_by"], line["reason"]) == ("upstream", "upstream connection lost")
        client.sock.close()
    finally:
        edge.close()
        upstream.close()


def test_frames_and_tunnel_session_lines_have_the_same_fields(tunnel: Edge, edge: Edge) -> None:
    """Log consumers parse one shape: the tunnel fills what it cannot know with null."""
    ws = open_ws(edge, "/sfs/sigmai/frames")
    ws.send("hi")
    assert ws.recv().data == "hi"
    ws.close(1000)
    wait_for(lambda: any(line["route"] == ROUTE for line in session_lines(edge)), "the frames line")
    [frames] = [line for line in session_lines(edge) if line["route"] == ROUTE][-1:]
    _, client = opened(tunnel)
    client.reset()
    wait_for(lambda: bool(session_lines(tunnel)), "the tunnel line")
    [tunneled] = session_lines(tunnel)
    assert frames.keys() == tunneled.keys()
    assert (frames["mode"], tunneled["mode"]) == ("frames", "tunnel")
    assert isinstance(frames["code"], int) and isinstance(frames["messages_from_client"], int)


class DeflateAware(RawUpstream):
    """Turns permessage-deflate on only when the request offers it, then sends "Hello"
    compressed (RFC 7692 section 7.2.3.1's example frame); plain "Hello" otherwise."""

    def answer(self, conn: socket.socket, head: bytes) -> None:
        if b"\r\nsec-websocket-extensions: permessage-deflate" in head.lower():
            conn.sendall(self.websocket_101(head, b"Sec-WebSocket-Extensions: permessage-deflate\r\n") + b"\xc1\x07\xf2H\xcd\xc9\xc9\x07\x00")
        else:
            conn.sendall(self.websocket_101(head) + b"\x81\x05Hello")
        conn.recv(1024)  # until the proxy lets go


def test_permessage_deflate_is_negotiated_end_to_end_through_a_tunnel(pki: DemoPki) -> None:
    """Found by interop testing (Chromium, node ws): the offer was stripped in tunnel mode too,
    so compression never worked through a tunnel (it does through nginx and HAProxy)."""
    from wsproto.extensions import PerMessageDeflate

    upstream = DeflateAware()
    edge = Edge.start(pki, websocket=WebSocketMode.TUNNEL, mutate=point_route_at(upstream.address))
    try:
        sock = edge.tls_socket()
        sock.settimeout(WAIT)
        sock.sendall(
            f"GET /sfs/sigmai/z HTTP/1.1\r\nHost: {SERVER_NAME}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY.decode()}\r\n"
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ") and b"\r\nSec-WebSocket-Extensions: permessage-deflate" in head
        deflate = PerMessageDeflate()
        deflate.finalize("permessage-deflate")
        ws = Connection(ConnectionType.CLIENT, extensions=[deflate])
        ws.receive_data(rest)
        events = list(ws.events())
        while not events:
            ws.receive_data(sock.recv(65536))
            events = list(ws.events())
        assert isinstance(events[0], TextMessage) and events[0].data == "Hello"
        assert b"permessage-deflate" in upstream.requests[0]  # the offer reached the upstream
        sock.close()
    finally:
        edge.close()
        upstream.close()
