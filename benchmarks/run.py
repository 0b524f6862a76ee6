"""nextproxy beside nginx, HAProxy and mitmproxy, on one machine, in one command.

    python benchmarks/run.py            # installs what is missing, runs everything (< 10 min)
    python benchmarks/run.py --help     # fewer workloads, shorter runs, no install...

Installs nginx (+ its stream module), haproxy and wrk from Debian's packages, nextproxy from this
checkout (pip install -e), and mitmproxy from PyPI into its own virtualenv (it pins other
cryptography/pyOpenSSL versions than nextproxy); starts every system on 127.0.0.1, then runs each
workload interleaved (A B C A B C ...) and reports medians. Writes benchmarks/results/latest.json
and latest.svg. Loopback only; every run bounded in time and count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loads import IdleSample, Sample, run_idle, run_wrk, run_ws_echo, write_stop_script  # noqa: E402
from report import HEADER, IDLE_HEADER, idle_rows, markdown_table, rows, svg_chart, text_table  # noqa: E402
from systems import NGINX_MODULES, ROOT, Lab, System  # noqa: E402

APT_PACKAGES = ["nginx", "libnginx-mod-stream", "haproxy", "wrk"]
MITM_VENV = Path.home() / ".cache" / "nextproxy-bench" / "mitmproxy-venv"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- installation


def install(skip: bool) -> tuple[str | None, list[str]]:
    """Debian packages, nextproxy, mitmproxy; returns (mitmdump path or None, notes)."""
    notes: list[str] = []
    missing = [b for b in ("nginx", "haproxy", "wrk") if not shutil.which(b)]
    if missing or not (NGINX_MODULES / "ngx_stream_module.so").exists():
        if skip:
            sys.exit(f"missing {missing or 'nginx stream module'} and --no-install given")
        log(f"apt-get install {' '.join(APT_PACKAGES)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", *APT_PACKAGES], check=True, env=env, stdout=subprocess.DEVNULL)
    # Debian starts the packaged services on install; they would compete for the CPU.
    for service in ("nginx", "haproxy"):
        subprocess.run(["service", service, "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    try:
        import nextproxy  # noqa: F401
    except ImportError:
        if skip:
            sys.exit("nextproxy is not installed and --no-install given")
        log("pip install -e .")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(ROOT)], check=True)
        # This interpreter read site-packages before the install; the child processes will see it,
        # this one needs the checkout on its path to import nextproxy below.
        sys.path.insert(0, str(ROOT))
    mitmdump = MITM_VENV / "bin" / "mitmdump"
    if not mitmdump.exists() and not skip:
        log(f"mitmproxy into {MITM_VENV}")
        try:
            subprocess.run([sys.executable, "-m", "venv", str(MITM_VENV)], check=True)
            subprocess.run([str(MITM_VENV / "bin" / "pip"), "install", "-q", "mitmproxy"], check=True, timeout=400)
        except (subprocess.SubprocessError, OSError) as exc:
            notes.append(f"mitmproxy skipped: it did not install ({exc})")
    if not mitmdump.exists():
        if not notes:
            notes.append("mitmproxy skipped: not installed")
        return None, notes
    return str(mitmdump), notes


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    return hard


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    versions = []
    for argv in (["nginx", "-v"], ["haproxy", "-v"]):
        out = subprocess.run(argv, capture_output=True, text=True)
        versions.append((out.stdout + out.stderr).splitlines()[0].strip())
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Linux {platform.release()}, "
            f"Python {platform.python_version()}; {'; '.join(versions)}")


# --------------------------------------------------------------------------- workloads


def median_sample(samples: list[Sample]) -> dict[str, Any]:
    keys = samples[0].to_dict().keys()
    out: dict[str, Any] = {k: statistics.median([getattr(s, k) for s in samples]) for k in keys}
    out["errors"] = sum(s.errors for s in samples)
    out["runs"] = [s.to_dict() for s in samples]
    return out


def interleaved(reps: int, plan: list[tuple[str, Callable[[], Sample]]]) -> dict[str, dict[str, Any]]:
    """A B C A B C ...: every system sees the same machine conditions across repetitions."""
    samples: dict[str, list[Sample]] = {name: [] for name, _ in plan}
    for rep in range(reps):
        for name, run in plan:
            try:
                samples[name].append(run())
            except Exception as exc:  # report the failure, keep the rest of the run
                log(f"  {name} rep {rep + 1} failed: {exc}")
    return {name: median_sample(s) for name, s in samples.items() if s}


def scaling_lines(results: dict[str, Any]) -> list[str]:
    """W1 with two workers against one, beside what two shared cores allow at all. With p2 the
    proxy's CPU per request with two workers and g what wrk and the upstream spend per request
    (measured in the same runs), both cores together serve at most 2 / (p2 + g) requests a second,
    however well the workers scale; the line says how close each system comes to that."""
    w1 = results["workloads"].get("W1 keep-alive GET small, 50 conns", {})
    lines = []
    for name in ("nginx", "haproxy", "nextproxy"):
        one, two = w1.get(f"{name}-1"), w1.get(f"{name}-2")
        if not one or not two or not one["rate"]:
            continue
        g = statistics.median(r.get("load_cpu_us_per_op", float("nan")) for r in two["runs"])
        p2 = two["cpu_us_per_op"]
        most = 2e6 / (p2 + g) if g == g else float("nan")
        lines.append(
            f"W1 scaling {name}: 2 workers {two['rate'] / one['rate']:.2f}x one ({two['rate']:,.0f} req/s, CPU per "
            f"request {p2:.1f} vs {one['cpu_us_per_op']:.1f} µs); two shared cores allow at most 2/(p2+g) = "
            f"{most:,.0f} req/s = {most / one['rate']:.2f}x one (g = wrk + upstream = {g:.1f} µs per request)"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per run (default 2)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per system and workload (default 3)")
    parser.add_argument("--only", default="W1,W2,W3,W4,W5,W6", help="comma-separated workloads")
    parser.add_argument("--idle", type=int, default=5000, help="W6 connections/sessions (default 5000)")
    parser.add_argument("--idle-reps", type=int, default=3, help="W6 repetitions (default 3)")
    parser.add_argument("--no-install", action="store_true", help="never apt-get or pip install")
    parser.add_argument("--no-mitmproxy", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    args = parser.parse_args()
    started = time.monotonic()
    only = set(args.only.upper().split(","))

    mitmdump, notes = install(args.no_install)
    if args.no_mitmproxy:
        mitmdump, notes = None, notes + ["mitmproxy skipped: --no-mitmproxy"]
    fds = raise_fd_limit()
    if fds < 4 * args.idle:
        notes.append(f"open-file limit {fds} is low for {args.idle} idle sessions; W6 may fail")

    from nextproxy.demo.pki import make_pki

    workdir = Path(tempfile.mkdtemp(prefix="nextproxy-bench-"))
    pki = make_pki().write(workdir / "pki")
    lab = Lab(workdir, pki, mitmdump)
    results: dict[str, Any] = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "duration_s": args.duration, "reps": args.reps, "notes": notes,
                               "workloads": {}, "idle": {}}
    for note in notes:
        log(note)
    try:
        log("starting upstreams and proxies")
        direct = lab.start_upstreams()
        systems: list[System] = [direct]
        for start in (lambda: lab.start_nginx(1), lambda: lab.start_nginx(2), lambda: lab.start_haproxy(1),
                      lambda: lab.start_haproxy(2), lambda: lab.start_nextproxy(1), lambda: lab.start_nextproxy(2),
                      lab.start_skeleton):
            systems.append(start())
        mitm = lab.start_mitmproxy()
        if mitm is not None:
            systems.append(mitm)
        stop = write_stop_script(workdir)
        d = args.duration

        def wrk_plan(path: str, close: bool, passthrough: bool = False, conns: int = 50) -> list[tuple[str, Callable[[], Sample]]]:
            plan = []
            for s in systems:
                port = s.pass_port if passthrough else s.https_port
                if port is None:
                    continue
                host = "localhost" if passthrough else "127.0.0.1"  # SNI localhost = nextproxy's passthrough route
                url = f"https://{host}:{port}{path}"
                plan.append((s.name, lambda s=s, url=url: run_wrk(s, url, d, conns, close, stop, direct)))
            return plan

        http = [
            ("W1 keep-alive GET small, 50 conns", "req/s", "W1", wrk_plan("/small", False)),
            ("W2 new TLS connection per request", "req/s", "W2", wrk_plan("/small", True)),
            ("W3 64 KiB responses, 50 conns", "MB/s", "W3", wrk_plan("/64k", False)),
            ("W4 passthrough 1 MiB bulk, TLS upstream, 16 conns", "MB/s", "W4", wrk_plan("/1m", False, True, 16)),
        ]
        for title, unit, key, plan in http:
            if key not in only:
                continue
            log(f"{title}: {len(plan)} systems x {args.reps}")
            out = interleaved(args.reps, plan)
            for m in out.values():
                m["unit"] = unit
            results["workloads"][title] = out

        if "W5" in only:
            ws_systems = [lab.systems["direct-ws"], *systems[1:]]
            for title, sessions, size, names in (
                ("W5 WebSocket echo 32 B, 100 sessions", 100, 32, None),
                ("W5 WebSocket echo 64 KiB, 20 sessions", 20, 65536, {"direct-ws", "nginx-1", "haproxy-1", "nextproxy-1", "mitmproxy"}),
            ):
                plan = []
                for s in ws_systems:
                    if s.ws_port is None or (names is not None and s.name not in names):
                        continue
                    for mode in s.ws_paths:
                        label = f"{s.name} {mode}" if s.kind in ("nextproxy", "mitmproxy") else s.name
                        plan.append((label, lambda s=s, mode=mode, n=sessions, z=size: run_ws_echo(s, mode, n, z, d)))
                log(f"{title}: {len(plan)} systems x {args.reps}")
                out = interleaved(args.reps, plan)
                for m in out.values():
                    m["unit"] = "msg/s"
                results["workloads"][title] = out

        if "W6" in only:
            # A fresh instance per measurement: a Python process keeps freed memory, so a second
            # measurement in the same process would read low.
            starters: list[tuple[str, Callable[[], System | None], str]] = [
                ("nginx-1", lambda: lab.start_nginx(1), "tunnel"),
                ("haproxy-1", lambda: lab.start_haproxy(1), "tunnel"),
                ("nextproxy-1", lambda: lab.start_nextproxy(1), "frames"),
                ("nextproxy-1 tunnel", lambda: lab.start_nextproxy(1), "tunnel"),
            ]
            if mitmdump:
                starters.append(("mitmproxy", lab.start_mitmproxy, "frames"))
            for kind, title in (("tls", f"W6 idle TLS connections x {args.idle}"), ("ws", f"W6 idle wss sessions x {args.idle}")):
                log(f"{title}: {len(starters) if kind == 'ws' else len(starters) - 1} systems x {args.idle_reps}")
                idle: dict[str, list[IdleSample]] = {}
                for rep in range(args.idle_reps):
                    for label, start, mode in starters:
                        if kind == "tls" and label.endswith("tunnel"):
                            continue  # the same TLS connection as frames mode
                        if label == "mitmproxy" and rep > 0:
                            continue  # ~20 s per 5,000 sessions: one run keeps the whole under 10 minutes
                        system = start()
                        if system is None:
                            continue
                        system.ws_paths = {mode: system.ws_paths.get(mode, "/ws-tunnel")}
                        try:
                            idle.setdefault(label, []).append(run_idle(system, kind, args.idle))
                        except Exception as exc:
                            log(f"  {label} failed: {exc}")
                        finally:
                            assert system.proc is not None
                            system.proc.stop()
                            lab.procs.remove(system.proc)
                results["idle"][title] = {
                    label: {
                        "connections": min(s.connections for s in samples),
                        "failed": sum(s.failed for s in samples),
                        "rss_kib_per_conn": statistics.median(s.rss_kib_per_conn for s in samples),
                        "pss_kib_per_conn": statistics.median(s.pss_kib_per_conn for s in samples),
                        "runs": [s.to_dict() for s in samples],
                    }
                    for label, samples in idle.items()
                }
    finally:
        lab.close()
        shutil.rmtree(workdir, ignore_errors=True)

    results["elapsed_s"] = round(time.monotonic() - started, 1)
    table = text_table(HEADER, rows(results))
    idle_table = text_table(IDLE_HEADER, idle_rows(results)) if results["idle"] else ""
    print()
    print(f"machine: {results['machine']}")
    print(f"medians of {args.reps} interleaved runs of {args.duration:g} s; CPU = the proxy's own processes")
    print(table)
    if idle_table:
        print()
        print(idle_table)
    for line in scaling_lines(results):
        print(line)
    for note in notes:
        print(f"note: {note}")
    target = Path(args.out)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=1))
    target.with_suffix(".svg").write_text(svg_chart(results))
    target.with_suffix(".md").write_text(
        f"machine: {results['machine']}\n\n{markdown_table(HEADER, rows(results))}\n\n"
        + (markdown_table(IDLE_HEADER, idle_rows(results)) + "\n" if results["idle"] else "")
    )
    print(f"\nwrote {target}, {target.with_suffix('.svg')} and {target.with_suffix('.md')} in {results['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
