"""WebSocketRelay: relays WebSocket frames between the client and the upstream, sans-IO.

After the HTTP layer has checked the upstream's 101, each leg is a frame-level wsproto
``Connection`` (no handshake): SERVER role toward the client, CLIENT role toward the upstream,
so wsproto checks the client's masking and masks what we send upstream. No extension is
negotiated (permessage-deflate is stripped from the forwarded handshake): frames are relayed
uncompressed on both legs, so there is no per-leg inflate/deflate cost. Messages are streamed
piece by piece as wsproto decodes them; the only cap is ``RelayLimits.max_message_size``.
Whole data frames, and a final binary frame cut by reads, skip wsproto (core/wsframing.py,
core/wsstream.py): the latter reaches the other leg as the same single frame.
Pings are answered per leg and never forwarded; closes are relayed with their code and reason.
It must never do I/O, keep time or log: the shell owns sockets and timers, and the only
exceptions that may escape are bugs (every wsproto error becomes a Close with a code).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import ProtocolError

from nextproxy.core.actions import (
    Action,
    CloseClient,
    CloseUpstream,
    MessageRelayed,
    SendToClient,
    SendToUpstream,
    SessionClosed,
    Side,
)
from nextproxy.core.wsframing import encode_frame, encode_head, simple_frame
from nextproxy.core.wsleg import Leg
from nextproxy.core.wsstream import FrameStream, partial_head, stream_head

__all__ = ["MessageRelayed", "RelayLimits", "SessionClosed", "Side", "WebSocketRelay"]

# RFC 6455 section 7.4 and the IANA registry. 1014 ("bad gateway") is registered but wsproto
# 1.3.2 (and other older stacks) reject it on receipt as a reserved code: a wsproto client sees
# our 1014 as a protocol error (1002). Browsers and websockets/ws accept it.
NORMAL_CLOSURE = 1000
GOING_AWAY = 1001
NO_STATUS_RECEIVED = 1005
ABNORMAL_CLOSURE = 1006
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
BAD_GATEWAY = 1014
# Codes that only report local conditions and must never be put in a Close frame.
LOCAL_ONLY_CODES = frozenset({1005, 1006, 1015})
FAILURE_REASONS = {1002: "protocol error", 1007: "invalid UTF-8 in a text message"}
"""What a failed peer reads in our Close: wsproto's detail (a Python decode error, an offset)
describes our parser, not the peer's contract, and goes to the log line instead."""

_OPEN = ConnectionState.OPEN
_LOCAL_CLOSING = ConnectionState.LOCAL_CLOSING


@dataclass(frozen=True, slots=True)
class RelayLimits:
    max_message_size: int = 16 * 1024 * 1024
    """Bytes of payload in one message, counted across fragments (text counted as UTF-8)."""


def _wire_close(code: int, reason: str) -> CloseConnection:
    """The Close frame to send for ``code``: local-only codes may not go on the wire (7.4.1)."""
    if code == NO_STATUS_RECEIVED:
        # wsproto writes an empty Close only for this enum member (it tests identity, not ==).
        return CloseConnection(code=CloseReason.NO_STATUS_RCVD)
    if code in LOCAL_ONLY_CODES:
        return CloseConnection(code=NORMAL_CLOSURE, reason=reason)
    return CloseConnection(code=code, reason=reason)


