"""`python -m nextproxy` as a real process: metrics after traffic, SIGTERM drain, SIGHUP reload, workers."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from nextproxy.demo.pki import DemoPki, make_pki

from tests.integration.process import API, DENIED, NAME, Proxy, Upstreams


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, w) in ls for k, w in labels.items()))


def test_every_metric_moves_after_real_traffic(proxy: Proxy, pki: DemoPki) -> None:
    assert proxy.https("/app/x")[0] == 200
    assert proxy.https("/nowhere")[0] == 404
    assert proxy.https("/", server_name=DENIED)[0] == 403
    api = ssl.create_default_context(cadata=pki.ca.certificate.decode())
    api.check_hostname = False
    assert proxy.https("/", server_name=API, context=api)[0] == 200
    ws = proxy.websocket()
    ws.send("hello")
    assert ws.recv().data == "hello"
    open_samples = proxy.metrics()
    assert value(open_samples, "nextproxy_websocket_sessions_active", route="app") == 1
    assert value(open_samples, "nextproxy_connections_active", listener="edge") >= 1
    ws.close()
    proxy.wait_for(lambda: value(proxy.metrics(), "nextproxy_websocket_session_duration_seconds_count", route="app") == 1, 5, "session end")
    bad = ssl.create_default_context(cadata=pki.ca.certificate.decode())
    bad.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        proxy.https("/app", context=bad)

    samples = proxy.metrics()
    assert value(samples, "nextproxy_requests_total", route="app", code="200") == 1
    assert value(samples, "nextproxy_requests_total", route="-", code="404") == 1
    assert value(samples, "nextproxy_requests_total", route="guarded", code="403") == 1
    assert value(samples, "nextproxy_authorization_denied_total", route="guarded", reason="no_certificate") == 1
    assert value(samples, "nextproxy_request_duration_seconds_count", route="app") >= 2
    assert value(samples, "nextproxy_tls_handshakes_total", result="ok") >= 4
    assert value(samples, "nextproxy_tls_handshakes_total", result="protocol_version") == 1
    assert value(samples, "nextproxy_passthrough_connections_total", route="api") == 1
    assert value(samples, "nextproxy_websocket_messages_total", route="app", direction="client_to_upstream") == 1
    assert value(samples, "nextproxy_websocket_messages_total", route="app", direction="upstream_to_client") == 1
    assert value(samples, "nextproxy_websocket_sessions_active", route="app") == 0
    assert value(samples, "nextproxy_bytes_total", route="app", direction="upstream_to_client") > 0
    assert value(samples, "nextproxy_bytes_total", route="api", direction="client_to_upstream") > 0
    assert value(samples, "nextproxy_upstream_up", upstream="app") == 1
    expiry = value(samples, "nextproxy_certificate_expiry_timestamp_seconds")
    assert expiry == x509.load_pem_x509_certificate(pki.edge.certificate).not_valid_after_utc.timestamp()
    assert ("nextproxy_config_reloads_total", (("result", "ok"),)) in samples
    assert value(samples, "process_resident_memory_bytes") > 0
    # Access-log lines are written in bursts (at most 50 ms late).
    proxy.wait_for(lambda: {r["status"] for r in proxy.events("request")} >= {200, 404, 403, 101}, 5, "access log")
    proxy.wait_for(lambda: proxy.events("passthrough") and proxy.events("websocket_session"), 5, "session logs")


def test_sigterm_drains_in_flight_work(proxy: Proxy) -> None:
    ws = proxy.websocket()
    ws.send("hi")
    assert ws.recv().data == "hi"
    slow: dict[str, Any] = {}

    def slow_request() -> None:
        slow["result"] = proxy.https("/app/slow?delay=1.5")

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.3)  # the slow request is in flight
    proxy.process.send_signal(signal.SIGTERM)
    proxy.wait_for(lambda: proxy.get("/readyz")[0] == 503, 5, "readiness 503")
    assert json.loads(proxy.get("/readyz")[1])["reason"] == "draining"
    closed = ws.recv()
    assert closed.close_code == 1001
    thread.join(10)
    assert slow["result"][0] == 200  # not cut short
    assert proxy.process.wait(15) == 0
    assert proxy.events("stopped")[0]["clean"] is True


def test_sighup_reloads_a_new_certificate_and_keeps_sessions(proxy: Proxy) -> None:
    first = proxy.peer_certificate()
    ws = proxy.websocket()
    fresh = make_pki()
    proxy.cert.write_bytes(fresh.edge.certificate)
    proxy.key.write_bytes(fresh.edge.key)
    proxy.process.send_signal(signal.SIGHUP)
    proxy.wait_for(lambda: proxy.events("reloaded"), 10, "reload")
    assert proxy.peer_certificate() == der(fresh.edge.certificate) != first
    ws.send("still here")
    assert ws.recv().data == "still here"  # the open session was untouched
    ws.close()
    assert value(proxy.metrics(), "nextproxy_config_reloads_total", result="ok") == 1


def test_a_broken_certificate_on_reload_keeps_the_old_one(proxy: Proxy, pki: DemoPki) -> None:
    proxy.cert.write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    proxy.process.send_signal(signal.SIGHUP)
    proxy.wait_for(lambda: proxy.events("reload_failed"), 10, "reload failure")
    assert "NEXTPROXY" in proxy.events("reload_failed")[0]["error"] or "tls.certificates" in proxy.events("reload_failed")[0]["error"]
    assert proxy.peer_certificate() == der(pki.edge.certificate)
    assert proxy.https("/app/ok")[0] == 200
    assert value(proxy.metrics(), "nextproxy_config_reloads_total", result="error") == 1


def test_certificate_file_change_is_picked_up_without_a_signal(proxy: Proxy) -> None:
    fresh = make_pki()
    proxy.key.write_bytes(fresh.edge.key)
    proxy.cert.write_bytes(fresh.edge.certificate)
    proxy.wait_for(lambda: proxy.peer_certificate() == der(fresh.edge.certificate), 15, "polled reload")


def test_a_reload_forgets_the_series_of_what_it_removed(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> None:
    """Found by black-box testing: a removed upstream kept ``up 0`` (an alert forever, and a row
    on the status page), a replaced certificate its old expiry (a page after every renewal)."""
    gone = '\n[upstreams.gone]\nservers = ["127.0.0.1:1"]\n'
    proxy = Proxy(tmp_path, pki, upstreams, extra=gone)
    try:
        def names(metric: str, label: str) -> set[str]:
            return {dict(labels)[label] for (name, labels), _ in proxy.metrics().items() if name == metric}

        proxy.wait_for(lambda: "gone" in names("nextproxy_upstream_up", "upstream"), 10, "the probe's verdict")
        before = names("nextproxy_certificate_expiry_timestamp_seconds", "name")
        renamed = make_pki(("renamed.example",))
        proxy.cert.write_bytes(renamed.edge.certificate)
        proxy.key.write_bytes(renamed.edge.key)
        proxy.config_file.write_text(proxy.config_file.read_text().replace(gone, "\n"))
        proxy.process.send_signal(signal.SIGHUP)
        proxy.wait_for(lambda: proxy.events("reloaded"), 10, "reload")
        time.sleep(1)  # the old runtime's prober must not bring the series back
        assert names("nextproxy_upstream_up", "upstream") == {"app", "api"}
        assert names("nextproxy_certificate_expiry_timestamp_seconds", "name") == {"renamed.example"} != before
        status = json.loads(proxy.get("/status.json")[1])
        assert "gone" not in {row["name"] for row in status["upstreams"]}
        assert proxy.stop() == 0
    finally:
        proxy.stop()


def test_an_upstream_still_down_is_not_reported_again_by_each_reload(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> None:
    proxy = Proxy(tmp_path, pki, upstreams, extra='\n[upstreams.dead]\nservers = ["127.0.0.1:1"]\n')
    try:
        down = lambda: [e for e in proxy.events("upstream_error") if e["upstream"] == "dead"]  # noqa: E731
        proxy.wait_for(lambda: down(), 10, "the first probe's report")
        for count in (1, 2):
            proxy.process.send_signal(signal.SIGHUP)
            proxy.wait_for(lambda: len(proxy.events("reloaded")) == count, 10, "reload")
        time.sleep(0.5)  # the new pools' first probes
        assert len(down()) == 1, down()
        assert proxy.stop() == 0
    finally:
        proxy.stop()


def worker_pids(parent: int) -> list[int]:
    """Children of the supervisor that are spawned workers (not multiprocessing's resource tracker)."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmdline:
            pids.append(int(entry))
    return pids


def test_two_workers_serve_aggregate_and_survive_a_death(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> None:
    proxy = Proxy(tmp_path, pki, upstreams, workers=2)
    try:
        for i in range(20):
            assert proxy.https(f"/app/{i}")[0] == 200
        # Each worker hands its counts to the supervisor's merge within metrics.FLUSH_INTERVAL.
        proxy.wait_for(lambda: value(proxy.metrics(), "nextproxy_requests_total", route="app", code="200") == 20, 5, "merged counts")
        pids = worker_pids(proxy.process.pid)
        assert len(pids) == 2, pids
        os.kill(pids[0], signal.SIGKILL)
        proxy.wait_for(lambda: len(proxy.events("worker_started")) >= 3, 15, "replacement worker")
        proxy.wait_for(lambda: proxy.get("/readyz")[0] == 200, 15, "ready again")
        for i in range(10):
            assert proxy.https(f"/app/after/{i}")[0] == 200
        proxy.wait_for(lambda: value(proxy.metrics(), "nextproxy_requests_total", route="app", code="200") == 30, 5, "merged counts")
        assert proxy.stop() == 0
    finally:
        proxy.stop()


def test_a_replacement_worker_serves_the_reloaded_configuration(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> None:
    """A worker that dies after a SIGHUP is replaced with the configuration the others serve
    now, not the start-up one the supervisor was given (it 404'd the new route)."""
    proxy = Proxy(tmp_path, pki, upstreams, workers=2)
    try:
        text = proxy.config_file.read_text()
        proxy.config_file.write_text(text + '\n[[routes]]\nname = "extra"\npath = "/extra"\nupstream = "app"\n')
        proxy.process.send_signal(signal.SIGHUP)
        proxy.wait_for(lambda: len(proxy.events("reloaded")) >= 2, 15, "both workers reloaded")
        pids = worker_pids(proxy.process.pid)
        assert len(pids) == 2, pids
        os.kill(pids[0], signal.SIGKILL)
        proxy.wait_for(lambda: len(proxy.events("worker_started")) >= 3, 15, "replacement worker")
        proxy.wait_for(lambda: len(worker_pids(proxy.process.pid)) == 2, 15, "two workers again")
        proxy.wait_for(lambda: proxy.get("/readyz")[0] == 200, 15, "ready again")
        statuses = [proxy.https(f"/extra/{i}")[0] for i in range(16)]  # a new connection each: both workers
        assert statuses == [200] * 16, statuses
        # A file broken since then does not keep a dead worker from being replaced.
        proxy.config_file.write_text("this is not TOML [")
        os.kill(worker_pids(proxy.process.pid)[0], signal.SIGKILL)
        proxy.wait_for(lambda: len(proxy.events("worker_started")) >= 4, 15, "second replacement")
        proxy.wait_for(lambda: proxy.events("worker_config_kept"), 15, "the kept configuration's line")
        proxy.wait_for(lambda: proxy.get("/readyz")[0] == 200, 15, "ready again")
        assert proxy.https("/app/still")[0] == 200
        assert proxy.stop() == 0
    finally:
        proxy.stop()


def test_a_reload_ends_keep_alive_on_the_replaced_configuration(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> None:
    """Found by black-box testing (security): a reload that fenced a route (allow_sources) left
    a kept-alive connection on the old configuration for as long as it stayed busy. Now its
    connections close after their exchange in flight (now, if idle), as nginx's old workers do."""
    proxy = Proxy(tmp_path, pki, upstreams)
    try:
        sock = proxy.context.wrap_socket(socket.create_connection(("127.0.0.1", proxy.port), timeout=10), server_hostname=NAME)
        sock.sendall(f"GET /app/before HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
        response = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
        response.begin()
        assert response.status == 200 and not response.will_close  # kept alive
        response.read()
        text = proxy.config_file.read_text()
        fenced = text.replace('path = "/app"', 'path = "/app"\nallow_sources = ["10.0.0.0/8"]', 1)
        assert fenced != text
        proxy.config_file.write_text(fenced)
        proxy.process.send_signal(signal.SIGHUP)
        proxy.wait_for(lambda: proxy.events("reloaded"), 10, "reload")
        sock.settimeout(5)
        assert sock.recv(65536) == b""  # the idle kept-alive connection was closed
        sock.close()
        assert proxy.https("/app/after")[0] == 403  # 127.0.0.1 is outside 10.0.0.0/8
        assert proxy.stop() == 0
    finally:
        proxy.stop()


def test_a_request_arriving_during_a_reload_is_answered_not_cut(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> None:
    """A head half-sent when the reload ran was closed under the client as an idle connection,
    with no answer and no line (found by review). It is answered, with connection: close."""
    proxy = Proxy(tmp_path, pki, upstreams)
    try:
        sock = proxy.context.wrap_socket(socket.create_connection(("127.0.0.1", proxy.port), timeout=10), server_hostname=NAME)
        sock.sendall(b"GET /app/during-reload HTTP/1.1\r\n")
        time.sleep(0.2)  # the head's first record is in
        proxy.process.send_signal(signal.SIGHUP)
        proxy.wait_for(lambda: proxy.events("reloaded"), 10, "reload")
        sock.sendall(f"Host: {NAME}\r\n\r\n".encode())
        response = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
        response.begin()
        assert response.status == 200 and response.will_close
        response.read()
        assert sock.recv(65536) == b""
        sock.close()
        proxy.wait_for(lambda: any(r["path"] == "/app/during-reload" for r in proxy.events("request")), 5, "its line")
    finally:
        assert proxy.stop() == 0


def test_admin_port_over_tls_and_the_healthcheck_command(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> None:
    import sys

    proxy = Proxy(tmp_path, pki, upstreams, admin_tls=True)  # Proxy waits for /readyz over TLS 1.3
    try:
        status, body = proxy.get("/metrics")
        assert status == 200 and b"nextproxy_requests_total" in body
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTPROXY_")}
        check = subprocess.run([sys.executable, "-m", "nextproxy", "healthcheck", "--config", str(proxy.config_file)],
                               env=env, capture_output=True, text=True, timeout=30)  # fmt: skip
        assert check.returncode == 0, check.stderr
    finally:
        assert proxy.stop() == 0


def test_shutdown_delay_keeps_serving_while_readiness_fails(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> None:
    proxy = Proxy(tmp_path, pki, upstreams, shutdown_delay=1.5)
    try:
        proxy.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        proxy.wait_for(lambda: proxy.get("/readyz")[0] == 503, 5, "readiness 503")
        assert proxy.https("/app/during-delay")[0] == 200  # the load balancer may still send traffic
        assert time.monotonic() - started < 1.5
        assert proxy.process.wait(15) == 0
        assert time.monotonic() - started >= 1.4
    finally:
        proxy.stop()


def test_a_wedged_worker_is_killed_and_replaced(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> None:
    """A worker whose loop stops turning (SIGSTOP here) misses its heartbeats and is replaced."""
    proxy = Proxy(tmp_path, pki, upstreams, workers=2)
    try:
        pids = worker_pids(proxy.process.pid)
        assert len(pids) == 2, pids
        os.kill(pids[0], signal.SIGSTOP)
        proxy.wait_for(lambda: proxy.events("worker_stalled"), 20, "stall detection")
        assert proxy.events("worker_stalled")[0]["pid"] == pids[0]
        proxy.wait_for(lambda: len(proxy.events("worker_started")) >= 3, 15, "replacement worker")
        proxy.wait_for(lambda: proxy.get("/readyz")[0] == 200, 15, "ready again")
        for i in range(6):
            assert proxy.https(f"/app/after-stall/{i}")[0] == 200
        assert proxy.stop() == 0
    finally:
        proxy.stop()
