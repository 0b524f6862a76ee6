"""What the proxy itself writes to the client: its own short answers and re-framed response heads.

Split from ``http1.py`` so the session keeps only the state machine. Everything here is a pure
function of its arguments: no I/O, no state. A refusal's body says what kind of trouble it is
and never more: for 5xx it is generic, because the detail may quote an upstream's bytes
(secrets included); the detail goes to the log through ``RequestCompleted.reason``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nextproxy.config.model import AllowRule
from nextproxy.core.actions import AuthorizationDenied
from nextproxy.core.codec import CHUNKED, UNTIL_CLOSE, RequestHead, ResponseHead, without_fields
from nextproxy.core.headers import PeerCertificate

REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    421: b"Misdirected Request",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}
GENERIC_BODIES = {502: b"bad gateway\n", 503: b"service unavailable\n", 504: b"gateway timeout\n"}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CLOSE = b"connection: close\r\n"
_KEEP_ALIVE = b"connection: keep-alive\r\n"
_CHUNKED_LINE = b"transfer-encoding: chunked\r\n"
_UPGRADE_LINES = b"connection: upgrade\r\nupgrade: websocket\r\n"
_VISIBLE = re.compile(rb"[\x21-\x7e]+")


def refusal(status: int, reason: str, *, keep: bool, retry_after: int = 0) -> bytes:
    """The proxy's own answer, head and body in one piece (one write, one TLS record)."""
    body = GENERIC_BODIES.get(status) or reason.encode("ascii", "replace") + b"\n"
    head = b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n" % (
        status, REASONS.get(status, b""), len(body),
    )  # fmt: skip
    if retry_after:  # seconds (RFC 9110 10.2.3); True counts as 1
        head += b"retry-after: %d\r\n" % retry_after
    if not keep:
        head += _CLOSE
    return head + b"\r\n" + body


@dataclass(slots=True)
class ClientResponse:
    """A final response head re-framed for the client, and how its body travels."""

    data: bytes
    length: int
    """How the upstream body ends after RFC 9112 section 6.3 (0 for HEAD, 204, 304)."""
    chunked: bool
    """The body goes to the client chunked (re-framed)."""
    close: bool
    """The client connection closes after this response."""


def client_response(head: ResponseHead, request: RequestHead, *, close: bool) -> ClientResponse:
    """The head the client gets for ``head``, answering ``request``; ``close`` forces a close."""
    status, lines, length = head.status, head.lines, head.length
    chunked = False
    if status == 204 or status == 304 or request.method == b"HEAD":
        length = 0
        if status == 204:
            lines = without_fields(lines, {b"content-length"})  # RFC 9110 section 8.6: never on a 204
    elif length == CHUNKED or length == UNTIL_CLOSE:
        if request.version == b"1.1":
            lines += _CHUNKED_LINE
            chunked = True
        else:
            close = True  # an HTTP/1.0 client reads this body until we close
    if close:
        lines += _CLOSE
    elif request.version == b"1.0":
        lines += _KEEP_ALIVE  # HTTP/1.0 closes unless told (it asked: RequestHead.keep_alive)
    data = b"HTTP/1.1 %d " % status + head.reason + b"\r\n" + lines + b"\r\n"
    return ClientResponse(data, length, chunked, close)


def switching_protocols(head: ResponseHead, extensions: bytes = b"") -> bytes:
    """The 101 for the client: the upstream's fields minus hop-by-hop and extensions, ours added
    (and ``extensions``, the upstream's Sec-WebSocket-Extensions lines, for a tunnel)."""
    return b"HTTP/1.1 101 " + head.reason + b"\r\n" + head.lines + extensions + _UPGRADE_LINES + b"\r\n"


def authorize(cert: PeerCertificate | None, route: str, allow: tuple[AllowRule, ...]) -> AuthorizationDenied | None:
    """Allow-list check. Name rules need a verified chain: anyone can self-sign any name."""
    if cert is None:
        return AuthorizationDenied(route, "no_certificate", "-")
    for rule in allow:
        if rule.kind == "sha256" and rule.value == cert.sha256:
            return None
        if rule.kind == "spki" and rule.value == cert.spki_sha256:
            return None
        if cert.verified and (
            (rule.kind == "dns" and rule.value in cert.dns_names)
            or (rule.kind == "uri" and rule.value in cert.uris)
            or (rule.kind == "cn" and rule.value == cert.common_name)
        ):
            return None
    reason = "not_allowed" if cert.verified else "not_allowed_unverified"  # admission.CERTIFICATE_DENIALS
    return AuthorizationDenied(route, reason, cert.sha256)


def request_line(raw: bytes) -> tuple[bytes, bytes]:
    """Method and target of a refused head, for the log, when both are visible ASCII.

    Anything else (a bare LF inside the "target", control bytes) is left out: the log line
    must not carry what the head regex refused.
    """
    parts = raw.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) == 3 and _VISIBLE.fullmatch(parts[0]) and _VISIBLE.fullmatch(parts[1]):
        return parts[0][:32], parts[1][:512]
    return b"", b""
