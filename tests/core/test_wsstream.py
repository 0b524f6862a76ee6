"""A final binary frame cut by reads is streamed as one frame (core/wsstream.py).

Client reads are capped at 64 KiB, so large messages always arrive in pieces. These tests cut
single frames at every byte (small ones) and at seeded random points (64 KiB and 200 KiB,
including inside the header, inside the masking key and at exactly 65,536 bytes), and check
that the other leg gets exactly one frame with the same payload, masked exactly toward the
upstream, and that a wsproto peer on each leg decodes what it decodes behind the wsproto-only
relay (``fast=False``), with the same facts. Then what may happen around a streamed frame: more
frames, pings, closes, the size cap, EOF and timeouts in the middle of it.
"""

from __future__ import annotations

import os
import random
import struct

import pytest

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
from nextproxy.core.websocket import RelayLimits, WebSocketRelay
from nextproxy.core.wsframing import mask
from nextproxy.core.wsstream import FrameStream, partial_head, stream_head
from tests.core.test_wsframing import Peers, frame
from tests.core.test_wsframing import frames_with_mask as parse

KiB = 1024
KEY = b"\x9a\x01\xfe\x37"


def sent(actions: list[Action], kind: type) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, kind))  # type: ignore[attr-defined]


def facts(actions: list[Action]) -> list[Action]:
    return [a for a in actions if not isinstance(a, (SendToClient, SendToUpstream))]


def relay_pieces(pieces: list[bytes], *, from_client: bool = True, limit: int = 16 * 1024 * KiB) -> tuple[list[Action], Peers, list[Action], Peers]:
    """Feed ``pieces`` to a fast and a wsproto-only relay; both relays' actions, and peers that
    decoded them, checked after every read to agree."""
    fast = WebSocketRelay(RelayLimits(max_message_size=limit), os.urandom)
    slow = WebSocketRelay(RelayLimits(max_message_size=limit), fast=False)
    fast_peers, slow_peers = Peers(), Peers()
    fast_all: list[Action] = []
    slow_all: list[Action] = []
    for piece in pieces:
        f = fast.client_data(piece) if from_client else fast.upstream_data(piece)
        s = slow.client_data(piece) if from_client else slow.upstream_data(piece)
        fast_all += f
        slow_all += s
        assert fast_peers.feed(f) == slow_peers.feed(s)
        assert fast_peers.logs == slow_peers.logs
    return fast_all, fast_peers, slow_all, slow_peers


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(p for p in points if 0 < p < len(data))), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def assert_one_frame_upstream(actions: list[Action], payload: bytes) -> None:
    assert parse(sent(actions, SendToUpstream)) == [(0x82, True, payload)]
    assert [a for a in actions if isinstance(a, MessageRelayed)] == [MessageRelayed(Side.CLIENT, len(payload))]


@pytest.mark.parametrize("size", [5, 300, 70_000])
def test_every_single_cut_of_a_frame_gives_one_frame_upstream(size: int) -> None:
    payload = random.Random(size).randbytes(size)
    data = frame(0x82, payload, KEY)
    points = range(1, len(data)) if size < 1000 else [*range(1, 40), *range(len(data) - 20, len(data))]
    for i in points:
        actions, _, _, _ = relay_pieces([data[:i], data[i:]])
        assert_one_frame_upstream(actions, payload)


@pytest.mark.parametrize("size", [64 * KiB, 200 * KiB])
def test_large_frames_cut_at_random_points_stay_one_frame(size: int) -> None:
    rng = random.Random(size)
    payload = rng.randbytes(size)
    data = frame(0x82, payload, KEY)
    header = 14  # 64-bit length and a key
    for run in range(300 if size < 100 * KiB else 120):
        points = [rng.randrange(1, len(data)) for _ in range(rng.randint(1, 6))]
        if run % 4 == 0:
            points.append(rng.randrange(1, header + 1))  # inside the header or its key
        if run % 4 == 1:
            points.append(65536)  # exactly a 64 KiB read
        if run % 4 == 2:
            points += [rng.randrange(1, 10), rng.randrange(10, header)]  # length, then key
        actions, _, slow, _ = relay_pieces(cut(data, points))
        assert_one_frame_upstream(actions, payload)
        assert facts(actions) == facts(slow)


