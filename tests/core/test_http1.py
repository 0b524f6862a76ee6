"""HttpSession fed bytes on both legs; assertions on the exact actions it returns."""

from __future__ import annotations

import base64
import hashlib

import h11
import pytest

from nextproxy.config.model import (
    Address,
    CertificateConfig,
    Config,
    Limits,
    PathRoute,
    PemSource,
    Upstream,
    WebSocketMode,
)
from nextproxy.core.actions import (
    HeadReceived,
    HeadStarted,
    RequestStarted,
    AwaitResponse,
    BodyReceived,
    CloseClient,
    CloseUpstream,
    ConnectUpstream,
    ReleaseUpstream,
    RequestCompleted,
    ResponseStarted,
    SendToClient,
    SendToUpstream,
    StartTunnel,
    StartWebSocket,
)
from nextproxy.core.codec import RequestParser
from nextproxy.core.headers import ClientInfo
from nextproxy.core.http1 import HttpSession, UpstreamLeg
from nextproxy.core.routing import RouteTable

PEM = CertificateConfig(PemSource(b"", "c"), PemSource(b"", "k"))
ROUTES = (
    PathRoute("ns-sigmai", "/ns/sigmai", "ns"),
    PathRoute("tunnel", "/t", "ns", websocket=WebSocketMode.TUNNEL),
)
CONFIG = Config(Address("127.0.0.1", 0), Address("127.0.0.1", 1), (PEM,), (Upstream("ns", (Address("127.0.0.1", 9),)),), ROUTES)
CLIENT = ClientInfo(address="192.0.2.7", server_name="edge.test")


def session(limits: Limits = Limits(), client: ClientInfo = CLIENT) -> HttpSession:
    return HttpSession(RouteTable(CONFIG), None, client, limits)


def to_client(actions: list[object]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, SendToClient))


def to_upstream(actions: list[object]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, SendToUpstream))


def kinds(actions: list[object]) -> list[type]:
    return [type(a) for a in actions if not isinstance(a, (SendToClient, SendToUpstream))]


def parse_request(data: bytes) -> tuple[h11.Request, bytes]:
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    request = server.next_event()
    assert isinstance(request, h11.Request)
    body = b""
    while True:
        event = server.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        else:
            break
    return request, body


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


def connect(s: HttpSession, request: bytes) -> tuple[UpstreamLeg, list[object]]:
    actions = s.client_data(request)
    assert isinstance(actions[-1], ConnectUpstream), actions
    leg = UpstreamLeg("127.0.0.1:9", 65536)
    return leg, s.upstream_connected(leg)


GET = b"GET /ns/sigmai/x?y=1 HTTP/1.1\r\nHost: edge.test\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"


def test_get_round_trip_and_headers_as_upstream_sees_them() -> None:
    s = session()
    leg, actions = connect(s, GET)
    request, _ = parse_request(to_upstream(actions))
    assert request.target == b"/ns/sigmai/x?y=1"
    headers = dict(request.headers)
    assert headers[b"host"] == b"edge.test"
    assert headers[b"x-forwarded-for"] == b"192.0.2.7"
    assert headers[b"x-forwarded-proto"] == b"https"
    assert AwaitResponse in kinds(actions)
    assert s.reading_client  # nothing piled up: the socket stays read while the answer comes
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")
    assert kinds(out) == [ResponseStarted, ReleaseUpstream, RequestCompleted]
    assert to_client(out).startswith(b"HTTP/1.1 200 OK\r\n") and to_client(out).endswith(b"\r\n\r\nok")
    assert out[[type(a) for a in out].index(ReleaseUpstream)] == ReleaseUpstream(reusable=True)
    done = next(a for a in out if isinstance(a, RequestCompleted))
    assert (done.route, done.status, done.bytes_to_client) == ("ns-sigmai", 200, 2)
    assert s.reading_client and s.idle
    assert leg.exchanges == 1


