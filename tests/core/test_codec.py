"""The hostile-input corpus (issue 11): every refusal class, for requests and upstream responses.

Each row is fed to a real HttpSession; the assertions are the status the client gets and the
proof that nothing reached the other side: no SendToUpstream for a refused request head, no
complete request (h11 on the upstream side sees no end of message) for a refused chunked body,
and none of a refused response's bytes in what the client receives.
"""

from __future__ import annotations

import h11
import pytest

from nextproxy.config import Limits
from nextproxy.core.actions import (
    CloseClient,
    ConnectUpstream,
    ReleaseUpstream,
    RequestCompleted,
    SendToUpstream,
    StartTunnel,
    StartWebSocket,
)
from nextproxy.core.chunked import MAX_CHUNK_LINE
from nextproxy.core.codec import CHUNKED, RequestParser, invalid_switch, parse_response
from nextproxy.errors import HttpError
from tests.core.test_http1 import CLIENT, GET, UPGRADE, accept_for, connect, kinds, session, status_of, to_client, to_upstream

HOST = b"Host: edge.test\r\n"
LINE = b"POST /ns/sigmai HTTP/1.1\r\n"


def head(*fields: bytes, line: bytes = LINE) -> bytes:
    return line + b"".join(fields) + b"\r\n"


REQUESTS: list[tuple[str, bytes, int]] = [
    ("bare-lf", b"GET /ns/sigmai HTTP/1.1\nHost: edge.test\n\n", 400),
    ("bare-lf-inside", head(b"Host: edge.test\nX-A: 1\r\n"), 400),
    ("bare-lf-partial", b"GET /ns/sigmai HTTP/1.1\nHost: e", 400),
    ("bare-cr", head(b"Host: edge.test\rX-A: 1\r\n"), 400),
    ("bare-cr-request-line", b"GET /ns/sigmai HTTP/1.1\r" + HOST + b"\r\n", 400),
    ("obs-fold", head(HOST, b"X-A: 1\r\n", b"  2\r\n"), 400),
    ("obs-fold-tab", head(HOST, b"X-A: 1\r\n", b"\t2\r\n"), 400),
    ("ctl-0x01", head(HOST, b"X-A: a\x01b\r\n"), 400),
    ("nul", head(HOST, b"X-A: a\x00b\r\n"), 400),
    ("del", head(HOST, b"X-A: a\x7fb\r\n"), 400),
    ("ctl-in-target", b"GET /ns/sigmai/\x01 HTTP/1.1\r\n" + HOST + b"\r\n", 400),
    ("space-before-colon", head(b"Host : edge.test\r\n"), 400),
    ("tab-before-colon", head(HOST, b"X-A\t: 1\r\n"), 400),
    ("name-paren", head(HOST, b"X(A): 1\r\n"), 400),
    ("name-space", head(HOST, b"X A: 1\r\n"), 400),
    ("name-obs-text", head(HOST, b"X\xe9: 1\r\n"), 400),
    ("empty-name", head(HOST, b": 1\r\n"), 400),
    ("no-colon", head(HOST, b"X-A 1\r\n"), 400),
    ("fragment", head(HOST, line=b"GET /ns/sigmai/x#frag HTTP/1.1\r\n"), 400),
    ("leading-bare-lf", b"\n" + head(HOST), 400),
    ("leading-bare-cr", b"\r" + head(HOST), 400),
    ("lower-case-version", head(HOST, line=b"GET /ns/sigmai http/1.1\r\n"), 400),
    ("http-1.2", head(HOST, line=b"GET /ns/sigmai HTTP/1.2\r\n"), 505),
    ("http-2.0", head(HOST, line=b"GET /ns/sigmai HTTP/2.0\r\n"), 505),
    ("http-0.9", head(HOST, line=b"GET /ns/sigmai HTTP/0.9\r\n"), 505),
    ("http-3", head(HOST, line=b"GET /ns/sigmai HTTP/3\r\n"), 505),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    ("cl-list", head(HOST, b"Content-Length: 5, 5\r\n"), 400),
    ("cl-identical-duplicates", head(HOST, b"Content-Length: 5\r\n", b"Content-Length: 5\r\n"), 400),
    ("cl-different-duplicates", head(HOST, b"Content-Length: 5\r\n", b"Content-Length: 6\r\n"), 400),
    ("cl-plus", head(HOST, b"Content-Length: +5\r\n"), 400),
    ("cl-negative", head(HOST, b"Content-Length: -1\r\n"), 400),
    ("cl-hex", head(HOST, b"Content-Length: 0x5\r\n"), 400),
    ("cl-empty", head(HOST, b"Content-Length: \r\n"), 400),
    ("cl-19-digits", head(HOST, b"Content-Length: 1000000000000000000\r\n"), 400),
    ("cl-unicode-digit", head(HOST, b"Content-Length: \xd9\xa5\r\n"), 400),
    ("te-gzip", head(HOST, b"Transfer-Encoding: gzip\r\n"), 501),
    ("te-identity", head(HOST, b"Transfer-Encoding: identity\r\n"), 501),
    ("te-chunked-param", head(HOST, b"Transfer-Encoding: chunked;q=1\r\n"), 501),
    ("te-combination", head(HOST, b"Transfer-Encoding: gzip, chunked\r\n"), 400),
    ("te-chunked-twice-list", head(HOST, b"Transfer-Encoding: chunked, chunked\r\n"), 400),
    ("te-chunked-twice-fields", head(HOST, b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: chunked\r\n"), 400),
    ("te-two-fields", head(HOST, b"Transfer-Encoding: gzip\r\n", b"Transfer-Encoding: chunked\r\n"), 400),
    ("cl-te", head(HOST, b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n"), 400),
    ("te-cl", head(HOST, b"Transfer-Encoding: chunked\r\n", b"Content-Length: 3\r\n"), 400),
    ("te-on-1.0", head(HOST, b"Transfer-Encoding: chunked\r\n", line=b"POST /ns/sigmai HTTP/1.0\r\n"), 400),
    ("no-host", head(b"X-A: 1\r\n"), 400),
    ("two-hosts", head(HOST, HOST), 400),
    ("two-hosts-1.0", head(HOST, HOST, line=b"GET /ns/sigmai HTTP/1.0\r\n"), 400),
    # A reverse proxy opens no tunnels: every CONNECT is refused, whatever its target form.
    ("connect-authority", head(HOST, line=b"CONNECT edge.test:443 HTTP/1.1\r\n"), 405),
    ("connect-path", head(HOST, line=b"CONNECT /ns/sigmai HTTP/1.1\r\n"), 405),
    ("connect-path-1.0", head(line=b"CONNECT /ns/sigmai HTTP/1.0\r\n"), 405),
    ("connect-absolute", head(HOST, line=b"CONNECT https://edge.test/ns/sigmai HTTP/1.1\r\n"), 405),
    ("connect-with-body", head(HOST, b"Content-Length: 5\r\n", line=b"CONNECT /ns/sigmai HTTP/1.1\r\n") + b"hello", 405),
    ("huge-head", head(HOST, b"X-Big: " + b"a" * 40000 + b"\r\n"), 431),
    ("huge-partial-head", LINE + HOST + b"X-Big: " + b"a" * 40000, 431),
]


@pytest.mark.parametrize(("request_bytes", "status"), [r[1:] for r in REQUESTS], ids=[r[0] for r in REQUESTS])
def test_hostile_request_heads_are_refused_before_the_upstream(request_bytes: bytes, status: int) -> None:
    s = session(Limits(max_header_size=32 * 1024))
    actions = s.client_data(request_bytes)
    assert status_of(to_client(actions)) == status
    assert not any(isinstance(a, (ConnectUpstream, SendToUpstream)) for a in actions)
    assert CloseClient in kinds(actions)
    done = next(a for a in actions if isinstance(a, RequestCompleted))
    assert done.status == status and done.reason


def test_a_fragment_is_refused_by_name() -> None:
    actions = session().client_data(head(HOST, line=b"GET /ns/sigmai/x?a#frag HTTP/1.1\r\n"))
    done = next(a for a in actions if isinstance(a, RequestCompleted))
    assert (done.status, done.reason) == (400, "fragment in request target")


def test_a_byte_at_a_time_refuses_the_same() -> None:
    for name, request_bytes, status in REQUESTS:
        if name.startswith("huge"):
            continue
        s = session()
        actions: list[object] = []
        for i in range(len(request_bytes)):
            actions += s.client_data(request_bytes[i : i + 1])
            if CloseClient in kinds(actions):
                break
        assert status_of(to_client(actions)) == status, name
        assert not any(isinstance(a, SendToUpstream) for a in actions), name


CHUNKED_HEAD = head(HOST, b"Transfer-Encoding: chunked\r\n")
BAD_CHUNKS: list[tuple[str, bytes]] = [
    ("17-hex-digits", b"10000000000000000\r\n"),
    ("space-after-size", b"5 \r\nhello\r\n0\r\n\r\n"),
    ("space-before-size", b" 5\r\nhello\r\n0\r\n\r\n"),
    ("tab-after-size", b"5\t\r\nhello\r\n0\r\n\r\n"),
    ("empty-size", b"\r\nhello\r\n0\r\n\r\n"),
    ("hex-prefix", b"0x5\r\nhello\r\n0\r\n\r\n"),
    ("negative", b"-5\r\nhello\r\n0\r\n\r\n"),
    ("not-hex", b"g\r\nhello\r\n0\r\n\r\n"),
    ("empty-extension", b"5;\r\nhello\r\n0\r\n\r\n"),
    ("extension-space", b"5;a b\r\nhello\r\n0\r\n\r\n"),
    ("extension-bws", b"5 ;a=b\r\nhello\r\n0\r\n\r\n"),
    ("extension-bad-value", b'5;a="b\r\nhello\r\n0\r\n\r\n'),
    ("extension-ctl", b"5;a=\x01\r\nhello\r\n0\r\n\r\n"),
    ("long-chunk-line", b"5;a=" + b"b" * MAX_CHUNK_LINE + b"\r\nhello\r\n0\r\n\r\n"),
    ("long-chunk-line-partial", b"5;a=" + b"b" * (MAX_CHUNK_LINE + 10)),
    ("bare-lf-size", b"5\nhello\r\n0\r\n\r\n"),
    ("data-overrun", b"5\r\nhelloX\r\n0\r\n\r\n"),
    ("bare-lf-after-data", b"5\r\nhello\n0\r\n\r\n"),
    ("trailer-obs-fold", b"5\r\nhello\r\n0\r\nX-A: 1\r\n 2\r\n\r\n"),
    ("trailer-bare-lf", b"5\r\nhello\r\n0\r\nX-A: 1\n\r\n"),
    ("trailer-ctl", b"5\r\nhello\r\n0\r\nX-A: \x01\r\n\r\n"),
]


@pytest.mark.parametrize("body", [b[1] for b in BAD_CHUNKS], ids=[b[0] for b in BAD_CHUNKS])
def test_hostile_chunked_request_bodies_never_complete_upstream(body: bytes) -> None:
    s = session()
    leg, actions = connect(s, CHUNKED_HEAD + body)
    assert status_of(to_client(actions)) == 400
    assert ReleaseUpstream(reusable=False) in actions and CloseClient in kinds(actions)
    upstream = h11.Connection(h11.SERVER)
    upstream.receive_data(to_upstream(actions))
    events = [upstream.next_event(), upstream.next_event()]
    assert isinstance(events[0], h11.Request) and events[1] is h11.NEED_DATA  # never a whole request


def test_request_trailers_are_not_forwarded() -> None:
    s = session()
    body = b"5\r\nhello\r\n0\r\nX-Forwarded-For: 6.6.6.6\r\nHost: evil.test\r\nContent-Length: 99\r\n\r\n"
    leg, actions = connect(s, CHUNKED_HEAD + body)
    sent = to_upstream(actions)
    assert sent.endswith(b"5\r\nhello\r\n0\r\n\r\n") and b"6.6.6.6" not in sent and b"evil" not in sent


OK_HEAD = b"HTTP/1.1 200 OK\r\n"
SECRET = b"DB_PASSWORD=hunter2"
RESPONSES: list[tuple[str, bytes]] = [
    ("not-http", b"NOT HTTP\r\n\r\n"),
    ("bare-lf", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"),
    ("bare-lf-partial", b"HTTP/1.1 200 OK\nX: " + SECRET),
    ("bare-cr", OK_HEAD + b"X-A: 1\rContent-Length: 0\r\n\r\n"),
    ("obs-fold", OK_HEAD + b"X-A: 1\r\n 2\r\nContent-Length: 0\r\n\r\n"),
    ("ctl", OK_HEAD + b"X-Leak: " + SECRET + b"\x01\r\nContent-Length: 0\r\n\r\n"),
    ("del", OK_HEAD + b"X-A: \x7f\r\nContent-Length: 0\r\n\r\n"),
    ("space-before-colon", OK_HEAD + b"Content-Length : 0\r\n\r\n"),
    ("bad-name", OK_HEAD + b"X(A): 1\r\nContent-Length: 0\r\n\r\n"),
    ("http-1.2", b"HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("http-2.0", b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("two-digit-status", b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n"),
    ("four-digit-status", b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n"),
    ("status-099", b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n"),
    ("cl-identical-duplicates", OK_HEAD + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nok"),
    ("cl-list", OK_HEAD + b"Content-Length: 2, 2\r\n\r\nok"),
    ("cl-19-digits", OK_HEAD + b"Content-Length: 1000000000000000000\r\n\r\n"),
    ("cl-te", OK_HEAD + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("te-gzip", OK_HEAD + b"Transfer-Encoding: gzip\r\n\r\n"),
    ("te-combination", OK_HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n"),
    ("te-chunked-twice", OK_HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
    # RFC 9112 section 6.1: Transfer-Encoding on HTTP/1.0 is faulty framing, even a valid chunked body.
    ("te-on-1.0", b"HTTP/1.0 200 OK\r\nX-Leak: " + SECRET + b"\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
    ("te-on-1.0-with-cl", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok"),
    ("huge-head", OK_HEAD + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n"),
    ("huge-partial-head", OK_HEAD + b"X-Big: " + b"a" * 70000),
    ("101-without-upgrade", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"),
]


@pytest.mark.parametrize("response", [r[1] for r in RESPONSES], ids=[r[0] for r in RESPONSES])
def test_hostile_upstream_responses_become_a_generic_502(response: bytes) -> None:
    s = session()
    connect(s, GET)
    out = s.upstream_data(response)
    data = to_client(out)
    assert status_of(data) == 502 and data.endswith(b"\r\n\r\nbad gateway\n")
    assert SECRET not in data and b"X-" not in data
    assert ReleaseUpstream(reusable=False) in out
    done = next(a for a in out if isinstance(a, RequestCompleted))
    assert done.status == 502
    if SECRET in response:
        assert SECRET in done.reason.encode()  # the detail is for the log only


SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: " + accept_for(b"dGhlIHNhbXBsZSBub25jZQ==") + b"\r\n"
)
# 101s answering UPGRADE (which offers the subprotocol "chat" and permessage-deflate; the proxy
# strips the extension offer): RFC 6455 section 4.1 makes the client, the proxy here, fail each.
SWITCHES: list[tuple[str, bytes]] = [
    ("wrong-accept", SWITCH.replace(b"Accept: ", b"Accept: d3Jvbmc=\r\nX-Old: ") + b"\r\n"),
    ("no-accept", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
    ("extension-the-proxy-did-not-forward", SWITCH + b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"),
    ("extension-never-offered", SWITCH + b"Sec-WebSocket-Extensions: x-leak; k=" + SECRET + b"\r\n\r\n"),
    ("extension-empty", SWITCH + b"Sec-WebSocket-Extensions:\r\n\r\n"),
    ("subprotocol-never-offered", SWITCH + b"Sec-WebSocket-Protocol: superchat\r\n\r\n"),
    ("subprotocol-other-case", SWITCH + b"Sec-WebSocket-Protocol: Chat\r\n\r\n"),  # exact, as wsproto and browsers
    ("subprotocol-list", SWITCH + b"Sec-WebSocket-Protocol: chat, chat\r\n\r\n"),
    ("subprotocol-twice", SWITCH + b"Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Protocol: chat\r\n\r\n"),
    ("subprotocol-empty", SWITCH + b"Sec-WebSocket-Protocol:\r\n\r\n"),
]


TUNNEL_MAY_CHOOSE = {"extension-the-proxy-did-not-forward"}
"""A tunnel forwards the client's extension offer (it relays frames untouched): an extension it
offered may be chosen; one it never offered, or an empty list, may not."""


HOSTILE_SWITCHES = [
    pytest.param(response, path, id=f"{name}-{mode}")
    for name, response in SWITCHES
    for path, mode in ((b"/ns/sigmai/ws", "frames"), (b"/t", "tunnel"))
    if not (mode == "tunnel" and name in TUNNEL_MAY_CHOOSE)
]


@pytest.mark.parametrize("response, path", HOSTILE_SWITCHES)
def test_hostile_101s_become_a_generic_502_and_no_websocket(response: bytes, path: bytes) -> None:
    s = session()
    connect(s, UPGRADE.replace(b"/ns/sigmai/ws", path))
    out = s.upstream_data(response + b"\x81\x02hi")
    data = to_client(out)
    assert status_of(data) == 502 and data.endswith(b"\r\n\r\nbad gateway\n")
    assert SECRET not in data and b"hi" not in data and b"Sec-WebSocket" not in data
    assert not any(isinstance(a, (StartWebSocket, StartTunnel)) for a in out)
    assert ReleaseUpstream(reusable=False) in out and CloseClient in kinds(out)
    done = next(a for a in out if isinstance(a, RequestCompleted))
    assert done.status == 502 and "invalid 101" in done.reason


def test_a_tunnel_passes_the_extension_negotiation_on() -> None:
    """Found by interop testing (Chromium, node ws): permessage-deflate was stripped in tunnel
    mode too, so compression never worked through a tunnel, where it works through nginx and
    HAProxy. A tunnel relays frames untouched: the offer goes up, the choice comes back."""
    s = session()
    _, actions = connect(s, UPGRADE.replace(b"/ns/sigmai/ws", b"/t"))
    assert b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\n" in to_upstream(actions)
    out = s.upstream_data(SWITCH + b"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n\r\n")
    assert b"\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n" in to_client(out)
    assert status_of(to_client(out)) == 101 and any(isinstance(a, StartTunnel) for a in out)
    # The frame relay re-frames messages: no offer goes up, so none may come back.
    s = session()
    assert b"Sec-WebSocket-Extensions" not in to_upstream(connect(s, UPGRADE)[1])


def test_a_101_is_checked_against_the_request_the_upstream_received() -> None:
    """The extension offer is stripped on the way up, so no extension may come back; the
    subprotocol must be one the forwarded request listed (in any of its fields)."""
    request = UPGRADE.replace(b"Sec-WebSocket-Protocol: chat\r\n", b"Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Protocol: v2 ,\tv3\r\n")
    parsed = RequestParser(CLIENT).parse(request)
    assert b"sec-websocket-protocol: v2 ,\tv3\r\n" in parsed.forward.lower()  # offered as it came
    assert b"sec-websocket-extensions" not in parsed.forward.lower()
    assert invalid_switch(parsed, parse_response(SWITCH + b"\r\n")) is None  # the upstream may choose none
    for chosen in (b"chat", b"v2", b"v3"):
        assert invalid_switch(parsed, parse_response(SWITCH + b"Sec-WebSocket-Protocol: " + chosen + b"\r\n\r\n")) is None
    assert invalid_switch(parsed, parse_response(SWITCH + b"Sec-WebSocket-Protocol: v4\r\n\r\n")) == (
        "a subprotocol the request did not offer"
    )
    assert invalid_switch(parsed, parse_response(SWITCH + b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n")) == (
        "an extension the request did not offer"
    )
    bare = RequestParser(CLIENT).parse(request.replace(b"Sec-WebSocket-Protocol", b"X-Not-Protocol"))
    assert invalid_switch(bare, parse_response(SWITCH + b"Sec-WebSocket-Protocol: chat\r\n\r\n")) is not None


CUT_RESPONSES: list[tuple[str, bytes]] = [
    ("short-length", OK_HEAD + b"Content-Length: 10\r\n\r\nabc"),
    ("cut-chunked", OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhel"),
    ("cut-before-last-chunk", OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"),
    ("bad-chunk-size", OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n10000000000000000\r\n"),
    ("bad-chunk-extension", OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5;a b\r\nhello\r\n"),
]


@pytest.mark.parametrize("response", [r[1] for r in CUT_RESPONSES], ids=[r[0] for r in CUT_RESPONSES])
def test_responses_cut_mid_body_are_aborted_never_completed(response: bytes) -> None:
    s = session()
    connect(s, GET)
    out = s.upstream_data(response)
    out += s.upstream_data(b"")
    data = to_client(out)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and not data.endswith(b"0\r\n\r\n")
    assert CloseClient in kinds(out) and ReleaseUpstream(reusable=False) in out
    done = [a for a in out if isinstance(a, RequestCompleted)]
    assert len(done) == 1 and done[0].status == 502 and "upstream" in done[0].reason


def test_until_close_body_reset_mid_body_is_aborted_but_clean_eof_completes() -> None:
    s = session()
    connect(s, GET)
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\n\r\npart1")
    out += s.upstream_failed("upstream connection lost: ConnectionResetError(104)")
    assert not to_client(out).endswith(b"0\r\n\r\n") and CloseClient in kinds(out)
    assert [a.status for a in out if isinstance(a, RequestCompleted)] == [502]
    s = session()
    connect(s, GET)
    out = s.upstream_data(b"HTTP/1.1 200 OK\r\n\r\npart1") + s.upstream_data(b"")
    assert to_client(out).endswith(b"5\r\npart1\r\n0\r\n\r\n")
    assert [a.status for a in out if isinstance(a, RequestCompleted)] == [200]


ACCEPTED_REQUESTS = [
    head(HOST, line=b"PURGE /ns/sigmai HTTP/1.1\r\n"),
    head(HOST, line=b"M-SEARCH /ns/sigmai HTTP/1.1\r\n"),
    head(HOST, b"X-Name: caf\xe9 \xff\r\n"),
    head(HOST, b"X-Empty:\r\n", b"X-Tabs:\t\tv\t\r\n"),
    head(HOST, b"Transfer-Encoding: CHUNKED\r\n") + b"5;a=b;c=\"d\\\"e\"\r\nhello\r\n0\r\n\r\n",
    head(line=b"GET /ns/sigmai HTTP/1.0\r\n"),
    b"\r\n" + head(HOST),  # RFC 9112 section 2.2: empty lines before a request line are ignored
    b"\r\n\r\n" + head(HOST),
]


@pytest.mark.parametrize("request_bytes", ACCEPTED_REQUESTS)
def test_custom_methods_obs_text_and_extensions_are_accepted(request_bytes: bytes) -> None:
    s = session()
    leg, actions = connect(s, request_bytes)
    upstream = h11.Connection(h11.SERVER)
    upstream.receive_data(to_upstream(actions))
    request = upstream.next_event()
    assert isinstance(request, h11.Request) and request.method == request_bytes.lstrip(b"\r\n").split(b" ")[0]
    assert dict(request.headers)[b"host"] in (b"edge.test", b"127.0.0.1:9")


def test_status_line_without_reason_and_obs_text_are_passed_on() -> None:
    s = session()
    connect(s, GET)
    out = s.upstream_data(b"HTTP/1.1 200\r\nX-A: caf\xe9\r\nContent-Length: 2\r\n\r\nok")
    assert to_client(out).startswith(b"HTTP/1.1 200 \r\nX-A: caf\xe9\r\n")
    assert [a.status for a in out if isinstance(a, RequestCompleted)] == [200]


def test_any_split_of_a_head_gives_the_same_answer_as_the_whole() -> None:
    """The resumed search for the head's end (core/buffer.py) must not depend on read sizes."""
    import random

    rng = random.Random(14)
    cases = [(r, status) for name, r, status in REQUESTS if not name.startswith("huge")]
    cases += [(request, 0) for request in ACCEPTED_REQUESTS]
    for request_bytes, status in cases:
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(request_bytes)), min(4, len(request_bytes) - 1)))
            s = session()
            actions: list[object] = []
            for start, end in zip([0, *cuts], [*cuts, len(request_bytes)]):
                actions += s.client_data(request_bytes[start:end])
                if CloseClient in kinds(actions):
                    break
            if status:
                assert status_of(to_client(actions)) == status, (request_bytes, cuts)
            else:
                assert isinstance(actions[-1], ConnectUpstream), (request_bytes, cuts)


def test_a_head_sent_a_byte_at_a_time_costs_linear_time() -> None:
    """32 KiB a byte at a time: quadratic buffering took about a second here, linear ~50 ms."""
    import time

    head = LINE + HOST + b"X-Big: " + b"a" * 32000
    s = session()
    start = time.process_time()
    for i in range(len(head)):
        s.client_data(head[i : i + 1])
    assert time.process_time() - start < 0.5 and s.awaiting_head


def test_refused_heads_log_no_control_bytes() -> None:
    s = session()
    actions = s.client_data(b"GET /a\nInjected: 1 HTTP/1.1\r\nHost: edge.test\r\n\r\n")
    done = next(a for a in actions if isinstance(a, RequestCompleted))
    assert (done.status, done.method, done.target) == (400, "", "")
    actions = session().client_data(head(HOST, b"X-A: \x01\r\n"))
    done = next(a for a in actions if isinstance(a, RequestCompleted))
    assert (done.method, done.target) == ("POST", "/ns/sigmai")


def test_connect_is_refused_by_the_codec_with_405() -> None:
    """A reverse proxy implements no CONNECT (RFC 9110 section 9.3.6 is for forward proxies):
    the parser refuses it before routing, so a path target cannot reach an upstream either."""
    request = head(HOST, line=b"CONNECT /ns/sigmai HTTP/1.1\r\n")
    with pytest.raises(HttpError) as refused:
        RequestParser(CLIENT).parse(request)
    assert refused.value.status == 405
    data = to_client(session().client_data(request))
    assert data.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n") and data.endswith(b"\r\n\r\nCONNECT is not supported\n")


def test_transfer_encoding_on_an_http10_response_is_faulty_framing() -> None:
    """RFC 9112 section 6.1: received as HTTP/1.0 with Transfer-Encoding, the message MUST be
    treated as having faulty framing; the same head as HTTP/1.1, or 1.0 with a length, is fine."""
    chunked = b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    with pytest.raises(HttpError) as refused:
        parse_response(chunked)
    assert refused.value.status == 502 and "HTTP/1.0" in refused.value.reason
    assert parse_response(chunked.replace(b"HTTP/1.0", b"HTTP/1.1")).length == CHUNKED
    assert parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n").length == 2
