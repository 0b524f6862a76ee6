"""edge/resumption.py with real OpenSSL on memory BIOs: a session is offered to the server it
came from, replaced when a server refuses it, and kept from full handshakes only."""

from __future__ import annotations

import ssl
from pathlib import Path

from nextproxy.config.model import UpstreamTls
from nextproxy.demo.pki import DemoPki, server_ssl_context
from nextproxy.edge.resumption import ResumingContext, keep_session
from nextproxy.edge.tlscontexts import upstream_ssl_context

ROUNDS = 10


def connect(client: ssl.SSLContext, server: ssl.SSLContext) -> ssl.SSLObject:
    """One handshake and one application record (after which a TLS 1.3 client holds the
    server's tickets, as an upstream connection does at its first read); the client's side."""
    to_client, to_server = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client.wrap_bio(to_client, to_server, server_hostname="localhost")
    peer = server.wrap_bio(server_in, server_out, server_side=True)
    done = [False, False]
    for _ in range(ROUNDS):
        for i, side in enumerate((tls, peer)):
            if not done[i]:
                try:
                    side.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        server_in.write(to_server.read())
        to_client.write(server_out.read())
        if all(done):
            break
    assert all(done)
    peer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    to_client.write(server_out.read())
    assert tls.read(1024).startswith(b"HTTP/1.1 204")
    keep_session(tls)
    return tls


def test_a_session_is_resumed_then_replaced_when_another_server_refuses_it(pki: DemoPki, pki_files: dict[str, Path]) -> None:
    client = upstream_ssl_context(UpstreamTls(ca_file=str(pki_files["ca.pem"])))
    assert isinstance(client, ResumingContext) and client.session is None
    first, second = server_ssl_context(pki.upstream), server_ssl_context(pki.upstream)  # two ticket keys
    assert not connect(client, first).session_reused
    kept = client.session
    assert kept is not None and kept.has_ticket
    assert connect(client, first).session_reused
    assert client.session is kept  # a resumed connection's session is not read again (costly)
    # The server changed its ticket keys (a restart): the offer is refused, a full handshake
    # brings a new session, and that one resumes.
    assert not connect(client, second).session_reused
    assert client.session is not kept
    assert connect(client, second).session_reused


def test_sessions_never_cross_contexts(pki: DemoPki, pki_files: dict[str, Path]) -> None:
    """Each upstream server has its own context: what one kept is never offered by another
    (which may verify another name, or present another client certificate)."""
    server = server_ssl_context(pki.upstream)
    one = upstream_ssl_context(UpstreamTls(ca_file=str(pki_files["ca.pem"])))
    other = upstream_ssl_context(UpstreamTls(ca_file=str(pki_files["ca.pem"])))
    connect(one, server)
    assert one.session is not None and other.session is None  # type: ignore[attr-defined]
    assert not connect(other, server).session_reused
