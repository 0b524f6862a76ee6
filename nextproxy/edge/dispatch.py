"""What the shell does with each core action: one table from action type to handler, built once.

``TerminatedConnection.run`` looks every action up here by its exact type (a dict lookup, not a
chain of isinstance checks: the hot path runs several actions per request). Handlers see the
connection only as a ``phases.Shell``. A handler returning True ends the batch: the connection
closed and the rest of the batch has nowhere to go.
"""

from __future__ import annotations

from typing import Any, Callable

from nextproxy.config.model import Timeouts
from nextproxy.core import actions as act
from nextproxy.edge.deadline import Timer
from nextproxy.edge.phases import Shell

Handler = Callable[[Shell, Any], "bool | None"]


def _connect(shell: Shell, action: act.ConnectUpstream) -> None:
    shell.route_name = action.route.name
    if shell.http is not None:
        shell.http.connect(action)


def _since_request(shell: Shell) -> float:
    return shell.loop.time() - shell.request_started


def _timeouts(shell: Shell) -> Timeouts:
    return shell.rt.config.timeouts


def _request_started(shell: Shell, action: act.RequestStarted) -> None:
    """A request's first byte: its head and body must arrive within ``request_body`` (a fixed
    bound; the idle timer alone restarts on every byte). The head keeps its own, shorter one."""
    shell.request_started = shell.loop.time()
    shell.deadline.switch(Timer.IDLE, Timer.BODY, _timeouts(shell).request_body)


def _head_started(shell: Shell, action: act.HeadStarted) -> None:
    if shell.deadline.kind is Timer.IDLE or shell.deadline.kind is Timer.BODY:
        shell.deadline.set(_timeouts(shell).request_head, Timer.HEAD)


def _response_started(shell: Shell, action: act.ResponseStarted) -> None:
    """The response's progress is watched by the quiet timer, unless the request body is still
    coming: then its fixed bound (BODY) runs on, or a body trickled beside the response, each
    byte pushing the quiet timer back, would live on."""
    if not action.uploading:
        shell.deadline.set(_timeouts(shell).client_idle, Timer.IDLE)


def _completed(shell: Shell, action: act.RequestCompleted) -> None:
    """An exchange ended without an upstream response (404, 400...): back to keep-alive."""
    shell.rt.observer.request(action, _since_request(shell), shell.peer)
    shell.deadline.switch(Timer.BODY, Timer.IDLE, _timeouts(shell).client_idle)


HANDLERS: dict[type, Handler] = {
    act.SendToClient: lambda c, a: c.send_client(a.data),
    act.SendToUpstream: lambda c, a: c.upstream.write(a.data),
    act.ConnectUpstream: _connect,
    act.ReleaseUpstream: lambda c, a: c.release(a.reusable),
    act.CloseUpstream: lambda c, a: c.release(False),
    act.CloseClient: lambda c, a: c.close_client(a.linger),
    act.StartTunnel: lambda c, a: c.upgrade(a),
    act.StartWebSocket: lambda c, a: c.upgrade(a),
    # timer facts: the only way the core's state reaches the connection's deadline
    act.HeadStarted: _head_started,
    act.HeadReceived: lambda c, a: c.deadline.switch(Timer.HEAD, Timer.BODY, _timeouts(c).request_body),
    act.AwaitResponse: lambda c, a: c.deadline.set(_timeouts(c).upstream_response, Timer.RESPONSE),
    act.ResponseStarted: _response_started,
    act.BodyReceived: lambda c, a: c.deadline.switch(Timer.BODY, Timer.IDLE, _timeouts(c).client_idle),
    # facts for the observer (metrics, logs)
    act.RequestStarted: _request_started,
    act.RequestCompleted: _completed,
    act.AuthorizationDenied: lambda c, a: c.rt.observer.denied(a, c.peer),
    act.RateLimited: lambda c, a: c.rt.observer.rate_limited(a, c.peer),
    act.MessageRelayed: lambda c, a: c.rt.observer.ws_message(c.route_name, a),
    act.SessionClosed: lambda c, a: c.rt.observer.ws_closed(c.route_name, a, c.peer, _since_request(c)),
}
