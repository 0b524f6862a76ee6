"""Structured log lines on stdout: JSON by default, ``text`` for humans.

Logging never blocks the event loop. Lines collect in a bounded buffer and a writer thread does
the blocking writes to stdout; if nobody reads stdout (a stalled pipe, a stuck log shipper), the
thread blocks instead of the loop, the buffer fills, and further lines are dropped and counted
(``on_drop``, wired to ``nextproxy_log_lines_dropped_total``). A thread rather than O_NONBLOCK
on fd 1: that flag belongs to the open file description, which the terminal or the parent
process shares, and would break their writes. Measured before this: a stalled reader froze the
loop after about 640 lines, and ``/livez`` and new handshakes timed out.

Kept apart from ``observe`` so that the supervisor can log before prometheus_client is imported
(multiprocess mode must be configured before that import).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from typing import IO, Any, Callable

FLUSH_DELAY = 0.05
"""Seconds lines may wait in the buffer: one write for a burst of access-log lines, not one each."""
MAX_BUFFERED = 1024 * 1024
"""Bytes of lines waiting for stdout before new lines are dropped (about 4,000 access lines)."""
EXIT_WAIT = 2.0
"""Seconds ``close`` waits for the writer to hand the last lines to stdout."""

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class Logger:
    """Structured log lines; ``enabled(level)`` is cheap so callers can skip building fields.

    ``stream`` given (tests): lines are written to it directly, on the caller's thread. Without
    it, lines go to stdout through ``_Writer``.
    """

    def __init__(self, level: str = "info", fmt: str = "json", stream: IO[str] | None = None, *, buffered: bool = True) -> None:
        self.threshold = LEVELS[level]
        self.fmt = fmt
        self.stream = stream
        self._pending: list[str] = []
        self._buffered = buffered
        self._writer: _Writer | None = None
        self.dropped = 0
        self.on_drop: Callable[[], None] | None = None
        """Called once per dropped line (the metric); set by the observer."""

    def enabled(self, level: str) -> bool:
        return LEVELS[level] >= self.threshold

    def log(self, level: str, event: str, **fields: Any) -> None:
        if LEVELS[level] < self.threshold:
            return
        now = time.time()
        if self.fmt == "json":
            record = {"ts": round(now, 3), "level": level, "event": event, **fields}
            line = json.dumps(record, separators=(",", ":"), default=str)
        else:
            stamp = time.strftime("%H:%M:%S", time.localtime(now))
            line = f"{stamp} {level.upper():7} {event} " + " ".join(f"{k}={v}" for k, v in fields.items())
        self._pending.append(line)
        if not self._buffered:
            self.flush()
            return
        if len(self._pending) > 1:
            return
        try:
            # Inside the event loop: flush once after the current burst. Outside it: now.
            asyncio.get_running_loop().call_later(FLUSH_DELAY, self.flush)
        except RuntimeError:
            self.flush()

    def flush(self) -> None:
        lines, self._pending = self._pending, []
        if not lines:
            return
        text = "\n".join(lines) + "\n"
        # sys.stdout replaced (pytest's capture, a redirect in-process): write to it directly.
        stream = self.stream or (None if sys.stdout is sys.__stdout__ else sys.stdout)
        if stream is not None:
            try:
                stream.write(text)
                stream.flush()
            except (OSError, ValueError):
                pass  # a closed stream must never take a connection down
            return
        writer = self._writer
        if writer is None or writer.pid != os.getpid():  # a forked worker starts its own thread
            writer = self._writer = _Writer()
        if not writer.put(text.encode("utf-8", "replace")):
            self.dropped += len(lines)
            if self.on_drop is not None:
                for _ in lines:
                    self.on_drop()

    def close(self) -> None:
        """Flush and give the writer a moment to finish (on exit): never blocks for long."""
        self.flush()
        if self._writer is not None:
            self._writer.wait_empty(EXIT_WAIT)


class _Writer:
    """A daemon thread that writes queued chunks to fd 1 with blocking writes."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._chunks: list[bytes] = []
        self._size = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="nextproxy-log", daemon=True)
        self._thread.start()

    def put(self, chunk: bytes) -> bool:
        """Queue ``chunk``; False (dropped) when the buffer is full. Never blocks on stdout."""
        with self._cond:
            if self._size + len(chunk) > MAX_BUFFERED:
                return False
            self._chunks.append(chunk)
            self._size += len(chunk)
            self._cond.notify()
        return True

    def wait_empty(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._size and time.monotonic() < deadline:
                self._cond.wait(0.05)

    def _run(self) -> None:
        fd = sys.stdout.fileno() if sys.stdout is not None else 1
        while True:
            with self._cond:
                while not self._chunks:
                    self._cond.wait()
                chunks, self._chunks = self._chunks, []
            data = b"".join(chunks)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                pass  # stdout closed: the lines are lost, the proxy keeps serving
            with self._cond:
                self._size -= len(data)
                self._cond.notify_all()
