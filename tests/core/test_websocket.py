"""WebSocketRelay between two real wsproto peers, in memory: no sockets, no mocks.

The mobile client is a wsproto CLIENT connection, the upstream a wsproto SERVER connection; the
relay's actions are delivered to them by hand, so every test sees what each peer would decode.
Close frames carrying 1014 are read from the raw bytes, because wsproto 1.3.2 rejects 1014.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

import pytest
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage
from wsproto.frame_protocol import CloseReason

from nextproxy.core.actions import Action, CloseClient, CloseUpstream, SendToClient, SendToUpstream
from nextproxy.core.websocket import (
    MessageRelayed,
    RelayLimits,
    SessionClosed,
    Side,
    WebSocketRelay,
)

KiB = 1024
MiB = 1024 * KiB


@dataclass
class Wire:
    """A relay with a real peer on each leg; records what each peer decoded."""

    relay: WebSocketRelay
    client: Connection = field(default_factory=lambda: Connection(ConnectionType.CLIENT))
    upstream: Connection = field(default_factory=lambda: Connection(ConnectionType.SERVER))
    client_events: list[Event] = field(default_factory=list)
    upstream_events: list[Event] = field(default_factory=list)
    to_client_raw: bytearray = field(default_factory=bytearray)
    actions: list[Action] = field(default_factory=list)

    def deliver(self, actions: list[Action]) -> list[Action]:
        self.actions += actions
        for action in actions:
            if isinstance(action, SendToClient):
                self.to_client_raw += action.data
                self.client.receive_data(action.data)
                self.client_events += self.client.events()
            elif isinstance(action, SendToUpstream):
                self.upstream.receive_data(action.data)
                self.upstream_events += self.upstream.events()
        return actions

    def from_client(self, event: Event) -> list[Action]:
        return self.deliver(self.relay.client_data(self.client.send(event)))

    def from_upstream(self, event: Event) -> list[Action]:
        return self.deliver(self.relay.upstream_data(self.upstream.send(event)))

    def facts(self, kind: type) -> list[object]:
        return [a for a in self.actions if isinstance(a, kind)]


def wire(max_message_size: int = 16 * MiB) -> Wire:
    return Wire(WebSocketRelay(RelayLimits(max_message_size=max_message_size)))


def closes(events: list[Event]) -> list[tuple[int, str | None]]:
    return [(e.code, e.reason) for e in events if isinstance(e, CloseConnection)]


def messages(events: list[Event]) -> list[TextMessage | BytesMessage]:
    return [e for e in events if isinstance(e, (TextMessage, BytesMessage))]


def server_close_frame(raw: bytes) -> tuple[int, str]:
    """The code and reason of the last unmasked Close frame in ``raw`` (server -> client)."""
    at = raw.rindex(b"\x88")
    length = raw[at + 1]
    assert length & 0x80 == 0 and length >= 2, raw[at:]
    payload = raw[at + 2 : at + 2 + length]
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode()


def text_frame_from_binary(frame: bytes) -> bytes:
    """A masked client frame with its opcode switched from binary to text: payload untouched."""
    assert frame[0] & 0x0F in (0x2, 0x0)
    return bytes([frame[0] & 0xF0 | (0x1 if frame[0] & 0x0F == 0x2 else 0x0)]) + frame[1:]


# ---------------------------------------------------------------------- data


def test_text_and_binary_round_trip() -> None:
    w = wire()
    w.from_client(TextMessage("hello, 世界"))
    w.from_upstream(BytesMessage(b"\x00\xffbinary"))
    w.from_upstream(TextMessage("x" * 70_000))
    assert [(type(m), m.data, m.message_finished) for m in messages(w.upstream_events)] == [
        (TextMessage, "hello, 世界", True)
    ]
    got = messages(w.client_events)
    assert [(type(m), m.message_finished) for m in got] == [(BytesMessage, True), (TextMessage, True)]
    assert got[0].data == b"\x00\xffbinary" and got[1].data == "x" * 70_000
    assert w.facts(MessageRelayed) == [
        MessageRelayed(Side.CLIENT, len("hello, 世界".encode())),
        MessageRelayed(Side.UPSTREAM, 8),
        MessageRelayed(Side.UPSTREAM, 70_000),
    ]
    assert not w.relay.closed


def test_one_send_action_per_side_per_call() -> None:
    w = wire()
    data = b"".join(w.client.send(TextMessage(f"m{i}")) for i in range(50))
    data += w.client.send(Ping(b"p"))
    actions = w.deliver(w.relay.client_data(data))
    sends = [a for a in actions if isinstance(a, (SendToClient, SendToUpstream))]
    assert [type(a) for a in sends] == [SendToClient, SendToUpstream]
    assert [m.data for m in messages(w.upstream_events)] == [f"m{i}" for i in range(50)]
    assert len(w.facts(MessageRelayed)) == 50


def test_fragments_are_relayed_before_the_message_ends() -> None:
    w = wire()
    first = w.from_client(TextMessage("part one, ", message_finished=False))
    assert any(isinstance(a, SendToUpstream) for a in first)
    assert not w.facts(MessageRelayed)
    w.from_client(TextMessage("part two, ", message_finished=False))
    w.from_client(TextMessage("end", message_finished=True))
    got = messages(w.upstream_events)
    assert [(m.data, m.message_finished) for m in got] == [
        ("part one, ", False),
        ("part two, ", False),
        ("end", True),
    ]
    assert w.facts(MessageRelayed) == [MessageRelayed(Side.CLIENT, 23)]


def test_partial_frame_is_streamed() -> None:
    """wsproto yields a data frame's payload as it arrives, not after the whole frame."""
    w = wire()
    frame = w.upstream.send(BytesMessage(b"a" * 10_000))
    actions = w.deliver(w.relay.upstream_data(frame[:5_000]))
    assert any(isinstance(a, SendToClient) for a in actions)
    w.deliver(w.relay.upstream_data(frame[5_000:]))
    got = messages(w.client_events)
    assert b"".join(m.data for m in got) == b"a" * 10_000  # type: ignore[misc]
    assert got[0].message_finished is False and got[-1].message_finished is True


