"""Command line: ``nextproxy [run] | check | demo | pki | standins``, and ``python -m nextproxy``.

Exit codes: 0 success, 2 bad configuration (one line on stderr naming the key, printed before
anything is bound). Never a traceback for a configuration problem.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from nextproxy import __version__
from nextproxy.config.model import Config
from nextproxy.config import load, unknown_variables
from nextproxy.errors import ConfigError
from nextproxy.process.lifecycle import run_loop

if TYPE_CHECKING:
    from nextproxy.edge.tlscontexts import ServerContexts

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextproxy", description="TLS 1.3 edge reverse proxy.")
    parser.add_argument("--version", action="version", version=f"nextproxy {__version__}")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="serve until SIGTERM/SIGINT (the default)")
    run.add_argument("--config", metavar="FILE", help="TOML configuration (else $NEXTPROXY_CONFIG, else the preset)")
    check = sub.add_parser("check", help="validate the configuration and print the routing table")
    check.add_argument("--config", metavar="FILE")
    demo = sub.add_parser("demo", help="the proxy with a throwaway PKI and stand-in ns/mc/sfs upstreams")
    demo.add_argument("--port", type=int, default=8443, help="edge port on 127.0.0.1 (default 8443)")
    demo.add_argument("--admin-port", type=int, default=9613, help="admin port on 127.0.0.1 (default 9613)")
    demo.add_argument(
        "--keep-pki", "--dir", dest="keep_pki", metavar="DIR", default=None,
        help="write the demo PKI into DIR and keep it (default: a temp folder removed when the demo stops)",
    )
    health = sub.add_parser("healthcheck", help="exit 0 if this host's proxy answers /readyz with 200 (for container healthchecks)")
    health.add_argument("--config", metavar="FILE")
    pki = sub.add_parser("pki", help="write a throwaway demo PKI (CA, edge, upstream, client) into DIR")
    pki.add_argument("dir", metavar="DIR")
    pki.add_argument("--owner", metavar="UID:GID", default=None, help="hand DIR and its files to UID:GID, keys 0640 (run as root)")
    standins = sub.add_parser("standins", help="serve the preset's stand-in upstreams for one service")
    standins.add_argument("--service", choices=("ns", "mc", "sfs", "all"), default="all")
    standins.add_argument(
        "--host", default=None, help="address to listen on (default 0.0.0.0; with all: one loopback IP per service)"
    )
    standins.add_argument("--pki", metavar="DIR", default=None, help="upstream.pem/.key and ca.pem for the TLS API ports")
    return parser


def _load_checked(path: str | None) -> tuple[Config, ServerContexts]:
    """Config plus built TLS contexts: every check that can fail happens before binding."""
    from nextproxy.edge.tlscontexts import admin_ssl_context, upstream_ssl_context

    from nextproxy.edge.tlscontexts import ServerContexts

    config = load(os.environ, path)
    contexts = ServerContexts.build(config)
    for upstream in config.upstreams:
        if upstream.tls is not None:
            upstream_ssl_context(upstream.tls)
    if config.admin_tls is not None:
        admin_ssl_context(config.admin_tls)
    return config, contexts


def check(path: str | None) -> int:
    from nextproxy.edge.listener import describe_routes

    config, contexts = _load_checked(path)
    print(f"configuration: {config.source}")
    listen = ", ".join(str(a) for a in (config.listen, *config.listen_also))
    print(f"listen: {listen}   admin: {config.admin_listen}   workers: {config.workers}")
    for cert in contexts.certificates:
        print(f"certificate: {cert.name} (SANs: {', '.join(cert.sans) or '-'})")
    rows = describe_routes(config)
    widths = [max(len(r[i]) for r in rows + [("match", "action", "upstream")]) for i in range(3)]
    header = ("match", "action", "upstream")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        target = row[2]
        upstream = config.upstream(target)
        if upstream is not None:
            target = f"{target} ({', '.join(str(s) for s in upstream.servers)})"
        print("  ".join(v.ljust(w) for v, w in zip((row[0], row[1], target), widths)))
    return 0


def run(path: str | None) -> int:
    from nextproxy.process.logs import Logger

    from nextproxy.process.nofile import fit

    config, contexts = _load_checked(path)
    config, files = fit(config)  # before binding: a cap that cannot fit is a config error
    logger = Logger(config.log_level, config.log_format)
    logger.log("info", "open_files", **files.describe())
    for name in unknown_variables(os.environ):
        logger.log("warning", "unknown_variable", variable=name)
    if config.workers > 1:
        from nextproxy.process.workers import supervise

        return supervise(config, logger, path)
    from nextproxy.process.lifecycle import serve

    return run_loop(serve(config, logger, config_path=path, contexts=contexts))


def demo(port: int, admin_port: int, keep_pki: str | None) -> int:
    """The proxy on its embedded preset, with a fresh PKI (removed on exit unless kept) and stand-ins."""
    from nextproxy.demo.pki import demo_pki_folder

    with demo_pki_folder(keep_pki) as folder:
        return _demo(port, admin_port, folder, kept=keep_pki is not None)


def _demo(port: int, admin_port: int, folder: Path, *, kept: bool) -> int:
    from nextproxy.config import from_environment
    from nextproxy.demo.pki import (
        DEMO_API_SERVER_NAMES,
        DEMO_HOSTS,
        demo_environment,
        make_pki,
        start_demo_upstreams,
    )
    from nextproxy.process.lifecycle import serve
    from nextproxy.process.logs import Logger

    pki = make_pki()
    files = pki.write(folder)
    env = demo_environment(files, listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{admin_port}")
    config = from_environment({**env, "NEXTPROXY_LOG_FORMAT": "text"})
    ca, cert, key = files["ca.pem"], files["client.pem"], files["client.key"]
    api = DEMO_API_SERVER_NAMES["ns"]
    resolve = f"--resolve localhost:{port}:127.0.0.1"
    print(f"""nextproxy demo: edge https://localhost:{port}  admin http://127.0.0.1:{admin_port}
  stand-in upstreams: ns on {DEMO_HOSTS['ns']}, mc on {DEMO_HOSTS['mc']}, sfs on {DEMO_HOSTS['sfs']} (ports 9999, 8888, 8080)
  demo PKI (throwaway CA, edge and client certificates): {folder} ({"kept" if kept else "removed on exit"})