def test_64k_reads_of_a_64k_message() -> None:
    """What the shell does with a 64 KiB message: a 65,536-byte read, then the last 10 bytes."""
    payload = os.urandom(64 * KiB)
    data = frame(0x82, payload, KEY)
    fast = WebSocketRelay(RelayLimits(), os.urandom)
    first = fast.client_data(data[: 64 * KiB])
    assert [type(a) for a in first] == [SendToUpstream]
    last = fast.client_data(data[64 * KiB :])
    assert_one_frame_upstream(first + last, payload)
    # the proxy's own key, not the client's
    assert sent(first, SendToUpstream)[10:14] != KEY


def test_the_upstream_direction_is_forwarded_unmasked_and_unchanged() -> None:
    rng = random.Random(3)
    payload = rng.randbytes(200 * KiB)
    data = frame(0x82, payload, None)
    for _ in range(40):
        points = [rng.randrange(1, len(data)) for _ in range(rng.randint(1, 5))] + [rng.randrange(1, 11)]
        actions, _, slow, _ = relay_pieces(cut(data, points), from_client=False)
        assert sent(actions, SendToClient) == data
        assert facts(actions) == facts(slow) == [MessageRelayed(Side.UPSTREAM, len(payload))]


def test_frames_pings_and_a_close_after_a_streamed_frame() -> None:
    rng = random.Random(11)
    big = rng.randbytes(100 * KiB)
    data = (
        frame(0x82, big, KEY) + frame(0x82, b"small", KEY) + frame(0x89, b"ping", KEY)
        + frame(0x82, big[:300], KEY) + frame(0x88, struct.pack("!H", 1000) + b"bye", KEY)
    )  # fmt: skip
    for run in range(60):
        points = [rng.randrange(1, len(data)) for _ in range(run % 5)]
        if run % 3 == 0:
            points.append(len(data) - 20)  # the rest of one frame and the next ones in one read
        actions, peers, slow, _ = relay_pieces(cut(data, points))
        up = parse(sent(actions, SendToUpstream))
        assert up[0] == (0x82, True, big) and up[1] == (0x82, True, b"small")
        # After the ping the rest of that read is wsproto's (as before), which may fragment.
        assert b"".join(p for f, _, p in up[2:-1]) == big[:300] and up[-1][0] == 0x88
        assert facts(actions) == facts(slow)
        assert [MessageRelayed(Side.CLIENT, n) for n in (len(big), 5, 300)] == [a for a in actions if isinstance(a, MessageRelayed)]
        assert [type(e[0]).__name__ for e in peers.logs["client"]] == ["Pong", "CloseConnection"]


def test_over_the_size_cap_is_not_streamed() -> None:
    payload = os.urandom(200 * KiB)
    data = frame(0x82, payload, KEY)
    actions, peers, slow, _ = relay_pieces([data[:64 * KiB], data[64 * KiB : 128 * KiB], data[128 * KiB :]], limit=100 * KiB)
    assert facts(actions) == facts(slow)
    assert any(isinstance(a, CloseClient) for a in actions)
    assert peers.logs["client"][-1][0].code == 1009  # type: ignore[attr-defined]


def test_text_is_left_to_wsproto_and_bad_utf8_midway_closes_1007() -> None:
    text = ("é" * 40_000).encode()
    bad = text[:50_000] + b"\xff" + text[50_001:]
    for payload in (text, bad):
        data = frame(0x81, payload, KEY)
        actions, peers, slow, _ = relay_pieces([data[:30_000], data[30_000:]])
        assert facts(actions) == facts(slow)
    assert peers.logs["client"][-1][0].code == 1007  # type: ignore[attr-defined]


def streaming(size: int = 100 * KiB, cut_at: int = 30_000) -> tuple[WebSocketRelay, Peers, bytes, list[Action]]:
    """A relay with a client frame streamed up to ``cut_at`` bytes, and peers that saw it."""
    relay, peers = WebSocketRelay(RelayLimits(), os.urandom), Peers()
    data = frame(0x82, os.urandom(size), KEY)
    actions = relay.client_data(data[:cut_at])
    peers.feed(actions)
    return relay, peers, data[cut_at:], actions


