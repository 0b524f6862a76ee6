"""The handshake failure vocabulary: OpenSSL texts, verify codes and reader refusals -> one fixed set."""

from __future__ import annotations

import pytest

from nextproxy.core.clienthello import ClientHelloReader
from nextproxy.core.handshake import MAPPED_REASONS, VerifyNote, hello_failure_reason, openssl_failure_reason
from nextproxy.errors import TLS_HANDSHAKE_FAILURES, ClientHelloError, HelloAnswer, TlsAlert


def test_every_reason_the_mapping_can_return_is_in_the_fixed_set() -> None:
    assert MAPPED_REASONS <= set(TLS_HANDSHAKE_FAILURES)
    # The shell adds the two only it can see; nothing in the set is unreachable.
    assert set(TLS_HANDSHAKE_FAILURES) - MAPPED_REASONS == {"timeout"}
    assert len(set(TLS_HANDSHAKE_FAILURES)) == len(TLS_HANDSHAKE_FAILURES) and "ok" not in TLS_HANDSHAKE_FAILURES


@pytest.mark.parametrize(
    ("text", "code", "reason"),
    [
        ("[('SSL routines', '', 'unsupported protocol')]", 0, "protocol_version"),
        ("-1; Unexpected EOF", 0, "eof_during_handshake"),
        ("no suitable key share", 0, "no_shared_group"),
        ("no shared cipher", 0, "no_shared_cipher"),
        ("peer did not return a certificate", 0, "certificate_required"),
        ("certificate verify failed", 20, "unknown_ca"),  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        ("certificate verify failed", 18, "unknown_ca"),  # DEPTH_ZERO_SELF_SIGNED_CERT
        ("certificate verify failed", 10, "certificate_expired"),
        ("certificate verify failed", 9, "bad_certificate"),  # not yet valid
        ("certificate verify failed", 0, "bad_certificate"),
        ("tlsv1 alert unknown ca", 0, "client_alert"),  # the client refused our certificate
        ("tlsv1 alert protocol version", 0, "protocol_version"),
        ("bad packet length", 0, "decode_error"),
        ("something new in OpenSSL 5", 0, "other"),
    ],
)
def test_openssl_failure_reason(text: str, code: int, reason: str) -> None:
    assert openssl_failure_reason(text, code) == reason


def test_verify_note_keeps_the_first_refusal() -> None:
    note = VerifyNote()
    note.note(0)
    note.note(20)
    note.note(10)
    assert note.code == 20


def refusal(data: bytes, max_size: int = 65536) -> ClientHelloError:
    with pytest.raises(ClientHelloError) as caught:
        ClientHelloReader(max_size).feed(data)
    return caught.value


def test_reader_refusals_map_by_their_answer() -> None:
    assert hello_failure_reason(refusal(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")) == "plaintext_http"
    assert hello_failure_reason(refusal(b"\x00\x01\x02\x03\x04\x05")) == "decode_error"
    over = refusal(b"\x16\x03\x01\x40\x00" + b"\x01\x00\x3f\xfc", max_size=512)
    assert over.answer is HelloAnswer.ALERT and hello_failure_reason(over) == "hello_too_large"
    sslv2 = ClientHelloError(TlsAlert.PROTOCOL_VERSION, "SSLv2-format ClientHello", answer=HelloAnswer.ALERT)
    assert hello_failure_reason(sslv2) == "protocol_version"
