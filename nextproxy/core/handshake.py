"""Why a handshake failed, in the fixed vocabulary of ``errors.TLS_HANDSHAKE_FAILURES``.

OpenSSL reports a failure as reason strings ("no suitable key share", "certificate verify
failed") and, for a chain it refused, as an X509 verify code that only its verify callback
sees; the ClientHello reader reports the alert it refuses with. This module turns either into
one label an operator can act on (``no_shared_group``: the client offers only key-exchange
groups we do not; ``unknown_ca``: its certificate is not from a configured CA) and that stays
bounded as a metric label. It never sees sockets or clocks: EOF and timeouts are the shell's.
"""

from __future__ import annotations

from nextproxy.errors import ClientHelloError, HelloAnswer, TlsAlert

__all__ = ["VerifyNote", "hello_failure_reason", "openssl_failure_reason"]

# OpenSSL reason strings, lower-cased, in the order they are tried (first match wins).
_OPENSSL_REASONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # SysCallError(-1, "Unexpected EOF"): the BIO reported the client's end of stream.
    ("eof_during_handshake", ("unexpected eof",)),
    # "tlsv1 alert protocol version" is received from a client that refuses our TLS 1.3 floor.
    ("protocol_version", ("unsupported protocol", "wrong version number", "protocol version",
                          "no protocols available", "version too low")),
    # Any other received alert ("tlsv1 alert unknown ca"): the client refused *us*, typically
    # our certificate; it must not count as a bad client certificate.
    ("client_alert", ("alert",)),
    ("no_shared_group", ("no suitable key share", "no shared group", "no suitable groups")),
    ("no_shared_cipher", ("no shared cipher", "no cipher match", "no ciphers available")),
    ("no_application_protocol", ("no application protocol",)),
    ("certificate_required", ("peer did not return a certificate",)),
    ("certificate_expired", ("certificate expired",)),
    ("unknown_ca", ("unknown ca",)),
    ("bad_certificate", ("certificate verify failed", "bad certificate", "unsupported certificate")),
    ("decode_error", ("decode error", "length mismatch", "bad packet length", "bad extension",
                      "packet length too long", "record layer failure")),
)  # fmt: skip

# X509_V_ERR_* codes (x509_vfy.h) that OpenSSL itself answers with unknown_ca or
# certificate_expired (ssl_x509err2alert); every other chain failure is bad_certificate.
_X509_UNKNOWN_CA = frozenset({2, 3, 18, 19, 20, 21, 27})
"""UNABLE_TO_GET_ISSUER_CERT(_LOCALLY), DEPTH_ZERO_SELF_SIGNED, SELF_SIGNED_CERT_IN_CHAIN,
UNABLE_TO_VERIFY_LEAF_SIGNATURE, CERT_UNTRUSTED, UNABLE_TO_GET_CRL (3, as OpenSSL maps it)."""
_X509_EXPIRED = frozenset({10})
"""CERT_HAS_EXPIRED."""

_HELLO_REASONS = {
    TlsAlert.PROTOCOL_VERSION: "protocol_version",  # an SSLv2-format hello, or a non-TLS record version
    TlsAlert.ILLEGAL_PARAMETER: "hello_too_large",  # the reader's own cap (HelloAnswer.ALERT)
}
"""The reader's refusals it answers by itself; every other one is not TLS at all: decode_error.
(Hellos that merely look wrong go to OpenSSL, whose error then names the reason.)"""

MAPPED_REASONS = frozenset({r for r, _ in _OPENSSL_REASONS} | set(_HELLO_REASONS.values()) | {"plaintext_http", "decode_error", "other"})
"""Every reason this module can return (a test holds it inside TLS_HANDSHAKE_FAILURES)."""


class VerifyNote:
    """Where a verify callback leaves the X509 verify code of the chain it refused.

    The engine hangs one on its ``SSL.Connection`` as app data; the callback (set on the
    context by the shell) calls ``note()``. Without it "certificate verify failed" could not
    tell an unknown CA from an expired certificate. It holds an int only, so no cycle forms.
    """

    __slots__ = ("code",)

    def __init__(self) -> None:
        self.code = 0

    def note(self, errnum: int) -> None:
        # The first refusal is the one OpenSSL acts on (it stops at a callback's False).
        if errnum and not self.code:
            self.code = errnum


def openssl_failure_reason(text: str, verify_code: int = 0) -> str:
    """Map an OpenSSL error text (any case) and the chain's verify code to a failure reason."""
    text = text.lower()
    for reason, needles in _OPENSSL_REASONS:
        if any(needle in text for needle in needles):
            if reason == "bad_certificate" and verify_code:
                return _verify_reason(verify_code)
            return reason
    return "other"


def _verify_reason(code: int) -> str:
    if code in _X509_UNKNOWN_CA:
        return "unknown_ca"
    if code in _X509_EXPIRED:
        return "certificate_expired"
    return "bad_certificate"


def hello_failure_reason(error: ClientHelloError) -> str:
    """The reason for a ClientHello the reader refused (by the alert it answers with)."""
    if error.answer is HelloAnswer.USE_HTTPS:
        return "plaintext_http"
    return _HELLO_REASONS.get(error.alert, "decode_error")

