"""The systems under test: their configuration files, start/stop, and /proc accounting.

Everything listens on 127.0.0.1 only. One upstream nginx serves static responses in clear text
(for the proxies) and over TLS 1.3 (direct-to-upstream, and the passthrough target); a small
Python echo server (wsecho.py) is the WebSocket upstream. Each proxy instance is a process tree
whose CPU (utime+stime of every live process in the tree) and memory (RSS, PSS) are read from
/proc. Never sends a byte beyond loopback.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SMALL_BODY = "nextproxy benchmark: a small static response of about one hundred bytes, served by nginx.\n"
CLK_TCK = os.sysconf("SC_CLK_TCK")
NGINX_MODULES = Path("/usr/lib/nginx/modules")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


# --------------------------------------------------------------------------- /proc


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(pid: int) -> list[int]:
    tree = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime of the live processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLK_TCK


def memory_kib(pids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) in KiB summed over the processes."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    pids: list[int] = field(default_factory=list)

    def refresh(self) -> list[int]:
        self.pids = process_tree(self.popen.pid)
        return self.pids

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                for pid in self.refresh():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.popen.wait(5)


def spawn(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> Proc:
    log = open(workdir / f"{name}.log", "wb")
    popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, **(env or {})}, cwd=workdir)
    return Proc(name, popen)


@dataclass
class System:
    """One proxy (or the upstream itself, for 'direct') as the load generators see it."""

    name: str
    kind: str                      # nginx | haproxy | nextproxy | mitmproxy | direct
    workers: int
    proc: Proc | None
    https_port: int | None = None  # W1-W3 (terminated TLS) and W6 idle TLS
    pass_port: int | None = None   # W4 passthrough
    ws_port: int | None = None     # W5/W6 wss
    ws_tls: bool = True
    ws_paths: dict[str, str] = field(default_factory=dict)  # mode -> path

    def pids(self) -> list[int]:
        return self.proc.refresh() if self.proc else []


class Lab:
    """Writes the configurations, starts everything, and stops it all in ``close()``."""

    def __init__(self, workdir: Path, pki_files: dict[str, Path], mitmdump: str | None) -> None:
        self.dir = workdir
        self.pki = pki_files
        self.mitmdump = mitmdump
        self.procs: list[Proc] = []
        self.systems: dict[str, System] = {}
        self.up_port, self.up_tls_port, self.ws_port = free_port(), free_port(), free_port()
        combined = workdir / "edge-combined.pem"
        combined.write_bytes(pki_files["edge.pem"].read_bytes() + pki_files["edge.key"].read_bytes())
        self.combined = combined
        www = workdir / "www"
        www.mkdir()
        (www / "64k").write_bytes(os.urandom(64 * 1024))
        (www / "1m").write_bytes(os.urandom(1024 * 1024))
        for path in (workdir, www, *www.iterdir(), *workdir.glob("*.pem"), *workdir.glob("*.key")):
            path.chmod(0o755 if path.is_dir() else 0o644)  # nginx workers run as nobody

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = spawn(name, argv, self.dir, env)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                print(f"stopping {proc.name}: {exc}", file=sys.stderr)

    # ------------------------------------------------------------------ upstreams

    def start_upstreams(self) -> System:
        conf = self.dir / "upstream-nginx.conf"
        conf.write_text(f"""
