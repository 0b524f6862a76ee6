"""The frame relay's fast path (core/wsframing.py) against wsproto: same frames out, same closes.

The fast path relays whole small data frames itself; everything else goes to wsproto. These
tests hold it to the wsproto-only relay (``fast=False``): over seeded random streams of frames
(fragments, control frames, 16- and 64-bit lengths, non-minimal lengths, bad UTF-8, RSV bits,
wrong masking) cut at random points, after every read a wsproto peer on each leg must have
decoded the same messages (pieces joined: the fast path streams a binary frame cut by a read
as one frame, where wsproto re-fragments it) and the same control frames, and both relays must
report the same facts and closes.
"""

from __future__ import annotations

import os
import random
import struct

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, Event, TextMessage

from nextproxy.core.actions import Action, SendToClient, SendToUpstream
from nextproxy.core.websocket import RelayLimits, WebSocketRelay
from nextproxy.core.wsframing import FrameScanner, encode_frame, mask, simple_frame


def frame(first: int, payload: bytes, key: bytes | None, *, length_form: str = "short") -> bytes:
    """Any frame, including forms the fast path must leave to wsproto."""
    n = len(payload)
    bit = 0x80 if key is not None else 0
    if length_form == "16" or (length_form == "short" and 126 <= n < 65536):
        head = bytes((first, bit | 126)) + struct.pack("!H", n)
    elif length_form == "64" or n >= 65536:
        head = bytes((first, bit | 127)) + struct.pack("!Q", n)
    else:
        head = bytes((first, bit | n))
    return head + (key + mask(payload, key) if key is not None else payload)


def frames_with_mask(data: bytes) -> list[tuple[int, bool, bytes]]:
    """(first byte, masked, unmasked payload) of every frame in ``data``; asserts that nothing
    is left over (a cut frame would be)."""
    out, pos = [], 0
    while pos < len(data):
        first, second = data[pos], data[pos + 1]
        n, pos = second & 0x7F, pos + 2
        if n == 126:
            n, pos = struct.unpack("!H", data[pos : pos + 2])[0], pos + 2
        elif n == 127:
            n, pos = struct.unpack("!Q", data[pos : pos + 8])[0], pos + 8
        key = None
        if second & 0x80:
            key, pos = data[pos : pos + 4], pos + 4
        assert pos + n <= len(data), "a frame was cut"
        payload = data[pos : pos + n]
        pos += n
        out.append((first, key is not None, mask(payload, key) if key else payload))
    return out


def frames_of(data: bytes) -> list[tuple[int, bytes]]:
    """(first byte, unmasked payload) of every frame in ``data`` (masking keys dropped)."""
    return [(first, payload) for first, _, payload in frames_with_mask(data)]


class Peers:
    """A wsproto peer on each leg of a relay: what each would decode, with each message's
    pieces joined (the fast path streams a frame whole where wsproto re-fragments it)."""

    def __init__(self) -> None:
        self.client = Connection(ConnectionType.CLIENT)
        self.upstream = Connection(ConnectionType.SERVER)
        self.logs: dict[str, list[list[object]]] = {"client": [], "upstream": []}

    def feed(self, actions: list[Action]) -> list[Action]:
        """Deliver the sends; returns the other actions (facts, closes) for exact comparison."""
        rest = []
        for action in actions:
            if isinstance(action, (SendToClient, SendToUpstream)):
                side = "client" if isinstance(action, SendToClient) else "upstream"
                conn = self.client if side == "client" else self.upstream
                conn.receive_data(action.data)
                for event in conn.events():
                    self._log(self.logs[side], event)
            else:
                rest.append(action)
        return rest

    @staticmethod
    def _log(log: list[list[object]], event: Event) -> None:
        if isinstance(event, (TextMessage, BytesMessage)):
            if log and log[-1][0] is type(event) and not log[-1][2]:
                log[-1][1] += event.data  # type: ignore[operator]
                log[-1][2] = event.message_finished
            elif event.data or event.message_finished:
                log.append([type(event), event.data, event.message_finished])
        else:
            log.append([event])


