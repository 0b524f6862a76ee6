"""Per-route admission: source-address allow-lists and request rate limits (sans-IO).

One ``Admission`` per worker and configuration (it lives in the ``RouteTable``, so a reload
starts with fresh buckets): its token buckets must be shared by every connection of a client,
or a client would get a new burst per connection. Time is an argument (the shell passes its
monotonic loop clock); nothing here reads a clock, a socket or a log.

Keys: a client that presented a verified certificate is limited by its fingerprint (``cert:<sha256>``),
since many clients may share one address behind a NAT while a certificate names one client;
anyone else by address (``ip:<address>``), which is the PROXY protocol header's source when the
listener trusts its balancer. Each worker keeps its own buckets (no shared memory), so with N
workers a client may get up to N times the configured rate, as with nginx's per-worker limits.
"""

from __future__ import annotations

from dataclasses import dataclass

from nextproxy.config.model import Config, PathRoute, SniAction, SniRoute
from nextproxy.core.actions import AuthorizationDenied, RateLimited
from nextproxy.core.headers import ClientInfo
from nextproxy.core.ratelimit import MAX_KEYS, KeyedRateLimiter, RateLimit
from nextproxy.core.sources import SourceMatcher

SOURCE = "source"
"""``nextproxy_authorization_denied_total`` reason for an address outside ``allow_sources``."""
CERTIFICATE_DENIALS = ("no_certificate", "not_allowed", "not_allowed_unverified")
"""The reasons ``responses.authorize`` gives for a client-certificate allow-list."""


def denial_series(config: Config) -> list[tuple[str, str]]:
    """Every (route, reason) ``config`` can count in ``nextproxy_authorization_denied_total``.

    The process creates them at 0 when it applies the configuration: a counter series that
    appears with its first increment hides that increment from increase() and rate(), and
    denials are what an alert watches. Certificate reasons go to every path route reachable
    through an allow-list (its own, or a terminating SNI route's), source reasons to every
    route with ``allow_sources``.
    """
    terminating = [s for s in config.sni_routes if s.action is SniAction.TERMINATE]
    any_sni_allow = any(s.allow is not None and s.upstream is None for s in terminating)
    series: list[tuple[str, str]] = []
    for route in config.routes:
        if route.allow is not None or any_sni_allow:
            series += [(route.name, reason) for reason in CERTIFICATE_DENIALS]
    for sni in terminating:
        if sni.allow is not None and sni.upstream is not None:  # its own route (``RouteTable``)
            series += [(sni.name, reason) for reason in CERTIFICATE_DENIALS]
    named: list[PathRoute | SniRoute] = [*config.routes, *config.sni_routes]
    for named_route in named:
        if named_route.allow_sources is not None:
            series.append((named_route.name, SOURCE))
    return series


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is not let through: the status to answer, and the fact to report."""

    status: int
    reason: str
    fact: AuthorizationDenied | RateLimited
    retry_after: int = 0
    """Seconds for Retry-After (429 only); 0 means no header."""


def source_allowed(matcher: SourceMatcher, address: str) -> bool:
    """``address`` (the effective client address) is inside ``matcher``; text that is not an
    address (an unknown peer, "-") never is."""
    try:
        return address in matcher
    except ValueError:
        return False


def rate_key(client: ClientInfo) -> tuple[str, str]:
    """(label, key) to limit ``client`` by: its certificate's fingerprint if the chain was
    verified, else its address. An unverified certificate (``optional``/``require-any``) costs
    nothing to mint, so a fresh one per connection would be a fresh bucket, and a flood of them
    would push real clients out of the limiter's memory."""
    cert = client.certificate
    if cert is not None and cert.verified:
        return "cert", "cert:" + cert.sha256
    return "ip", "ip:" + client.address


class Admission:
    """The allow-lists and rate limiters of every route of one configuration."""

    def __init__(self, config: Config, max_keys: int = MAX_KEYS) -> None:
        self._sources: dict[str, SourceMatcher] = {}
        self._limiters: dict[str, KeyedRateLimiter] = {}
        routes: list[PathRoute | SniRoute] = [*config.routes, *config.sni_routes]
        for route in routes:
            if route.allow_sources is not None:
                self._sources[route.name] = SourceMatcher(route.allow_sources)
            if route.rate_limit is not None:
                limit = RateLimit(route.rate_limit.requests_per_second, route.rate_limit.burst)
                self._limiters[route.name] = KeyedRateLimiter(limit, max_keys)

    def sni_refusal(self, route: str, address: str) -> AuthorizationDenied | None:
        """At accept, for an SNI route: a denial if ``address`` is outside its ``allow_sources``."""
        matcher = self._sources.get(route)
        if matcher is None or source_allowed(matcher, address):
            return None
        return AuthorizationDenied(route, SOURCE, "-")

    def check(self, route: PathRoute, client: ClientInfo, now: float) -> Refusal | None:
        """For a request (or upgrade) on ``route`` at time ``now``: None to let it through.

        The source check comes first: a refused address must not drain a bucket either.
        """
        matcher = self._sources.get(route.name)
        if matcher is not None and not source_allowed(matcher, client.address):
            return Refusal(403, "source address not allowed", AuthorizationDenied(route.name, SOURCE, "-"))
        limiter = self._limiters.get(route.name)
        if limiter is None:
            return None
        label, key = rate_key(client)
        decision = limiter.check(key, now)
        if decision.allowed:
            return None
        seconds = int(decision.retry_after_header)
        return Refusal(429, "too many requests", RateLimited(route.name, label, seconds), seconds)

    @property
    def evictions(self) -> int:
        """Keys forgotten by every limiter to stay under the cap (non-zero: raise the cap)."""
        return sum(limiter.evictions for limiter in self._limiters.values())
