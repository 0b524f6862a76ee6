"""Logs under load: one throttled line per interval, and a writer that never blocks the loop."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import textwrap

from nextproxy.process.logs import Logger
from nextproxy.process.observe import Throttle


def test_a_frequent_event_is_one_line_per_interval_with_counts() -> None:
    stream = io.StringIO()
    logger = Logger("info", "json", stream=stream, buffered=False)

    async def flood() -> None:
        throttle = Throttle(logger, "info", "tls_handshakes_failed", interval=0.2)
        for i in range(5000):
            throttle.count("timeout" if i % 2 else "other", f"127.0.0.1 #{i}")
        await asyncio.sleep(0.3)  # the interval's timer writes the rest

    asyncio.run(flood())
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 3  # the first of each kind at once, then one summary: not 5,000 lines
    assert lines[0]["counts"] == {"other": 1} and lines[1]["counts"] == {"timeout": 1}
    assert lines[2]["counts"] == {"other": 2499, "timeout": 2499} and lines[2]["last"] == "127.0.0.1 #4999"


def test_a_disabled_level_counts_nothing_and_writes_nothing() -> None:
    stream = io.StringIO()
    logger = Logger("warning", "json", stream=stream, buffered=False)

    async def flood() -> None:
        throttle = Throttle(logger, "info", "tls_handshakes_failed", interval=0.1)
        for _ in range(100):
            throttle.count("timeout")
        await asyncio.sleep(0.2)

    asyncio.run(flood())
    assert stream.getvalue() == ""


def test_stdout_nobody_reads_drops_lines_instead_of_blocking() -> None:
    """A child logs 20 MB to a pipe this test never reads: it finishes, and counts the drops."""
    child = textwrap.dedent("""
        import sys, time
        from nextproxy.process.logs import Logger
        logger = Logger("info", "json")
        started = time.monotonic()
        for i in range(40000):
            logger.log("info", "request", path="x" * 400, i=i)
            if i % 500 == 0:
                logger.flush()
        logger.flush()
        sys.stderr.write(f"{time.monotonic() - started:.2f} {logger.dropped}\\n")
        sys.stderr.flush()
        import os
        os._exit(0)
    """)
    env = dict(os.environ)
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert process.stderr is not None
        report = process.stderr.readline().decode().split()
        elapsed, dropped = float(report[0]), int(report[1])
        assert elapsed < 10  # it never waited for the pipe
        assert dropped > 30000  # 64 KiB of pipe and 1 MiB of buffer hold ~2,500 such lines
    finally:
        process.kill()
        process.wait(10)


def test_handshake_failure_lines_name_the_client_the_sni_and_the_reason() -> None:
    """Issue 14.3 within issue 12's throttle: the first failure of a reason is its own line with
    every field; repeats are counted in one summary that carries the last example's fields."""
    from nextproxy.process.observe import Observer

    stream = io.StringIO()
    logger = Logger("info", "json", stream=stream, buffered=False)

    async def failures() -> None:
        observer = Observer(logger)
        observer._handshakes.interval = 0.2
        observer.handshake("eof_during_handshake", "the client closed", "192.0.2.7", 40001, "localhost")
        observer.handshake("eof_during_handshake", "connection lost", "192.0.2.8", 40002, None)
        observer.handshake("timeout", "no ClientHello within 10 s (0 bytes received)", "192.0.2.9", 40003)
        await asyncio.sleep(0.3)

    asyncio.run(failures())
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if '"tls_handshakes_failed"' in line]
    first, timeout, summary = lines
    assert {k: first[k] for k in ("client", "client_port", "sni", "reason", "detail")} == {
        "client": "192.0.2.7", "client_port": 40001, "sni": "localhost", "reason": "eof_during_handshake",
        "detail": "the client closed",
    }  # fmt: skip
    assert timeout["reason"] == "timeout" and "sni" not in timeout and timeout["client_port"] == 40003
    assert summary["counts"] == {"eof_during_handshake": 1} and summary["client"] == "192.0.2.8"
    assert summary["client_port"] == 40002 and summary["reason"] == "eof_during_handshake"
