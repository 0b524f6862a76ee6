"""Command line: ``nextproxy [run] | check | healthcheck | demo | pki | standins``, and
``python -m nextproxy``. Arguments and dispatch only: the commands live in ``process.commands``
and ``demo.commands``.

Exit codes: 0 success, 2 bad configuration (one line on stderr naming the key, printed before
anything is bound). Never a traceback for a configuration problem.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from nextproxy import __version__
from nextproxy.errors import ConfigError
from nextproxy.process import commands
from nextproxy.process.loop import run_loop

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
    health = sub.add_parser("healthcheck", help="exit 0 if this host's proxy answers /readyz with 200 (for container healthchecks)")
    health.add_argument("--config", metavar="FILE")
    pki = sub.add_parser("pki", help="write a throwaway demo PKI (CA, edge, upstream, client) into DIR")
    pki.add_argument("dir", metavar="DIR")
    standins = sub.add_parser("standins", help="serve the preset's stand-in upstreams for one service")
    standins.add_argument("--service", choices=("ns", "mc", "sfs", "all"), default="all")
    standins.add_argument(
        "--host", default=None, help="address to listen on (default 0.0.0.0; with all: one loopback IP per service)"
    )
    standins.add_argument("--pki", metavar="DIR", default=None, help="upstream.pem/.key and ca.pem for the TLS API ports")
    return parser


def demo(port: int, admin_port: int, directory: str | None) -> int:
    """The proxy on its embedded preset, with a fresh PKI and stand-in upstreams on loopback."""
    from nextproxy.demo.commands import prepare_demo, with_demo_upstreams
    from nextproxy.process.lifecycle import serve
    from nextproxy.process.logs import Logger

    setup = prepare_demo(port, admin_port, directory)
    try:
        return run_loop(with_demo_upstreams(setup.pki, lambda: serve(setup.config, Logger("info", "text"))))
    except OSError as exc:
        print(f"nextproxy demo: {exc}", file=sys.stderr)
        return 1


def standins(service: str, host: str | None, pki_dir: str | None) -> int:
    from nextproxy.demo import commands

    try:
        return run_loop(commands.standins(service, host, pki_dir))
    except OSError as exc:
        print(f"nextproxy standins: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    try:
        if command == "check":
            return commands.check(args.config)
        if command == "demo":
            return demo(args.port, args.admin_port, args.dir)
        if command == "healthcheck":
            return commands.healthcheck(args.config)
        if command == "pki":
            from nextproxy.demo.commands import write_pki

            return write_pki(args.dir)
        if command == "standins":
            return standins(args.service, args.host, args.pki)
        return commands.run(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"nextproxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
