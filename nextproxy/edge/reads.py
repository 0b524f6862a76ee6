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

import threading

READ_SIZE = 64 * 1024
"""Largest single read: four TLS records, a few network round trips' worth on a LAN."""

_buffers = threading.local()


def read_buffer() -> memoryview:
    """This thread's read buffer (created on first use)."""
    buffer: memoryview | None = getattr(_buffers, "buffer", None)
    if buffer is None:
        buffer = _buffers.buffer = memoryview(bytearray(READ_SIZE))
    return buffer
