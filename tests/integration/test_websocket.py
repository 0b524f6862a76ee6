"""wss through the proxy, frame relay and tunnel: real clients, real TLS, real upstream servers."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from nextproxy.config.model import WebSocketMode
from nextproxy.demo.pki import DemoPki
from nextproxy.demo.wsclient import WsClient, connect
from tests.integration.harness import PATH_ROUTES, SERVER_NAME, Edge, RawUpstream, point_route_at


def open_ws(edge: Edge, path: str, **kwargs: object) -> WsClient:
    return connect(
        f"wss://{SERVER_NAME}:{edge.port}{path}",
        address=("127.0.0.1", edge.port),
        context=edge.client_context(),
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("route, prefix", PATH_ROUTES)
def test_text_and_binary_round_trip_on_every_route(edge: Edge, route: str, prefix: str) -> None:
    ws = open_ws(edge, prefix + "/ws", subprotocols=["chat.v1", "chat.v2"])
    try:
        assert ws.subprotocol == "chat.v1"
        ws.send("hello")
        assert ws.recv().data == "hello"
        ws.send(b"\x00\x01binary\xff")
        assert ws.recv().data == b"\x00\x01binary\xff"
        ws.send("info")
        info = json.loads(ws.recv().data)  # type: ignore[arg-type]
        assert info["service"] == route
        names = [n for n, _ in info["headers"]]
        assert "sec-websocket-extensions" not in names  # no permessage-deflate across the relay
        assert dict(info["headers"])["x-forwarded-for"] == "127.0.0.1"
    finally:
        closed = ws.close(1000, "bye")
    assert closed.close_code == 1000


def test_fragmented_message_is_relayed(edge: Edge) -> None:
    ws = open_ws(edge, "/ns/websocket")
    try:
        ws.send("frag-", final=False)
        ws.send("mented", final=True)
        assert ws.recv().data == "frag-mented"
    finally:
        ws.close()


def test_close_code_and_reason_from_the_upstream(edge: Edge) -> None:
    ws = open_ws(edge, "/mc/sigmai")
    ws.send("close:4000:custom reason")
    received = ws.recv()
    assert (received.close_code, received.close_reason) == (4000, "custom reason")
    ws.sock.close()


def test_large_message_round_trip(edge: Edge) -> None:
    ws = open_ws(edge, "/sfs/sigmai")
    payload = bytes(range(256)) * 4096 * 4  # 4 MiB
    try:
        ws.send(payload)
        assert ws.recv().data == payload
    finally:
        ws.close()


def test_200_concurrent_sessions_50_messages_each_keep_order(edge: Edge) -> None:
    sessions, messages = 200, 50
    errors: list[str] = []

    def one(index: int) -> None:
        try:
            ws = open_ws(edge, f"/ns/sigmai/{index}")
            for i in range(messages):
                ws.send(f"{index}:{i}")
            for i in range(messages):
                got = ws.recv().data
                if got != f"{index}:{i}":
                    errors.append(f"{index}: expected {index}:{i}, got {got!r}")
                    break
            ws.close()
        except Exception as exc:  # collected and asserted below
            errors.append(f"{index}: {exc!r}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:5]


def test_tunnel_mode(pki: DemoPki) -> None:
    edge = Edge.start(pki, websocket=WebSocketMode.TUNNEL)
    try:
        ws = open_ws(edge, "/ns/sigmai/tunnel")
        ws.send("through the tunnel")
        assert ws.recv().data == "through the tunnel"
        assert ws.close(1000).close_code == 1000
    finally:
        edge.close()


def test_upstream_killed_mid_session_closes_the_client(pki: DemoPki) -> None:
    edge = Edge.start(pki)
    try:
        ws = open_ws(edge, "/ns/websocket")
        ws.send("before")
        assert ws.recv().data == "before"
        edge.stop_upstream("ns-websocket")
        ws.sock.settimeout(10)
        # Read the Close frame raw: wsproto (as a client) rejects 1014 as a reserved code, though
        # RFC 6455's registry assigns it ("bad gateway") and browsers accept it.
        frame = ws.sock.recv(1024)
        assert frame[0] == 0x88  # FIN + Close, unmasked from the server
        code = int.from_bytes(frame[2:4], "big")
        assert code == 1014
    finally:
        edge.close()


def test_silent_client_is_detected_by_ping(pki: DemoPki) -> None:
    edge = Edge.start(pki, route_options={"ping_interval": 0.3, "ping_timeout": 0.3})
    try:
        ws = open_ws(edge, "/ns/sigmai")
        ws.send("hi")
        assert ws.recv().data == "hi"
        # Stop answering: read nothing, so our pings go unanswered (wsproto answers only when read).
        started = time.monotonic()
        deadline = started + 5
        while time.monotonic() < deadline:
            if "websocket_session" in edge.logs():
                break
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        assert "websocket_session" in edge.logs()
        assert elapsed < 0.3 + 0.3 + 1.0
        ws.sock.close()
    finally:
        edge.close()


def test_an_idle_session_is_pinged_every_ping_interval(pki: DemoPki) -> None:
    """Found by interop testing (node ws, Python websockets): with the defaults an idle client
    saw pings at 20 s and 60 s, every ping_interval + ping_timeout, not every ping_interval as
    the README says; a NAT or balancer idle timeout of 30-45 s would cut such a session."""
    from wsproto.events import Ping

    edge = Edge.start(pki, route_options={"ping_interval": 0.3, "ping_timeout": 0.15})
    try:
        ws = open_ws(edge, "/ns/sigmai")
        pings: list[float] = []
        next_event = ws._next_event

        def recording() -> object:
            event = next_event()
            if isinstance(event, Ping):
                pings.append(time.monotonic())
            return event

        ws._next_event = recording  # type: ignore[method-assign, assignment]
        ws.sock.settimeout(0.05)
        end = time.monotonic() + 1.6
        while time.monotonic() < end:  # idle: reads (answering pings), sends nothing
            try:
                ws.recv()
            except (TimeoutError, socket.timeout):
                continue
        gaps = [round(b - a, 2) for a, b in zip(pings, pings[1:])]
        assert len(pings) >= 4 and max(gaps) < 0.42, gaps  # every 0.3 s (0.45 s before)
        assert "websocket_session" not in edge.logs()  # the pongs kept it alive
    finally:
        edge.close()


class DeflatingUpstream(RawUpstream):
    """A WebSocket server that turns permessage-deflate on whether or not it was offered: a
    correct Sec-WebSocket-Accept, then a compressed frame."""

    def answer(self, conn: socket.socket, head: bytes) -> None:
        fields = b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
        conn.sendall(self.websocket_101(head, fields) + b"\xc1\x07\xf2H\xcd\xc9\xc9\x07\x00")
        conn.recv(1024)  # until the proxy lets go


class HungUpstream(RawUpstream):
    """Accepts the upgrade, then never reads or writes again: no pong, no Close reply."""

    def answer(self, conn: socket.socket, head: bytes) -> None:
        conn.sendall(self.websocket_101(head))
        deadline = time.monotonic() + 10
        while not self.stopped and time.monotonic() < deadline:  # held open, silent
            time.sleep(0.05)


def test_a_closing_handshake_nobody_finishes_is_cut_at_its_deadline(pki: DemoPki) -> None:
    """Found by black-box testing: a client that vanished (no pongs) got its leg dropped and the
    upstream a Close 1001, and then the session waited for the upstream's Close reply with no
    timer at all: a hung upstream held the session, its connection slots and its upstream
    socket until the process stopped. The closing handshake now has ping_timeout to finish."""
    upstream = HungUpstream()
    edge = Edge.start(pki, route_options={"ping_interval": 0.3, "ping_timeout": 0.3}, mutate=point_route_at(upstream.address))
    try:
        sock = edge.tls_socket()
        sock.settimeout(5)
        sock.sendall(
            b"GET /sfs/sigmai/ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 101 ")
        started = time.monotonic()  # from here neither side answers anything
        deadline = started + 6
        while "websocket_session" not in edge.logs() and time.monotonic() < deadline:
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        [line] = [json.loads(line) for line in edge.logs().splitlines() if '"websocket_session"' in line]
        assert (line["code"], line["reason"]) == (1006, "client ping timeout"), line
        assert elapsed < 0.3 + 0.3 + 0.3 + 1.0, elapsed  # ping, pong wait, closing handshake
        while edge.thread.call(_count(edge)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert edge.thread.call(_count(edge)) == 0  # the connection (and its slots) are gone
        sock.close()
    finally:
        edge.close()
        upstream.close()


async def _count(edge: Edge) -> int:
    return len(edge.server.runtime.connections)


@pytest.mark.parametrize("mode, offer", [
    (WebSocketMode.FRAMES, b"Sec-WebSocket-Extensions: permessage-deflate\r\n"), (WebSocketMode.TUNNEL, b""),
], ids=["frames", "tunnel"])  # fmt: skip
def test_an_upstream_101_with_an_extension_never_offered_is_a_502(pki: DemoPki, mode: WebSocketMode, offer: bytes) -> None:
    """RFC 6455 section 4.1: the proxy, the upstream's client, offered no extension (the frame
    relay strips the client's offer; a tunnel forwards it, and here the client made none), so a
    101 naming one fails the handshake: the client gets a 502."""
    upstream = DeflatingUpstream()
    edge = Edge.start(pki, websocket=mode, mutate=point_route_at(upstream.address))
    try:
        sock = edge.tls_socket()
        sock.settimeout(10)
        sock.sendall(
            b"GET /sfs/sigmai/ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" + offer + b"\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        sock.close()
        assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and answer.endswith(b"\r\n\r\nbad gateway\n"), answer
        assert len(upstream.requests) == 1 and b"sec-websocket-extensions" not in upstream.requests[0].lower()
    finally:
        edge.close()
        upstream.close()