class WebSocketRelay:
    """Both legs of one WebSocket session. Feed bytes in, execute the returned actions in order.

    Close actions are per leg: ``CloseClient``/``CloseUpstream`` come at once for a leg that is
    dead or failed (EOF, timeout, protocol error, size cap), and with ``SessionClosed`` for a
    leg that finished its closing handshake cleanly. ``closed`` means both transports can go.
    """

    def __init__(self, limits: RelayLimits, entropy: Callable[[int], bytes] | None = None, *, fast: bool = True) -> None:
        """``entropy`` (``os.urandom``) gives the masking keys of frames the fast path writes
        upstream; without it only the upstream-to-client direction takes the fast path.
        ``fast=False`` sends every frame through wsproto: the reference the tests hold the
        fast path to."""
        self._limits = limits
        self._entropy = entropy
        self._fast = fast
        self._keys = b""
        self._client = Leg(Side.CLIENT, ConnectionType.SERVER)
        self._upstream = Leg(Side.UPSTREAM, ConnectionType.CLIENT)
        self._facts: list[MessageRelayed] = []
        self.ending: tuple[Side | None, int, str] | None = None
        """The first cause of the session's end, kept; set once its end has begun (a Close, an
        EOF, a failure, a timeout), which the shell reads to bound the rest (a plain attribute:
        it is read after every relayed message)."""
        self._session_closed: SessionClosed | None = None
        self._closed = False
        self._pings_sent = 0

    @property
    def closed(self) -> bool:
        return self._closed


    # ------------------------------------------------------------------ inputs

    def client_data(self, data: bytes) -> list[Action]:
        """Bytes from the client; ``b""`` is the client's TCP EOF."""
        return self._receive(self._client, self._upstream, data)

    def upstream_data(self, data: bytes) -> list[Action]:
        """Bytes from the upstream; ``b""`` is the upstream's TCP EOF."""
        return self._receive(self._upstream, self._client, data)

    def ping(self, side: Side) -> list[Action]:
        """Send a keepalive ping with a payload unique in this session.

        On a leg that already got our Close, wsproto may not send a ping; the Close reply we
        wait for then plays the pong, so ``pong_outstanding`` and ``peer_timed_out`` also bound
        a closing handshake that never completes.
        """
        leg = self._leg(side)
        if leg.finished:
            return []
        self._pings_sent += 1
        leg.ping_payload = b"nextproxy-%d" % self._pings_sent
        if leg.conn.state is _OPEN:
            leg.send(Ping(payload=leg.ping_payload))
        return self._collect()

    def pong_outstanding(self, side: Side) -> bool:
        """A ping we sent on this leg (or, while closing, our Close) is not yet answered."""
        leg = self._leg(side)
        return not leg.finished and leg.ping_payload is not None

    def peer_timed_out(self, side: Side) -> list[Action]:
        """No pong in time: drop that leg's transport and close the other leg (1001 or 1014)."""
        leg = self._leg(side)
        if leg.finished:
            return []
        self._record(None, ABNORMAL_CLOSURE, f"{side.value} ping timeout")
        self._finish(leg, clean=False)
        self._close_other(leg)
        return self._collect()

    def shutdown(self) -> list[Action]:
        """Drain: Close 1001 to both legs; the session ends when both have answered."""
        self._record(None, GOING_AWAY, "going away")
        for leg in (self._client, self._upstream):
            if leg.writable:
                leg.send(CloseConnection(code=GOING_AWAY, reason="going away"))
        return self._collect()

    def abort(self, reason: str = "aborted") -> list[Action]:
        """End now without waiting for any reply (drain deadline passed, or the connection is
        gone under the session): close what is left. The session's end is reported with the
        code that began it if there was one, else 1006 and ``reason``."""
        self._record(None, ABNORMAL_CLOSURE, reason)
        for leg in (self._client, self._upstream):
            if not leg.finished:
                self._finish(leg, clean=False)
        return self._collect()

    # ------------------------------------------------------------------ receiving

    def _leg(self, side: Side) -> Leg:
        return self._client if side is Side.CLIENT else self._upstream

    def _receive(self, leg: Leg, other: Leg, data: bytes) -> list[Action]:
        # A finished leg's transport is closing; late bytes (or its EOF) change nothing, and
        # wsproto raises if fed after its CLOSED state.
        if leg.finished:
            return []
        if not data:
            self._eof(leg, other)
            return self._collect()
        if leg.pending:
            data, leg.pending = leg.pending + data, b""
        if leg.stream is not None:
            pos = self._stream(leg, other, data, 0)
            if pos == len(data):
                return self._collect()
            data = data[pos:]
        if self._fast and leg.scanner.clean and leg.writable and other.writable:
            pos = self._relay_simple(leg, other, data)
            if pos == len(data):
                return self._collect()
            data = data[pos:]
        leg.scanner.feed(data)
        try:
            leg.conn.receive_data(data)
            for event in leg.conn.events():
                self._handle(leg, other, event)
                if leg.finished:
                    break
        except ProtocolError as exc:
            # Unreachable while the state checks hold; still a Close, not a traceback.
            self._fail(leg, other, INTERNAL_ERROR, f"relay error: {exc}")
        return self._collect()

    def _relay_simple(self, leg: Leg, other: Leg, data: bytes) -> int:
        """Relay the whole small data frames at the start of ``data`` without wsproto (see
        core/wsframing.py); returns where the rest, for wsproto, starts."""
        from_client = leg is self._client
        if from_client and self._entropy is None:
            return 0
        pos, limit, end = 0, self._limits.max_message_size, len(data)
        while pos < end:
            frame = simple_frame(data, pos, from_client)
            if frame is None or len(frame[2]) > limit:
                break  # the size cap's answer (1009) is wsproto path's to give
            pos, first, payload = frame
            other.out += encode_frame(first, payload, self._key() if from_client else None)
            size = len(payload)
            leg.bytes += size
            leg.messages += 1
            self._facts.append(MessageRelayed(leg.side, size))
        return pos if pos == end else self._open_stream(leg, other, data, pos)

    def _open_stream(self, leg: Leg, other: Leg, data: bytes, pos: int) -> int:
        """Start streaming the frame at ``pos`` if the read ends inside it (core/wsstream.py);
        returns where wsproto's part of ``data`` starts (``len(data)`` if none)."""
        from_client = leg is self._client
        head = stream_head(data, pos, from_client)
        if head is None:
            if partial_head(data, pos, from_client):
                leg.pending = data[pos:]
                return len(data)
            return pos
        first, start, length, theirs = head
        if length > self._limits.max_message_size or start + length <= len(data):
            return pos  # over the cap: wsproto's path closes with 1009
        ours = self._key() if from_client else None
        other.out += encode_head(first, length, ours)
        other.mid_frame = True
        leg.stream = FrameStream(length, theirs, ours)
        return self._stream(leg, other, data, start)

    def _stream(self, leg: Leg, other: Leg, data: bytes, pos: int) -> int:
        """Relay the streamed frame's bytes in ``data`` from ``pos``; returns where they end.

        The frame goes on even once either leg is closing (it cannot be cut short without
        breaking the other leg's framing): wsproto's bytes for the other leg wait in ``held``
        until it ends. If the other leg's transport is gone the rest is read and dropped."""
        stream = leg.stream
        assert stream is not None
        end, piece = stream.take(data, pos)
        if not other.close_due:
            other.out += piece
            leg.bytes += end - pos
        if stream.left:
            return end
        leg.stream = None
        other.mid_frame = False
        if other.held:
            other.out += other.held
            other.held.clear()
        if not other.close_due:
            leg.messages += 1
            self._facts.append(MessageRelayed(leg.side, stream.size))
        return end

    def _key(self) -> bytes:
        """A fresh masking key (RFC 6455 section 5.3), from entropy drawn 64 keys at a time."""
        keys = self._keys
        if not keys:
            assert self._entropy is not None
            keys = self._entropy(256)
        self._keys = keys[4:]
        return keys[:4]

    def _handle(self, leg: Leg, other: Leg, event: Event) -> None:
        if isinstance(event, (TextMessage, BytesMessage)):
            self._relay_piece(leg, other, event)
        elif isinstance(event, Ping):
            # wsproto never answers pings itself (RFC 6455 5.5.2 makes it ours to do).
            if leg.writable:
                leg.send(event.response())
        elif isinstance(event, Pong):
            if event.payload == leg.ping_payload:
                leg.ping_payload = None
        elif isinstance(event, CloseConnection):
            self._on_close(leg, other, event)

    def _relay_piece(self, leg: Leg, other: Leg, event: TextMessage | BytesMessage) -> None:
        # Once either side is closing, data can no longer be delivered (wsproto refuses to send
        # data after a Close, as RFC 6455 5.5.1 asks): drop it.
        if not (leg.writable and other.writable):
            return
        data = event.data
        if isinstance(data, str):
            # isascii() is O(1) on str; encoding only for non-ASCII text keeps the count exact.
            size = len(data) if data.isascii() else len(data.encode("utf-8"))
        else:
            size = len(data)
        leg.message_size += size
        if leg.message_size > self._limits.max_message_size:
            self._fail(leg, other, MESSAGE_TOO_BIG, "message too big")
            return
        # An empty non-final piece (e.g. text cut inside a UTF-8 sequence) would cost an empty
        # frame on the other leg and say nothing.
        if data or event.message_finished:
            other.send(event)
        leg.bytes += size
        if event.message_finished:
            leg.messages += 1
            self._facts.append(MessageRelayed(leg.side, leg.message_size))
            leg.message_size = 0

    def _on_close(self, leg: Leg, other: Leg, event: CloseConnection) -> None:
        state = leg.conn.state
        code, reason = event.code, event.reason or ""
        if state is _OPEN or state is _LOCAL_CLOSING:
            # wsproto reports a parse failure (bad frame 1002, bad UTF-8 1007) as a
            # CloseConnection without changing state; a real Close frame always moves it.
            self._fail(leg, other, code, reason)
            return
        if state is ConnectionState.REMOTE_CLOSING:
            # The peer started: echo its code (RFC 6455 5.5.1) and pass it on to the other leg.
            leg.send(_wire_close(code, reason))
            self._record(leg.side, code, reason)
            if other.writable:
                other.send(_wire_close(code, reason))
        # Otherwise (CLOSED) this was the answer to a Close we sent.
        self._finish(leg, clean=True)

    def _eof(self, leg: Leg, other: Leg) -> None:
        if leg.conn.state is _OPEN:
            self._record(leg.side, ABNORMAL_CLOSURE, f"{leg.side.value} EOF")
        self._finish(leg, clean=False)
        self._close_other(leg)

    # ------------------------------------------------------------------ ending

    def _fail(self, leg: Leg, other: Leg, code: int, reason: str) -> None:
        """Fail this leg (RFC 6455 7.1.7): our Close, then its transport; 1001 to the other."""
        if leg.writable:
            leg.send(_wire_close(code, FAILURE_REASONS.get(code, reason)))
        self._record(None, code, reason)
        self._finish(leg, clean=False)
        if other.writable:
            other.send(CloseConnection(code=GOING_AWAY, reason="peer failed"))

    def _close_other(self, gone: Leg) -> None:
        """``gone`` vanished: tell the other side, 1001 toward the upstream, 1014 toward the client."""
        other = self._upstream if gone is self._client else self._client
        if other.writable:
            if other is self._upstream:
                event = CloseConnection(code=GOING_AWAY, reason="client gone")
            else:
                event = CloseConnection(code=BAD_GATEWAY, reason="upstream gone")
            other.send(event)

    def _record(self, closed_by: Side | None, code: int, reason: str) -> None:
        if self.ending is None:
            # int(): wsproto hands out CloseReason members; logs and metrics want plain numbers.
            self.ending = (closed_by, int(code), reason)

    def _finish(self, leg: Leg, *, clean: bool) -> None:
        if leg.finished:
            return
        leg.finished = True
        # A dead or failed leg's transport goes now; after a clean closing handshake it waits
        # for the session end, so the shell sees one end of the session, not two.
        leg.close_due = not clean
        if not clean and leg.mid_frame:
            leg.mid_frame = False  # the frame toward it is cut with its transport
            leg.held.clear()
        if leg.stream is not None:
            # Its frame can never end, so the other leg, mid-frame, cannot be sent a Close
            # either (as with a TCP EOF mid-frame on the wsproto path, no message completes).
            leg.stream = None
            self._finish(self._upstream if leg is self._client else self._client, clean=False)
        if self._client.finished and self._upstream.finished and not self._closed:
            self._closed = True
            self._client.close_due = self._upstream.close_due = True
            closed_by, code, reason = self.ending or (None, ABNORMAL_CLOSURE, "")
            c, u = self._client, self._upstream
            self._session_closed = SessionClosed(
                closed_by, code, reason, c.messages, u.messages, c.bytes, u.bytes
            )

    def _collect(self) -> list[Action]:
        """This call's output: one send per side, facts, then closes (upstream before client,
        because a shell may stop at ``CloseClient``)."""
        actions: list[Action] = []
        if self._client.out:
            actions.append(SendToClient(bytes(self._client.out)))
            self._client.out.clear()
        if self._upstream.out:
            actions.append(SendToUpstream(bytes(self._upstream.out)))
            self._upstream.out.clear()
        if self._facts:
            actions += self._facts
            self._facts.clear()
        if self._session_closed is not None:
            actions.append(self._session_closed)
            self._session_closed = None
        if self._upstream.close_due and not self._upstream.close_sent:
            self._upstream.close_sent = True
            actions.append(CloseUpstream())
        if self._client.close_due and not self._client.close_sent:
            self._client.close_sent = True
            actions.append(CloseClient())
        return actions
