"""Structured log lines on stdout: JSON by default, ``text`` for humans.

Kept apart from ``observe`` so that the supervisor can log before prometheus_client is imported
(multiprocess mode must be configured before that import).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import IO, Any

FLUSH_DELAY = 0.05
"""Seconds lines may wait in the buffer: one write for a burst of access-log lines, not one each."""

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class Logger:
    """Structured log lines; ``enabled(level)`` is cheap so callers can skip building fields."""

    def __init__(self, level: str = "info", fmt: str = "json", stream: IO[str] | None = None, *, buffered: bool = True) -> None:
        self.threshold = LEVELS[level]
        self.fmt = fmt
        self.stream = stream or sys.stdout
        self._pending: list[str] = []
        self._buffered = buffered

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
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stdout must never take a connection down
