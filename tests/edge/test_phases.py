"""edge/phases.py and edge/dispatch.py: each phase's answer to the five inputs, on a real loop
and real core objects (HttpSession, WebSocketRelay); the upstream transport is a recording fake."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import get_args

import pytest

from nextproxy.config.model import Address, Upstream, WebSocketMode
from nextproxy.core.actions import (
    Action,
    CloseClient,
    ConnectUpstream,
    HeadStarted,
    ReleaseUpstream,
    RequestCompleted,
    SendToClient,
    SendToUpstream,
    SessionClosed,
    Side,
    StartTunnel,
    StartWebSocket,
)
from nextproxy.core.upstream_leg import new_upstream_leg
from nextproxy.edge.deadline import Deadline, Timer
from nextproxy.edge.host import Group
from nextproxy.edge.dispatch import HANDLERS
from nextproxy.edge.listener import Runtime
from nextproxy.edge.phases import HttpPhase, TunnelPhase, WebSocketPhase, upgrade
from nextproxy.edge.upstream import UpstreamConnection, UpstreamSlot
from tests.edge.fakes import FakeTransport, run, runtime


@dataclass(eq=False)
class Shell:
    """The part of a connection the phases use, with nothing behind it but a real deadline."""

    rt: Runtime
    loop: asyncio.AbstractEventLoop
    peer: str = "192.0.2.7"
    closed: bool = False
    upstream: UpstreamSlot = field(default_factory=UpstreamSlot)
    http: HttpPhase | None = None
    route_name: str = "-"
    request_started: float = 0.0
    fired: list[Timer] = field(default_factory=list)
    ran: list[list[Action]] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)
    deadline: Deadline = field(init=False)

    def __post_init__(self) -> None:
        self.deadline = Deadline(self.loop, self.fired.append)

    def run(self, actions: list[Action]) -> None:
        self.ran.append(actions)

    def send_client(self, data: bytes) -> None:
        self.sent.append(data)


def _shell(**timeouts: float) -> Shell:
    from tests.edge.fakes import config

    rt, _ = runtime(config(**timeouts))
    return Shell(rt, asyncio.get_running_loop())


def _upstream_connection() -> tuple[UpstreamConnection, FakeTransport]:
    conn = UpstreamConnection(Upstream("app", (Address("127.0.0.1", 9),)), Address("127.0.0.1", 9), 65536)
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, transport


def test_every_action_of_the_core_has_exactly_one_handler() -> None:
    assert set(HANDLERS) == set(get_args(Action))


def test_the_tunnel_relays_bytes_passes_half_close_and_ends_with_either_side() -> None:
    async def scenario() -> tuple[list[list[Action]], FakeTransport, Timer | None, list[bytes]]:
        shell = _shell(passthrough_idle=30)
        conn, transport = _upstream_connection()
        route = shell.rt.config.routes[0]
        phase, started = upgrade(StartTunnel(route, to_upstream=b"early", to_client=b"HTTP/1.1 101 \r\n\r\n"), conn, shell)
        assert isinstance(phase, TunnelPhase) and phase.quiet == 30
        results = [started, phase.client_data(b"abc"), phase.client_data(b""), phase.upstream_data(b"xyz")]
        results += [phase.upstream_data(b""), phase.upstream_lost(None), phase.deadline(Timer.IDLE), phase.drain()]
        return results, transport, shell.deadline.kind, shell.sent

    results, transport, kind, sent = run(scenario())
    assert results[0] == [SendToClient(b"HTTP/1.1 101 \r\n\r\n"), SendToUpstream(b"early")]
    # Chunks go straight to the other leg, no action per chunk: the upstream's transport got
    # b"abc", the connection's client queue b"xyz" (its run() seals and writes it).
    assert results[1] == [] and transport.take() == b"abc"
    assert results[2] == [] and transport.eof_written  # client EOF: half-close toward the upstream
    assert results[3] == [] and sent == [b"xyz"]
    assert results[4] == results[5] == results[6] == [CloseClient()]
    assert results[7] == []  # no message boundary to stop at: the drain timeout ends a tunnel
    assert kind is Timer.IDLE


@pytest.mark.parametrize(
    ("end", "closed_by", "reason"),
    [
        ("client_eof", Side.CLIENT, "client EOF"),
        ("upstream_eof", Side.UPSTREAM, "upstream EOF"),
        ("upstream_reset", Side.UPSTREAM, "upstream connection lost"),
        ("client_reset", Side.CLIENT, "client connection lost"),
        ("idle", None, "idle timeout"),
        ("drain_deadline", None, "the drain deadline ended it"),
        ("error", None, "closed on an error"),  # a TLS error or a bug: no phase method is told
    ],
)
def test_the_tunnel_counts_its_bytes_and_reports_its_first_end(end: str, closed_by: Side | None, reason: str) -> None:
    """Bytes are counted from the 101's leftovers on; the first end is kept whatever follows
    (here the upstream's EOF, then the drain deadline), and reported as frames mode's
    SessionClosed with what a tunnel cannot know (close code, message counts) left None."""

    async def scenario() -> tuple[SessionClosed, list[str], bool]:
        shell = _shell()
        conn, _ = _upstream_connection()
        route = shell.rt.config.routes[0]
        phase, _ = upgrade(StartTunnel(route, to_upstream=b"early", to_client=b"hi"), conn, shell)
        assert isinstance(phase, TunnelPhase)
        phase.client_data(b"abc")
        phase.upstream_data(b"wxyz")
        ending = {
            "client_eof": lambda: phase.client_data(b""),
            "upstream_eof": lambda: phase.upstream_data(b""),
            "upstream_reset": lambda: phase.upstream_lost(ConnectionResetError()),
            "client_reset": phase.client_gone,
            "idle": lambda: phase.deadline(Timer.IDLE),
            "drain_deadline": lambda: phase.cut("the drain deadline ended it"),
            "error": lambda: [],
        }
        ending[end]()
        if end != "error":
            phase.upstream_data(b"")
            phase.cut("later")
        events = [e for e, _ in shell.rt.observer.events]
        return phase.ended(), events, shell in shell.rt.groups[Group.WEBSOCKET]

    closed, events, grouped = run(scenario())
    assert closed == SessionClosed(closed_by, None, reason, None, None, 5 + 3, 2 + 4, WebSocketMode.TUNNEL)
    assert events == ["ws_opened"] and grouped  # counted at the 101; counted out by the close


def test_the_websocket_phase_pings_both_legs_then_declares_a_silent_leg_dead() -> None:
    async def scenario() -> tuple[list[Timer | None], list[Action], list[Action], list[str]]:
        shell = _shell()
        route = shell.rt.config.routes[0]
        phase, started = upgrade(StartWebSocket(route, b"", b"", None), None, shell)
        assert isinstance(phase, WebSocketPhase) and started == []
        kinds = [shell.deadline.kind]
        pings = phase.deadline(Timer.PING)
        kinds.append(shell.deadline.kind)
        dead = phase.deadline(Timer.PONG)  # nobody answered
        return kinds, pings, dead, [e for e, _ in shell.rt.observer.events]

    kinds, pings, dead, events = run(scenario())
    assert kinds == [Timer.PING, Timer.PONG]
    assert {type(a) for a in pings} == {SendToClient, SendToUpstream}
    # the silent client leg is dropped, the upstream leg gets a Close frame
    assert CloseClient() in dead and any(isinstance(a, SendToUpstream) for a in dead)
    assert "ws_opened" in events


def test_the_websocket_phase_outlives_the_client_until_the_relay_is_closed() -> None:
    async def scenario() -> tuple[bool, bool, list[Action]]:
        shell = _shell()
        phase = WebSocketPhase(shell.rt.config.routes[0], shell)
        before = phase.outlives_client
        actions = phase.upstream_lost(None) + phase.client_data(b"")
        return before, phase.finished, actions

    before, finished, actions = run(scenario())
    assert before and finished
    assert any(isinstance(a, SessionClosed) for a in actions)


def test_the_http_phase_answers_a_response_timeout_with_504_and_the_idle_clock() -> None:
    async def scenario() -> tuple[list[Action], Timer | None, bool]:
        shell = _shell(client_idle=30)
        phase = HttpPhase.after_handshake(shell, None, "localhost", None)
        shell.http = phase
        first = phase.client_data(b"GET /app/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert any(isinstance(a, ConnectUpstream) for a in first)
        phase.session.upstream_connected(new_upstream_leg("127.0.0.1:9", 65536))
        return phase.deadline(Timer.RESPONSE), shell.deadline.kind, phase.reading_client

    actions, kind, _ = run(scenario())
    sent = b"".join(a.data for a in actions if isinstance(a, SendToClient))
    assert sent.startswith(b"HTTP/1.1 504 ")
    assert kind is Timer.IDLE


def test_the_http_phase_closes_an_idle_connection_quietly() -> None:
    async def scenario() -> list[Action]:
        shell = _shell()
        phase = HttpPhase.after_handshake(shell, None, None, None)
        return phase.deadline(Timer.IDLE)

    assert run(scenario()) == [CloseClient()]


def test_the_http_phase_answers_a_head_deadline_with_408_and_reports_it() -> None:
    """A slowloris head gets what a trickled body gets: 408, a log line, the connection closed."""

    async def scenario() -> list[Action]:
        shell = _shell()
        phase = HttpPhase.after_handshake(shell, None, None, None)
        assert HeadStarted() in phase.client_data(b"GET /app/x HTTP/1.1\r\nHost: loc")
        return phase.deadline(Timer.HEAD)

    actions = run(scenario())
    sent = b"".join(a.data for a in actions if isinstance(a, SendToClient))
    assert sent.startswith(b"HTTP/1.1 408 ") and b"connection: close" in sent.lower()
    [done] = [a for a in actions if isinstance(a, RequestCompleted)]
    assert (done.status, done.reason) == (408, "request head timed out")
    assert actions[-1] == CloseClient()


def _mid_response(shell: Shell) -> HttpPhase:
    """A phase whose response has started (200, 5 of its 10 body bytes relayed)."""
    phase = HttpPhase.after_handshake(shell, None, "localhost", None)
    shell.http = phase
    phase.client_data(b"GET /app/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
    phase.session.upstream_connected(new_upstream_leg("127.0.0.1:9", 65536))
    relayed = phase.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    assert any(isinstance(a, SendToClient) for a in relayed)
    return phase


@pytest.mark.parametrize(
    ("client_paused", "status", "reason"),
    [
        (True, 200, "timed out: the client stopped reading the response"),
        (False, 504, "timed out: the upstream stopped sending the response"),
    ],
)
def test_an_idle_deadline_under_a_response_in_flight_cuts_it_and_reports_it(client_paused: bool, status: int, reason: str) -> None:
    """A response that stalls for the idle timeout is cut (closed without its end) and logged:
    with the status that went out when the client stopped reading, as 504 when the upstream
    stopped sending (an upstream fault, as a reset mid-body is a 502)."""

    async def scenario() -> list[Action]:
        shell = _shell()
        phase = _mid_response(shell)
        shell.upstream.client_paused = client_paused
        return phase.deadline(Timer.IDLE)

    actions = run(scenario())
    [done] = [a for a in actions if isinstance(a, RequestCompleted)]
    assert (done.status, done.reason, done.method, done.target) == (status, reason, "GET", "/app/x")
    assert ReleaseUpstream(reusable=False) in actions and actions[-1] == CloseClient()
    assert not any(isinstance(a, SendToClient) for a in actions)  # no end of body, ever


def test_the_drain_deadline_reports_what_each_phase_had_in_flight() -> None:
    async def scenario() -> tuple[list[Action], list[Action], list[Action]]:
        shell = _shell()
        waiting = HttpPhase.after_handshake(shell, None, "localhost", None)
        waiting.client_data(b"GET /app/slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
        idle = HttpPhase.after_handshake(shell, None, "localhost", None)
        return waiting.cut("the drain deadline ended it"), _mid_response(_shell()).cut("x"), idle.cut("x")

    async def websocket() -> list[Action]:
        shell = _shell()
        phase = WebSocketPhase(shell.rt.config.routes[0], shell)
        assert not any(isinstance(a, SessionClosed) for a in phase.drain())  # Close 1001 sent; no answer
        return phase.cut("the drain deadline ended it")

    [closed] = [a for a in run(websocket()) if isinstance(a, SessionClosed)]
    assert (closed.closed_by, closed.code, closed.reason) == (None, 1001, "going away")
    waiting, started, idle = run(scenario())
    [done] = [a for a in waiting if isinstance(a, RequestCompleted)]
    assert (done.status, done.reason, done.target) == (503, "the drain deadline ended it", "/app/slow")
    assert [a.status for a in started if isinstance(a, RequestCompleted)] == [200]
    assert idle == []


def test_the_http_phase_gets_a_pooled_upstream_without_a_task() -> None:
    async def scenario() -> tuple[UpstreamConnection | None, list[list[Action]]]:
        shell = _shell()
        phase = HttpPhase.after_handshake(shell, None, None, None)
        shell.http = phase
        upstream = shell.rt.config.upstream("app")
        assert upstream is not None
        pooled, _ = _upstream_connection()
        shell.rt.pool.release(pooled, True)
        first = phase.client_data(b"GET /app/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        [connect] = [a for a in first if isinstance(a, ConnectUpstream)]
        phase.connect(connect)
        return shell.upstream.conn, shell.ran

    conn, ran = run(scenario())
    assert conn is not None  # attached at once from the pool
    assert ran and any(isinstance(a, SendToUpstream) and a.data.startswith(b"GET /app/x") for a in ran[0])