def test_client_eof_mid_frame_completes_no_message_and_closes_both_transports() -> None:
    relay, peers, _, first = streaming()
    end = relay.client_data(b"")
    assert end == [SessionClosed(Side.CLIENT, 1006, "client EOF", 0, 0, len(sent(first, SendToUpstream)) - 14, 0), CloseUpstream(), CloseClient()]
    assert not [a for a in first + end if isinstance(a, MessageRelayed)]
    assert not any(entry[2] for entry in peers.logs["upstream"] if len(entry) == 3)  # no finished message
    assert relay.closed


def test_upstream_eof_mid_frame_cuts_the_client_transport_without_a_close() -> None:
    relay, peers = WebSocketRelay(RelayLimits(), os.urandom), Peers()
    data = frame(0x82, os.urandom(100 * KiB), None)
    peers.feed(relay.upstream_data(data[:50_000]))
    end = relay.upstream_data(b"")
    assert [type(a) for a in end] == [SessionClosed, CloseUpstream, CloseClient]
    assert relay.closed


def test_pings_and_closes_for_the_leg_mid_frame_wait_for_its_end() -> None:
    relay, peers, rest, _ = streaming()
    ping = relay.ping(Side.UPSTREAM)  # keepalive toward the leg the frame is streaming to
    assert ping == []
    upstream_ping = relay.upstream_data(frame(0x89, b"up?", None))  # answered after the frame
    assert upstream_ping == []
    drain = relay.shutdown()
    assert [type(a) for a in drain] == [SendToClient]  # the client's Close goes at once
    peers.feed(upstream_ping + drain)
    peers.feed(relay.client_data(rest[:-5]))
    peers.feed(relay.client_data(rest[-5:]))
    up = peers.logs["upstream"]
    assert up[0][0].__name__ == "BytesMessage" and up[0][2]  # type: ignore[attr-defined]
    assert [type(e[0]).__name__ for e in up[1:]] == ["Ping", "Pong", "CloseConnection"]
    assert relay.pong_outstanding(Side.UPSTREAM)


def test_the_other_leg_timing_out_mid_frame_drops_the_rest() -> None:
    relay, peers, rest, _ = streaming()
    gone = relay.peer_timed_out(Side.UPSTREAM)
    assert [type(a) for a in gone] == [SendToClient, CloseUpstream]
    assert relay.client_data(rest) == []  # read and dropped: no one to send it to
    end = relay.client_data(frame(0x88, struct.pack("!H", 1000), KEY))
    assert [type(a) for a in end] == [SessionClosed, CloseClient]
    assert end[0].messages_from_client == 0  # type: ignore[attr-defined]


def test_stream_head_and_partial_head_follow_simple_frames_rules() -> None:
    data = frame(0x82, b"a" * 70_000, KEY)
    assert stream_head(data[:14], 0, True) == (0x82, 14, 70_000, KEY)
    assert stream_head(data[:13], 0, True) is None and partial_head(data[:13], 0, True)
    assert not partial_head(frame(0x82, b"a" * 200, None, length_form="64")[:10], 0, False)  # 16 bits held it
    assert not partial_head(frame(0x82, b"a" * 20, KEY, length_form="16")[:5], 0, True)  # not shortest
    assert not partial_head(b"\x81\xfe", 0, True)  # text
    assert not partial_head(b"\x82\x7e", 0, True)  # unmasked from the client
    assert stream_head(frame(0x02, b"a" * 300, None), 0, False) is None  # not final


def test_frame_stream_remasks_at_any_offset() -> None:
    payload = os.urandom(1001)
    theirs, ours = b"\x01\x02\x03\x04", b"\xa0\xb0\xc0\xd0"
    masked = mask(payload, theirs)
    stream = FrameStream(len(payload), theirs, ours)
    out, pos = bytearray(), 0
    for step in (1, 2, 3, 5, 990):
        pos, piece = stream.take(masked[:pos + step], pos)
        out += piece
    assert stream.left == 0 and mask(bytes(out), ours) == payload


@pytest.mark.parametrize("size", [0, 1, 3, 4, 16 * KiB - 1, 16 * KiB, 16 * KiB + 3, 64 * KiB + 10])
def test_mask_is_the_same_xor_at_every_size(size: int) -> None:
    """Large payloads take byte tables, small ones one big int: the same XOR either way."""
    payload, key = random.Random(size).randbytes(size), b"\x00\x7f\x80\xff"
    expected = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    assert mask(payload, key) == expected and mask(expected, key) == payload
