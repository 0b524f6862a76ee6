"""Header policy at the edge: what a request may carry in, and what the proxy adds on the way.

The policy's names (HOP_BY_HOP, EDGE_OWNED, FRAMING), its token and Host rules and the
certificate headers the edge adds (XFCC, RFC 9440 Client-Cert) live here; ``core/codec.py``
applies them inside its one loop over a raw head: it refuses smuggling-prone requests, answers
421 when Host and SNI disagree, strips hop-by-hop headers and every client-sent copy of the
headers the edge owns (X-Forwarded-*, Forwarded, XFCC, Client-Cert...), and adds them afresh
from what the connection actually saw. The same policy over h11-shaped header lists, the
oracle the codec is fuzzed against, lives with the tests (tests/core/header_oracle.py).

It must never do I/O, keep time, log, or hand h11 a value it would reject (certificate fields
come from the client and are escaped to printable ASCII here).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

Headers = list[tuple[bytes, bytes]]


class PeerCertificate(Protocol):
    """The fields of ``nextproxy.core.tls.PeerCertificate`` this module reads.

    Structural on purpose: the header policy needs facts about a certificate, not the TLS
    engine, and the tests can hand it any frozen dataclass with these fields.
    """

    @property
    def der(self) -> bytes: ...
    @property
    def chain(self) -> tuple[bytes, ...]:
        """Intermediates as sent by the client, DER, leaf excluded."""
    @property
    def verified(self) -> bool: ...
    @property
    def spki_sha256(self) -> str: ...
    @property
    def common_name(self) -> str | None: ...
    @property
    def verify_error(self) -> str | None: ...
    @property
    def sha256(self) -> str:
        """Hex SHA-256 of ``der``."""
    @property
    def subject(self) -> str:
        """RFC 4514."""
    @property
    def dns_names(self) -> tuple[str, ...]: ...
    @property
    def uris(self) -> tuple[str, ...]: ...

# RFC 9110 section 7.6.1 plus the de-facto ones (Keep-Alive, Proxy-Connection). Proxy-Authorization
# and Proxy-Authenticate are credentials and challenges for a forward proxy; we are a reverse proxy
# that authenticates nobody that way, so they stop here rather than leak to the upstream (nginx
# forwards Proxy-Authorization; we deliberately don't).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# Headers only the edge may set: a client copy would let it pose as another address or as
# the holder of a client certificate it never presented.
EDGE_OWNED = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"forwarded",
        b"x-real-ip",
        b"x-forwarded-client-cert",
        b"client-cert",
        b"client-cert-chain",
        b"x-client-cert-verified",
    }
)
# Headers that decide framing or routing. A Connection token may not remove them (a client
# sending "Connection: content-length" would otherwise turn its body into a second request
# upstream), and an underscore alias (content_length) is dropped: CGI-style upstreams map '_'
# and '-' to the same variable, h11 does not.
FRAMING = frozenset({b"host", b"content-length", b"transfer-encoding"})

# Connection tokens that name no header we still carry; seeing only these needs no second pass.
PLAIN_TOKENS = HOP_BY_HOP | {b"close"}

_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
_PEM_LINE = 48  # DER bytes per 64-character PEM line (OpenSSL's and cryptography's width)
MAX_VERIFY_ERROR = 200  # characters of a verify error we pass on; the rest is noise upstream


@dataclass(slots=True)
class ClientInfo:
    """What the TLS layer learned about the client, for the headers the edge adds.

    Not frozen (nothing changes it): one is built per connection, and a frozen dataclass pays
    an ``object.__setattr__`` per field (34 bytecode instructions for these four fields, 15 without)."""

    address: str
    """Client IP as text ("127.0.0.1", "::1"): becomes X-Forwarded-For."""
    server_name: str | None
    """SNI from the ClientHello (validated, lower-case, no trailing dot), or None."""
    certificate: PeerCertificate | None = None
    """The client certificate, when one was presented (verified or not)."""
    forward_chain: bool = False
    """Also send Client-Cert-Chain (RFC 9440) with the intermediates the client sent."""


def _normalize(name: bytes) -> bytes:
    # h11 accepts '_' in field names; upstreams that map both to one variable must not see a
    # client's "X_Forwarded_For" as the edge's X-Forwarded-For.
    return name.lower().replace(b"_", b"-")


def tokens(values: Iterable[bytes]) -> Iterator[bytes]:
    """The comma-separated tokens of list-valued fields (Connection, Upgrade), normalized."""
    for value in values:
        for token in value.split(b","):
            token = token.strip()
            if token:
                yield _normalize(token)


def normalize_host(value: bytes) -> str:
    """Host as compared with SNI: lower-case, no port, no brackets, no trailing dot."""
    # bytes.lower() touches ASCII only, so no non-ASCII Host can lower-case into a match.
    host = value.strip().lower().decode("latin-1")
    if host.startswith("["):
        end = host.find("]")
        rest = host[end + 1 :]
        if end > 0 and (not rest or (rest[0] == ":" and (len(rest) == 1 or rest[1:].isdigit()))):
            return host[1:end]
        return host  # malformed: kept whole, so it matches no SNI
    colon = host.find(":")
    if colon >= 0:
        port = host[colon + 1 :]
        if port and not (port.isascii() and port.isdigit()):
            return host
        host = host[:colon]
    return host[:-1] if host.endswith(".") else host


def client_cert_fields(client: ClientInfo) -> Headers:
    """The client-certificate headers the edge adds (none without a certificate)."""
    cert = client.certificate
    if cert is None:
        return []
    out = [(b"x-forwarded-client-cert", xfcc(cert)), (b"client-cert", rfc9440(cert.der))]
    if client.forward_chain and cert.chain:
        out.append((b"client-cert-chain", b", ".join(rfc9440(der) for der in cert.chain)))
    out.append((b"x-client-cert-verified", _verified(cert)))
    return out


def websocket_accept(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for ``key`` (RFC 6455 section 4.2.2), to check the upstream's 101."""
    return base64.b64encode(hashlib.sha1(key + _WEBSOCKET_GUID).digest())