def test_bytes_that_come_while_a_request_is_in_flight_wait_and_stop_the_reading() -> None:
    """A pipelined request sent after the first one's head was forwarded waits in the buffer (the
    shell then pauses the socket) and is forwarded once the first answer is complete."""
    s = session()
    leg, _ = connect(s, GET)
    assert s.reading_client
    assert s.client_data(b"GET /ns/sigmai/second HTTP/1.1\r\nHost: edge.test\r\n\r\n") == []
    assert not s.reading_client
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert [a.status for a in out if isinstance(a, RequestCompleted)] == [200]
    assert isinstance(out[-1], ConnectUpstream)  # the second request, taken from the buffer
    assert to_upstream(s.upstream_connected(leg)).startswith(b"GET /ns/sigmai/second HTTP/1.1\r\n")
    assert s.reading_client


def test_eof_while_a_request_is_in_flight_closes_after_its_answer() -> None:
    s = session()
    connect(s, GET)
    assert s.client_data(b"") == []  # the client half-closed: the answer still goes out
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert to_client(out).endswith(b"ok") and kinds(out)[-1] is CloseClient


@pytest.mark.parametrize("end", ["eof", "drain"])
def test_eof_or_drain_after_the_response_head_closes_after_the_response(end: str) -> None:
    """The close decided at the head is not the last chance: a half-close or a drain that comes
    while the body streams ends the connection with the response, not at the idle timeout."""
    s = session()
    leg, _ = connect(s, GET)
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nok")
    assert b"connection: close" not in to_client(out).lower()  # keep-alive, as far as the head goes
    assert (s.client_data(b"") if end == "eof" else s.drain()) == []
    out = s.upstream_data(b"ok")
    assert to_client(out) == b"ok" and kinds(out)[-1] is CloseClient
    assert out[[type(a) for a in out].index(ReleaseUpstream)] == ReleaseUpstream(reusable=True)


def test_a_pipelined_request_waiting_at_a_drain_is_still_answered_then_closed() -> None:
    s = session()
    leg, _ = connect(s, GET)
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nok")
    s.client_data(b"GET /ns/sigmai/second HTTP/1.1\r\nHost: edge.test\r\n\r\n")
    assert s.drain() == []
    out = s.upstream_data(b"ok")
    assert CloseClient not in kinds(out) and isinstance(out[-1], ConnectUpstream)
    s.upstream_connected(leg)
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert b"connection: close" in to_client(out).lower() and kinds(out)[-1] is CloseClient


def test_a_client_gone_mid_exchange_is_reported_and_its_upstream_not_reused() -> None:
    s = session()
    connect(s, GET)
    out = s.client_gone()
    assert out[0] == ReleaseUpstream(reusable=False)
    [done] = [a for a in out if isinstance(a, RequestCompleted)]
    assert (done.status, done.reason) == (499, "client closed the connection")
    assert not s.reading_client and s.client_gone() == []  # once
    s = session()
    connect(s, GET)
    s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    [done] = [a for a in s.client_gone() if isinstance(a, RequestCompleted)]
    assert (done.status, done.bytes_to_client) == (200, 4)  # what went out, cut short


def test_keep_alive_second_request_on_the_same_connection() -> None:
    s = session()
    leg, _ = connect(s, GET)
    s.upstream_data(b"HTTP/1.1 204 No Content\r\n\r\n")
    actions = s.client_data(GET)
    assert isinstance(actions[-1], ConnectUpstream)
    out = s.upstream_connected(leg)  # the pooled leg, cycled
    assert to_upstream(out).startswith(b"GET /ns/sigmai/x?y=1 HTTP/1.1")