Try, in another terminal:
  curl --cacert {ca} {resolve} https://localhost:{port}/ns/sigmai/hello
  curl --cacert {ca} {resolve} https://localhost:{port}/mc/sigmai/echo -d 'echo me'
  curl --cacert {ca} {resolve} -i https://localhost:{port}/nowhere
  curl --cacert {ca} --resolve {api}:{port}:127.0.0.1 --cert {cert} --key {key} https://{api}:{port}/who
  python -m nextproxy.demo.wsclient --cacert {ca} {resolve} wss://localhost:{port}/ns/websocket hello world
  curl http://127.0.0.1:{admin_port}/metrics
  open http://127.0.0.1:{admin_port}/ for the status page

Ctrl-C stops it.
""", flush=True)

    async def main() -> int:
        standins = await start_demo_upstreams(pki=pki)
        try:
            return await serve(config, Logger("info", "text"))
        finally:
            for standin in standins:
                await standin.close()

    try:
        return run_loop(main())
    except OSError as exc:
        print(f"nextproxy demo: {exc}", file=sys.stderr)
        return 1


# The edge certificate of `nextproxy pki` also names the compose service, so that containers on
# the compose network can reach the proxy as https://nextproxy:8443 and verify it.
PKI_EDGE_SERVICE_NAMES = ("nextproxy",)
STANDIN_SERVICES = ("ns", "mc", "sfs")


def pki(directory: str, owner: str | None = None) -> int:
    """Write the demo PKI into ``directory`` unless it already holds one (compose runs this on every ``up``)."""
    from nextproxy.demo.pki import DEMO_EDGE_NAMES, hand_over, make_pki, parse_owner

    try:
        uid_gid = None if owner is None else parse_owner(owner)
    except ValueError as exc:
        raise ConfigError("--owner", str(exc)) from None
    folder = Path(directory)
    if (folder / "ca.pem").is_file() and (folder / "edge.pem").is_file():
        print(f"nextproxy pki: {folder} already holds ca.pem and edge.pem; left unchanged", flush=True)
        return 0
    names = (*DEMO_EDGE_NAMES, *PKI_EDGE_SERVICE_NAMES)
    try:
        files = make_pki(names).write(folder)
        if uid_gid is not None:
            hand_over(folder, files, uid_gid)
    except OSError as exc:
        print(f"nextproxy pki: cannot write {folder}: {exc.strerror or exc}", file=sys.stderr)
        if isinstance(exc, PermissionError):
            print("nextproxy pki: in a container, run it as root with --owner UID:GID (see the README)", file=sys.stderr)
        return 1
    print(f"nextproxy pki: wrote a throwaway demo PKI (valid one year) to {folder}:")
    for name, path in sorted(files.items()):
        print(f"  {path}")
    print(f"  edge.pem names: {', '.join(names)}", flush=True)
    return 0


def _standin_plan(service: str, host: str | None) -> list[tuple[str, str, int, bool]]:
    """(stand-in name, host, port, is the TLS API) for every preset route of ``service``."""
    from nextproxy.config.preset import PRESET_API_ROUTES, PRESET_PATH_ROUTES
    from nextproxy.demo.pki import DEMO_HOSTS

    if service == "all":
        if host is not None:
            # ns, mc and sfs share the preset's ports, so they cannot share one address.
            raise ConfigError("--host", "cannot be used with --service all (ns, mc and sfs use the same ports)")
        hosts = dict(DEMO_HOSTS)
    else:
        hosts = {service: host or "0.0.0.0"}
    plan = [(name, hosts[svc.lower()], port, False) for name, _, svc, port in PRESET_PATH_ROUTES if svc.lower() in hosts]
    plan += [(name, hosts[svc.lower()], port, True) for name, svc, port in PRESET_API_ROUTES if svc.lower() in hosts]
    return plan


def _standin_api_tls(pki_dir: str | None) -> ssl.SSLContext:
    """The API ports' context: DIR/upstream.pem+key, asking (not requiring) client certs from DIR/ca.pem."""
    from pathlib import Path

    from nextproxy.demo.pki import Pem, make_pki, server_ssl_context

    if pki_dir is None:
        print("nextproxy standins: no --pki: the TLS API ports use a fresh CA that no client trusts", flush=True)
        fresh = make_pki()
        return server_ssl_context(fresh.upstream, fresh.ca.certificate)
    folder = Path(pki_dir)
    try:
        upstream = Pem((folder / "upstream.pem").read_bytes(), (folder / "upstream.key").read_bytes())
        ca = (folder / "ca.pem").read_bytes()
        return server_ssl_context(upstream, ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("--pki", f"needs upstream.pem, upstream.key and ca.pem in {folder}: {exc}") from None


def standins(service: str, host: str | None, pki_dir: str | None) -> int:
    """Serve the stand-in upstreams of ``service`` on the preset's ports until SIGTERM/SIGINT; exit 0."""
    plan = _standin_plan(service, host)
    tls = _standin_api_tls(pki_dir) if any(is_api for *_, is_api in plan) else None

    async def serve_standins() -> int:
        from nextproxy.demo.standins import StandIn, start_http_ws, start_tls_api

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        started: list[StandIn] = []
        try:
            for name, bind_host, port, is_api in plan:
                if is_api:
                    assert tls is not None
                    started.append(await start_tls_api(bind_host, port, name, tls))
                else:
                    started.append(await start_http_ws(bind_host, port, name))
                scheme = "https" if is_api else "http+ws"
                print(f"nextproxy standins: {name} on {scheme}://{bind_host}:{port}", flush=True)
            print("nextproxy standins: serving until SIGTERM", flush=True)
            await stop.wait()
        finally:
            await asyncio.gather(*(standin.close() for standin in started), return_exceptions=True)
        return 0

    try:
        return run_loop(serve_standins())
    except OSError as exc:
        print(f"nextproxy standins: {exc}", file=sys.stderr)
        return 1


# The container's main process: PID 1 itself, or under --init (tini, catatonit) PID 1's command line
# still carries it after "--". One image serves both roles, so its HEALTHCHECK asks what runs here.
MAIN_CMDLINE = Path("/proc/1/cmdline")


def _standins_argv(cmdline: Path) -> list[str] | None:
    """The ``standins ...`` arguments when ``cmdline`` runs ``nextproxy standins``, else None."""
    try:
        argv = cmdline.read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    for index in range(1, len(argv)):
        if argv[index] == "standins" and Path(argv[index - 1]).name == "nextproxy":
            return [arg for arg in argv[index:] if arg]
    return None


def _standins_healthcheck(argv: list[str]) -> int:
    """Exit 0 when every port of the stand-ins that ``argv`` describes accepts a connection."""
    import socket

    args = _parser().parse_args(argv)
    for name, host, port, _ in _standin_plan(args.service, args.host):
        target = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        try:
            socket.create_connection((target, port), timeout=3).close()
        except OSError as exc:
            print(f"nextproxy healthcheck: standins {name} on {target}:{port}: {exc}", file=sys.stderr)
            return 1
    return 0


def healthcheck(path: str | None, main_cmdline: Path = MAIN_CMDLINE) -> int:
    """The stand-ins' ports when ``main_cmdline`` is ``nextproxy standins``, else GET /readyz on the
    configured admin address (a wildcard address means this host)."""
    import http.client
    import ssl

    standins_argv = _standins_argv(main_cmdline)
    if standins_argv is not None:
        return _standins_healthcheck(standins_argv)
    config = load(os.environ, path)
    address = config.admin_listen
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
    conn: http.client.HTTPConnection
    if config.admin_tls is not None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # our own process on this host; only liveness matters
        conn = http.client.HTTPSConnection(host, address.port, timeout=3, context=context)
    else:
        conn = http.client.HTTPConnection(host, address.port, timeout=3)
    try:
        conn.request("GET", "/readyz")
        status = conn.getresponse().status
    except OSError as exc:
        print(f"nextproxy healthcheck: {address}: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    if status != 200:
        print(f"nextproxy healthcheck: /readyz answered {status}", file=sys.stderr)
    return 0 if status == 200 else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    try:
        if command == "check":
            return check(args.config)
        if command == "demo":
            return demo(args.port, args.admin_port, args.keep_pki)
        if command == "healthcheck":
            return healthcheck(args.config)
        if command == "pki":
            return pki(args.dir, args.owner)
        if command == "standins":
            return standins(args.service, args.host, args.pki)
        return run(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"nextproxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
