"""Where a head ends in a buffer, and why the head regex refused one.

Split from ``core/codec.py``: the codec validates a complete head; this finds the head's end
under its size limit (431 / 502), refuses a partial head that already shows a bare CR or LF,
and turns a refusal into the reason the log line gives (the rare path, never timed).

Sans-IO: no sockets, clocks or logs. Raises only ``HttpError`` with the status to answer.
"""

from __future__ import annotations

import re

from nextproxy.errors import HttpError

# The grammar both codec regexes share (RFC 9110 token, RFC 9112 HTTP-version).
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
VERSION = rb"HTTP/([0-9]+(?:\.[0-9]+)?)"
# A request target is visible ASCII without "#": a fragment is the client's own (RFC 9110
# section 4.2.5 keeps it out of requests), and an upstream may not parse it as we would.
TARGET_CHAR = rb"[\x21\x22\x24-\x7e]"
_REQUEST_LINE = re.compile(TOKEN + rb" [\x21-\x7e]+ " + VERSION)
_STATUS_LINE = re.compile(VERSION + rb" [0-9]{3}(?: [\t\x20-\x7e\x80-\xff]*)?")
_NAME = re.compile(TOKEN)
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def head_end(buffer: bytes | bytearray, limit: int, *, request: bool, scanned: int = 0) -> int:
    """Where the head at the start of ``buffer`` ends (past its empty line); -1 if not yet.

    Raises the limit's answer (431 for a request, 502 for a response) for a head longer than
    ``limit``, complete or not, and refuses a partial head that already shows a bare CR or LF.
    ``scanned`` bytes at the start were searched before and found clean (see core/buffer.py).
    """
    end = buffer.find(b"\r\n\r\n", max(0, scanned - 3))
    size = len(buffer) if end < 0 else end + 4
    if size > limit:
        if request:
            raise HttpError(431, "request header fields too large")
        raise HttpError(502, "upstream response head too large")
    if end < 0:
        check_partial(buffer, request=request, scanned=scanned)
    return -1 if end < 0 else end + 4


def check_partial(buffer: bytes | bytearray, *, request: bool, scanned: int = 0) -> None:
    """An incomplete head already holding a bare CR or LF is refused now, not at the size limit.

    Without this a head that uses bare LF line ends never shows the CRLFCRLF we look for, and
    would sit in the buffer until the 431. Only what follows ``scanned`` is looked at, plus
    one byte before it: a CR that ended the previous look may be paired with an LF now.
    """
    start = max(0, scanned - 1)
    tail = buffer[start:]
    crlf = tail.count(b"\r\n")
    # An LF at ``start`` was already judged (with the CR before it) by the previous look.
    lf = tail.count(b"\n") - (start > 0 and tail[:1] == b"\n")
    carriage = tail.count(b"\r") - tail.endswith(b"\r")
    if lf != crlf or carriage != crlf:
        raise HttpError(400 if request else 502, "bare CR or LF line ending")


def diagnose(head: bytes, *, request: bool) -> str:
    """Why the head regex refused ``head``: the reason for the log (the rare path, not timed)."""
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf:
        return "bare LF line ending"
    if head.count(b"\r") != crlf:
        return "bare CR in head"
    lines = head.split(b"\r\n")
    first = _REQUEST_LINE if request else _STATUS_LINE
    if first.fullmatch(lines[0]) is None:
        return "invalid request line" if request else "invalid status line"
    if request and b"#" in lines[0].split(b" ")[1]:
        return "fragment in request target"
    for line in lines[1:]:
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            return "obs-fold line"
        name, colon, value = line.partition(b":")
        if not colon:
            return "header line without a colon"
        if name != name.rstrip(b" \t"):
            return "whitespace before colon"
        if _NAME.fullmatch(name) is None:
            return "invalid header name"
        if _CTL.search(value) is not None:
            return "control character in header value"
    return "malformed head"