def test_pipelined_requests_are_served_in_order() -> None:
    s = session()
    actions = s.client_data(GET + GET.replace(b"/x?y=1", b"/second"))
    assert [type(a) for a in actions] == [RequestStarted, ConnectUpstream]
    leg = UpstreamLeg("u", 65536)
    s.upstream_connected(leg)
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(out[-1], ConnectUpstream)  # the second request, only after the first response
    out = s.upstream_connected(leg)
    assert b"GET /ns/sigmai/second" in to_upstream(out)


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GET /nope HTTP/1.1\r\nHost: edge.test\r\n\r\n", 404),
        (b"GET /ns/sigmaix HTTP/1.1\r\nHost: edge.test\r\n\r\n", 404),
        (b"GET /ns/sigmai/../x HTTP/1.1\r\nHost: edge.test\r\n\r\n", 400),
        (b"GET /ns/sigmai HTTP/1.1\r\nHost: other.test\r\n\r\n", 421),
        (b"GET /ns/sigmai HTTP/1.1\r\n\r\n", 400),
        (b"POST /ns/sigmai HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /ns/sigmai HTTP/1.1\r\nHost: edge.test\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n", 431),
        (b"CONNECT edge.test:443 HTTP/1.1\r\nHost: edge.test\r\n\r\n", 405),
        (b"CONNECT /ns/sigmai HTTP/1.1\r\nHost: edge.test\r\n\r\n", 405),
    ],
    ids=[
        "no-route", "not-a-segment", "dot-segment", "host-sni", "no-host", "cl-te", "garbage", "huge-head", "connect",
        "connect-path",
    ],  # fmt: skip
)
def test_refusals(request_bytes: bytes, status: int) -> None:
    s = session()
    actions = s.client_data(request_bytes)
    data = to_client(actions)
    assert status_of(data) == status
    assert len([a for a in actions if isinstance(a, SendToClient)]) == 1  # one write
    assert b"content-type: text/plain" in data.lower()
    assert not any(isinstance(a, ConnectUpstream) for a in actions)
    done = next(a for a in actions if isinstance(a, RequestCompleted))
    assert done.status == status


def test_404_keeps_the_connection_but_400_closes_it() -> None:
    s = session()
    actions = s.client_data(b"GET /nope HTTP/1.1\r\nHost: edge.test\r\n\r\n")
    assert CloseClient not in kinds(actions)
    assert isinstance(s.client_data(GET)[-1], ConnectUpstream)
    s2 = session()
    assert CloseClient in kinds(s2.client_data(b"GET /ns/../x HTTP/1.1\r\nHost: edge.test\r\n\r\n"))


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /nope HTTP/1.1\r\nHost: edge.test\r\nConnection: close\r\n\r\n",
        b"GET /nope HTTP/1.0\r\n\r\n",
        b"GET /nope HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",  # refusals keep only 1.1 connections
    ],
    ids=["connection-close", "http-1.0", "http-1.0-keep-alive"],
)
def test_a_refusal_closes_when_the_request_did_not_ask_to_keep_the_connection(request_head: bytes) -> None:
    """RFC 9112 section 9.6: after a request with Connection: close (or an HTTP/1.0 one) the
    server closes once it has answered, its own 404 included, and says so."""
    actions = session().client_data(request_head)
    assert status_of(to_client(actions)) == 404
    assert b"connection: close" in to_client(actions).lower()
    assert kinds(actions)[-1] is CloseClient


def test_http_1_0_keep_alive_is_honoured_when_the_body_has_a_length() -> None:
    """Found by interop testing: an HTTP/1.0 request with Connection: keep-alive got
    connection: close (nginx keeps it, and ab -k and old clients count on it). It is kept, and
    said to be, when the response has a length; a body that ends at close, or would be chunked
    (which HTTP/1.0 cannot read), still closes."""
    request = b"GET /ns/sigmai/a HTTP/1.0\r\nHost: edge.test\r\nConnection: keep-alive\r\n\r\n"
    s = session()
    _, actions = connect(s, request)
    assert b"keep-alive" not in to_upstream(actions).lower()  # hop-by-hop: not forwarded
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert b"\r\nconnection: keep-alive\r\n" in to_client(out) and CloseClient not in kinds(out)
    assert isinstance(s.client_data(request)[-1], ConnectUpstream)  # the next request, same connection
    s = session()
    connect(s, request)
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    assert b"\r\nconnection: close\r\n" in to_client(out) and kinds(out)[-1] is CloseClient
    s = session()
    connect(s, request.replace(b"Connection: keep-alive", b"Connection: keep-alive, close"))
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert b"\r\nconnection: close\r\n" in to_client(out) and kinds(out)[-1] is CloseClient


def test_upstream_unreachable_is_502_and_timeout_504() -> None:
    s = session()
    s.client_data(GET)
    out = s.upstream_failed("upstream unreachable")
    assert status_of(to_client(out)) == 502
    s = session()
    s.client_data(GET)
    assert status_of(to_client(s.upstream_failed("connect timed out", timeout=True))) == 504
    s = session()
    connect(s, GET)
    out = s.upstream_timeout()
    assert status_of(to_client(out)) == 504 and ReleaseUpstream(reusable=False) in out


