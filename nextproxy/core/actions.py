"""What the core asks the shell to do (imperative names) and what it reports (past tense).

The HTTP session and the WebSocket relay return lists of these; the shell executes them in
order. Keeping them plain frozen dataclasses keeps the core testable by comparing lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from nextproxy.config.model import PathRoute


@dataclass(frozen=True, slots=True)
class SendToClient:
    data: bytes


@dataclass(frozen=True, slots=True)
class SendToUpstream:
    data: bytes


@dataclass(frozen=True, slots=True)
class ConnectUpstream:
    """Get a connection to ``route.upstream`` (pooled unless ``fresh``) and call ``upstream_connected``."""

    route: PathRoute
    fresh: bool = False


@dataclass(frozen=True, slots=True)
class ReleaseUpstream:
    """The exchange is over: pool the upstream connection if ``reusable``, else close it."""

    reusable: bool


@dataclass(frozen=True, slots=True)
class CloseClient:
    """Flush what was sent, then close the client connection (TLS close_notify first)."""


@dataclass(frozen=True, slots=True)
class CloseUpstream:
    """Flush, then close the upstream connection."""


@dataclass(frozen=True, slots=True)
class PauseClient:
    """Stop reading the client until ``ResumeClient`` (h11 is paused on a pipelined request)."""


@dataclass(frozen=True, slots=True)
class ResumeClient:
    pass


@dataclass(frozen=True, slots=True)
class AwaitResponse:
    """The request is fully sent: start the upstream response timer (504 when it fires)."""


@dataclass(frozen=True, slots=True)
class ResponseStarted:
    """The upstream's response head arrived: stop the response timer."""

    status: int


@dataclass(frozen=True, slots=True)
class StartTunnel:
    """After a 101: splice raw bytes both ways; the leftovers go first."""

    route: PathRoute
    to_upstream: bytes
    to_client: bytes


@dataclass(frozen=True, slots=True)
class StartWebSocket:
    """After a 101 on a ``frames`` route: relay frames; the leftovers are fed to the relay first."""

    route: PathRoute
    from_client: bytes
    from_upstream: bytes
    subprotocol: str | None


@dataclass(frozen=True, slots=True)
class RequestCompleted:
    """One exchange finished (or was refused): for the access log and the request metrics."""

    route: str
    method: str
    target: str
    status: int
    bytes_from_client: int
    bytes_to_client: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class AuthorizationDenied:
    route: str
    reason: str
    fingerprint: str


Action = (
    SendToClient
    | SendToUpstream
    | ConnectUpstream
    | ReleaseUpstream
    | CloseClient
    | CloseUpstream
    | PauseClient
    | ResumeClient
    | AwaitResponse
    | ResponseStarted
    | StartTunnel
    | StartWebSocket
    | RequestCompleted
    | AuthorizationDenied
)
