"""Token buckets keyed by client (an address or a certificate fingerprint), bounded in memory.

One ``KeyedRateLimiter`` per limit: a route's ``rate_limit`` (requests and WebSocket upgrades,
429 with Retry-After when denied) or a listener's ``new_connections_per_second`` (close at
accept). Each key's bucket holds up to ``burst`` tokens and refills at ``rate`` per second;
an event takes one token.

Time is an argument (the shell passes a monotonic clock): the core keeps no clock. Memory is
capped by an LRU: past ``max_keys`` the least recently seen key is forgotten. A forgotten key
starts again with a full bucket, so a flood of fresh keys can only make the limiter more
lenient, never refuse a client that is within its limit; ``evictions`` counts it happening.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

MAX_KEYS = 100_000
"""Default LRU cap: ~20 MB at worst (a key string plus a two-float bucket, ~200 B)."""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``rate`` events per second on average, up to ``burst`` back to back."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        # Config validation names the key; reaching here with bad values is a bug.
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"rate must be a positive number, got {self.rate}")
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, got {self.burst}")


@dataclass(frozen=True, slots=True)
class RateDecision:
    """Whether one event may go ahead and, if not, how long until it could."""

    allowed: bool
    retry_after: float
    """Seconds until one token is back; 0.0 when allowed."""

    @property
    def retry_after_header(self) -> str:
        """Retry-After value (RFC 9110 10.2.3: whole seconds), rounded up, at least 1."""
        return str(max(1, math.ceil(self.retry_after)))


ALLOWED = RateDecision(True, 0.0)


class _Bucket:
    """Mutable per-key state; slotted, because there may be ``max_keys`` of them."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class KeyedRateLimiter:
    """Token buckets per key, with the least recently used keys forgotten past a cap."""

    def __init__(self, limit: RateLimit, max_keys: int = MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self.limit = limit
        self.max_keys = max_keys
        self.evictions = 0
        """Keys forgotten to stay under ``max_keys`` (a metric: non-zero means the cap is
        too small for the number of clients, and limits are being reset)."""
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, key: str, now: float) -> RateDecision:
        """Take one token from ``key``'s bucket at time ``now`` (seconds, monotonic).

        A denied event takes nothing, so a client that keeps retrying is let in again as soon
        as the rate allows, not punished for its retries.
        """
        rate, burst = self.limit.rate, self.limit.burst
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(float(burst), now)
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
                self.evictions += 1
        else:
            self._buckets.move_to_end(key)
            # A clock that steps back (it should not: the shell passes a monotonic one)
            # refills nothing rather than draining the bucket.
            elapsed = now - bucket.stamp
            if elapsed > 0:
                bucket.tokens = min(float(burst), bucket.tokens + elapsed * rate)
                bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return ALLOWED
        return RateDecision(False, (1.0 - bucket.tokens) / rate)