def test_broken_upstream_response_is_502() -> None:
    s = session()
    connect(s, GET)
    out = s.upstream_data(b"NOT HTTP\r\n\r\n")
    assert status_of(to_client(out)) == 502


def test_upstream_dying_mid_body_cuts_the_client() -> None:
    s = session()
    connect(s, GET)
    s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    out = s.upstream_data(b"")
    assert CloseClient in kinds(out) and to_client(out) == b""


def test_dead_pooled_connection_is_retried_once_for_idempotent_requests() -> None:
    s = session()
    leg, _ = connect(s, GET)
    s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    s.client_data(GET)
    s.upstream_connected(leg)  # reused leg (exchanges == 1)
    out = s.upstream_data(b"")  # the upstream had closed it while idle
    assert out[-1] == ConnectUpstream(ROUTES[0], fresh=True)
    fresh = UpstreamLeg("u", 65536)
    s.upstream_connected(fresh)
    out = s.upstream_data(b"")
    assert status_of(to_client(out)) == 502  # a fresh connection failing is not retried


def test_request_bodies_stream_content_length_and_chunked() -> None:
    s = session()
    head = b"POST /ns/sigmai HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 10\r\n\r\n"
    leg, actions = connect(s, head + b"01234")
    assert s.reading_client
    first = to_upstream(actions)
    assert first.endswith(b"01234")
    out = s.client_data(b"56789")
    assert to_upstream(out) == b"56789" and AwaitResponse in kinds(out)

    s = session()
    head = b"POST /ns/sigmai HTTP/1.1\r\nHost: edge.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    leg, actions = connect(s, head)
    out = s.client_data(b"5\r\nhello\r\n0\r\n\r\n")
    request, body = parse_request(to_upstream(actions) + to_upstream(out))
    assert body == b"hello" and (b"transfer-encoding", b"chunked") in request.headers


def test_a_response_that_starts_before_the_request_body_ends_says_so() -> None:
    """The shell keeps the body's fixed deadline while ``uploading``; ``BodyReceived`` hands the
    connection back to the quiet timer once the body is whole."""
    s = session()
    head = b"POST /ns/sigmai/echo HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 4\r\n\r\n"
    connect(s, head + b"ab")
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n")
    assert out[0] == ResponseStarted(200, uploading=True)
    assert b"\r\nconnection: close\r\n" in to_client(out)  # an early answer ends the connection
    out = s.client_data(b"cd")
    assert kinds(out) == [BodyReceived] and to_upstream(out) == b"cd"
    out = s.upstream_data(b"2\r\ncd\r\n0\r\n\r\n")
    assert kinds(out) == [ReleaseUpstream, RequestCompleted, CloseClient]
    # A whole request answered: no upload in progress, no BodyReceived.
    s = session()
    connect(s, GET)
    assert s.upstream_data(b"HTTP/1.1 204 No Content\r\n\r\n")[0] == ResponseStarted(204, uploading=False)


