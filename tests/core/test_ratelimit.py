"""KeyedRateLimiter (token buckets, LRU-capped) and SourceMatcher (allow-lists, trusted nets).

Time is an argument, so every test drives the clock by hand: no sleeps, exact expectations.
Rates and times are chosen as binary fractions (2/s, 0.5 s) so float arithmetic is exact.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from nextproxy.core.ratelimit import KeyedRateLimiter, RateDecision, RateLimit
from nextproxy.core.sources import SourceMatcher, normalise_address, normalise_network


def limiter(rate: float = 2.0, burst: int = 3, max_keys: int = 100) -> KeyedRateLimiter:
    return KeyedRateLimiter(RateLimit(rate, burst), max_keys)


# --- token buckets ----------------------------------------------------------------------------

def test_burst_then_deny_with_retry_after() -> None:
    lim = limiter(rate=2.0, burst=3)
    assert [lim.check("a", 10.0).allowed for _ in range(3)] == [True, True, True]
    denied = lim.check("a", 10.0)
    assert denied == RateDecision(False, 0.5)  # one token takes 1/rate seconds
    assert denied.retry_after_header == "1"


def test_refills_at_the_rate() -> None:
    lim = limiter(rate=2.0, burst=3)
    for _ in range(3):
        lim.check("a", 0.0)
    assert lim.check("a", 0.25) == RateDecision(False, 0.25)  # half a token back
    assert lim.check("a", 0.5).allowed                        # one token back
    assert not lim.check("a", 0.5).allowed


def test_a_denial_costs_nothing() -> None:
    # A client hammering while denied gets in as soon as the rate allows.
    lim = limiter(rate=2.0, burst=1)
    assert lim.check("a", 0.0).allowed
    for step in range(1, 4):
        assert not lim.check("a", step / 8).allowed
    assert lim.check("a", 0.5).allowed


def test_idle_refill_stops_at_burst() -> None:
    lim = limiter(rate=2.0, burst=3)
    lim.check("a", 0.0)
    results = [lim.check("a", 1000.0).allowed for _ in range(4)]
    assert results == [True, True, True, False]


def test_sustained_rate_is_the_configured_rate() -> None:
    # 10 s of a client asking 100 times a second against 2/s, burst 3: 3 + 2 * 10 allowed.
    lim = limiter(rate=2.0, burst=3)
    allowed = sum(lim.check("a", i / 100).allowed for i in range(1001))
    assert allowed == 23


def test_keys_are_independent() -> None:
    lim = limiter(rate=1.0, burst=1)
    assert lim.check("ip:203.0.113.7", 0.0).allowed
    assert not lim.check("ip:203.0.113.7", 0.0).allowed
    assert lim.check("cert:ab12", 0.0).allowed


def test_slow_rate_retry_after_rounds_up() -> None:
    lim = limiter(rate=0.25, burst=1)
    lim.check("a", 0.0)
    denied = lim.check("a", 1.0)
    assert denied.retry_after == 3.0 and denied.retry_after_header == "3"
    lim.check("b", 0.0)
    assert lim.check("b", 3.5).retry_after_header == "1"  # 0.5 s left -> at least 1


def test_clock_stepping_back_refills_nothing() -> None:
    lim = limiter(rate=2.0, burst=1)
    assert lim.check("a", 100.0).allowed
    assert not lim.check("a", 50.0).allowed
    assert lim.check("a", 100.5).allowed


def test_lru_cap_bounds_memory_and_forgets_the_oldest() -> None:
    lim = limiter(rate=1.0, burst=1, max_keys=3)
    for key in "abc":
        assert lim.check(key, 0.0).allowed
    assert not lim.check("a", 0.0).allowed  # touching "a" makes "b" the oldest
    assert lim.check("d", 0.0).allowed       # evicts "b"
    assert len(lim) == 3 and lim.evictions == 1
    assert not lim.check("a", 0.0).allowed   # still remembered: still empty
    assert lim.check("b", 0.0).allowed       # forgotten: starts full (fails open, counted)
    assert lim.evictions == 2


def test_a_flood_of_keys_stays_under_the_cap() -> None:
    lim = limiter(max_keys=1000)
    for i in range(20_000):
        lim.check(f"ip:10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", i / 1000)
    assert len(lim) == 1000 and lim.evictions == 19_000


@pytest.mark.parametrize("rate,burst", [(0.0, 1), (-1.0, 1), (float("inf"), 1),
                                        (float("nan"), 1), (1.0, 0)])
def test_invalid_limits_are_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        RateLimit(rate, burst)


def test_invalid_cap_is_refused() -> None:
    with pytest.raises(ValueError):
        KeyedRateLimiter(RateLimit(1.0, 1), max_keys=0)


# --- source matching --------------------------------------------------------------------------

def test_ipv4_and_ipv6_networks() -> None:
    allow = SourceMatcher(["203.0.113.0/24", "2001:db8::/32", "192.0.2.7"])
    assert "203.0.113.200" in allow and "203.0.114.1" not in allow
    assert "2001:db8:1::5" in allow and "2001:db9::1" not in allow
    assert "192.0.2.7" in allow and "192.0.2.8" not in allow
    assert IPv4Address("203.0.113.1") in allow and IPv6Address("2001:db8::1") in allow


def test_ipv4_mapped_addresses_match_ipv4_rules() -> None:
    # What a dual-stack listener reports for an IPv4 client.
    allow = SourceMatcher(["203.0.113.0/24"])
    assert "::ffff:203.0.113.9" in allow
    assert IPv6Address("::ffff:203.0.113.9") in allow
    assert "::ffff:203.0.114.9" not in allow


def test_ipv4_mapped_networks_become_ipv4_rules() -> None:
    allow = SourceMatcher(["::ffff:10.0.0.0/104"])
    assert allow.networks == (IPv4Network("10.0.0.0/8"),)
    assert "10.1.2.3" in allow and "::ffff:10.1.2.3" in allow and "11.0.0.1" not in allow


def test_ipv6_rules_covering_the_mapped_range_match_ipv4_clients() -> None:
    assert "198.51.100.1" in SourceMatcher(["::/0"])
    assert "198.51.100.1" not in SourceMatcher(["2000::/3"])
    # and an IPv4 "everything" does not let IPv6 clients in
    assert "2001:db8::1" not in SourceMatcher(["0.0.0.0/0"])


def test_empty_matcher_matches_nothing() -> None:
    assert "127.0.0.1" not in SourceMatcher([])


def test_scope_ids_are_ignored() -> None:
    allow = SourceMatcher(["fe80::/10"])
    assert "fe80::1%eth0" in allow and IPv6Address("fe80::1%2") in allow
    assert normalise_address("fe80::1%eth0") == IPv6Address("fe80::1")


def test_text_that_is_not_an_address_matches_nothing() -> None:
    allow = SourceMatcher(["0.0.0.0/0", "::/0"])
    for bad in ("", "localhost", "1.2.3.4.5", "01.2.3.4", "1.2.3.4/32", "::1::"):
        assert bad not in allow


def test_networks_must_be_strict() -> None:
    with pytest.raises(ValueError):
        SourceMatcher(["10.0.0.1/8"])  # host bits set: a typo, not a network
    with pytest.raises(ValueError):
        normalise_network("example.com")
    assert normalise_network(IPv6Network("::ffff:0:0/96")) == IPv4Network("0.0.0.0/0")
