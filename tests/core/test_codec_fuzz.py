"""Differential fuzzing of our codec against h11, and the round-trip property of what we write.

The rule (issue 11): whatever our codec accepts, h11 plus our policy (``core/headers.py``)
must accept too, with the same method, target, version, lower-cased fields and body. Inputs are
seeded mutations of real request heads, response heads and chunked bodies, so a failure names
its seed and is reproducible. CI runs a bounded count; ``pytest -m fuzz_long`` runs a long one.

Intended differences, each normalized in ``_h11_*`` below with its reason:
- h11 lower-cases the Transfer-Encoding value (``CHUNKED`` -> ``chunked``); we keep the field
  as received and re-declare the coding ourselves, so values are compared case-insensitively.
- Informational responses (1xx) are not framed by the codec but by the session (a 101 is only
  taken for an upgrade we asked for, which h11's client refuses otherwise): their heads are
  compared, their bodies are not.
- h11 applies the Content-Length and Transfer-Encoding rules to trailer fields (it refuses a
  trailer ``Transfer-Encoding: gzip`` with 501); we drop request trailers and strip framing
  fields from response trailers, so their values frame nothing. Such trailers are skipped.
- We forward response heads without h11's view of 204/304/HEAD bodies; the body rule is the
  session's and is applied to both sides here (RFC 9112 section 6.3 rules 1-2).
"""

from __future__ import annotations

import random
import time

import h11
import pytest

from nextproxy.core.chunked import ChunkedReader
from nextproxy.core.codec import CHUNKED, UNTIL_CLOSE, RequestParser, parse_response
from nextproxy.core.headers import ClientInfo
from tests.core.header_oracle import check_request, is_upgrade_request, response_headers, upstream_request_headers
from nextproxy.errors import HttpError

CLIENT = ClientInfo(address="192.0.2.7", server_name="edge.test")
CI_SECONDS = 1.0
LONG_COUNT = 200_000

REQUEST_SEEDS = [
    b"GET /ns/sigmai/x?y=1 HTTP/1.1\r\nHost: edge.test\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n",
    b"GET /small HTTP/1.1\r\nHost: edge.test:8443\r\n\r\n",
    b"POST /api HTTP/1.1\r\nHost: edge.test\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhello",
    b"PUT /up HTTP/1.1\r\nHost: edge.test\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: edge.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
    b"GET /old HTTP/1.0\r\nAccept: text/html\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\n\r\n",
    b"DELETE /x HTTP/1.1\r\nHost: EDGE.test.\r\nX-Forwarded-For: 6.6.6.6\r\nCookie: a=1\r\nCookie: b=2\r\n"
    b"Keep-Alive: timeout=5\r\nX_Real_IP: 1.2.3.4\r\n\r\n",
]
RESPONSE_SEEDS = [
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
    b"Connection: keep-alive\r\n\r\nhello world\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html></html>",
    b"HTTP/1.1 204 No Content\r\nDate: Sun, 29 Nov 2026 08:00:00 GMT\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nETag: \"1\"\r\nContent-Length: 99\r\n\r\n",
    b"HTTP/1.1 404\r\nConnection: close, X-Private\r\nX-Private: p\r\nContent-Length: 2\r\n\r\nno",
]
CHUNKED_SEEDS = [
    b"5\r\nhello\r\n0\r\n\r\n",
    b"a;name=value\r\n0123456789\r\n3;q=\"x y\"\r\nabc\r\n0\r\nX-Sum: 9\r\n\r\n",
    b"000001\r\nx\r\nA\r\n0123456789\r\n0\r\n\r\n",
]
ALPHABET = b"\r\n\t :;,=\"\x00\x01\x7f\x80\xff0123456789abcdefABCDEF-_/HTP."
SNIPPETS = [
    b"\r\n", b"\n", b"\r", b" ", b"\t", b"Content-Length: 5\r\n", b"Content-Length: 0\r\n",
    b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip\r\n", b"Host: edge.test\r\n",
    b"Host: other.test\r\n", b"Connection: close\r\n", b"HTTP/1.0", b"HTTP/1.1", b"\r\n\r\n", b"0\r\n\r\n",
    b"X-A: \x80\xff\r\n", b"Expect: 100-continue\r\n", b"Connection: x-a\r\nX-A: 1\r\n",
]  # fmt: skip


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to three edits: byte insert, delete, replace, snippet insert, line duplicate, case flip."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        pos = rng.randrange(len(out) + 1)
        op = rng.randrange(6)
        if op == 0:
            out[pos:pos] = bytes([rng.choice(ALPHABET)])
        elif op == 1 and out:
            del out[min(pos, len(out) - 1)]
        elif op == 2 and out:
            out[min(pos, len(out) - 1)] = rng.choice(ALPHABET)
        elif op == 3:
            out[pos:pos] = rng.choice(SNIPPETS)
        elif op == 4:
            lines = bytes(out).split(b"\r\n")
            index = rng.randrange(len(lines))
            lines.insert(index, lines[index])
            out = bytearray(b"\r\n".join(lines))
        elif out:
            index = min(pos, len(out) - 1)
            out[index : index + 1] = bytes(out[index : index + 1]).swapcase()
    return bytes(out)


