"""Real TLS clients with no socket, for driving a TlsEngine (mitmproxy's SSLTest idea).

``TlsPeer`` is the standard library ``ssl`` client over ``MemoryBIO`` (the base image's
OpenSSL 3.0: no post-quantum groups). ``OpenSSLPeer`` is the same over pyOpenSSL (the OpenSSL
that ``cryptography`` bundles, which offers X25519MLKEM768). ``pump()`` moves bytes between a
peer and an engine until both are idle, collecting plaintext and errors instead of raising, so
a test can assert on what each side saw. Every loop is bounded.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from OpenSSL import SSL

from nextproxy.core.tls import TlsEngine
from nextproxy.errors import TlsError
from nextproxy.demo.pki import Issued

MAX_ROUNDS = 200


class Peer(Protocol):
    handshake_done: bool
    error: Exception | None
    received: bytearray
    peer_closed: bool

    def feed(self, data: bytes) -> None: ...
    def data_to_send(self) -> bytes: ...
    def send(self, data: bytes) -> None: ...
    def close(self) -> None: ...


def client_context(
    ca: Issued | None = None,
    *,
    cert: Issued | None = None,
    chain: Sequence[Issued] = (),
    alpn: Sequence[str] = ("h2", "http/1.1"),
    tls12_only: bool = False,
) -> ssl.SSLContext:
    """A stdlib client context; verifies the server against ``ca`` when given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cadata=ca.cert_pem.decode())
    if cert is not None:
        load_pair(context, cert, chain)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    if tls12_only:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def load_pair(context: ssl.SSLContext, cert: Issued, chain: Sequence[Issued] = ()) -> None:
    """The stdlib only loads certificates from files: use a private temporary one."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pair.pem"
        path.write_bytes(cert.key_pem + cert.cert_pem + b"".join(c.cert_pem for c in chain))
        context.load_cert_chain(str(path))


@dataclass
class TlsPeer:
    """A stdlib ``ssl`` client over memory BIOs."""

    context: ssl.SSLContext
    server_name: str | None = "localhost"
    session: ssl.SSLSession | None = None
    """A session from an earlier connection, to attempt resumption."""
    handshake_done: bool = False
    error: Exception | None = None
    received: bytearray = field(default_factory=bytearray)
    peer_closed: bool = False

    def __post_init__(self) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = self.context.wrap_bio(
            self.incoming, self.outgoing, server_hostname=self.server_name, session=self.session
        )
        self._step()

    def feed(self, data: bytes) -> None:
        self.incoming.write(data)
        self._step()

    def _step(self) -> None:
        if self.error is not None or self.peer_closed:
            return
        try:
            if not self.handshake_done:
                self.obj.do_handshake()
                self.handshake_done = True
            for _ in range(MAX_ROUNDS * 100):
                chunk = self.obj.read(65536)
                if not chunk:
                    self.peer_closed = True
                    return
                self.received += chunk
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except ssl.SSLZeroReturnError:
            self.peer_closed = True
        except ssl.SSLError as exc:
            self.error = exc

    def data_to_send(self) -> bytes:
        return self.outgoing.read()

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self.obj.write(view) :]

    def close(self) -> None:
        try:
            self.obj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            pass

    @property
    def alpn(self) -> str | None:
        return self.obj.selected_alpn_protocol()


@dataclass
class OpenSSLPeer:
    """A pyOpenSSL client over memory BIOs (OpenSSL 4: offers X25519MLKEM768 by default)."""

    server_name: str | None = "localhost"
    alpn: Sequence[bytes] = (b"http/1.1",)
    handshake_done: bool = False
    error: Exception | None = None
    received: bytearray = field(default_factory=bytearray)
    peer_closed: bool = False

    def __post_init__(self) -> None:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if self.alpn:
            context.set_alpn_protos(list(self.alpn))
        self.conn = SSL.Connection(context, None)
        self.conn.set_connect_state()
        if self.server_name:
            self.conn.set_tlsext_host_name(self.server_name.encode())
        self._step()

    def feed(self, data: bytes) -> None:
        self.conn.bio_write(data)
        self._step()

    def _step(self) -> None:
        if self.error is not None or self.peer_closed:
            return
        try:
            if not self.handshake_done:
                self.conn.do_handshake()
                self.handshake_done = True
            for _ in range(MAX_ROUNDS * 100):
                self.received += self.conn.recv(65536)
        except SSL.WantReadError:
            return
        except SSL.ZeroReturnError:
            self.peer_closed = True
        except SSL.Error as exc:
            self.error = exc

    def data_to_send(self) -> bytes:
        out = bytearray()
        for _ in range(MAX_ROUNDS * 100):
            try:
                out += self.conn.bio_read(65536)
            except SSL.WantReadError:
                break
        return bytes(out)

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def close(self) -> None:
        self.conn.shutdown()


@dataclass
class PumpResult:
    server_plaintext: bytes = b""
    server_error: TlsError | None = None
    rounds: int = 0


def pump(peer: Peer, engine: TlsEngine, *, chunk: int | None = None, result: PumpResult | None = None) -> PumpResult:
    """Move bytes both ways until neither side has anything to say (or the engine failed).

    ``chunk`` feeds the engine that many bytes per ``receive()`` call (1 = byte at a time).
    """
    result = result or PumpResult()
    result.server_error = result.server_error or engine.error  # failed on the constructor's bytes
    for _ in range(MAX_ROUNDS):
        result.rounds += 1
        moved = False
        out = peer.data_to_send()
        if out and result.server_error is None:
            moved = True
            step = chunk or len(out)
            try:
                for start in range(0, len(out), step):
                    result.server_plaintext += engine.receive(out[start : start + step])
            except TlsError as exc:
                result.server_error = exc
        back = engine.data_to_send()
        if back:
            moved = True
            peer.feed(back)
        if not moved:
            return result
    raise AssertionError(f"still talking after {MAX_ROUNDS} rounds")
