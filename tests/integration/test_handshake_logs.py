"""Issue 14.3: a failed handshake's log line names the client's address and port, the SNI when the
hello had one, and a reason from a fixed set that is also the metric's ``result`` label.

Lines are throttled (issue 12): the first failure of each reason in a 10 s interval is logged at
once, later ones are summed into one line at the interval's end. So each test runs its own proxy
and provokes its reason once: the line it waits for is that first, immediate one.

Each reason is provoked by a real client against a real ``python -m nextproxy`` process:
the standard library's ssl module, ``openssl s_client`` (system OpenSSL) for what ssl cannot
express (key-exchange groups, TLS 1.3 cipher suites), and raw sockets for hang-ups and silence.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from nextproxy.demo.pki import DemoPki, make_pki
from nextproxy.errors import TLS_HANDSHAKE_FAILURES
from tests.integration.process import NAME, Proxy, Upstreams

ANY_AUTH = "any-auth.localhost"
CA_AUTH = "ca-auth.localhost"
SILENCE_LIMIT = 0.5


@pytest.fixture
def proxy(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> Iterator[Proxy]:
    folder = tmp_path
    ca_file = folder / "client-ca.pem"
    ca_file.write_bytes(pki.ca.certificate)
    extra = f"""client_hello = {SILENCE_LIMIT}
handshake = {SILENCE_LIMIT}
[[sni_routes]]
name = "any-auth"
server_names = ["{ANY_AUTH}"]
action = "terminate"
upstream = "app"
client_auth = "require-any"
[[sni_routes]]
name = "ca-auth"
server_names = ["{CA_AUTH}"]
action = "terminate"
upstream = "app"
client_auth = "require-ca"
client_ca_file = "{ca_file}"
"""
    running = Proxy(folder, pki, upstreams, extra=extra)
    yield running
    running.stop()


def failures(proxy: Proxy) -> list[dict[str, Any]]:
    return proxy.events("tls_handshakes_failed")


def handshake_count(proxy: Proxy, result: str) -> float:
    return proxy.metrics().get(("nextproxy_tls_handshakes_total", (("result", result),)), 0.0)


def expect_failure(proxy: Proxy, before: int, reason: str, *, sni: str | None, port: int | None = None) -> dict[str, Any]:
    """The one new failure line: reason, client address and port, SNI; and the metric moved."""
    proxy.wait_for(lambda: len(failures(proxy)) > before, 10, f"a {reason} log line")
    time.sleep(0.1)  # a second line (a double count) would show up by now
    new = failures(proxy)[before:]
    assert len(new) == 1, new
    line = new[0]
    assert line["reason"] == reason and line["counts"] == {reason: 1}, line
    assert line["client"] == "127.0.0.1" and isinstance(line["client_port"], int) and line["client_port"] > 0, line
    if port is not None:
        assert line["client_port"] == port, line
    assert line.get("sni") == sni, line
    assert line["detail"], line
    return line


def stdlib_client(pki: DemoPki, **options: Any) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=pki.ca.certificate.decode())
    context.check_hostname = False
    for name, value in options.items():
        setattr(context, name, value)
    return context


def attempt(proxy: Proxy, context: ssl.SSLContext, server_name: str) -> tuple[int, BaseException | None]:
    """A handshake plus one read (TLS 1.3 client-auth refusals arrive after the client's Finished)."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    port = sock.getsockname()[1]
    try:
        with context.wrap_socket(sock, server_hostname=server_name) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            tls.recv(100)
    except (ssl.SSLError, OSError) as exc:
        return port, exc
    finally:
        sock.close()
    return port, None


def s_client(proxy: Proxy, *options: str) -> str:
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}", "-servername", NAME, *options],
        input=b"", capture_output=True, timeout=20,
    )  # fmt: skip
    return done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")


