"""Structured log lines on stdout: JSON by default, ``text`` for humans.

Kept apart from ``observe`` so that the supervisor can log before prometheus_client is imported
(multiprocess mode must be configured before that import).
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class Logger:
    """Structured log lines; ``enabled(level)`` is cheap so callers can skip building fields."""

    def __init__(self, level: str = "info", fmt: str = "json", stream: IO[str] | None = None) -> None:
        self.threshold = LEVELS[level]
        self.fmt = fmt
        self.stream = stream or sys.stdout

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
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stdout must never take a connection down
