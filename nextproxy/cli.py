"""Command line: ``nextproxy [run] | check | healthcheck | demo | pki | standins``, and
``python -m nextproxy``. Arguments and dispatch only: the commands live in ``process.commands``
and ``demo.commands``.

Exit codes: 0 success, 2 bad configuration (one line on stderr naming the key, printed before
anything is bound) or an edge or admin address that cannot be listened on (one line naming
``listen``/``admin_listen`` or their variables). Never a traceback for either.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Sequence

from nextproxy import __version__
from nextproxy.errors import ConfigError
from nextproxy.process import commands
from nextproxy.process.loop import run_loop

EXIT_CONFIG = 2


def _port(text: str) -> int:
    """A TCP port for ``demo``: its errors name the option, not the variable it becomes."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 1-65535, got {text!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextproxy", description="TLS 1.3 edge reverse proxy.")
    parser.add_argument("--version", action="version", version=f"nextproxy {__version__}")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="serve until SIGTERM/SIGINT (the default)")
    run.add_argument("--config", metavar="FILE", help="TOML configuration (else $NEXTPROXY_CONFIG, else the preset)")
    check = sub.add_parser("check", help="validate the configuration and print the routing table")
    check.add_argument("--config", metavar="FILE")
    demo = sub.add_parser("demo", help="the proxy with a throwaway PKI and stand-in ns/mc/sfs upstreams")
    demo.add_argument("--port", type=_port, default=8443, help="edge port on 127.0.0.1 (default 8443)")
    demo.add_argument("--admin-port", type=_port, default=9613, help="admin port on 127.0.0.1 (default 9613)")
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


def demo(port: int, admin_port: int, keep_pki: str | None) -> int:
    """The proxy on its embedded preset, with stand-in upstreams on loopback and a fresh PKI that is
    removed when the demo stops unless ``keep_pki`` names a folder to keep it in."""
    from nextproxy.demo.commands import demo_pki_folder, prepare_demo, with_demo_upstreams
    from nextproxy.process.lifecycle import serve
    from nextproxy.process.logs import Logger

    for option, number in (("--port", port), ("--admin-port", admin_port)):
        # Before the banner and its copy-paste commands, and named as the user typed it (the
        # ports become NEXTPROXY_LISTEN / NEXTPROXY_ADMIN_LISTEN, which they never set).
        try:
            with socket.create_server(("127.0.0.1", number)):
                pass
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            print(f"nextproxy demo: {option} {number}: cannot listen on 127.0.0.1:{number}: {reason}", file=sys.stderr)
            return EXIT_CONFIG
    with demo_pki_folder(keep_pki) as folder:
        setup = prepare_demo(port, admin_port, folder, kept=keep_pki is not None)
        try:
            return run_loop(with_demo_upstreams(setup.pki, lambda: serve(setup.config, Logger("info", "text"))))
        except OSError as exc:
            print(f"nextproxy demo: {exc}", file=sys.stderr)
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


def healthcheck(path: str | None, main_cmdline: Path = MAIN_CMDLINE) -> int:
    """The stand-ins' ports when this container's main process is ``nextproxy standins``, else
    GET /readyz on the proxy's configured admin address."""
    standins_argv = _standins_argv(main_cmdline)
    if standins_argv is not None:
        from nextproxy.demo.commands import standins_healthcheck

        args = _parser().parse_args(standins_argv)
        return standins_healthcheck(args.service, args.host)
    return commands.healthcheck(path)


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
            return demo(args.port, args.admin_port, args.keep_pki)
        if command == "healthcheck":
            return healthcheck(args.config)
        if command == "pki":
            from nextproxy.demo.commands import write_pki

            return write_pki(args.dir, args.owner)
        if command == "standins":
            return standins(args.service, args.host, args.pki)
        return commands.run(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"nextproxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # ``nextproxy check | head``: the reader left. Point stdout at /dev/null so that the
        # interpreter's own flush at exit does not fail again (Python's documented recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
