"""The stand-ins' WebSocket side: echo every message frame by frame, plus two text commands.

``info`` answers with what the stand-in saw of the handshake (JSON); ``close:CODE:REASON``
makes the stand-in start the closing handshake with that code, so tests can check how close
codes travel through the proxy.
"""

from __future__ import annotations

from typing import Any

from wsproto import WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from nextproxy.demo.channels import Channel


class WebSocketEcho:
    """Echoes messages frame by frame; ``info`` and ``close:CODE:REASON`` are commands."""

    def __init__(self, ws: WSConnection, channel: Channel, info: str) -> None:
        self.ws = ws
        self.channel = channel
        self.info = info
        self.mid_message = False

    async def run(self, trailing: bytes) -> None:
        self.ws.receive_data(trailing)
        while True:
            for event in self.ws.events():
                if isinstance(event, (TextMessage, BytesMessage)):
                    await self._message(event)
                elif isinstance(event, Ping):
                    await self._send(event.response())
                elif isinstance(event, CloseConnection):
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        await self._send(event.response())
                    elif self.ws.state is ConnectionState.OPEN:
                        # wsproto reports a frame it cannot parse as a close it does not send.
                        await self._send(CloseConnection(code=event.code, reason=event.reason))
                    return
            if self.ws.state is ConnectionState.CLOSED:
                return
            data = await self.channel.read()
            self.ws.receive_data(data or None)

    async def _send(self, event: Any) -> None:
        await self.channel.write(self.ws.send(event))

    async def _message(self, event: TextMessage | BytesMessage) -> None:
        whole = not self.mid_message and event.message_finished
        self.mid_message = not event.message_finished
        if self.ws.state is not ConnectionState.OPEN:
            return  # we already sent our close: the peer's late messages get no echo
        if whole and isinstance(event, TextMessage):
            if event.data == "info":
                await self._send(TextMessage(data=self.info))
                return
            command = close_command(event.data)
            if command is not None:
                await self._send(CloseConnection(code=command[0], reason=command[1]))
                return
        if isinstance(event, TextMessage):
            await self._send(TextMessage(data=event.data, message_finished=event.message_finished))
        else:
            await self._send(BytesMessage(data=event.data, message_finished=event.message_finished))


def close_command(text: str) -> tuple[int, str] | None:
    """``close:CODE:REASON`` with a code a peer may send (RFC 6455 section 7.4), else None."""
    if not text.startswith("close:"):
        return None
    code_text, _, reason = text[len("close:") :].partition(":")
    if not code_text.isdigit():
        return None
    code = int(code_text)
    return (code, reason) if 1000 <= code <= 4999 and code not in (1005, 1006, 1015) else None
