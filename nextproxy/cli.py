"""Command line: ``nextproxy [run] | check | demo``, and ``python -m nextproxy``.

Exit codes: 0 success, 2 bad configuration (one line on stderr naming the key, printed before
anything is bound). Never a traceback for a configuration problem.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Sequence

from nextproxy import __version__
from nextproxy.config import Config, load, unknown_variables
from nextproxy.errors import ConfigError

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
    demo.add_argument("--dir", default=None, help="where to write the demo PKI (default: a temp dir)")
    return parser


def _load_checked(path: str | None) -> tuple[Config, object]:
    """Config plus built TLS contexts: every check that can fail happens before binding."""
    from nextproxy.tlsconfig import ServerContexts, admin_ssl_context, upstream_ssl_context

    config = load(os.environ, path)
    contexts = ServerContexts.build(config)
    for upstream in config.upstreams:
        if upstream.tls is not None:
            upstream_ssl_context(upstream.tls)
    if config.admin_tls is not None:
        admin_ssl_context(config.admin_tls)
    return config, contexts


def check(path: str | None) -> int:
    from nextproxy.core.routing import RouteTable

    config, contexts = _load_checked(path)
    print(f"configuration: {config.source}")
    print(f"listen: {config.listen}   admin: {config.admin_listen}   workers: {config.workers}")
    for cert in contexts.certificates:  # type: ignore[attr-defined]
        print(f"certificate: {cert.name} (SANs: {', '.join(cert.sans) or '-'})")
    rows = RouteTable(config).describe()
    widths = [max(len(r[i]) for r in rows + [("match", "action", "upstream")]) for i in range(3)]
    header = ("match", "action", "upstream")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        target = row[2]
        try:
            servers = ", ".join(str(s) for s in config.upstream(target).servers)
            target = f"{target} ({servers})"
        except KeyError:
            pass
        print("  ".join(v.ljust(w) for v, w in zip((row[0], row[1], target), widths)))
    return 0


def run(path: str | None) -> int:
    from nextproxy.logs import Logger

    config, _ = _load_checked(path)
    logger = Logger(config.log_level, config.log_format)
    for name in unknown_variables(os.environ):
        logger.log("warning", "unknown_variable", variable=name)
    if config.workers > 1:
        from nextproxy.workers import supervise

        return supervise(config, logger, path)
    from nextproxy.lifecycle import serve

    return run_loop(serve(config, logger, config_path=path))


def demo(port: int, admin_port: int, directory: str | None) -> int:
    """The proxy on its embedded preset, with a fresh PKI and stand-in upstreams on loopback."""
    import tempfile
    from pathlib import Path

    from nextproxy.config import from_environment
    from nextproxy.demo import DEMO_API_SERVER_NAMES, DEMO_HOSTS, demo_environment, make_pki, start_demo_upstreams
    from nextproxy.lifecycle import serve
    from nextproxy.logs import Logger

    folder = Path(directory or tempfile.mkdtemp(prefix="nextproxy-demo-"))
    pki = make_pki()
    files = pki.write(folder)
    env = demo_environment(files, listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{admin_port}")
    config = from_environment({**env, "NEXTPROXY_LOG_FORMAT": "text"})
    ca, cert, key = files["ca.pem"], files["client.pem"], files["client.key"]
    api = DEMO_API_SERVER_NAMES["ns"]
    resolve = f"--resolve localhost:{port}:127.0.0.1"
    print(f"""nextproxy demo: edge https://localhost:{port}  admin http://127.0.0.1:{admin_port}
  stand-in upstreams: ns on {DEMO_HOSTS['ns']}, mc on {DEMO_HOSTS['mc']}, sfs on {DEMO_HOSTS['sfs']} (ports 9999, 8888, 8080)
  demo PKI (throwaway CA, edge and client certificates): {folder}

Try, in another terminal:
  curl --cacert {ca} {resolve} https://localhost:{port}/ns/sigmai/hello
  curl --cacert {ca} {resolve} https://localhost:{port}/mc/sigmai/echo -d 'echo me'
  curl --cacert {ca} {resolve} -i https://localhost:{port}/nowhere
  curl --cacert {ca} --resolve {api}:{port}:127.0.0.1 --cert {cert} --key {key} https://{api}:{port}/who
  python -m nextproxy.wsclient --cacert {ca} {resolve} wss://localhost:{port}/ns/websocket hello world
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


def run_loop(coro: object) -> int:
    """Run on uvloop when it is installed (production), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return int(asyncio.run(coro))  # type: ignore[arg-type]
    return int(uvloop.run(coro))  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    try:
        if command == "check":
            return check(args.config)
        if command == "demo":
            return demo(args.port, args.admin_port, args.dir)
        return run(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"nextproxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