def rfc9440(der: bytes) -> bytes:
    """A certificate as an RFC 9440 / RFC 8941 sf-binary item: ``:<base64 DER>:``."""
    return b":" + base64.b64encode(der) + b":"


def _verified(cert: PeerCertificate) -> bytes:
    if cert.verified:
        return b"SUCCESS"
    # nginx's $ssl_client_verify shape. The reason may quote certificate fields: printable only.
    reason = _printable(cert.verify_error or "unknown")[:MAX_VERIFY_ERROR].strip() or "unknown"
    return b"FAILED:" + reason.encode("ascii")


def _printable(text: str) -> str:
    if text.isascii() and text.isprintable():
        return text
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)


def xfcc(cert: PeerCertificate) -> bytes:
    """Envoy's X-Forwarded-Client-Cert element for ``cert``.

    ``Hash=<sha256>;Subject="<RFC 4514>";URI=<uri>;DNS=<dns>;Cert="<url-encoded PEM>"``, with
    URI and DNS once per SAN: the order of our contract (issue 5). Envoy puts Cert second;
    XFCC consumers read elements by key, so both parse the same. Envoy emits ``URI=`` even
    without a URI SAN; we leave out keys that have no value. Cached: the same certificate comes back on every
    request of a keep-alive connection.
    """
    return _xfcc(cert.sha256, cert.der, cert.subject, tuple(cert.uris), tuple(cert.dns_names))


@lru_cache(maxsize=256)
def _xfcc(sha256: str, der: bytes, subject: str, uris: tuple[str, ...], dns: tuple[str, ...]) -> bytes:
    parts = ["Hash=" + _printable(sha256).lower(), 'Subject="' + _dn_for_header(subject) + '"']
    parts += ["URI=" + _quote_if_needed(_percent_escape(uri)) for uri in uris]
    parts += ["DNS=" + _quote_if_needed(_percent_escape(name)) for name in dns]
    parts.append('Cert="' + _url_encoded_pem(der) + '"')
    return ";".join(parts).encode("ascii")


def _url_encoded_pem(der: bytes) -> str:
    body = "".join(
        base64.b64encode(der[i : i + _PEM_LINE]).decode("ascii") + "%0A" for i in range(0, len(der), _PEM_LINE)
    )
    # Envoy's exact escaping: '\n', ' ', '+', '/', '=' (all a PEM holds besides [A-Za-z0-9-]).
    body = body.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    return "-----BEGIN%20CERTIFICATE-----%0A" + body + "-----END%20CERTIFICATE-----%0A"


def _dn_for_header(subject: str) -> str:
    """Make an RFC 4514 string safe inside XFCC's double quotes without changing its meaning.

    RFC 4514 allows any character as ``\\XX`` hex, so the characters that would end or confuse
    the quoted value (``"``, a backslash escaping itself) and anything h11 cannot send become
    hex escapes. The result has no '"' at all, so Envoy-style parsers that only unescape ``\\"``
    and naive ones that cut at the next quote read the same string. Envoy's own output (OpenSSL
    RFC 2253 flags) hex-escapes non-ASCII bytes the same way.
    """
    if '"' not in subject and "\\" not in subject and subject.isascii() and subject.isprintable():
        return subject
    # Left to right, every backslash in valid RFC 4514 opens an escape, so replacing the
    # escaped backslash first tokenizes exactly as an RFC 4514 parser would.
    text = subject.replace("\\\\", "\\5C").replace('\\"', "\\22").replace('"', "\\22")
    if text.endswith("\\"):
        text = text[:-1] + "\\5C"  # a dangling backslash (not valid RFC 4514) would eat our quote
    if text.isascii() and text.isprintable():
        return text
    return "".join(
        ch if " " <= ch <= "~" else "".join(f"\\{byte:02X}" for byte in ch.encode("utf-8")) for ch in text
    )


def _percent_escape(text: str) -> str:
    # A URI SAN is ASCII by definition, a DNS SAN an A-label; anything else came from a
    # hand-made certificate. '"' and '\\' are not URI characters either: escaping them means a
    # quoted value below never needs an inner escape.
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text and " " not in text:
        return text
    return "".join(
        ch if "!" <= ch <= "~" and ch not in '"\\' else "".join(f"%{b:02X}" for b in ch.encode("utf-8"))
        for ch in text
    )


def _quote_if_needed(value: str) -> str:
    # Envoy's rule: a value holding ',', ';' or '=' is double-quoted, '"' escaped as \".
    if any(ch in value for ch in ',;="'):
        return '"' + value.replace('"', '\\"') + '"'
    return value