def client_hello(server_name: str) -> bytes:
    """A real ClientHello from the standard library, taken off a memory BIO."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_tls12_only_client_is_protocol_version(proxy: Proxy, pki: DemoPki) -> None:
    before, counted = len(failures(proxy)), handshake_count(proxy, "protocol_version")
    port, error = attempt(proxy, stdlib_client(pki, maximum_version=ssl.TLSVersion.TLSv1_2), NAME)
    assert isinstance(error, ssl.SSLError) and "PROTOCOL_VERSION" in str(error).upper()
    expect_failure(proxy, before, "protocol_version", sni=NAME, port=port)
    assert handshake_count(proxy, "protocol_version") == counted + 1


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        # OpenSSL's default groups on the server stop at ffdhe3072.
        (("-groups", "ffdhe4096"), "no_shared_group"),
        # TLS_AES_128_CCM_SHA256 is not among OpenSSL's default TLS 1.3 suites.
        (("-ciphersuites", "TLS_AES_128_CCM_SHA256"), "no_shared_cipher"),
    ],
)
def test_openssl_client_without_common_parameters(proxy: Proxy, options: tuple[str, ...], reason: str) -> None:
    before, counted = len(failures(proxy)), handshake_count(proxy, reason)
    output = s_client(proxy, *options)
    assert "handshake failure" in output, output[-1000:]
    line = expect_failure(proxy, before, reason, sni=NAME)
    assert line["detail"] in ("no suitable key share", "no shared cipher")
    assert handshake_count(proxy, reason) == counted + 1


@pytest.mark.parametrize("how", ["close", "reset"])
def test_hanging_up_mid_handshake_is_eof_during_handshake(proxy: Proxy, how: str) -> None:
    before, counted = len(failures(proxy)), handshake_count(proxy, "eof_during_handshake")
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    port = sock.getsockname()[1]
    sock.sendall(client_hello(NAME))
    assert sock.recv(5)[:1] == b"\x16"  # the ServerHello: the handshake is under way
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    expect_failure(proxy, before, "eof_during_handshake", sni=NAME, port=port)
    assert handshake_count(proxy, "eof_during_handshake") == counted + 1


def test_a_silent_client_times_out(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as silent:
        port = silent.getsockname()[1]
        assert silent.recv(10) == b""  # the proxy closes after client_hello seconds
    line = expect_failure(proxy, 0, "timeout", sni=None, port=port)
    assert "no ClientHello within 0.5 s" in line["detail"]
    assert handshake_count(proxy, "timeout") == 1


def test_a_client_that_stops_after_its_hello_times_out(proxy: Proxy) -> None:
    """Said hello, then never answered the server's flight: the handshake timeout, with the SNI."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as stalled:
        port = stalled.getsockname()[1]
        stalled.sendall(client_hello(NAME))
        while stalled.recv(65536):
            pass
    line = expect_failure(proxy, 0, "timeout", sni=NAME, port=port)
    assert line["detail"] == "handshake not finished within 0.5 s"
    assert handshake_count(proxy, "timeout") == 1


def test_no_client_certificate_on_require_any_is_certificate_required(proxy: Proxy, pki: DemoPki) -> None:
    before = len(failures(proxy))
    port, error = attempt(proxy, stdlib_client(pki), ANY_AUTH)
    assert isinstance(error, ssl.SSLError) and "CERTIFICATE_REQUIRED" in str(error).upper()
    expect_failure(proxy, before, "certificate_required", sni=ANY_AUTH, port=port)
    assert handshake_count(proxy, "certificate_required") >= 1


def test_client_certificate_from_an_unknown_ca_is_unknown_ca(proxy: Proxy, pki: DemoPki, tmp_path: Path) -> None:
    stranger = make_pki()
    cert, key = tmp_path / "stranger.pem", tmp_path / "stranger.key"
    cert.write_bytes(stranger.client.certificate)
    key.write_bytes(stranger.client.key)
    context = stdlib_client(pki)
    context.load_cert_chain(cert, key)
    before = len(failures(proxy))
    port, error = attempt(proxy, context, CA_AUTH)
    assert isinstance(error, ssl.SSLError) and "UNKNOWN_CA" in str(error).upper()
    expect_failure(proxy, before, "unknown_ca", sni=CA_AUTH, port=port)
    assert handshake_count(proxy, "unknown_ca") >= 1


def test_every_result_label_exists_from_the_start(proxy: Proxy) -> None:
    samples = proxy.metrics()
    for result in ("ok", *TLS_HANDSHAKE_FAILURES):
        assert ("nextproxy_tls_handshakes_total", (("result", result),)) in samples, result
