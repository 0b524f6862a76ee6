"""A small fast WebSocket echo server: the benchmark's upstream for W5 and W6.

``python benchmarks/wsecho.py PORT`` listens on 127.0.0.1:PORT (plain ws, any path), answers
every upgrade, echoes each data frame back (fragments frame by frame), answers pings and closes.
asyncio Protocol on uvloop, one process. It is written for the benchmark, not reused from
nextproxy.demo.standins, whose h11+wsproto echo costs several times more CPU per message and would
make the upstream, not the proxy, the limit. Never reachable beyond loopback.
"""

from __future__ import annotations

import asyncio
import signal
import sys

sys.path.insert(0, __import__("os").path.dirname(__file__))
from wsframes import OP_CLOSE, OP_PING, OP_PONG, FrameReader, accept_key, frame  # noqa: E402

MAX_HEAD = 16384


class Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.reader: FrameReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.reader is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD:
                    self.transport.close()
                return
            key = b""
            for line in self.head[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            rest = self.head[end + 4 :]
            self.head = b""
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n"
            )
            self.reader = FrameReader()
            data = rest
            if not data:
                return
        out = []
        for fin, opcode, payload in self.reader.feed(data):
            if opcode == OP_PING:
                out.append(frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                out.append(frame(OP_CLOSE, payload[:2]))
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            elif opcode != OP_PONG:
                # Echo with the same opcode and FIN bit, so fragments stay fragments.
                head = frame(opcode, payload)
                if not fin:
                    head = bytes([head[0] & 0x7F]) + head[1:]
                out.append(head)
        if out:
            self.transport.write(b"".join(out))


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", port, backlog=8192, reuse_address=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main(int(sys.argv[1])))
    except ImportError:
        asyncio.run(main(int(sys.argv[1])))
