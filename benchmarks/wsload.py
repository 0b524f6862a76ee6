"""WebSocket load client (one process; the harness starts several): echo rounds or idle sessions.

echo: ``--sessions`` sessions, each sends one message and waits for its echo, again and again,
until ``--duration`` seconds or ``--max-messages`` echoes in all (both bounds always apply).
Writes one JSON object to ``--out``: messages, bytes, errors, and round-trip samples in microseconds.
idle: opens ``--sessions`` TLS connections (``--idle tls``) or wss sessions (``--idle ws``),
prints ``ready OK FAILED``, holds them until a line on stdin or ``--hold`` seconds, then exits.

Client frames use the all-zero masking key: valid on the wire (every peer must unmask it), and
it keeps the client's own CPU out of the measurement. TLS is not verified (loopback benchmark).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from wsframes import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, FrameReader, frame  # noqa: E402

ZERO_MASK = b"\0\0\0\0"
CONNECT_TIMEOUT = 20.0
MAX_SAMPLES = 20000


def client_tls() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["http/1.1"])
    return context


class Session(asyncio.Protocol):
    """One client session: upgrade, then ping-pong messages of a fixed size."""

    def __init__(self, shared: Shared, path: str, upgrade: bool) -> None:
        self.shared = shared
        self.path = path
        self.upgrade = upgrade
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.reader: FrameReader | None = None
        self.ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.sent_at = 0.0
        self.echoing = False
        self.pending = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.upgrade:
            self.ready.set_result(True)
            return
        self.transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        if self.reader is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            ok = self.head.startswith(b"HTTP/1.1 101")
            data = self.head[end + 4 :]
            self.head = b""
            self.reader = FrameReader()
            if not self.ready.done():
                self.ready.set_result(ok)
            if not data:
                return
        for fin, opcode, payload in self.reader.feed(data):
            if opcode == OP_PING:
                self.transport.write(frame(OP_PONG, payload, ZERO_MASK))  # type: ignore[union-attr]
            elif opcode == OP_CLOSE:
                self.transport.close()  # type: ignore[union-attr]
            elif opcode != OP_PONG:
                self.pending -= len(payload)
                if fin and self.pending <= 0:
                    self.shared.echoed(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_result(False)
        if self.echoing:
            self.shared.lost(self)

    def send(self) -> None:
        self.pending = len(self.shared.message)
        self.sent_at = time.perf_counter()
        self.transport.write(self.shared.frame)  # type: ignore[union-attr]


class Shared:
    def __init__(self, size: int, max_messages: int, deadline: float) -> None:
        self.message = os.urandom(size)
        self.frame = frame(OP_BINARY, self.message, ZERO_MASK)
        self.max_messages = max_messages
        self.deadline = deadline
        self.messages = 0
        self.errors = 0
        self.samples: list[int] = []
        self.active = 0
        self.done = asyncio.get_running_loop().create_future()

    def echoed(self, session: Session) -> None:
        now = time.perf_counter()
        self.messages += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(int((now - session.sent_at) * 1e6))
        if self.messages < self.max_messages and now < self.deadline:
            session.send()
        else:
            self.finish(session)

    def lost(self, session: Session) -> None:
        self.errors += 1
        self.finish(session)

    def finish(self, session: Session) -> None:
        if session.echoing:
            session.echoing = False
            self.active -= 1
            if self.active == 0 and not self.done.done():
                self.done.set_result(None)


async def open_sessions(args: argparse.Namespace, shared: Shared | None, upgrade: bool) -> list[Session]:
    loop = asyncio.get_running_loop()
    tls = client_tls() if args.tls else None
    sem = asyncio.Semaphore(64)  # bounded concurrent handshakes: the listener's backlog stays sane

    async def one() -> Session | None:
        async with sem:
            try:
                _, session = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: Session(shared, args.path, upgrade),  # type: ignore[arg-type]
                        args.host, args.port, ssl=tls, server_hostname="" if tls else None,
                    ),
                    CONNECT_TIMEOUT,
                )
                if await asyncio.wait_for(session.ready, CONNECT_TIMEOUT):
                    return session
                session.transport.close()  # type: ignore[union-attr]
            except (OSError, asyncio.TimeoutError, ssl.SSLError):
                pass
            return None

    opened = await asyncio.gather(*(one() for _ in range(args.sessions)))
    return [s for s in opened if s is not None]


async def echo(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    shared = Shared(args.size, args.max_messages, float("inf"))
    sessions = await open_sessions(args, shared, upgrade=True)
    start = time.perf_counter()
    shared.deadline = start + args.duration
    for session in sessions:
        session.echoing = True
        shared.active += 1
        session.send()
    if sessions:
        try:
            await asyncio.wait_for(shared.done, args.duration + 10)
        except asyncio.TimeoutError:
            shared.errors += shared.active
    elapsed = time.perf_counter() - start
    for session in sessions:
        session.transport.close()  # type: ignore[union-attr]
    await asyncio.sleep(0.05)
    del loop
    return {
        "sessions": len(sessions), "failed_sessions": args.sessions - len(sessions),
        "messages": shared.messages, "bytes": shared.messages * args.size * 2, "elapsed": elapsed,
        "errors": shared.errors, "samples": shared.samples,
    }


async def idle(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    sessions = await open_sessions(args, None, upgrade=args.idle == "ws")
    print(f"ready {len(sessions)} {args.sessions - len(sessions)}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        await asyncio.wait_for(reader.readline(), args.hold)
    except asyncio.TimeoutError:
        pass
    for session in sessions:
        session.transport.close()  # type: ignore[union-attr]
    await asyncio.sleep(0.1)


def prime_malloc() -> None:
    """Make this client's per-read cost independent of how the server's records arrive.

    CPython's SSL read allocates the whole size asked (asyncio's and uvloop's SSL ask 256 KiB),
    above glibc's initial mmap threshold of 128 KiB, then shrinks the result to what was read:
    mmap, mremap, munmap per read. glibc raises the threshold only when it frees such a block
    unshrunk, which here happens only if some read returns nothing: a server's session tickets
    arriving alone. Tickets that ride with the first response never do, and then every later
    read paid three syscalls (measured: 5.2-5.6 against 2.3 syscalls per echo, twice the
    client's CPU, and fewer echoes for the proxy to batch). Freeing one large block here raises
    the threshold for good, whatever the server does.
    """
    block = bytes(1 << 20)
    del block


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/ws")
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--max-messages", type=int, default=1_000_000)
    parser.add_argument("--idle", choices=("tls", "ws"))
    parser.add_argument("--hold", type=float, default=120.0)
    parser.add_argument("--out", help="echo mode: write the JSON result to this file")
    args = parser.parse_args()
    prime_malloc()
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    if args.idle:
        run(idle(args))
    else:
        # A file, not stdout: the samples make the line long and the loop may leave stdout non-blocking.
        with open(args.out, "w") as file:
            json.dump(run(echo(args)), file)


if __name__ == "__main__":
    main()