def random_stream(rng: random.Random, client: bool) -> bytes:
    """Frames a client (masked) or an upstream (unmasked) might send, mostly valid."""
    out = bytearray()
    for _ in range(rng.randint(1, 12)):
        key = os.urandom(4) if client else None
        if rng.random() < 0.05:
            key = None if client else b"\x01\x02\x03\x04"  # wrong masking for this side
        kind = rng.random()
        size = rng.choice((0, 1, 5, 32, 125, 126, 200, 1000))
        payload = bytes(rng.randrange(256) for _ in range(size))
        if kind < 0.45:
            out += frame(0x82, payload, key)
        elif kind < 0.65:
            text = "".join(rng.choice("aé€😀") for _ in range(size // 4)).encode()
            out += frame(0x81, text, key)
        elif kind < 0.7:
            out += frame(0x81, b"ab\xff\xfe", key)  # invalid UTF-8: 1007
        elif kind < 0.75:
            out += frame(0x82, payload[:100], key, length_form=rng.choice(("16", "64")))
        elif kind < 0.85:  # a fragmented message
            out += frame(rng.choice((0x01, 0x02)), payload[:10], key)
            if rng.random() < 0.5:
                out += frame(0x89, b"ping", key)
            out += frame(0x80, payload[10:20], key)
        elif kind < 0.9:
            out += frame(0x89, payload[:20], key)
        elif kind < 0.93:
            out += frame(0xC2, payload[:10], key)  # RSV1 without an extension
        elif kind < 0.96:
            out += frame(0x02, payload[:10], key)  # a fragment never finished...
            out += frame(0x82, payload[:10], key)  # ...then a new message: protocol error
        else:
            out += frame(0x88, struct.pack("!H", 1000) + b"bye", key)
    return bytes(out)


def cuts(rng: random.Random, data: bytes) -> list[bytes]:
    pieces, pos = [], 0
    while pos < len(data):
        step = rng.choice((1, 2, 3, 7, 40, 500, len(data)))
        pieces.append(data[pos : pos + step])
        pos += step
    return pieces


@pytest.mark.parametrize("seed", range(300))
def test_the_fast_path_relays_what_wsproto_relays(seed: int) -> None:
    rng = random.Random(seed)
    fast = WebSocketRelay(RelayLimits(max_message_size=rng.choice((150, 16 * 1024 * 1024))), os.urandom)
    slow = WebSocketRelay(RelayLimits(max_message_size=fast._limits.max_message_size), fast=False)
    fast_peers, slow_peers = Peers(), Peers()
    for _ in range(rng.randint(1, 6)):
        from_client = rng.random() < 0.5
        for piece in cuts(rng, random_stream(rng, from_client)):
            if from_client:
                assert fast_peers.feed(fast.client_data(piece)) == slow_peers.feed(slow.client_data(piece))
            else:
                assert fast_peers.feed(fast.upstream_data(piece)) == slow_peers.feed(slow.upstream_data(piece))
            assert fast_peers.logs == slow_peers.logs
        if fast.closed:
            break
    assert fast.closed == slow.closed


def test_small_whole_frames_take_the_fast_path_and_wsproto_reads_what_it_writes() -> None:
    relay = WebSocketRelay(RelayLimits(), os.urandom)
    key = b"\x11\x22\x33\x44"
    data = frame(0x82, b"x" * 32, key) + frame(0x81, "é".encode() * 100, key)
    assert simple_frame(data, 0, True) == (38, 0x82, b"x" * 32)
    actions = relay.client_data(data)
    sent = next(a for a in actions if isinstance(a, SendToUpstream)).data
    upstream = Connection(ConnectionType.SERVER)
    upstream.receive_data(sent)
    events = list(upstream.events())
    assert isinstance(events[0], BytesMessage) and events[0].data == b"x" * 32
    assert events[1].data == "é" * 100  # type: ignore[union-attr]
    # Distinct masking keys per frame, from the entropy given.
    assert sent[2:6] != sent[40:44]


def test_a_whole_64_bit_length_frame_takes_the_fast_path() -> None:
    relay = WebSocketRelay(RelayLimits(), os.urandom)
    payload = bytes(range(256)) * 300  # 76,800 bytes: the 64-bit length form is the shortest
    data = frame(0x82, payload, b"\x01\x02\x03\x04")
    assert simple_frame(data, 0, True) == (len(data), 0x82, payload)
    assert simple_frame(data[:-1], 0, True) is None  # not whole yet: wsproto's
    sent = next(a for a in relay.client_data(data) if isinstance(a, SendToUpstream)).data
    upstream = Connection(ConnectionType.SERVER)
    upstream.receive_data(sent)
    (event,) = list(upstream.events())
    assert isinstance(event, BytesMessage) and event.data == payload and event.message_finished


@pytest.mark.parametrize(
    "data, masked",
    [
        (frame(0x82, b"abc", None, length_form="16"), False),  # not the shortest length form
        (frame(0x82, b"abc", None, length_form="64"), False),
        (frame(0x82, b"a" * 65535, None, length_form="64"), False),  # 16 bits would have held it
        (frame(0x02, b"abc", None), False),  # not final
        (frame(0x89, b"abc", None), False),  # control
        (frame(0xC2, b"abc", None), False),  # RSV1
        (frame(0x82, b"abc", None), True),  # unmasked from the client
        (frame(0x82, b"abc", b"abcd"), False),  # masked from the upstream
        (frame(0x81, b"\xff", None), False),  # bad UTF-8
        (frame(0x82, b"abcdef", None)[:-1], False),  # incomplete
    ],
)
def test_simple_frame_leaves_everything_else_to_wsproto(data: bytes, masked: bool) -> None:
    assert simple_frame(data, 0, masked) is None


def test_the_scanner_knows_when_wsproto_holds_nothing_partial() -> None:
    scanner = FrameScanner()
    whole = frame(0x82, b"y" * 300, b"abcd")
    scanner.feed(whole[:1])
    assert not scanner.clean
    scanner.feed(whole[1:7])
    assert not scanner.clean
    scanner.feed(whole[7:])
    assert scanner.clean
    scanner.feed(frame(0x01, b"part", None) + frame(0x89, b"", None))
    assert not scanner.clean  # inside a fragmented message
    scanner.feed(frame(0x80, b"end", None))
    assert scanner.clean
    assert encode_frame(0x82, b"z" * 70000, None)[:2] == b"\x82\x7f"
