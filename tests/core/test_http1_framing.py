"""Response framing through HttpSession: HEAD, 1xx, 204, 304, chunked with trailers, until-close,
HTTP/1.0 clients, and when an upstream connection may go back to the pool.

Every response the session writes is read back by h11 as the client: the property that h11
re-parses our heads (and bodies) to what the upstream meant.
"""

from __future__ import annotations

import h11
import pytest

from nextproxy.core.actions import CloseClient, ReleaseUpstream, RequestCompleted
from tests.core.test_http1 import GET, connect, kinds, session, to_client, to_upstream


def client_view(data: bytes, method: bytes = b"GET") -> tuple[h11.Response, bytes, list[tuple[bytes, bytes]]]:
    """What an h11 client makes of the bytes the session sent it: head, body, trailers."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/", headers=[("host", "x")], ))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    response = client.next_event()
    assert isinstance(response, h11.Response), response
    body = b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(b"")  # a body that ends at close
            continue
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return response, body, list(event.headers)
        else:
            raise AssertionError(event)


def released(actions: list[object]) -> bool:
    return next(a for a in actions if isinstance(a, ReleaseUpstream)).reusable


def test_head_response_with_length_has_no_body_and_keeps_the_upstream() -> None:
    s = session()
    connect(s, GET.replace(b"GET", b"HEAD", 1))
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    response, body, _ = client_view(to_client(out), b"HEAD")
    assert dict(response.headers)[b"content-length"] == b"1000" and body == b""
    assert released(out) and s.idle and CloseClient not in kinds(out)


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_end_at_the_head(status: int) -> None:
    s = session()
    connect(s, GET)
    out = s.upstream_data(b"HTTP/1.1 %d X\r\nContent-Length: 5\r\nETag: \"1\"\r\n\r\n" % status)
    data = to_client(out)
    response, body, _ = client_view(data)
    assert response.status_code == status and body == b""
    assert (b"content-length" in data.lower()) is (status == 304)  # RFC 9110 8.6: never on a 204
    # A 304's Content-Length describes the representation; a 204's declares a body it must not
    # have and may still send, into the next exchange: that connection is not pooled.
    assert released(out) is (status == 304)


def test_informational_hints_are_not_forwarded() -> None:
    s = session()
    connect(s, GET)
    out = s.upstream_data(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert to_client(out).startswith(b"HTTP/1.1 200 OK\r\n")
    assert client_view(to_client(out))[1] == b"ok"


def test_chunked_response_is_reframed_with_its_trailers() -> None:
    s = session()
    connect(s, GET)
    response = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 5\r\nContent-Length: 9\r\n\r\n"
    )
    out: list[object] = []
    for i in range(len(response)):  # a byte at a time
        out += s.upstream_data(response[i : i + 1])
    head, body, trailers = client_view(to_client(out))
    assert body == b"abcde" and trailers == [(b"x-sum", b"5")]
    assert b"trailer" not in dict(head.headers) and released(out)


def test_http10_client_gets_a_body_that_ends_at_close() -> None:
    s = session()
    connect(s, b"GET /ns/sigmai HTTP/1.0\r\n\r\n")
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    data = to_client(out)
    assert b"transfer-encoding" not in data.lower() and b"connection: close" in data.lower()
    assert data.endswith(b"\r\n\r\nhello") and CloseClient in kinds(out)  # h11 cannot be a 1.0 client


def test_http10_request_without_host_gets_the_upstream_authority() -> None:
    s = session()
    _, actions = connect(s, b"GET /ns/sigmai HTTP/1.0\r\nAccept: */*\r\n\r\n")
    sent = to_upstream(actions)
    assert sent.startswith(b"GET /ns/sigmai HTTP/1.1\r\nhost: 127.0.0.1:9\r\nAccept: */*\r\n")


@pytest.mark.parametrize(
    ("response", "reusable"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nEXTRA", False),
    ],
    ids=["keep-alive", "connection-close", "http10", "bytes-past-length", "bytes-past-chunks"],
)
def test_upstream_goes_back_to_the_pool_only_when_nothing_is_unexplained(response: bytes, reusable: bool) -> None:
    s = session()
    connect(s, GET)
    out = s.upstream_data(response)
    assert released(out) is reusable
    assert client_view(to_client(out))[1] == b"ok"
    assert b"EXTRA" not in to_client(out)


def test_client_connection_close_is_honoured_after_the_response() -> None:
    s = session()
    connect(s, GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert b"connection: close" in to_client(out).lower() and CloseClient in kinds(out)
    assert released(out)  # the upstream connection is still good


def test_upstream_answering_before_the_request_body_ends_closes_the_client() -> None:
    s = session()
    head = b"POST /ns/sigmai HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 100\r\n\r\n"
    connect(s, head + b"partial")
    out = s.upstream_data(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    assert to_client(out).startswith(b"HTTP/1.1 413 ") and CloseClient in kinds(out)
    assert not released(out)
    assert [a.status for a in out if isinstance(a, RequestCompleted)] == [413]


def test_pipelined_request_after_a_body_waits_in_the_buffer() -> None:
    s = session()
    post = b"POST /ns/sigmai HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 3\r\n\r\nabc"
    leg, actions = connect(s, post + GET)
    assert to_upstream(actions).endswith(b"\r\n\r\nabc") and b"GET" not in to_upstream(actions)
    assert not s.reading_client
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    out += s.upstream_connected(leg)
    assert to_upstream(out).startswith(b"GET /ns/sigmai/x?y=1 HTTP/1.1\r\n")


def test_head_response_followed_by_a_body_anyway_never_reaches_the_client_or_the_pool() -> None:
    """The httptools failure mode: a HEAD answer's stray body would be read as the next response."""
    s = session()
    connect(s, GET.replace(b"GET", b"HEAD", 1))
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert b"hello" not in to_client(out) and not released(out)
