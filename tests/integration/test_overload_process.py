"""Overload protection of a real ``python -m nextproxy run`` process (issue 12).

The process-wide cap across a reload, running out of file descriptors (the limit lowered on
the running process with prlimit), a stdout nobody reads, and the open-file check at start-up.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from nextproxy.demo.pki import DemoPki
from tests.integration.process import NAME, Proxy, Upstreams


def _metric(proxy: Proxy, name: str, **labels: str) -> float:
    return proxy.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


def _tls(proxy: Proxy, timeout: float = 5) -> ssl.SSLSocket | None:
    """A finished TLS handshake, or None if the proxy closed the connection first."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    try:
        return proxy.context.wrap_socket(sock, server_hostname=NAME)
    except (ssl.SSLError, OSError):
        sock.close()
        return None


def _get(tls: ssl.SSLSocket, path: str = "/app/x") -> bytes:
    tls.sendall(f"GET {path} HTTP/1.1\r\nhost: {NAME}\r\n\r\n".encode())
    return tls.recv(65536)


def test_max_connections_counts_every_connection_across_a_reload(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> None:
    proxy = Proxy(tmp_path, pki, upstreams, extra="[limits]\nmax_connections = 12\nmax_connections_per_ip = 100")
    try:
        # WebSocket sessions keep the configuration they started with across a reload (idle
        # keep-alive connections would be closed by it, freeing their slots).
        before = [proxy.websocket() for _ in range(8)]
        proxy.process.send_signal(signal.SIGHUP)  # the old configuration keeps serving these 8
        proxy.wait_for(lambda: proxy.events("reloaded"), 10, "reload")
        after = [_tls(proxy) for _ in range(8)]
        assert sum(1 for s in after if s is not None) == 4  # 12 in all, not 12 per configuration
        assert _metric(proxy, "nextproxy_connections_refused_total", reason="max_connections") == 4
        for ws in before:
            ws.close()
        for sock in after:
            if sock is not None:
                sock.close()
        proxy.wait_for(lambda: _metric(proxy, "nextproxy_connections_active", listener="edge") == 0, 10, "counted out")
        assert all(_tls(proxy) for _ in range(3))  # every slot came back
    finally:
        proxy.stop()


def _fds(pid: int) -> tuple[int, int]:
    """(count, highest) of the process's open descriptors."""
    numbers = [int(n) for n in os.listdir(f"/proc/{pid}/fd")]
    return len(numbers), max(numbers)


def test_running_out_of_descriptors_backs_off_and_recovers(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> None:
    """Readiness does not follow descriptor exhaustion (see README): it is per process and
    clears by itself as connections close; the metric and the log line are the signal."""
    proxy = Proxy(tmp_path, pki, upstreams)
    pid = proxy.process.pid
    original = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    try:
        time.sleep(0.5)
        count, highest = _fds(pid)
        limit = max(count, highest + 1) + 4
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, original[1]))
        held: list[ssl.SSLSocket] = []
        for _ in range(12):  # until one waits in the backlog: every descriptor is in use
            tls = _tls(proxy, timeout=1.5)
            if tls is None:
                break
            held.append(tls)
        assert 1 <= len(held) < 12
        # The next ones wait in the backlog (accept backs off) instead of being reset.
        waiting = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(3)]
        time.sleep(1.0)
        # A request on an established connection needs an upstream descriptor: EMFILE there is
        # the proxy's shortage, answered without blaming the upstream.
        answer = _get(held[0])
        assert answer.startswith(b"HTTP/1.1 502"), answer
        for sock in held:
            sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, original)
        # Recovery on its own: the queued connections are accepted and served.
        for raw in waiting:
            tls = proxy.context.wrap_socket(raw, server_hostname=NAME)
            assert _get(tls).startswith(b"HTTP/1.1 200")
            tls.close()
        proxy.wait_for(lambda: _metric(proxy, "nextproxy_descriptors_exhausted_total", where="accept") >= 1, 10, "accept count")
        assert _metric(proxy, "nextproxy_descriptors_exhausted_total", where="upstream") >= 1
        assert _metric(proxy, "nextproxy_upstream_up", upstream="app") == 1
        assert proxy.get("/readyz")[0] == 200 and proxy.get("/livez")[0] == 200
        proxy.wait_for(lambda: proxy.events("descriptors_exhausted"), 10, "log line")
        assert not [e for e in proxy.events("upstream_error") if "Too many open files" in e.get("detail", "")]
        assert len(proxy.events("descriptors_exhausted")) <= 3  # once per interval, not per accept
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, original)
        proxy.stop()


def test_a_stalled_stdout_reader_never_blocks_the_loop(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> None:
    proxy = Proxy(tmp_path, pki, upstreams, read_stdout=False)
    try:
        tls = _tls(proxy)
        assert tls is not None
        tls.settimeout(10)
        path = "/app/" + "x" * 500  # ~800-byte access-log lines: the pipe and the buffer fill fast
        for _ in range(2500):
            tls.sendall(f"GET {path} HTTP/1.1\r\nhost: {NAME}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += tls.recv(65536)
            length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
            body = head.split(b"\r\n\r\n", 1)[1]
            while len(body) < length:
                body += tls.recv(65536)
        started = time.monotonic()
        assert proxy.get("/livez")[0] == 200
        fresh = _tls(proxy)
        assert fresh is not None and _get(fresh).startswith(b"HTTP/1.1 200")
        assert time.monotonic() - started < 5
        assert _metric(proxy, "nextproxy_log_lines_dropped_total") > 0
        fresh.close()
        tls.close()
    finally:
        proxy.process.kill()
        proxy.process.wait(10)


def _run_with_limit(config: Path, limit: tuple[int, int], wait: float, command: str = "run") -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTPROXY_")}
    env["NEXTPROXY_CONFIG"] = str(config)
    return subprocess.Popen(
        [sys.executable, "-m", "nextproxy", command], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limit),
    )  # fmt: skip


def test_start_up_fits_max_connections_into_the_open_file_limit(tmp_path: Path, pki: DemoPki, upstreams: Upstreams) -> None:
    proxy = Proxy(tmp_path, pki, upstreams)  # writes a working configuration...
    proxy.stop()
    config = proxy.config_file
    text = config.read_text()
    # ...an explicit cap the hard limit cannot hold: one line, exit 2, before binding
    config.write_text(text + "[limits]\nmax_connections = 5000\n")
    for command in ("run", "check"):  # check refuses what run would
        refused = _run_with_limit(config, (1024, 1024), 10, command)
        out, err = refused.communicate(timeout=30)
        assert refused.returncode == 2, (command, out, err)
        assert err.count("\n") == 1 and err.startswith("nextproxy: limits.max_connections: 5000 connections need about")
    # Given, even at the default's value, a cap is the operator's: refused, never lowered.
    config.write_text(text + "[limits]\nmax_connections = 20000\n")
    refused = _run_with_limit(config, (1024, 1024), 10)
    out, err = refused.communicate(timeout=30)
    assert refused.returncode == 2 and "limits.max_connections: 20000 connections" in err, (out, err)
    # the default cap is lowered to fit, and the soft limit raised toward the hard one
    config.write_text(text)
    started = _run_with_limit(config, (256, 2048), 10)
    try:
        assert started.stdout is not None
        line = json.loads(started.stdout.readline())
        assert line["event"] == "open_files"
        assert line["soft_limit_was"] == 256 and line["soft_limit"] == 2048 and line["hard_limit"] == 2048
        assert line["max_connections_lowered"] is True and 800 < line["max_connections"] < 1024
    finally:
        started.send_signal(signal.SIGTERM)
        started.communicate(timeout=30)
