"""The live status page and /status.json after real traffic through a real proxy process.

Traffic first (requests, a 404, a 502 from a dead upstream, a passthrough connection, a refused
TLS 1.2 handshake, an open WebSocket), then the figures are checked in /status.json and in the
DOM headless Chromium renders, and a screenshot is kept: it is written under the test's tmp
dir and copied to tests/artifacts/status-page.png (git-ignored), whose path the test prints.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nextproxy.demo.pki import DemoPki
from tests.integration.process import API, Proxy, Upstreams

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
DEAD_UPSTREAM = """
[upstreams.dead]
servers = ["127.0.0.1:1"]
[[routes]]
name = "dead"
path = "/dead"
upstream = "dead"
"""
APP_REQUESTS = 6


def status(proxy: Proxy) -> dict[str, Any]:
    code, body = proxy.get("/status.json")
    assert code == 200
    document: dict[str, Any] = json.loads(body)
    return document


def row(rows: list[dict[str, Any]], key: str, name: str) -> dict[str, Any]:
    found = [r for r in rows if r[key] == name]
    assert len(found) == 1, rows
    return found[0]


def drive_traffic(proxy: Proxy, pki: DemoPki) -> None:
    for i in range(APP_REQUESTS):
        assert proxy.https(f"/app/{i}")[0] == 200
    assert proxy.https("/nowhere")[0] == 404
    assert proxy.https("/dead/x")[0] == 502
    api = ssl.create_default_context(cadata=pki.ca.certificate.decode())
    api.check_hostname = False
    assert proxy.https("/", server_name=API, context=api)[0] == 200
    old = ssl.create_default_context(cadata=pki.ca.certificate.decode())
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        proxy.https("/app", context=old)


def check_document(doc: dict[str, Any]) -> None:
    app = row(doc["routes"], "route", "app")
    # Both tests open one WebSocket before looking: its 101 is a request too.
    assert app["requests_total"] == APP_REQUESTS + 1 and app["requests_per_second"] > 0
    assert app["p50_seconds"] is not None and 0 < app["p50_seconds"] <= app["p99_seconds"] < 5
    assert app["bytes_out"] > 0
    assert any(value > 0 for _, value in app["history"]), app["history"]  # the sparkline has a rise
    assert row(doc["routes"], "route", "-")["client_errors_total"] == 1
    assert row(doc["routes"], "route", "dead")["server_errors_total"] == 1
    assert row(doc["passthrough"], "route", "api")["connections_total"] == 1
    assert row(doc["tls_handshakes"], "result", "protocol_version")["total"] == 1
    assert row(doc["tls_handshakes"], "result", "ok")["total"] >= APP_REQUESTS
    dead = row(doc["upstreams"], "name", "dead")
    # The request's failure, or the health probe's (whichever came last: a reload's new pool
    # probes afresh and reports the upstream down again; with workers, from any worker).
    assert dead["last_error"] is not None
    assert re.match(r"(connect failed|health check: 127\.0\.0\.1:1: )", dead["last_error"]["detail"]), dead["last_error"]
    # The open WebSocket holds its upstream connection (a client's keep-alive upstream connection
    # stays with that client, so short-lived clients leave nothing idle).
    assert row(doc["upstreams"], "name", "app")["open"] >= 1


def test_status_page_in_headless_chromium(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is installed by .ci/run"
    proxy = Proxy(tmp_path, pki, upstreams, extra=DEAD_UPSTREAM)
    try:
        drive_traffic(proxy, pki)
        proxy.process.send_signal(signal.SIGHUP)
        proxy.wait_for(lambda: proxy.events("reloaded"), 10, "reload")
        ws = proxy.websocket()
        ws.send("hello")
        assert ws.recv().data == "hello"
        proxy.wait_for(lambda: row(status(proxy)["upstreams"], "name", "app")["open"] >= 1, 5, "pool facts")
        doc = status(proxy)
        check_document(doc)
        assert row(doc["routes"], "route", "app")["websocket_sessions_open"] == 1
        assert doc["reloads"]["ok"] == 1 and doc["reloads"]["recent"][0]["ok"] is True

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium'}"]  # fmt: skip
        url = f"http://127.0.0.1:{proxy.admin}/"
        dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=60).stdout
        assert "<script" not in dom
        app_row = re.search(r'<tr><td class="name">app</td>(.*?)</tr>', dom)
        assert app_row, dom[-3000:]
        cells = re.findall(r"<td[^>]*>(.*?)</td>", app_row.group(1))
        assert cells[-1] == str(APP_REQUESTS + 1) and cells[-2] == "1", cells  # requests, WebSocket sessions open
        assert re.search(r'<polyline points="[^"]*"', app_row.group(1)), "no sparkline in the app row"
        assert re.search(r"connect failed|health check: 127\.0\.0\.1:1: ", dom) and "protocol_version" in dom and "/app" in dom

        shot = tmp_path / "status-page.png"
        subprocess.run([chromium, *flags, "--window-size=1280,1500", f"--screenshot={shot}", url], capture_output=True, timeout=60)
        assert shot.exists() and shot.stat().st_size > 10_000
        ARTIFACTS.mkdir(exist_ok=True)
        kept = ARTIFACTS / "status-page.png"
        shutil.copyfile(shot, kept)
        print(f"status page screenshot: {kept}")
        ws.close()
    finally:
        assert proxy.stop() == 0


def test_status_json_merges_workers(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> None:
    """NEXTPROXY_WORKERS=2: the supervisor's ring samples the merged metrics, and the workers'
    facts (pools, last errors) reach it through their files."""
    proxy = Proxy(tmp_path, pki, upstreams, workers=2, extra=DEAD_UPSTREAM)
    try:
        drive_traffic(proxy, pki)
        proxy.process.send_signal(signal.SIGHUP)  # the supervisor forwards it: both workers reload
        ws = proxy.websocket()
        proxy.wait_for(lambda: status(proxy)["reloads"]["ok"] == 2, 10, "two reloads")
        proxy.wait_for(lambda: row(status(proxy)["upstreams"], "name", "dead")["last_error"] is not None, 10, "worker facts")
        proxy.wait_for(lambda: row(status(proxy)["upstreams"], "name", "app")["open"] >= 1, 10, "pool facts")
        # A worker hands its counts to the merge within metrics.FLUSH_INTERVAL (1 s).
        app_requests = lambda: row(status(proxy)["routes"], "route", "app")  # noqa: E731
        proxy.wait_for(lambda: app_requests()["requests_total"] == APP_REQUESTS + 1 and app_requests()["requests_per_second"] > 0, 10, "merged counts")
        doc = status(proxy)
        check_document(doc)
        rows = lambda: [(r["ok"], r["processes"]) for r in status(proxy)["reloads"]["recent"]]  # noqa: E731
        proxy.wait_for(lambda: rows() == [(True, 2)], 10, "one reload row for both workers")
        ws.close()
        code, page = proxy.get("/")
        assert code == 200 and b"<polyline" in page and re.search(rb"connect failed|health check: 127\.0\.0\.1:1: ", page)
    finally:
        assert proxy.stop() == 0


def test_a_reload_with_workers_updates_the_supervisors_route_table(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> None:
    """The supervisor serves the page; on SIGHUP it loads the new configuration as the workers
    do, so a route added by the reload is listed (not only after a restart)."""
    proxy = Proxy(tmp_path, pki, upstreams, workers=2)
    try:
        before = [row["match"] for row in status(proxy)["route_table"]]
        assert not any("/dead" in match for match in before), before
        proxy.config_file.write_text(proxy.config_file.read_text() + DEAD_UPSTREAM)
        proxy.process.send_signal(signal.SIGHUP)
        proxy.wait_for(lambda: status(proxy)["reloads"]["ok"] == 2, 10, "two reloads")
        after = [(row["match"], row["target"]) for row in status(proxy)["route_table"]]
        assert any("/dead" in match and "dead" in target for match, target in after), after
        assert proxy.https("/dead/x")[0] == 502  # the workers serve it too
    finally:
        assert proxy.stop() == 0
