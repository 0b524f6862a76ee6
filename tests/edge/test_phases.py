"""edge/phases.py and edge/dispatch.py: each phase's answer to the five inputs, on a real loop
and real core objects (HttpSession, WebSocketRelay); the upstream transport is a recording fake."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import get_args

from nextproxy.config.model import Address, Upstream
from nextproxy.core.actions import (
    Action,
    CloseClient,
    ConnectUpstream,
    SendToClient,
    SendToUpstream,
    SessionClosed,
    StartTunnel,
    StartWebSocket,
)
from nextproxy.core.upstream_leg import new_upstream_leg
from nextproxy.edge.deadline import Deadline, Timer
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


def test_the_http_phase_closes_on_an_idle_or_head_deadline() -> None:
    async def scenario() -> tuple[list[Action], list[Action]]:
        shell = _shell()
        phase = HttpPhase.after_handshake(shell, None, None, None)
        return phase.deadline(Timer.IDLE), phase.deadline(Timer.HEAD)

    assert run(scenario()) == ([CloseClient()], [CloseClient()])


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
