"""The I/O skeleton of nextproxy with no HTTP in it: a lower bound, not a proxy.

    python benchmarks/skeleton.py --cert edge.pem --key edge.key --listen 18445 --upstream 127.0.0.1:18080

It does what nextproxy's shell does per request (uvloop Protocols, TLS 1.3 on a pyOpenSSL
memory BIO, upstream connections kept in a pool, one TLS record per response, session tickets
sent with the first response) and nothing else: the request head is forwarded as it came (but
for ``Connection: close``, which ends the client's connection after its response, not the pooled
upstream's), the response is framed by finding Content-Length with bytes.find, there are no
checks, no routing, no headers, no limits, no metrics, no timeouts. GET with Content-Length
responses only. Never use it for anything but measuring: its CPU per request (W1, W3) and per
new connection (W2) under wrk is what any Python proxy built on uvloop and pyOpenSSL pays before
it parses a single header (benchmarks/README.md, "What runs").
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop
from OpenSSL import SSL


CLOSE = b"\r\nConnection: close"
"""How wrk asks for a new connection per request (``-H "Connection: close"``, W2)."""
KEEP_ALIVE = b"\r\nConnection: keep-alive"
IDLE: list[Upstream] = []
"""Upstream connections no client holds; a client takes one for its connection's life."""


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client | None) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            self.buffer = buffer
            return
        start = buffer.find(b"Content-Length: ", 0, end)
        length = int(buffer[start + 16 : buffer.find(b"\r\n", start)]) if start >= 0 else 0
        total = end + 4 + length
        if len(buffer) < total:
            self.buffer = buffer
            return
        self.buffer = buffer[total:]
        if self.client is not None:
            self.client.respond(buffer[:total])

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self in IDLE:
            IDLE.remove(self)


class Client(asyncio.Protocol):
    def __init__(self, context: SSL.Context, upstream: tuple[str, int], loop: asyncio.AbstractEventLoop) -> None:
        self.tls = SSL.Connection(context, None)
        self.tls.set_accept_state()
        self.upstream_address = upstream
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.pending = b""
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        tls = self.tls
        tls.bio_write(data)
        plaintext = b""
        try:
            while True:
                plaintext += tls.recv(16384)
        except SSL.WantReadError:
            pass
        except SSL.Error:
            self.transport.close()  # type: ignore[union-attr]
            return
        if plaintext:
            self.request(plaintext)  # the session tickets wait for the response, as in nextproxy
        else:
            self.flush()

    def request(self, data: bytes) -> None:
        if CLOSE in data:
            data, self.closing = data.replace(CLOSE, b"", 1), True
        if self.upstream is None and IDLE:
            self.upstream = IDLE.pop()
            self.upstream.client = self
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.write(data)
            return
        self.pending += data
        if upstream is None:
            self.upstream = Upstream(self)
            self.loop.create_task(self.connect())

    async def connect(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        await self.loop.create_connection(lambda: upstream, *self.upstream_address)
        assert upstream.transport is not None
        upstream.transport.write(self.pending)
        self.pending = b""

    def respond(self, response: bytes) -> None:
        if self.closing:
            # The upstream's "Connection: keep-alive" would have the client send its next request
            # into the closing connection: the client is told, as nextproxy tells it.
            response = response.replace(KEEP_ALIVE, b"\r\nConnection: close", 1)
        view = memoryview(response)
        while view:
            view = view[self.tls.send(view) :]
        if not self.closing:
            self.flush()
            return
        self.tls.shutdown()  # close_notify leaves with the response
        self.flush()
        if self.transport is not None:
            self.transport.close()
        self.release()

    def release(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None and upstream.transport is not None and not upstream.buffer:
            upstream.client = None
            IDLE.append(upstream)

    def flush(self) -> None:
        parts = []
        while True:
            try:
                parts.append(self.tls.bio_read(65536))
            except SSL.WantReadError:
                break
        if parts and self.transport is not None:
            self.transport.write(b"".join(parts))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()  # mid-exchange: its response has nowhere to go


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--upstream", required=True, help="host:port, plain HTTP/1.1")
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.use_certificate_chain_file(args.cert)
    context.use_privatekey_file(args.key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(context, (host, int(port)), loop), "127.0.0.1", args.listen)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