def test_an_early_answer_says_connection_close_before_closing() -> None:
    """An upstream refusing a body it has not read (413) ends the connection: the client is
    told in the head, not only by the close that follows (RFC 9112 section 9.6)."""
    s = session()
    connect(s, b"POST /ns/sigmai HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 100\r\n\r\nab")
    out = s.upstream_data(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
    assert to_client(out).startswith(b"HTTP/1.1 413 ") and b"\r\nconnection: close\r\n" in to_client(out)
    assert kinds(out)[-1] is CloseClient


def test_a_body_timeout_is_a_408_before_the_response_and_a_cut_after_it() -> None:
    s = session()
    head = b"POST /ns/sigmai/upload HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 4\r\n\r\n"
    connect(s, head + b"ab")
    out = s.body_timed_out("ns-sigmai")
    assert to_client(out).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert kinds(out) == [RequestCompleted, CloseUpstream, CloseClient]
    done = out[1]
    assert isinstance(done, RequestCompleted) and (done.status, done.bytes_from_client) == (408, 2)

    s = session()
    connect(s, head + b"ab")
    s.upstream_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n")
    out = s.body_timed_out("ns-sigmai")
    assert to_client(out) == b""  # a response is on its way: no second head, no final chunk
    assert kinds(out) == [ReleaseUpstream, RequestCompleted, CloseClient]
    assert out[0] == ReleaseUpstream(reusable=False)
    done = out[1]
    assert isinstance(done, RequestCompleted)
    assert (done.status, done.reason, done.bytes_to_client) == (200, "request body timed out", 2)


def test_an_empty_line_after_a_request_starts_no_request() -> None:
    """Some clients end a POST body with an extra CRLF (RFC 9112 section 2.2 asks a server to
    ignore it): it must not start a request, whose timer would then end the kept connection
    with a 408 instead of letting it idle."""
    s = session()
    post = b"POST /ns/sigmai HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 2\r\n\r\nok"
    connect(s, post + b"\r\n")
    out = s.upstream_data(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert kinds(out) == [ResponseStarted, ReleaseUpstream, RequestCompleted]  # no RequestStarted
    # Empty lines on an idle connection are skipped but start the head's fixed clock (found by
    # review: they pushed the idle timer back, so a CRLF per client_idle held it forever).
    assert kinds(s.client_data(b"\r\n")) == [RequestStarted, HeadStarted]
    assert s.client_data(b"\r\n") == []  # the same clock runs on
    actions = s.client_data(GET)
    assert kinds(actions) == [RequestStarted, HeadReceived, ConnectUpstream]
    leg = UpstreamLeg("127.0.0.1:9", 65536)
    actions = s.upstream_connected(leg)
    assert parse_request(to_upstream(actions))[0].target == b"/ns/sigmai/x?y=1"


def test_empty_lines_that_time_out_close_quietly() -> None:
    """Empty lines alone run the head's clock (above), but its end is no 408: no request came,
    and a 408 sent then could meet the client's next request on the wire. A CR and its LF in two
    reads (two TLS records) are the same empty line (found by review: it became a 408)."""
    for reads in ([b"\r\n"], [b"\r", b"\n"], [b"\r\n\r", b"\n"]):
        s = session()
        actions = [action for data in reads for action in s.client_data(data)]
        assert kinds(actions) == [RequestStarted, HeadStarted]
        out = s.head_timed_out()
        assert kinds(out) == [CloseClient] and to_client(out) == b""
    s = session()
    s.client_data(b"\r\nGET /ns/sig")  # a request began after the empty line: a slowloris's 408
    out = s.head_timed_out()
    assert status_of(to_client(out)) == 408 and kinds(out)[-1] is CloseClient
    s = session()
    s.client_data(b"\r")  # a bare CR, never completed, is no empty line either
    assert status_of(to_client(s.head_timed_out())) == 408


def test_a_request_pipelined_behind_a_kept_refusal_starts_its_own_clock() -> None:
    """Without its RequestStarted the shell would leave the refusal's quiet timer running, which
    every trickled body byte pushes back: the request_body bound would never apply."""
    s = session()
    post = b"POST /ns/sigmai HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 10\r\n\r\nab"
    actions = s.client_data(b"GET /nowhere HTTP/1.1\r\nHost: edge.test\r\n\r\n" + post)
    assert kinds(actions) == [RequestStarted, RequestCompleted, RequestStarted, ConnectUpstream]
    assert status_of(to_client(actions)) == 404


@pytest.mark.parametrize("offer, status", [
    (b"", 400), (b",", 400), (b"a b", 400), (b"chat/1", 400),
    (b"chat", 0), (b"chat, superchat", 0), (b" a ,b", 0), (b"a,,b", 0),
])  # fmt: skip
def test_a_websocket_subprotocol_offer_must_be_a_token_list(offer: bytes, status: int) -> None:
    """An empty or malformed offer is the client's 400, before any upstream is asked (it was
    forwarded, and the upstream's answer then judged an invalid 101: a 502 on the route)."""
    s = session()
    out = s.client_data(
        b"GET /ns/sigmai/ws HTTP/1.1\r\nHost: edge.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: " + offer + b"\r\n\r\n"
    )
    if status:
        assert status_of(to_client(out)) == 400 and ConnectUpstream not in kinds(out)
    else:
        assert isinstance(out[-1], ConnectUpstream)


@pytest.mark.parametrize("framing, reusable", [
    (b"", True), (b"Content-Length: 0\r\n", True), (b"Content-Length: 5\r\n", False), (b"Transfer-Encoding: chunked\r\n", False),
])  # fmt: skip
def test_a_204_that_declares_a_body_is_not_pooled(framing: bytes, reusable: bool) -> None:
    """Its body, if the upstream sends it after all, would be the next client's response."""
    s = session()
    connect(s, GET)
    out = s.upstream_data(b"HTTP/1.1 204 No Content\r\n" + framing + b"\r\n")
    assert ReleaseUpstream(reusable=reusable) in out
    assert to_client(out) == b"HTTP/1.1 204 No Content\r\n\r\n"  # no framing fields: there is no body


@pytest.mark.parametrize("target, forwarded", [
    (b"http://edge.test/ns/sigmai/x?y=1", b"/ns/sigmai/x?y=1"),
    (b"HTTPS://edge.test:443/ns/sigmai?q", b"/ns/sigmai?q"),
])  # fmt: skip
def test_absolute_form_is_accepted_and_its_authority_is_the_host(target: bytes, forwarded: bytes) -> None:
    """RFC 9112 section 3.2.2: a server MUST accept absolute-form, and use its authority as the
    Host, ignoring the Host field sent (which here names another server)."""
    s = session()
    leg, actions = connect(s, b"GET " + target + b" HTTP/1.1\r\nHost: other.test\r\nX-A: 1\r\n\r\n")
    request, _ = parse_request(to_upstream(actions))
    assert request.target == forwarded
    assert dict(request.headers)[b"host"] == target.split(b"/")[2] and dict(request.headers)[b"x-a"] == b"1"


@pytest.mark.parametrize("target, status", [
    (b"https://other.test/ns/sigmai", 421),  # the authority, not Host, must match the SNI
    (b"https://edge.test", 404),  # path "/"
    (b"http://user@edge.test/ns/sigmai", 400),  # userinfo: refused, as RFC 9110 section 4.2.4 asks
    (b"ftp://edge.test/ns/sigmai", 400),
])  # fmt: skip
def test_absolute_form_refusals(target: bytes, status: int) -> None:
    s = session()
    out = s.client_data(b"GET " + target + b" HTTP/1.1\r\nHost: edge.test\r\n\r\n")
    assert status_of(to_client(out)) == status and ConnectUpstream not in kinds(out)


def test_read_until_close_response_becomes_chunked_for_the_client() -> None:
    s = session()
    connect(s, GET)
    out = s.upstream_data(b"HTTP/1.0 200 OK\r\n\r\npart1")
    out += s.upstream_data(b"part2")
    out += s.upstream_data(b"")
    data = to_client(out)
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    events = []
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            break
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            break
    assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == b"part1part2"
    assert isinstance(events[-1], h11.EndOfMessage)


def test_expect_100_continue_is_relayed() -> None:
    s = session()
    head = b"PUT /ns/sigmai HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    leg, actions = connect(s, head)
    assert b"expect: 100-continue" in to_upstream(actions).lower()
    out = s.upstream_data(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert to_client(out).startswith(b"HTTP/1.1 100 ")
    assert to_upstream(s.client_data(b"abc")) == b"abc"


def accept_for(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())


UPGRADE = (
    b"GET /ns/sigmai/ws HTTP/1.1\r\nHost: edge.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
)


def test_websocket_upgrade_hands_over_with_leftovers() -> None:
    s = session()
    leg, actions = connect(s, UPGRADE + b"\x81\x85early")
    request, _ = parse_request(to_upstream(actions))
    headers = dict(request.headers)
    assert headers[b"upgrade"].lower() == b"websocket" and b"upgrade" in headers[b"connection"].lower()
    assert b"sec-websocket-extensions" not in headers
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_for(b"dGhlIHNhbXBsZSBub25jZQ==") + b"\r\nSec-WebSocket-Protocol: chat\r\n\r\n\x81\x02hi"
    )
    out = s.upstream_data(answer)
    assert to_client(out).startswith(b"HTTP/1.1 101 ")
    start = out[-1]
    assert isinstance(start, StartWebSocket)
    assert (start.from_client, start.from_upstream, start.subprotocol) == (b"\x81\x85early", b"\x81\x02hi", "chat")


def test_an_http10_upgrade_request_is_a_plain_request() -> None:
    """RFC 9110 section 7.8: a server MUST ignore Upgrade in an HTTP/1.0 request (RFC 6455
    section 4.1 asks for HTTP/1.1): forwarded without Upgrade, and a 101 to it is a 502."""
    request = UPGRADE.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    assert not RequestParser(CLIENT).parse(request).upgrade
    s = session()
    leg, actions = connect(s, request)
    upstream, _ = parse_request(to_upstream(actions))
    headers = dict(upstream.headers)
    assert b"upgrade" not in headers and b"connection" not in headers
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_for(b"dGhlIHNhbXBsZSBub25jZQ==") + b"\r\n\r\n"
    )
    out = s.upstream_data(answer)
    assert status_of(to_client(out)) == 502 and not any(isinstance(a, (StartWebSocket, StartTunnel)) for a in out)


def test_tunnel_route_and_bad_accept() -> None:
    s = session()
    connect(s, UPGRADE.replace(b"/ns/sigmai/ws", b"/t"))
    good = b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept_for(b"dGhlIHNhbXBsZSBub25jZQ==") + b"\r\n\r\n"
    assert isinstance(s.upstream_data(good)[-1], StartTunnel)
    s = session()
    connect(s, UPGRADE)
    bad = b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: d3Jvbmc=\r\n\r\n"
    assert status_of(to_client(s.upstream_data(bad))) == 502


def test_upgrade_refused_during_drain_with_503() -> None:
    s = session()
    s.draining = s.refusing_upgrades = True  # as the shell sets them on a draining runtime
    data = to_client(s.client_data(UPGRADE))
    assert status_of(data) == 503 and b"retry-after" in data.lower()


def test_a_reload_ends_keep_alive_after_the_exchange_and_refuses_upgrades() -> None:
    """A replaced configuration (a revoked allow-list...) must not live on in a kept-alive
    connection: idle, it closes; busy, its response says close; an upgrade asked on it gets
    503, since the WebSocket session would live on the replaced configuration (found by review:
    upgrades were still served)."""
    s = session()
    assert s.drain() == [CloseClient()]  # idle: closed now
    s = session()
    connect(s, GET)
    s.client_data(UPGRADE)  # pipelined behind the exchange in flight
    assert s.drain() == []  # busy: after this exchange
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert b"\r\nconnection: close\r\n" in to_client(out) and kinds(out)[-1] is CloseClient


def test_drain_closes_idle_and_marks_busy_responses_close() -> None:
    s = session()
    assert kinds(s.drain()) == [CloseClient]
    s = session()
    connect(s, GET)
    assert s.drain() == []
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert b"connection: close" in to_client(out).lower() and CloseClient in kinds(out)


def test_a_drain_answers_a_request_whose_head_is_arriving() -> None:
    """A head half-received is a request in flight: closing under it lost it (found by review:
    a reload closed such a connection as idle, without a line). Empty lines are no head."""
    s = session()
    s.client_data(GET[:10])
    assert s.drain() == []
    assert kinds(s.client_data(GET[10:])) == [HeadReceived, ConnectUpstream]
    s.upstream_connected(UpstreamLeg("127.0.0.1:9", 65536))
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert b"\r\nconnection: close\r\n" in to_client(out) and kinds(out)[-1] is CloseClient
    s = session()
    s.client_data(b"\r\n\r\n")
    assert kinds(s.drain()) == [CloseClient]


def test_client_eof_while_idle_closes() -> None:
    s = session()
    assert kinds(s.client_data(b"")) == [CloseClient]


def test_byte_at_a_time_request() -> None:
    s = session()
    actions: list[object] = []
    for i in range(len(GET)):
        actions += s.client_data(GET[i : i + 1])
    assert isinstance(actions[-1], ConnectUpstream)


def test_awaiting_head_tracks_a_partial_request_head() -> None:
    s = session()
    assert not s.awaiting_head
    assert kinds(s.client_data(GET[:10])) == [RequestStarted, HeadStarted]
    assert s.awaiting_head and s.idle
    assert kinds(s.client_data(GET[10:20])) == []  # more bytes do not restart the head's clock
    assert kinds(s.client_data(GET[20:])) == [HeadReceived, ConnectUpstream]
    assert not s.awaiting_head and not s.idle


def test_a_whole_head_in_one_read_reports_no_head_timer() -> None:
    assert kinds(session().client_data(GET)) == [RequestStarted, ConnectUpstream]
