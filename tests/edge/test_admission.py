"""Admission: the process-wide counts behind max_connections, max_connections_per_ip and max_handshakes."""

from __future__ import annotations

from nextproxy.config.model import Limits
from nextproxy.edge.admission import Admission, Refusal


def test_caps_per_address_and_in_all() -> None:
    admission = Admission(Limits(max_connections=4, max_connections_per_ip=2))
    assert admission.admit("10.0.0.1") is None
    assert admission.admit("10.0.0.1") is None
    assert admission.admit("10.0.0.1") is Refusal.MAX_CONNECTIONS_PER_IP
    assert admission.admit("10.0.0.2") is None
    assert admission.admit("10.0.0.3") is None
    assert admission.admit("10.0.0.4") is Refusal.MAX_CONNECTIONS
    assert admission.total == 4 and admission.per_address == {"10.0.0.1": 2, "10.0.0.2": 1, "10.0.0.3": 1}


def test_release_frees_the_slot_and_forgets_the_address() -> None:
    admission = Admission(Limits(max_connections_per_ip=1))
    assert admission.admit("::1") is None
    admission.release("::1")
    assert admission.total == 0 and admission.per_address == {}  # no entry per address ever seen
    assert admission.admit("::1") is None


def test_new_limits_apply_to_the_counts_carried_over_a_reload() -> None:
    admission = Admission(Limits(max_connections=10))
    for _ in range(8):
        assert admission.admit("10.0.0.1") is None
    admission.limits = Limits(max_connections=8)  # what ProxyServer.reload does
    assert admission.admit("10.0.0.2") is Refusal.MAX_CONNECTIONS


def test_handshake_slots_call_back_when_one_frees() -> None:
    admission = Admission(Limits(max_handshakes=2))
    calls: list[int] = []
    admission.watch_handshakes(lambda: calls.append(admission.handshakes))
    admission.admit("a")
    admission.admit("b")
    assert admission.handshakes_full
    admission.handshake_over()
    assert not admission.handshakes_full and calls == [1]


def test_a_balancer_is_uncapped_and_its_clients_are_capped_once_named() -> None:
    admission = Admission(Limits(max_connections=100, max_connections_per_ip=2))
    balancer = "10.0.0.5"
    for _ in range(5):  # one balancer carries many clients: only the global cap applies to it
        assert admission.admit(balancer, capped=False) is None
    assert admission.rekey(balancer, "203.0.113.7") is None
    assert admission.rekey(balancer, "203.0.113.7") is None
    # The named client is at its cap: refused, and still counted under the balancer to be released.
    assert admission.rekey(balancer, "203.0.113.7") is Refusal.MAX_CONNECTIONS_PER_IP
    assert admission.per_address == {balancer: 3, "203.0.113.7": 2}
    assert admission.rekey(balancer, balancer) is None  # LOCAL-like: nothing moves
    for address in (balancer, balancer, balancer, "203.0.113.7", "203.0.113.7"):
        admission.release(address)
    assert admission.total == 0 and admission.per_address == {}
