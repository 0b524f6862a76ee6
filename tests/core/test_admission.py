"""Per-route allow_sources and rate limits: ``Admission`` alone, then inside ``HttpSession``.

Time is a plain number handed in (no clock, no event loop): the tests step it by hand.
"""

from __future__ import annotations

from dataclasses import replace

from nextproxy.config.model import PathRoute, RateLimitConfig, SniAction, SniRoute
from nextproxy.core.actions import AuthorizationDenied, ConnectUpstream, RateLimited, RequestCompleted
from nextproxy.core.admission import Admission, rate_key
from nextproxy.core.headers import ClientInfo
from nextproxy.core.tls import PeerCertificate
from nextproxy.core.http1 import HttpSession
from nextproxy.core.routing import RouteTable
from tests.core.test_http1 import CONFIG, kinds, status_of, to_client

LIMITED = PathRoute("limited", "/l", "ns", rate_limit=RateLimitConfig(2.0, 3))
FENCED = PathRoute("fenced", "/f", "ns", allow_sources=("10.0.0.0/8", "2001:db8::/32"))
BOTH = PathRoute("both", "/b", "ns", allow_sources=("10.0.0.0/8",), rate_limit=RateLimitConfig(1.0, 1))
SNI = SniRoute("api", ("api.test",), SniAction.TERMINATE, "ns", allow_sources=("192.0.2.0/24",), rate_limit=RateLimitConfig(1.0, 2))
POLICY = replace(CONFIG, routes=(*CONFIG.routes, LIMITED, FENCED, BOTH), sni_routes=(SNI,))


def client(address: str, fingerprint: str | None = None, *, verified: bool = True) -> ClientInfo:
    cert = None
    if fingerprint is not None:
        cert = PeerCertificate(
            der=b"", chain=(), verified=verified, verify_error=None, sha256=fingerprint, spki_sha256="00",
            subject="CN=x", common_name="x", dns_names=(), uris=(),
        )  # fmt: skip
    return ClientInfo(address=address, server_name="edge.test", certificate=cert)


def test_sources_match_networks_both_families_and_mapped_addresses() -> None:
    admission = Admission(POLICY)
    assert admission.check(FENCED, client("10.9.8.7"), 0.0) is None
    assert admission.check(FENCED, client("::ffff:10.9.8.7"), 0.0) is None  # a dual-stack socket's IPv4 peer
    assert admission.check(FENCED, client("2001:db8::5"), 0.0) is None
    refused = admission.check(FENCED, client("192.0.2.1"), 0.0)
    assert refused is not None and refused.status == 403 and refused.fact == AuthorizationDenied("fenced", "source", "-")
    assert admission.check(FENCED, client("-"), 0.0) is not None  # not an address: never allowed


def test_rate_limit_burst_then_refill_with_retry_after() -> None:
    admission = Admission(POLICY)
    a = client("192.0.2.1")
    assert [admission.check(LIMITED, a, 0.0) for _ in range(3)] == [None, None, None]
    refused = admission.check(LIMITED, a, 0.0)
    assert refused is not None and refused.status == 429 and refused.retry_after == 1
    assert refused.fact == RateLimited("limited", "ip", 1)
    assert admission.check(LIMITED, client("192.0.2.2"), 0.0) is None  # its own bucket
    assert admission.check(LIMITED, a, 0.5) is None  # 2/s: one token back after 0.5 s
    assert admission.check(LIMITED, a, 0.5) is not None


def test_certificate_clients_are_keyed_by_fingerprint_not_address() -> None:
    admission = Admission(POLICY)
    assert rate_key(client("192.0.2.1", "ab" * 32)) == ("cert", "cert:" + "ab" * 32)
    assert rate_key(client("192.0.2.1")) == ("ip", "ip:192.0.2.1")
    for _ in range(3):
        assert admission.check(LIMITED, client("192.0.2.1", "ab" * 32), 0.0) is None
    refused = admission.check(LIMITED, client("198.51.100.1", "ab" * 32), 0.0)  # same certificate, new address
    assert refused is not None and refused.fact == RateLimited("limited", "cert", 1)
    assert admission.check(LIMITED, client("192.0.2.1"), 0.0) is None  # that address without it: separate


def test_unverified_certificates_are_limited_by_address() -> None:
    """A self-signed certificate per connection (optional / require-any) buys no fresh bucket."""
    admission = Admission(POLICY)
    assert rate_key(client("192.0.2.1", "ab" * 32, verified=False)) == ("ip", "ip:192.0.2.1")
    for i in range(3):
        assert admission.check(LIMITED, client("192.0.2.1", f"{i:064x}", verified=False), 0.0) is None
    refused = admission.check(LIMITED, client("192.0.2.1", "ff" * 32, verified=False), 0.0)
    assert refused is not None and refused.fact == RateLimited("limited", "ip", 1)