def test_utf8_character_split_across_fragments() -> None:
    w = wire()
    one = text_frame_from_binary(w.client.send(BytesMessage(b"caf\xc3", message_finished=False)))
    two = w.client.send(BytesMessage(b"\xa9!", message_finished=True))
    w.deliver(w.relay.client_data(one))
    w.deliver(w.relay.client_data(two))
    assert "".join(m.data for m in messages(w.upstream_events)) == "café!"  # type: ignore[misc]
    assert all(isinstance(m, TextMessage) for m in messages(w.upstream_events))
    assert w.facts(MessageRelayed) == [MessageRelayed(Side.CLIENT, 6)]


def test_twenty_mib_message_streams_in_chunk_sized_pieces() -> None:
    w = wire(max_message_size=32 * MiB)
    payload = random.Random(7).randbytes(20 * MiB)
    frame = w.client.send(BytesMessage(payload))
    chunk = 64 * KiB
    largest = 0
    received = bytearray()
    for start in range(0, len(frame), chunk):  # bounded: 321 iterations
        for action in w.relay.client_data(frame[start : start + chunk]):
            if isinstance(action, SendToUpstream):
                largest = max(largest, len(action.data))
                w.upstream.receive_data(action.data)
                for event in w.upstream.events():
                    assert isinstance(event, BytesMessage)
                    received += event.data
            elif isinstance(action, MessageRelayed):
                assert action == MessageRelayed(Side.CLIENT, 20 * MiB)
    assert largest <= 2 * chunk
    assert bytes(received) == payload


def test_one_byte_at_a_time() -> None:
    w = wire()
    data = (
        w.client.send(TextMessage("héllo"))
        + w.client.send(BytesMessage(b"12", message_finished=False))
        + w.client.send(BytesMessage(b"34", message_finished=True))
        + w.client.send(Ping(b"are you there"))
        + w.client.send(CloseConnection(4000, "custom"))
    )
    for i in range(len(data)):
        w.deliver(w.relay.client_data(data[i : i + 1]))
    assert "".join(m.data for m in messages(w.upstream_events) if isinstance(m, TextMessage)) == "héllo"
    assert b"".join(m.data for m in messages(w.upstream_events) if isinstance(m, BytesMessage)) == b"1234"
    assert [e for e in w.client_events if isinstance(e, Pong)] == [Pong(b"are you there")]
    assert closes(w.upstream_events) == [(4000, "custom")]
    assert w.facts(MessageRelayed) == [MessageRelayed(Side.CLIENT, 6), MessageRelayed(Side.CLIENT, 4)]


# ---------------------------------------------------------------------- ping / pong


def test_client_ping_is_answered_by_the_relay_not_forwarded() -> None:
    w = wire()
    actions = w.from_client(Ping(b"p1"))
    assert [type(a) for a in actions] == [SendToClient]
    assert w.client_events == [Pong(b"p1")]
    assert w.upstream_events == []
    w.from_upstream(Ping(b"p2"))
    assert w.upstream_events == [Pong(b"p2")]
    assert w.client_events == [Pong(b"p1")]