Parsed = tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]], bytes]


def _canonical(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(n, v.lower() if n == b"transfer-encoding" else v) for n, v in fields]


def ours_request(data: bytes) -> tuple[Parsed, bytes] | None:
    """(method, target, version, fields, body) and the forwarded head if our codec accepts ``data``."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    try:
        head = RequestParser(CLIENT).parse(data[: end + 4])
    except HttpError:
        return None
    if head.misdirected:
        return None
    body = _ours_body(head.length, data[end + 4 :])
    if body is None:
        return None
    forwarded = head.method + b" " + head.target + b" HTTP/1.1\r\n" + head.forward
    return (head.method, head.target, head.version, head.fields, body), forwarded


def _ours_body(length: int, rest: bytes) -> bytes | None:
    if length == CHUNKED:
        reader, pieces = ChunkedReader(65536), []
        try:
            reader.feed(rest, pieces)
        except HttpError:
            return None
        return b"".join(pieces) if reader.done else None
    if length == UNTIL_CLOSE:
        return rest
    return rest[:length] if len(rest) >= length else None


def h11_request(data: bytes) -> Parsed | None:
    """The same facts from h11, then our policy's refusals (``check_request``)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        request = conn.next_event()
        if not isinstance(request, h11.Request):
            return None
        body = b""
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return None
        fields = list(request.headers)
        check_request(request.method, request.target, fields, CLIENT)
    except (h11.RemoteProtocolError, HttpError):
        return None
    return request.method, request.target, request.http_version, fields, body


def h11_fields(head: bytes, *, response: bool = False) -> list[tuple[bytes, bytes]]:
    """h11's parse of a head we wrote (it must parse)."""
    if response:
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
    else:
        conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    event = conn.next_event()
    assert isinstance(event, (h11.Request, h11.Response)), head
    return list(event.headers)


def check_request_case(data: bytes) -> bool:
    mine = ours_request(data)
    if mine is None:
        return False
    parsed, forwarded = mine
    theirs = h11_request(data)
    assert theirs is not None, f"we accept what h11 + policy refuse: {data!r}"
    method, target, version, fields, body = parsed
    assert (method, target, version, _canonical(fields), body) == (*theirs[:3], _canonical(theirs[3]), theirs[4]), data
    # The policy: what we forward is what core/headers.py makes of h11's parse, and h11
    # re-parses our head to exactly those fields (the round-trip property).
    upgrade = is_upgrade_request(theirs[0], theirs[3], theirs[2])
    expected = upstream_request_headers(theirs[3], CLIENT, upgrade=upgrade)
    if version == b"1.0" and not any(n == b"host" for n, _ in fields):
        forwarded = forwarded.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nhost: u\r\n", 1)
        expected = [(b"host", b"u")] + expected
    assert _canonical(h11_fields(forwarded)) == _canonical([(n.lower(), v) for n, v in expected]), data
    return True


