"""The event loop every command runs on: uvloop when installed (production), else asyncio's.

A module of its own so that ``cli`` can import it without importing ``process.metrics``, which
must first be imported after the supervisor has set PROMETHEUS_MULTIPROC_DIR.
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine


def run_loop(coro: Coroutine[Any, Any, int]) -> int:
    """Run ``coro`` to completion on a fresh loop and return its exit code."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    return uvloop.run(coro)