@pytest.mark.parametrize("side", [Side.CLIENT, Side.UPSTREAM])
def test_keepalive_pong_clears_outstanding(side: Side) -> None:
    w = wire()
    peer_events = w.client_events if side is Side.CLIENT else w.upstream_events
    assert not w.relay.pong_outstanding(side)
    w.deliver(w.relay.ping(side))
    assert w.relay.pong_outstanding(side)
    pings = [e for e in peer_events if isinstance(e, Ping)]
    assert len(pings) == 1
    # a pong with another payload is not the answer
    (w.from_client if side is Side.CLIENT else w.from_upstream)(Pong(b"other"))
    assert w.relay.pong_outstanding(side)
    (w.from_client if side is Side.CLIENT else w.from_upstream)(pings[0].response())
    assert not w.relay.pong_outstanding(side)
    w.deliver(w.relay.ping(side))
    second = [e for e in peer_events if isinstance(e, Ping)][1]
    assert second.payload != pings[0].payload


def test_client_timed_out() -> None:
    w = wire()
    w.deliver(w.relay.ping(Side.CLIENT))
    actions = w.deliver(w.relay.peer_timed_out(Side.CLIENT))
    assert [type(a) for a in actions] == [SendToUpstream, CloseClient]
    assert closes(w.upstream_events) == [(1001, "client gone")]
    assert not w.relay.closed
    assert w.relay.peer_timed_out(Side.CLIENT) == []
    end = w.from_upstream(CloseConnection(1001, "client gone"))
    assert [type(a) for a in end] == [SessionClosed, CloseUpstream]
    assert end[0] == SessionClosed(None, 1006, "client ping timeout", 0, 0, 0, 0)
    assert w.relay.closed


def test_upstream_timed_out_gives_1014_to_the_client() -> None:
    w = wire()
    actions = w.deliver(w.relay.peer_timed_out(Side.UPSTREAM))
    assert [type(a) for a in actions] == [SendToClient, CloseUpstream]
    assert server_close_frame(bytes(w.to_client_raw)) == (1014, "upstream gone")
    # wsproto 1.3.2 itself rejects 1014 as "unknown reserved code": a wsproto client sees 1002
    assert closes(w.client_events)[0][0] == 1002
    assert not w.relay.closed
    end = w.deliver(w.relay.client_data(Connection(ConnectionType.CLIENT).send(CloseConnection(1000))))
    assert [type(a) for a in end] == [SessionClosed, CloseClient]
    assert w.relay.closed


def test_unanswered_close_counts_as_outstanding() -> None:
    """A peer that never answers our Close is caught by the same keepalive timer."""
    w = wire()
    w.deliver(w.relay.shutdown())
    assert [type(a) for a in w.relay.ping(Side.CLIENT)] == []  # wsproto can't ping after Close
    assert w.relay.pong_outstanding(Side.CLIENT)
    w.from_upstream(CloseConnection(1001))
    w.deliver(w.relay.peer_timed_out(Side.CLIENT))
    assert w.relay.closed
    assert [type(a) for a in w.actions][-3:] == [SessionClosed, CloseUpstream, CloseClient]


# ---------------------------------------------------------------------- close


@pytest.mark.parametrize(("code", "reason"), [(1000, "bye"), (4000, "custom"), (1001, "")])
def test_client_close_is_relayed_and_both_handshakes_complete(code: int, reason: str) -> None:
    w = wire()
    w.from_client(TextMessage("last"))
    actions = w.from_client(CloseConnection(code, reason))
    assert [type(a) for a in actions] == [SendToClient, SendToUpstream]  # no close yet
    assert closes(w.client_events) == [(code, reason)]  # the echo
    assert w.client.state is ConnectionState.CLOSED
    assert closes(w.upstream_events) == [(code, reason)]
    assert not w.relay.closed
    end = w.from_upstream(CloseConnection(code, reason))
    assert w.upstream.state is ConnectionState.CLOSED
    assert [type(a) for a in end] == [SessionClosed, CloseUpstream, CloseClient]
    assert end[0] == SessionClosed(Side.CLIENT, code, reason, 1, 0, 4, 0)
    assert w.relay.closed
    assert w.relay.client_data(b"late") == [] and w.relay.upstream_data(b"") == []


