"""What the core asks the shell to do (imperative names) and what it reports (past tense).

The HTTP session and the WebSocket relay return lists of these; the shell executes them in
order. Keeping them plain dataclasses keeps the core testable by comparing lists. They are never
changed once made, but not ``frozen``: a frozen dataclass pays an ``object.__setattr__`` per field
(0.2 µs for one field, 0.9 µs for RequestCompleted's seven), and a proxied request makes about
nine of these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nextproxy.config.model import PathRoute, WebSocketMode


@dataclass(slots=True)
class SendToClient:
    data: bytes


@dataclass(slots=True)
class SendToUpstream:
    data: bytes


@dataclass(slots=True)
class ConnectUpstream:
    """Get a connection to ``route.upstream`` (pooled unless ``fresh``) and call ``upstream_connected``."""

    route: PathRoute
    fresh: bool = False


@dataclass(slots=True)
class ReleaseUpstream:
    """The exchange is over: pool the upstream connection if ``reusable``, else close it."""

    reusable: bool


@dataclass(slots=True)
class CloseClient:
    """Flush what was sent, then close the client connection (TLS close_notify first)."""

    linger: bool = False
    """The client may still be sending (a request body answered before it ended, requests
    behind a refused one): closing with its bytes unread makes the kernel reset the connection,
    and the client loses the answer. The shell half-closes and drops what still comes first
    (nginx's lingering close)."""


@dataclass(slots=True)
class CloseUpstream:
    """Flush, then close the upstream connection."""


@dataclass(slots=True)
class RequestStarted:
    """The first bytes of a new request arrived: the request's duration is counted from here."""


@dataclass(slots=True)
class HeadStarted:
    """Part of a request head is buffered: the rest must come within the head timeout, which
    more bytes do not push back (a slow-head client cannot hold the connection forever)."""


@dataclass(slots=True)
class HeadReceived:
    """The buffered head is complete: the head timeout no longer applies."""


@dataclass(slots=True)
class AwaitResponse:
    """The request is fully sent: start the upstream response timer (504 when it fires)."""


@dataclass(slots=True)
class ResponseStarted:
    """The upstream's response head arrived: stop the response timer."""

    status: int
    uploading: bool = False
    """The request body is still arriving: its own bound (``request_body``) keeps running, so
    a body trickled beside a streaming response cannot outlive it (``BodyReceived`` ends it)."""


@dataclass(slots=True)
class BodyReceived:
    """The request body ended after its response had started: from now on only the response
    keeps the connection busy, and the quiet timer watches it."""


@dataclass(slots=True)
class StartTunnel:
    """After a 101: splice raw bytes both ways; the leftovers go first."""

    route: PathRoute
    to_upstream: bytes
    to_client: bytes


@dataclass(slots=True)
class StartWebSocket:
    """After a 101 on a ``frames`` route: relay frames; the leftovers are fed to the relay first."""

    route: PathRoute
    from_client: bytes
    from_upstream: bytes
    subprotocol: str | None


@dataclass(slots=True)
class RequestCompleted:
    """One exchange finished (or was refused): for the access log and the request metrics."""

    route: str
    method: str
    target: str
    status: int
    bytes_from_client: int
    bytes_to_client: int
    reason: str = ""


@dataclass(slots=True)
class AuthorizationDenied:
    route: str
    reason: str
    fingerprint: str


@dataclass(slots=True)
class RateLimited:
    """A request or WebSocket upgrade was answered 429: its client's bucket on ``route`` is empty.

    ``key`` is the kind of key that was limited (``ip`` or ``cert``), a bounded metric label;
    the address or fingerprint itself only goes to the log, as the connection's peer.
    """

    route: str
    key: str
    retry_after: int


class Side(enum.Enum):
    """A WebSocket relay's two legs."""

    CLIENT = "client"
    UPSTREAM = "upstream"


@dataclass(slots=True)
class MessageRelayed:
    """One complete WebSocket message went through; ``direction`` is who sent it."""

    direction: Side
    size: int


@dataclass(slots=True)
class SessionClosed:
    """A WebSocket session ended: reported exactly once per session, in either mode.

    Frames mode (the relay): both legs are finished; emitted before the last Close actions.
    ``closed_by`` is who started the end (None: the proxy, for drain, timeout, limit or a
    protocol error). ``code`` is the close code that started it; 1006 when a leg vanished
    without a Close frame (EOF, ping timeout, abort). ``bytes_from_*`` count relayed payload.

    Tunnel mode (made by the edge, which reads no frames): ``closed_by`` is the side whose
    connection ended first (None: the proxy, for the idle timeout or the drain deadline),
    ``code`` and the message counts are None (unknown, not zero), and ``bytes_from_*`` count
    every byte of the stream, frame headers included.
    """

    closed_by: Side | None
    code: int | None
    reason: str
    messages_from_client: int | None
    messages_from_upstream: int | None
    bytes_from_client: int
    bytes_from_upstream: int
    mode: WebSocketMode = WebSocketMode.FRAMES


Action = (
    SendToClient
    | SendToUpstream
    | ConnectUpstream
    | ReleaseUpstream
    | CloseClient
    | CloseUpstream
    | RequestStarted
    | HeadStarted
    | HeadReceived
    | AwaitResponse
    | ResponseStarted
    | BodyReceived
    | StartTunnel
    | StartWebSocket
    | RequestCompleted
    | AuthorizationDenied
    | RateLimited
    | MessageRelayed
    | SessionClosed
)
"""Everything the core returns to the shell: ``edge.connection`` dispatches on the exact type."""