worker_processes 1;
worker_rlimit_nofile 20000;
pid {self.dir}/upstream-nginx.pid;
error_log {self.dir}/upstream-nginx.err warn;
events {{ worker_connections 20000; }}
http {{
  {_nginx_http_common(self.dir, "upstream")}
  keepalive_requests 10000000;
  server {{
    listen 127.0.0.1:{self.up_port} backlog=4096;
    listen 127.0.0.1:{self.up_tls_port} ssl backlog=4096;
    ssl_certificate {self.pki['edge.pem']};
    ssl_certificate_key {self.pki['edge.key']};
    ssl_protocols TLSv1.3;
    root {self.dir}/www;
    location = /small {{ default_type text/plain; return 200 "{SMALL_BODY.strip()}\\n"; }}
  }}
}}
""")
        proc = self._start("upstream-nginx", ["nginx", "-c", str(conf), "-p", str(self.dir), "-g", "daemon off;"])
        echo = self._start("wsecho", [sys.executable, str(HERE / "wsecho.py"), str(self.ws_port)])
        wait_port(self.up_port)
        wait_port(self.up_tls_port)
        wait_port(self.ws_port)
        direct = System("direct", "direct", 1, proc, https_port=self.up_tls_port, pass_port=self.up_tls_port)
        self.systems["direct"] = direct
        # The ws echo is a different process: W5 direct measures it, not nginx.
        self.systems["direct-ws"] = System("direct-ws", "direct", 1, echo, ws_port=self.ws_port, ws_tls=False,
                                           ws_paths={"tunnel": "/ws-tunnel"})
        return direct

    # ------------------------------------------------------------------ proxies

    def start_nginx(self, workers: int) -> System:
        name = f"nginx-{workers}"
        https, passthrough = free_port(), free_port()
        conf = self.dir / f"{name}.conf"
        conf.write_text(f"""
