"""A small blocking WebSocket client (wsproto over a TLS socket), for the demo and the tests.

``python -m nextproxy.demo.wsclient --cacert ca.pem --resolve HOST:PORT:ADDR wss://HOST:PORT/path [MSG ...]``
sends each MSG as a text message and prints each reply; with no MSG it sends stdin line by line.
It is a tool for trying the proxy by hand, not part of the proxy's data path.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,

    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)


class WebSocketError(Exception):
    pass


@dataclass
class Received:
    """One whole message, or the close the peer sent."""

    data: str | bytes | None
    close_code: int | None = None
    close_reason: str = ""


class WsClient:
    """Blocking client over an already-connected socket (plain or TLS)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.subprotocol: str | None = None
        self._events: list[Event] = []
        self._partial: list[str | bytes] = []
        self.closed: Received | None = None

    def handshake(self, host: str, path: str, subprotocols: Sequence[str] = (), headers: Sequence[tuple[str, str]] = ()) -> None:
        extra = [(name.encode(), value.encode()) for name, value in headers]
        self._send(Request(host=host, target=path, subprotocols=list(subprotocols), extra_headers=extra))
        while True:
            event = self._next_event()
            if isinstance(event, AcceptConnection):
                self.subprotocol = event.subprotocol
                return
            if isinstance(event, (RejectConnection, RejectData)):
                status = getattr(event, "status_code", 0)
                raise WebSocketError(f"upgrade refused: HTTP {status}")

    def send(self, data: str | bytes, *, final: bool = True) -> None:
        message: TextMessage | BytesMessage
        if isinstance(data, str):
            message = TextMessage(data=data, message_finished=final)
        else:
            message = BytesMessage(data=data, message_finished=final)
        self._send(message)

    def ping(self, payload: bytes = b"") -> None:
        self._send(Ping(payload=payload))

    def recv_piece(self) -> tuple[str | bytes | None, bool]:
        """The next piece of a message as it arrives, and whether it ends the message.

        For messages too large to hold: ``(None, True)`` means the peer closed instead.
        """
        while True:
            event = self._next_event()
            if isinstance(event, (TextMessage, BytesMessage)):
                data = event.data if isinstance(event.data, str) else bytes(event.data)
                return data, event.message_finished
            if isinstance(event, Ping):
                self._send(event.response())
            elif isinstance(event, CloseConnection):
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    self._send(event.response())
                self.closed = Received(None, int(event.code), event.reason or "")
                return None, True

    def recv(self) -> Received:
        """The next whole message (fragments joined), or the peer's close."""
        while True:
            event = self._next_event()
            if isinstance(event, (TextMessage, BytesMessage)):
                self._partial.append(event.data if isinstance(event.data, str) else bytes(event.data))
                if event.message_finished:
                    parts, self._partial = self._partial, []
                    if isinstance(parts[0], str):
                        return Received("".join(p for p in parts if isinstance(p, str)))
                    return Received(b"".join(p for p in parts if isinstance(p, bytes)))
            elif isinstance(event, Ping):
                self._send(event.response())
            elif isinstance(event, CloseConnection):
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    self._send(event.response())
                self.closed = Received(None, int(event.code), event.reason or "")
                return self.closed

    def close(self, code: int = 1000, reason: str = "") -> Received:
        """Send a Close and wait for the peer's; returns what the peer answered."""
        if self.ws.state is ConnectionState.OPEN:
            self._send(CloseConnection(code=code, reason=reason))
        while self.closed is None:
            try:
                self.recv()
            except WebSocketError:
                break
        self.sock.close()
        return self.closed or Received(None, 1006)

    def _send(self, event: Event) -> None:
        self.sock.sendall(self.ws.send(event))

    def _next_event(self) -> Event:
        while not self._events:
            data = self.sock.recv(65536)
            if not data:
                self.ws.receive_data(None)
                self._events.extend(self.ws.events())
                if not self._events:
                    raise WebSocketError("connection closed")
                break
            self.ws.receive_data(data)
            self._events.extend(self.ws.events())
        return self._events.pop(0)


def connect(url: str, *, address: tuple[str, int] | None = None, context: ssl.SSLContext | None = None,
            subprotocols: Sequence[str] = (), timeout: float = 10.0,
            headers: Sequence[tuple[str, str]] = ()) -> WsClient:  # fmt: skip
    """Open ``ws://`` or ``wss://`` ``url``; ``address`` overrides DNS (like curl's --resolve)."""
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise WebSocketError(f"expected a ws:// or wss:// URL, got {url!r}")
    port = parts.port or (443 if secure else 80)
    sock: socket.socket = socket.create_connection(address or (parts.hostname, port), timeout=timeout)
    if secure:
        sock = (context or ssl.create_default_context()).wrap_socket(sock, server_hostname=parts.hostname)
    client = WsClient(sock)
    host = parts.netloc.rsplit("@", 1)[-1]
    client.handshake(host, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), subprotocols, headers)
    return client


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nextproxy.demo.wsclient", description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("messages", nargs="*")
    parser.add_argument("--cacert", help="CA bundle to verify the server with")
    parser.add_argument("--resolve", help="HOST:PORT:ADDRESS, as curl's --resolve")
    args = parser.parse_args(argv)
    context = ssl.create_default_context(cafile=args.cacert)
    address = None
    if args.resolve:
        _, port, addr = args.resolve.split(":", 2)
        address = (addr, int(port))
    try:
        client = connect(args.url, address=address, context=context)
    except (OSError, WebSocketError) as exc:
        print(f"wsclient: {exc}", file=sys.stderr)
        return 1
    messages = args.messages or (line.rstrip("\n") for line in sys.stdin)
    for message in messages:
        client.send(message)
        reply = client.recv()
        if reply.data is None:
            print(f"closed by server: {reply.close_code} {reply.close_reason}")
            return 0
        print(reply.data if isinstance(reply.data, str) else f"<{len(reply.data)} bytes>")
    closed = client.close()
    print(f"closed: {closed.close_code} {closed.close_reason}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