@pytest.mark.parametrize(("code", "reason"), [(1000, "done"), (4000, "custom"), (1011, "oops")])
def test_upstream_close_is_relayed(code: int, reason: str) -> None:
    w = wire()
    w.from_upstream(CloseConnection(code, reason))
    assert closes(w.upstream_events) == [(code, reason)]
    assert closes(w.client_events) == [(code, reason)]
    end = w.from_client(CloseConnection(code, reason))
    assert [type(a) for a in end] == [SessionClosed, CloseUpstream, CloseClient]
    assert end[0] == SessionClosed(Side.UPSTREAM, code, reason, 0, 0, 0, 0)


def test_close_without_status_is_relayed_without_status() -> None:
    w = wire()
    # wsproto writes an empty Close frame for the NO_STATUS_RCVD member (RFC 6455: 1005 is never sent)
    frame = w.client.send(CloseConnection(CloseReason.NO_STATUS_RCVD))
    assert len(frame) == 6 and frame[1] == 0x80  # masked, zero-length payload
    w.deliver(w.relay.client_data(frame))
    assert closes(w.upstream_events) == [(1005, "")]
    assert closes(w.client_events) == [(1005, "")]
    end = w.from_upstream(CloseConnection(CloseReason.NO_STATUS_RCVD))
    assert end[0] == SessionClosed(Side.CLIENT, 1005, "", 0, 0, 0, 0)


def test_crossing_closes() -> None:
    w = wire()
    from_client = w.client.send(CloseConnection(1000, "a"))
    from_upstream = w.upstream.send(CloseConnection(1001, "b"))
    w.deliver(w.relay.client_data(from_client))
    end = w.deliver(w.relay.upstream_data(from_upstream))
    assert w.relay.closed
    assert [a for a in end if isinstance(a, SessionClosed)] == [SessionClosed(Side.CLIENT, 1000, "a", 0, 0, 0, 0)]


def test_data_while_closing_is_dropped() -> None:
    w = wire()
    w.from_client(CloseConnection(1000))
    # sent by the upstream before it read our Close: its own wsproto would now refuse to send it
    w.deliver(w.relay.upstream_data(Connection(ConnectionType.SERVER).send(TextMessage("too late"))))
    assert messages(w.client_events) == []
    w.from_upstream(CloseConnection(1000))
    assert w.facts(MessageRelayed) == []


def test_shutdown_sends_1001_and_waits_for_both() -> None:
    w = wire()
    actions = w.deliver(w.relay.shutdown())
    assert [type(a) for a in actions] == [SendToClient, SendToUpstream]
    assert closes(w.client_events) == [(1001, "going away")]
    assert closes(w.upstream_events) == [(1001, "going away")]
    assert w.relay.shutdown() == []
    assert [type(a) for a in w.from_client(CloseConnection(1001, "going away"))] == []
    assert not w.relay.closed
    end = w.from_upstream(CloseConnection(1001))
    assert [type(a) for a in end] == [SessionClosed, CloseUpstream, CloseClient]
    assert len(w.facts(SessionClosed)) == 1
    assert end[0] == SessionClosed(None, 1001, "going away", 0, 0, 0, 0)


def test_abort_ends_at_once() -> None:
    w = wire()
    w.deliver(w.relay.shutdown())
    end = w.deliver(w.relay.abort())
    assert [type(a) for a in end] == [SessionClosed, CloseUpstream, CloseClient]
    assert w.relay.closed and w.relay.abort() == []


# ---------------------------------------------------------------------- EOF


def test_client_eof_sends_1001_upstream() -> None:
    w = wire()
    actions = w.deliver(w.relay.client_data(b""))
    assert [type(a) for a in actions] == [SendToUpstream, CloseClient]
    assert closes(w.upstream_events) == [(1001, "client gone")]
    end = w.from_upstream(CloseConnection(1001))
    assert end[0] == SessionClosed(Side.CLIENT, 1006, "client EOF", 0, 0, 0, 0)
    assert w.relay.closed


def test_upstream_eof_sends_1014_to_client() -> None:
    w = wire()
    actions = w.deliver(w.relay.upstream_data(b""))
    assert [type(a) for a in actions] == [SendToClient, CloseUpstream]
    assert server_close_frame(bytes(w.to_client_raw)) == (1014, "upstream gone")
    end = w.deliver(w.relay.client_data(Connection(ConnectionType.CLIENT).send(CloseConnection(1000))))
    assert end[0] == SessionClosed(Side.UPSTREAM, 1006, "upstream EOF", 0, 0, 0, 0)


