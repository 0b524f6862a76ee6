"""The error vocabulary. Every error carries what goes on the wire.

A config error names the key; a ClientHello or TLS error names the TLS alert; an HTTP error
carries the status to answer with. The core raises only these types: anything else escaping
from ``nextproxy.core`` is a bug (h11's contract).
"""

from __future__ import annotations

import enum


class TlsAlert(enum.IntEnum):
    """TLS alert descriptions (RFC 8446 section 6) that we name in logs and metrics."""

    CLOSE_NOTIFY = 0
    UNEXPECTED_MESSAGE = 10
    RECORD_OVERFLOW = 22
    HANDSHAKE_FAILURE = 40
    BAD_CERTIFICATE = 42
    CERTIFICATE_EXPIRED = 45
    ILLEGAL_PARAMETER = 47
    UNKNOWN_CA = 48
    ACCESS_DENIED = 49
    DECODE_ERROR = 50
    PROTOCOL_VERSION = 70
    INTERNAL_ERROR = 80
    UNRECOGNIZED_NAME = 112
    CERTIFICATE_REQUIRED = 116
    NO_APPLICATION_PROTOCOL = 120


TLS_HANDSHAKE_OK = "ok"
TLS_HANDSHAKE_FAILURES = (
    "eof_during_handshake", "timeout", "plaintext_http", "decode_error", "hello_too_large", "protocol_version",
    "no_shared_group", "no_shared_cipher", "no_application_protocol", "certificate_required", "unknown_ca",
    "certificate_expired", "bad_certificate", "client_alert", "other",
)  # fmt: skip
"""Why an edge handshake failed: a small fixed set, shared by the ``tls_handshake_failed`` log
line and the ``result`` label of ``nextproxy_tls_handshakes_total`` (``ok`` is the success).
``core.handshake`` maps OpenSSL's errors and the ClientHello reader's refusals onto it; the shell
adds ``eof_during_handshake`` and ``timeout``, which only it can see."""


class NextproxyError(Exception):
    """Base class: lets the shell tell our errors from bugs."""


class ConfigError(NextproxyError):
    """A bad configuration value. ``str()`` is one line naming the key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(key, reason)
        self.key = key
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}"


class HelloAnswer(enum.Enum):
    """Who answers first bytes that the ClientHello reader cannot route by, and how.

    The reader only routes; the TLS library judges (design.md). It answers by itself only
    where OpenSSL would not answer as a TLS server should.
    """

    TLS_LIBRARY = "tls_library"
    """They look like TLS: OpenSSL (default context) gets every byte read and answers."""
    ALERT = "alert"
    """The reader refuses by itself (over its cap; an SSLv2 hello, which OpenSSL 4 drops
    without a word): send ``alert_record()``, then linger like any handshake failure."""
    USE_HTTPS = "use_https"
    """Clear-text HTTP: a 400 that says to use https://."""
    CLOSE = "close"
    """Not TLS at all (or nothing at all): closed without an answer, as OpenSSL does."""


class ClientHelloError(NextproxyError):
    """The first bytes are not a usable TLS ClientHello.

    ``answer`` says who answers them; ``alert`` is what the reader found wrong (the alert it
    sends itself when ``answer`` is ``ALERT``).
    """

    def __init__(self, alert: TlsAlert, reason: str, *, answer: HelloAnswer = HelloAnswer.TLS_LIBRARY,
                 record_version: int = 0x0303) -> None:  # fmt: skip
        super().__init__(alert, reason)
        self.alert = alert
        self.reason = reason
        self.answer = answer
        self.record_version = record_version

    @property
    def plaintext_http(self) -> bool:
        return self.answer is HelloAnswer.USE_HTTPS

    def alert_record(self) -> bytes:
        """The fatal alert record (RFC 8446 6) the reader writes itself for ``HelloAnswer.ALERT``."""
        return bytes((21, self.record_version >> 8, self.record_version & 0xFF, 0, 2, 2, self.alert))

    def __str__(self) -> str:
        return f"{self.reason} ({self.alert.name.lower()})"


class TlsError(NextproxyError):
    """The TLS engine failed. ``reason`` is a metric label value; any alert is in the out-buffer."""

    def __init__(self, reason: str, detail: str = "", *, alert_sent: bool = False) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail
        self.alert_sent = alert_sent

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


class HttpError(NextproxyError):
    """A request we refuse; ``status`` is the answer (h11's ``error_status_hint``)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


class ProxyProtocolError(NextproxyError):
    """A PROXY protocol header (v1 or v2) that must not be accepted.

    The answer on the wire is no answer: the specification says to abort the connection at
    once, before reading anything else. ``reason`` is a short fixed token for a metric label
    (``nextproxy.core.proxyprotocol`` lists them); ``detail`` says what exactly was wrong.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason
