"""Response bodies the stand-ins generate: a fixed pattern, streamed in pieces, with its hash
(which goes in the head, before the body, so a client can check every byte it received)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator

from nextproxy.demo.channels import READ_SIZE

# ``?bytes=N`` answers with this pattern repeated: easy to eyeball, and any shifted or dropped
# byte changes the sha256 the client compares against ``x-body-sha256``.
PATTERN = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_"
_PATTERN_BLOCK = PATTERN * (READ_SIZE // len(PATTERN))


def pattern_chunks(size: int) -> Iterator[bytes]:
    """The first ``size`` bytes of the repeated PATTERN, in 64 KiB pieces."""
    remaining = size
    while remaining > 0:
        piece = _PATTERN_BLOCK[: min(remaining, len(_PATTERN_BLOCK))]
        remaining -= len(piece)
        yield piece


def pattern(size: int) -> bytes:
    """The whole ``?bytes=size`` body at once (for tests comparing what they received)."""
    return b"".join(pattern_chunks(size))


@functools.lru_cache(maxsize=64)
def pattern_sha256(size: int) -> str:
    """Hex sha256 of ``pattern(size)``; cached because it goes in the head before the body."""
    digest = hashlib.sha256()
    for piece in pattern_chunks(size):
        digest.update(piece)
    return digest.hexdigest()