def test_a_refused_source_does_not_spend_a_token() -> None:
    admission = Admission(POLICY)
    for _ in range(5):
        refused = admission.check(BOTH, client("192.0.2.1"), 0.0)
        assert refused is not None and refused.status == 403
    assert admission.check(BOTH, client("10.0.0.1"), 0.0) is None


def test_sni_sources_and_the_sni_only_route_limit() -> None:
    admission = Admission(POLICY)
    assert admission.sni_refusal("api", "192.0.2.9") is None
    assert admission.sni_refusal("api", "203.0.113.9") == AuthorizationDenied("api", "source", "-")
    assert admission.sni_refusal("no-such-route", "203.0.113.9") is None
    table = RouteTable(POLICY)
    only = table.match_path(SNI, b"/anything")
    assert only is not None and only.name == "api"
    assert [table.admission.check(only, client("192.0.2.9"), 0.0) is None for _ in range(3)] == [True, True, False]


def test_memory_stays_bounded() -> None:
    admission = Admission(POLICY, max_keys=10)
    for i in range(50):
        admission.check(LIMITED, client(f"10.0.{i}.1"), 0.0)
    assert admission.evictions == 40


# ----------------------------------------------------------------------- inside the session


def feed(s: HttpSession, now: float, request: bytes) -> list[object]:
    s.now = now
    return list(s.client_data(request))


def test_session_answers_429_with_retry_after_and_keeps_the_connection() -> None:
    s = HttpSession(RouteTable(POLICY), None, client("192.0.2.1"), POLICY.limits)
    table = s._routes  # the shared buckets of this configuration
    for _ in range(3):
        assert table.admission.check(LIMITED, client("192.0.2.1"), 0.0) is None
    actions = feed(s, 0.0, b"GET /l/x HTTP/1.1\r\nhost: edge.test\r\n\r\n")
    data = to_client(actions)
    assert status_of(data) == 429 and b"\r\nretry-after: 1\r\n" in data and b"connection: close" not in data
    assert RateLimited in kinds(actions) and ConnectUpstream not in kinds(actions)
    completed = [a for a in actions if isinstance(a, RequestCompleted)]
    assert completed[0].status == 429 and completed[0].route == "limited"
    # A second later the bucket has a token again: the same connection's next request goes through.
    assert ConnectUpstream in kinds(feed(s, 1.0, b"GET /l/x HTTP/1.1\r\nhost: edge.test\r\n\r\n"))


def test_session_refuses_upgrades_over_the_limit() -> None:
    s = HttpSession(RouteTable(POLICY), None, client("192.0.2.1"), POLICY.limits)
    upgrade = (b"GET /l/ws HTTP/1.1\r\nhost: edge.test\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
               b"sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")  # fmt: skip
    for _ in range(3):
        s._routes.admission.check(LIMITED, client("192.0.2.1"), 5.0)
    assert status_of(to_client(feed(s, 5.0, upgrade))) == 429


def test_session_answers_403_for_a_source_outside_the_route() -> None:
    s = HttpSession(RouteTable(POLICY), None, client("192.0.2.1"), POLICY.limits)
    actions = feed(s, 0.0, b"GET /f HTTP/1.1\r\nhost: edge.test\r\n\r\n")
    assert status_of(to_client(actions)) == 403
    assert AuthorizationDenied("fenced", "source", "-") in actions
    ok = HttpSession(RouteTable(POLICY), None, client("10.1.1.1"), POLICY.limits)
    assert ConnectUpstream in kinds(feed(ok, 0.0, b"GET /f HTTP/1.1\r\nhost: edge.test\r\n\r\n"))



def test_every_denial_a_configuration_can_count_is_listed() -> None:
    """Created at 0 when the configuration is applied, so alerts see the first denial."""
    from nextproxy.config.model import AllowRule
    from nextproxy.core.admission import CERTIFICATE_DENIALS, SOURCE, denial_series

    assert set(denial_series(POLICY)) == {("fenced", SOURCE), ("both", SOURCE), ("api", SOURCE)}
    certified = PathRoute("certified", "/c", "ns", allow=(AllowRule("cn", "x"),))
    gated = SniRoute("gated", ("gated.test",), SniAction.TERMINATE, "ns", allow=(AllowRule("cn", "x"),))
    series = set(denial_series(replace(CONFIG, routes=(*CONFIG.routes, certified), sni_routes=(gated,))))
    assert series == {(name, reason) for name in ("certified", "gated") for reason in CERTIFICATE_DENIALS}
    # A terminating SNI route without an upstream of its own gates every path route behind it.
    open_gate = replace(gated, upstream=None)
    series = set(denial_series(replace(CONFIG, sni_routes=(open_gate,))))
    assert series == {(route.name, reason) for route in CONFIG.routes for reason in CERTIFICATE_DENIALS}