def check_response_case(data: bytes) -> bool:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False
    try:
        head = parse_response(data[: end + 4])
    except HttpError:
        return False
    rest = data[end + 4 :]
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        raise AssertionError(f"we accept a response h11 refuses: {data!r}") from None
    if head.status < 200:
        return True  # informational: framed by the session, not compared (see module docstring)
    assert isinstance(event, h11.Response), data
    response = event
    assert (head.status, head.reason, head.version) == (event.status_code, event.reason, event.http_version), data
    assert _canonical(head.fields) == _canonical(list(event.headers)), data
    length = 0 if head.status in (204, 304) else head.length
    ours = _ours_body(length, rest)
    if ours is None:
        return False
    body = b""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            if length == CHUNKED and _framing_in_trailer(rest):
                return True  # intended difference (module docstring)
            raise
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
        else:
            raise AssertionError(f"h11 did not finish a body we finished: {data!r} {event!r}")
    assert ours == body, data
    written = b"HTTP/1.1 200 OK\r\n" + head.lines + b"\r\n"
    expected = [(n, v) for n, v in response_headers(list(response.headers), upgrade=False) if n != b"transfer-encoding"]
    assert h11_fields(written, response=True) == [(n.lower(), v) for n, v in expected], data
    return True


def check_chunked_case(data: bytes) -> bool:
    request = b"POST / HTTP/1.1\r\nHost: edge.test\r\nTransfer-Encoding: chunked\r\n\r\n" + data
    mine = ours_request(request)
    if mine is None:
        return False
    theirs = h11_request(request)
    if theirs is None and _framing_in_trailer(data):
        return True  # intended difference (module docstring)
    assert theirs is not None and theirs[4] == mine[0][4], data
    return True


def _framing_in_trailer(body: bytes) -> bool:
    reader = ChunkedReader(65536)
    reader.feed(body, [])
    names = [line.partition(b":")[0].lower() for line in reader.trailer.split(b"\r\n")]
    return b"content-length" in names or b"transfer-encoding" in names


CASES = [(REQUEST_SEEDS, check_request_case), (RESPONSE_SEEDS, check_response_case), (CHUNKED_SEEDS, check_chunked_case)]


def run(seeds: list[bytes], check: object, *, seconds: float | None = None, count: int = LONG_COUNT) -> tuple[int, int]:
    """Mutate seeds with a fixed RNG seed until the time or the count runs out; (tried, accepted)."""
    assert callable(check)
    for seed in seeds:
        assert check(seed), f"a seed must be accepted: {seed!r}"
    rng = random.Random(11)
    deadline = time.monotonic() + seconds if seconds is not None else None
    tried = accepted = 0
    while tried < count and (deadline is None or time.monotonic() < deadline):
        data = mutate(rng, rng.choice(seeds))
        tried += 1
        accepted += bool(check(data))
    return tried, accepted


@pytest.mark.parametrize(("seeds", "check"), CASES, ids=["requests", "responses", "chunked"])
def test_differential_against_h11_bounded(seeds: list[bytes], check: object) -> None:
    tried, accepted = run(seeds, check, seconds=CI_SECONDS)
    assert tried > 500 and accepted > tried // 50  # the mutations still reach the accepting paths


@pytest.mark.fuzz_long
@pytest.mark.parametrize(("seeds", "check"), CASES, ids=["requests", "responses", "chunked"])
def test_differential_against_h11_long(seeds: list[bytes], check: object) -> None:
    tried, _ = run(seeds, check)
    assert tried == LONG_COUNT