def test_eof_instead_of_close_reply_ends_the_session() -> None:
    w = wire()
    w.from_client(CloseConnection(1000))
    end = w.deliver(w.relay.upstream_data(b""))
    assert [type(a) for a in end] == [SessionClosed, CloseUpstream, CloseClient]
    assert end[0] == SessionClosed(Side.CLIENT, 1000, "", 0, 0, 0, 0)


# ---------------------------------------------------------------------- violations


@pytest.mark.parametrize("fragments", [1, 2])
def test_message_too_big_from_client(fragments: int) -> None:
    w = wire(max_message_size=1000)
    w.from_client(BytesMessage(b"a" * 1000))  # exactly the cap: fine
    if fragments == 1:
        actions = w.from_client(BytesMessage(b"b" * 1001))
    else:
        w.from_client(BytesMessage(b"b" * 600, message_finished=False))
        actions = w.from_client(BytesMessage(b"b" * 600))
    assert [type(a) for a in actions] == [SendToClient, SendToUpstream, CloseClient]
    assert closes(w.client_events) == [(1009, "message too big")]
    assert closes(w.upstream_events) == [(1001, "peer failed")]
    relayed = b"".join(m.data for m in messages(w.upstream_events))  # type: ignore[misc]
    assert relayed == b"a" * 1000 + b"b" * (600 if fragments == 2 else 0)
    end = w.from_upstream(CloseConnection(1001))
    assert end[0] == SessionClosed(None, 1009, "message too big", 1, 0, len(relayed), 0)
    assert [type(a) for a in end] == [SessionClosed, CloseUpstream]


def test_text_size_counts_utf8_bytes() -> None:
    w = wire(max_message_size=10)
    w.from_upstream(TextMessage("é" * 5))  # 10 bytes
    w.from_upstream(TextMessage("é" * 5 + "x"))  # 11 bytes, 6 characters
    assert closes(w.upstream_events) == [(1009, "message too big")]
    assert closes(w.client_events) == [(1001, "peer failed")]


def test_unmasked_frame_from_client_is_1002() -> None:
    w = wire()
    actions = w.deliver(w.relay.client_data(b"\x81\x02hi"))
    assert [type(a) for a in actions] == [SendToClient, SendToUpstream, CloseClient]
    assert closes(w.client_events) == [(1002, "protocol error")]
    assert closes(w.upstream_events) == [(1001, "peer failed")]
    assert messages(w.upstream_events) == []
    w.from_upstream(CloseConnection(1001))
    assert w.facts(SessionClosed) == [
        SessionClosed(None, 1002, "server received unexpected unmasked frame", 0, 0, 0, 0)
    ]


def test_reserved_opcode_from_upstream_is_1002() -> None:
    w = wire()
    w.deliver(w.relay.upstream_data(b"\x83\x00"))
    assert closes(w.upstream_events) == [(1002, "protocol error")]
    assert closes(w.client_events) == [(1001, "peer failed")]
    assert w.facts(CloseUpstream) == [CloseUpstream()]
    w.from_client(CloseConnection(1001))
    assert [(f.code, f.reason) for f in w.facts(SessionClosed)] == [(1002, "Invalid opcode 0x3")]  # the log's detail


def test_invalid_utf8_is_1007() -> None:
    w = wire()
    frame = text_frame_from_binary(w.client.send(BytesMessage(b"ok \xff\xfe")))
    w.deliver(w.relay.client_data(frame))
    # The client reads a plain reason, not Python's decode error; the log line keeps that.
    assert closes(w.client_events) == [(1007, "invalid UTF-8 in a text message")]
    assert closes(w.upstream_events) == [(1001, "peer failed")]
    assert w.facts(CloseClient) == [CloseClient()]


def test_bad_close_frame_is_1002() -> None:
    w = wire()
    # Close with a one-byte payload, masked with a zero key
    w.deliver(w.relay.client_data(b"\x88\x81\x00\x00\x00\x00\x03"))
    assert closes(w.client_events) == [(1002, "protocol error")]
    assert closes(w.upstream_events) == [(1001, "peer failed")]


def test_seeded_garbage_never_raises() -> None:
    rng = random.Random(1234)
    for _ in range(300):  # bounded
        relay = WebSocketRelay(RelayLimits(max_message_size=4096))
        for _ in range(rng.randrange(1, 6)):
            blob = rng.randbytes(rng.randrange(0, 64))
            if rng.random() < 0.5:
                out = relay.client_data(blob)
            else:
                out = relay.upstream_data(blob)
            assert isinstance(out, list)
        relay.shutdown()
        relay.abort()
        assert relay.closed
