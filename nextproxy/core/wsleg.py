"""One leg of a WebSocket relay: its wsproto connection and what the relay tracks about it.

Split from core/websocket.py, which drives two of these. What goes out on a leg is collected
in ``out`` per call; while a frame streamed by the fast path (core/wsstream.py) is unfinished
toward this leg, whatever wsproto writes for it waits in ``held``, since no frame may start
inside another's payload. Sans-IO, like the relay.
"""

from __future__ import annotations

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import Event

from nextproxy.core.actions import Side
from nextproxy.core.wsframing import FrameScanner
from nextproxy.core.wsstream import FrameStream

_OPEN = ConnectionState.OPEN


class Leg:
    """One side's wsproto connection plus what the relay tracks about it."""

    __slots__ = ("side", "conn", "out", "finished", "close_due", "close_sent", "ping_payload",
                 "message_size", "messages", "bytes", "scanner", "stream", "pending", "mid_frame",
                 "held")  # fmt: skip

    def __init__(self, side: Side, role: ConnectionType) -> None:
        self.side = side
        self.conn = Connection(role)
        self.out = bytearray()  # bytes for this side produced by the current call
        self.finished = False  # closing handshake done, transport gone, or failed by us
        self.close_due = False  # the shell must close this leg's transport
        self.close_sent = False  # ... and has been told so
        self.ping_payload: bytes | None = None  # our keepalive ping still unanswered
        self.message_size = 0  # payload of the message in progress, for the size cap
        self.messages = 0
        self.bytes = 0
        self.scanner = FrameScanner()  # where wsproto's input stands: the fast path needs a boundary
        self.stream: FrameStream | None = None  # a frame from this side being streamed to the other
        self.pending = b""  # the start of a header the fast path may stream, held for the next read
        self.mid_frame = False  # a streamed frame toward this side is not finished...
        self.held = bytearray()  # ...so what wsproto writes to this side waits here until it is

    def send(self, event: Event) -> None:
        """wsproto's bytes for ``event`` on this leg, after any frame being streamed to it."""
        data = self.conn.send(event)
        if self.mid_frame:
            self.held += data
        else:
            self.out += data

    @property
    def writable(self) -> bool:
        return not self.finished and self.conn.state is _OPEN
