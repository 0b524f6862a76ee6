"""How much the edge reads from a socket at once, and the one buffer each loop thread reads into.

uvloop reads up to 256 KiB per callback into a plain Protocol, and a chunk is handled whole:
relayed past the other side's write mark, or written into OpenSSL's memory BIO, which keeps the
capacity of its largest fill for the connection's lifetime. With a client that stopped reading
(or sent a large body) that was most of the ~0.8 MiB each one held. Our protocols are
BufferedProtocols that read at most ``READ_SIZE`` into ``read_buffer()`` and hand on a copy,
as uvloop's own bytes are. One buffer per loop thread is enough: the loop calls get_buffer and
buffer_updated back to back, in its own thread, before any other read.
"""

from __future__ import annotations

import asyncio
import threading

READ_SIZE = 64 * 1024
"""Largest single read from a client or in passthrough: four TLS records."""
MAX_READ = 256 * 1024
"""Largest upstream read toward a terminated client, when that client's buffer has the room:
``read_buffer(room)`` sizes each read to what the client can take below its mark, so a fast
client gets big reads (fewer callbacks per MiB) and a stalled one gets ``MIN_READ``."""
MIN_READ = 16 * 1024
READ_CHUNK_LIMIT = 128 * 1024
"""High-water mark of a terminated client's write buffer before its upstream is paused. With
upstream reads sized to the room left below it (``read_room``) a client that stops reading
holds about 215 KiB in all (RSS, measured): the mark, a 16 KiB read and the connection; 128 KiB
still streams a 1 MiB response in a few turns."""

_buffers = threading.local()


def read_buffer(size: int = READ_SIZE) -> memoryview:
    """This thread's read buffer (created on first use), ``size`` bytes of it (at most MAX_READ)."""
    buffer: memoryview | None = getattr(_buffers, "buffer", None)
    if buffer is None:
        buffer = _buffers.buffer = memoryview(bytearray(MAX_READ))
    return buffer[:size]


def read_room(client: asyncio.Transport | None) -> int:
    """An upstream's next read toward ``client``: what its buffer can take below the mark, so a
    stalled client's buffer never passes the mark by more than ``MIN_READ``."""
    room = READ_CHUNK_LIMIT - client.get_write_buffer_size() if client is not None else 0
    return MIN_READ if room < MIN_READ else (MAX_READ if room > MAX_READ else room)