load_module {NGINX_MODULES}/ngx_stream_module.so;
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {self.dir}/{name}.pid;
error_log {self.dir}/{name}.err warn;
events {{ worker_connections 20000; }}
http {{
  {_nginx_http_common(self.dir, name)}
  map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
  upstream web {{ server 127.0.0.1:{self.up_port}; keepalive 64; keepalive_requests 10000000; }}
  upstream ws {{ server 127.0.0.1:{self.ws_port}; }}
  proxy_http_version 1.1;
  proxy_buffers 16 16k;
  proxy_buffer_size 16k;
  proxy_max_temp_file_size 0;
  server {{
    listen 127.0.0.1:{https} ssl backlog=4096;
    ssl_certificate {self.pki['edge.pem']};
    ssl_certificate_key {self.pki['edge.key']};
    ssl_protocols TLSv1.3;
    location / {{ proxy_pass http://web; proxy_set_header Connection ""; }}
    location /ws {{
      proxy_pass http://ws;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 3600s;
    }}
  }}
}}
stream {{
  server {{ listen 127.0.0.1:{passthrough} backlog=4096; proxy_pass 127.0.0.1:{self.up_tls_port}; }}
}}
""")
        argv = ["nginx", "-c", str(conf), "-p", str(self.dir), "-g", "daemon off;"]
        return self._c_proxy(name, "nginx", workers, argv, https, passthrough)

    def start_haproxy(self, threads: int) -> System:
        name = f"haproxy-{threads}"
        https, passthrough = free_port(), free_port()
        conf = self.dir / f"{name}.cfg"
        conf.write_text(f"""
global
  nbthread {threads}
  maxconn 9000
  ssl-default-bind-options ssl-min-ver TLSv1.3
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
  timeout tunnel 3600s
frontend edge
  bind 127.0.0.1:{https} ssl crt {self.combined} alpn http/1.1 ssl-min-ver TLSv1.3
  use_backend ws if {{ path_beg /ws }}
  default_backend web
backend web
  http-reuse always
  server s1 127.0.0.1:{self.up_port}
backend ws
  server s1 127.0.0.1:{self.ws_port}
frontend passthrough
  mode tcp
  bind 127.0.0.1:{passthrough}
  default_backend tls
backend tls
  mode tcp
  server s1 127.0.0.1:{self.up_tls_port}
""")
        return self._c_proxy(name, "haproxy", threads, ["haproxy", "-db", "-f", str(conf)], https, passthrough)

    def _c_proxy(self, name: str, kind: str, count: int, argv: list[str], https: int, passthrough: int) -> System:
        """Start nginx or HAProxy with its written configuration; both serve wss as a tunnel."""
        proc = self._start(name, argv)
        wait_port(https)
        wait_port(passthrough)
        system = System(name, kind, count, proc, https, passthrough, https, True, {"tunnel": "/ws-tunnel"})
        self.systems[name] = system
        return system

    def start_nextproxy(self, workers: int) -> System:
        name = f"nextproxy-{workers}"
        port, admin = free_port(), free_port()
        conf = self.dir / f"{name}.toml"
        conf.write_text(f"""
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"

# Every benchmark client connects from 127.0.0.1 (like clients behind a balancer that sends no
# PROXY header): W6's 5,000 idle sessions need more than the default 256 per address.
[limits]
max_connections_per_ip = 20000

[tls]
certificates = [ {{ certificate_file = "{self.pki['edge.pem']}", key_file = "{self.pki['edge.key']}" }} ]

[upstreams.web]
servers = ["127.0.0.1:{self.up_port}"]
[upstreams.ws]
servers = ["127.0.0.1:{self.ws_port}"]
[upstreams.tlsup]
servers = ["127.0.0.1:{self.up_tls_port}"]

[[routes]]
name = "ws-frames"
path = "/ws-frames"
upstream = "ws"
websocket = "frames"
[[routes]]
name = "ws-tunnel"
path = "/ws-tunnel"
upstream = "ws"
websocket = "tunnel"
[[routes]]
name = "web"
path = "/"
upstream = "web"

[[sni_routes]]
name = "pass"
server_names = ["localhost"]
action = "passthrough"
upstream = "tlsup"
""")
        env = {"NEXTPROXY_WORKERS": str(workers), "NEXTPROXY_LOG_LEVEL": "warning"}
        proc = self._start(name, [sys.executable, "-m", "nextproxy", "run", "--config", str(conf)], env)
        wait_port(port, 40)
        system = System(name, "nextproxy", workers, proc, port, port, port, True,
                        {"tunnel": "/ws-tunnel", "frames": "/ws-frames"})
        self.systems[name] = system
        return system

    def start_skeleton(self) -> System:
        """skeleton.py: nextproxy's I/O path with no HTTP in it, the floor for a Python proxy (W1, W2, W3)."""
        name, port = "python-skeleton", free_port()
        argv = [sys.executable, str(Path(__file__).resolve().parent / "skeleton.py"), "--cert", str(self.pki["edge.pem"]),
                "--key", str(self.pki["edge.key"]), "--listen", str(port), "--upstream", f"127.0.0.1:{self.up_port}"]
        proc = self._start(name, argv)
        wait_port(port)
        system = System(name, "skeleton", 1, proc, https_port=port)
        self.systems[name] = system
        return system

    def start_mitmproxy(self) -> System | None:
        if not self.mitmdump:
            return None
        https, ws = free_port(), free_port()
        confdir = self.dir / "mitmproxy"
        argv = [
            self.mitmdump, "-q", "--listen-host", "127.0.0.1",
            "--mode", f"reverse:http://127.0.0.1:{self.up_port}@{https}",
            "--mode", f"reverse:http://127.0.0.1:{self.ws_port}@{ws}",
            "--set", f"confdir={confdir}", "--set", "tls_version_client_min=TLS1_3",
            "--set", "connection_strategy=lazy", "--set", "flow_detail=0",
            "--set", "stream_large_bodies=256k",
        ]
        proc = self._start("mitmproxy", argv)
        wait_port(https, 60)
        wait_port(ws, 60)
        system = System("mitmproxy", "mitmproxy", 1, proc, https, None, ws, True, {"frames": "/ws-tunnel"})
        self.systems["mitmproxy"] = system
        return system


def _nginx_http_common(workdir: Path, name: str) -> str:
    temp = workdir / f"tmp-{name}"
    temp.mkdir(exist_ok=True)
    temp.chmod(0o777)
    paths = " ".join(
        f"{kind}_temp_path {temp}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"access_log off; sendfile on; tcp_nodelay on; keepalive_timeout 75s; {paths}"


def which(name: str) -> str | None:
    return shutil.which(name)
