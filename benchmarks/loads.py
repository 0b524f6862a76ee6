"""Load generators and what one bounded run measured.

wrk drives HTTPS (W1-W4), wsload.py (several processes) drives WebSocket echo (W5) and holds idle
connections (W6). Around every run the proxy's process tree is sampled from /proc: CPU seconds
before and after (so CPU per operation is the proxy's own cost, whatever else runs on the
machine), or RSS/PSS before and after for W6. Every run is bounded in time (wrk -d, wsload
--duration, a subprocess timeout) and in count (a wrk Lua stop after N responses per thread,
wsload --max-messages). Only loopback URLs are ever built here.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from systems import HERE, System, cpu_seconds, memory_kib

WRK_THREADS = 2
MAX_RESPONSES_PER_THREAD = 5_000_000
MAX_MESSAGES = 5_000_000
WS_PROCESSES = 2
IDLE_PROCESSES = 4

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_BYTES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


@dataclass
class Sample:
    """One bounded run of one system on one workload."""

    ops: int
    seconds: float
    rate: float            # operations per second (requests, messages)
    mb_per_s: float        # MiB/s of payload the client received
    cpu_us_per_op: float   # proxy's own utime+stime per operation
    p50_ms: float
    p99_ms: float
    errors: int
    load_cpu_us_per_op: float = float("nan")
    """wrk's and the upstream's CPU per operation (what shares the two cores with the proxy)."""

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _latency_ms(text: str, pct: str) -> float:
    match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")


def write_stop_script(workdir: Path) -> Path:
    # The count bound: each wrk thread stops itself after MAX_RESPONSES_PER_THREAD responses.
    script = workdir / "stop.lua"
    script.write_text(
        f"local n = 0\nfunction response()\n  n = n + 1\n"
        f"  if n >= {MAX_RESPONSES_PER_THREAD} then wrk.thread:stop() end\nend\n"
    )
    return script


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk's, once it has been waited for
    return usage.ru_utime + usage.ru_stime


def run_wrk(
    system: System, url: str, duration: float, connections: int, close: bool, stop_script: Path,
    upstream: System | None = None,
) -> Sample:  # fmt: skip
    argv = ["wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "--timeout", "5s",
            "-s", str(stop_script)]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    pids = system.pids()
    upstream_pids = upstream.pids() if upstream is not None and upstream is not system else []
    before, load_before = cpu_seconds(pids), _children_cpu() + cpu_seconds(upstream_pids)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30).stdout
    after, load_after = cpu_seconds(pids), _children_cpu() + cpu_seconds(upstream_pids)
    match = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s), ([\d.]+)([KMGT]?B) read", out)
    if not match:
        raise RuntimeError(f"wrk printed no summary for {system.name} {url}:\n{out}")
    ops = int(match.group(1))
    seconds = float(match.group(2)) * _UNITS[match.group(3)] / 1e3
    read = float(match.group(4)) * _BYTES[match.group(5)]
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        # With Connection: close, wrk counts the server's orderly close as a read error; those are
        # not failures (the request was answered), so only connect/write/timeout count there.
        errors += int(sock.group(1)) + int(sock.group(3)) + int(sock.group(4)) + (0 if close else int(sock.group(2)))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    return Sample(
        ops=ops, seconds=seconds, rate=ops / seconds if seconds else 0.0,
        mb_per_s=read / seconds / 1024**2 if seconds else 0.0,
        cpu_us_per_op=(after - before) / ops * 1e6 if ops else float("nan"),
        p50_ms=_latency_ms(out, "50"), p99_ms=_latency_ms(out, "99"), errors=errors,
        load_cpu_us_per_op=(load_after - load_before) / ops * 1e6 if ops else float("nan"),
    )


def _percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] / 1e3


def run_ws_echo(system: System, mode: str, sessions: int, size: int, duration: float) -> Sample:
    assert system.ws_port is not None
    per = [sessions // WS_PROCESSES + (1 if i < sessions % WS_PROCESSES else 0) for i in range(WS_PROCESSES)]
    argv = [sys.executable, str(HERE / "wsload.py"), "--port", str(system.ws_port), "--path", system.ws_paths[mode],
            "--size", str(size), "--duration", str(duration), "--max-messages", str(MAX_MESSAGES // WS_PROCESSES)]
    if system.ws_tls:
        argv.append("--tls")
    pids = system.pids()
    outs = [tempfile.mktemp(prefix="wsload-", suffix=".json") for _ in per]
    clients = [subprocess.Popen(argv + ["--sessions", str(n), "--out", o]) for n, o in zip(per, outs)]
    # CPU is sampled around the whole client lifetime: session setup is part of the cost but
    # small (100 handshakes) next to seconds of echo traffic.
    before = cpu_seconds(pids)
    results = []
    for client, path in zip(clients, outs):
        client.wait(timeout=duration + 60)
        with open(path) as file:
            results.append(json.load(file))
        os.unlink(path)
    after = cpu_seconds(pids)
    messages = sum(r["messages"] for r in results)
    seconds = max(r["elapsed"] for r in results)
    samples = sorted(s for r in results for s in r["samples"])
    errors = sum(r["errors"] + r["failed_sessions"] for r in results)
    return Sample(
        ops=messages, seconds=seconds, rate=messages / seconds if seconds else 0.0,
        mb_per_s=messages * size / seconds / 1024**2 if seconds else 0.0,
        cpu_us_per_op=(after - before) / messages * 1e6 if messages else float("nan"),
        p50_ms=_percentile(samples, 0.5), p99_ms=_percentile(samples, 0.99), errors=errors,
    )


@dataclass
class IdleSample:
    connections: int
    failed: int
    rss_kib_per_conn: float
    pss_kib_per_conn: float
    rss_before_kib: int
    rss_after_kib: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def run_idle(system: System, kind: str, count: int, hold: float = 120.0) -> IdleSample:
    """Open ``count`` idle TLS connections (kind "tls") or wss sessions ("ws"); memory per one."""
    port = system.https_port if kind == "tls" else system.ws_port
    assert port is not None
    path = system.ws_paths.get("frames") or system.ws_paths["tunnel"]
    per = [count // IDLE_PROCESSES + (1 if i < count % IDLE_PROCESSES else 0) for i in range(IDLE_PROCESSES)]
    argv = [sys.executable, str(HERE / "wsload.py"), "--port", str(port), "--path", path, "--idle", kind,
            "--hold", str(hold)]
    if system.ws_tls:
        argv.append("--tls")
    time.sleep(0.3)  # let connections of the previous run finish closing
    rss0, pss0 = memory_kib(system.pids())
    clients = [subprocess.Popen(argv + ["--sessions", str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for n in per]
    ok = failed = 0
    try:
        for client in clients:
            assert client.stdout is not None
            line = client.stdout.readline().split()  # "ready OK FAILED", bounded by wsload's own timeouts
            if len(line) == 3:
                ok += int(line[1])
                failed += int(line[2])
        time.sleep(0.5)
        rss1, pss1 = memory_kib(system.pids())
    finally:
        for client in clients:
            try:
                client.communicate("\n", timeout=30)
            except subprocess.TimeoutExpired:
                client.kill()
    return IdleSample(
        connections=ok, failed=failed,
        rss_kib_per_conn=(rss1 - rss0) / ok if ok else float("nan"),
        pss_kib_per_conn=(pss1 - pss0) / ok if ok else float("nan"),
        rss_before_kib=rss0, rss_after_kib=rss1,
    )
