"""The demo's commands: ``nextproxy demo``, ``nextproxy pki`` and ``nextproxy standins``.

``cli`` parses the arguments and runs these; the proxy itself (``demo`` serves it) is started by
``cli``, since the demo kit never imports the proxy's layers. ``start_demo_upstreams()`` starts
the stand-ins (``standins``) where the environment preset expects them, one loopback IP per
service; ``demo_environment()`` writes the NEXTPROXY_* variables that point the preset at them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nextproxy.config import from_environment
from nextproxy.config.model import Config
from nextproxy.config.preset import PRESET_API_ROUTES, PRESET_PATH_ROUTES
from nextproxy.demo.pki import (
    DEMO_API_SERVER_NAMES,
    DEMO_EDGE_NAMES,
    DEMO_HOSTS,
    DemoPki,
    Pem,
    make_pki,
    server_ssl_context,
)
from nextproxy.errors import ConfigError
from nextproxy.demo.standins import StandIn, start_http_ws, start_tls_api


async def start_demo_upstreams(
    hosts: Mapping[str, str] | None = None,
    *,
    pki: DemoPki | None = None,
    upstream_tls: bool = False,
) -> list[StandIn]:
    """Start one stand-in per preset route where the preset expects it; returns them all.

    ``hosts`` maps "ns"/"mc"/"sfs" to an IP (default DEMO_HOSTS). Each stand-in is named after
    its route ("ns-sigmai", "ns-api"...), which is also the "service" its JSON reports. The API
    ports speak TLS with ``pki.upstream`` and ask (not require) for a client certificate from
    ``pki.ca``; with ``upstream_tls`` the HTTP/WebSocket ports speak TLS too. Without ``pki`` a
    fresh one is made, and nobody can verify it. Raises OSError naming the address if a port is
    taken; nothing is left listening then.
    """
    hosts = DEMO_HOSTS if hosts is None else hosts
    pki = make_pki() if pki is None else pki
    api_tls = server_ssl_context(pki.upstream, pki.ca.certificate, require_client_cert=False)
    http_tls = server_ssl_context(pki.upstream) if upstream_tls else None
    started: list[StandIn] = []
    try:
        for name, _prefix, service, port in PRESET_PATH_ROUTES:
            started.append(await start_http_ws(hosts[service.lower()], port, name, http_tls))
        for name, service, port in PRESET_API_ROUTES:
            started.append(await start_tls_api(hosts[service.lower()], port, name, api_tls))
    except BaseException:
        await asyncio.gather(*(standin.close() for standin in started), return_exceptions=True)
        raise
    return started


def demo_environment(
    files: Mapping[str, Path],
    *,
    listen: str = "127.0.0.1:8443",
    admin_listen: str = "127.0.0.1:9613",
    hosts: Mapping[str, str] | None = None,
    api_mode: str = "passthrough",
) -> dict[str, str]:
    """NEXTPROXY_* variables pointing the preset at the demo upstreams and ``DemoPki.write()`` files.

    With ``api_mode="terminate"`` the preset re-encrypts to every upstream, so start the
    stand-ins with ``upstream_tls=True``; the proxy then presents the demo client certificate.
    """
    hosts = DEMO_HOSTS if hosts is None else hosts
    env = {
        "NEXTPROXY_LISTEN": listen,
        "NEXTPROXY_ADMIN_LISTEN": admin_listen,
        "NEXTPROXY_TLS_CERTIFICATE_FILE": str(files["edge.pem"]),
        "NEXTPROXY_TLS_KEY_FILE": str(files["edge.key"]),
        "NEXTPROXY_API_MODE": api_mode,
    }
    for service, host in hosts.items():
        env[f"NEXTPROXY_{service.upper()}_HOST"] = host
    for service, server_name in DEMO_API_SERVER_NAMES.items():
        env[f"NEXTPROXY_{service.upper()}_API_SNI"] = server_name
    if api_mode == "terminate":
        env["NEXTPROXY_UPSTREAM_TLS"] = "true"
        env["NEXTPROXY_UPSTREAM_CA_FILE"] = str(files["ca.pem"])
        env["NEXTPROXY_UPSTREAM_TLS_CERTIFICATE_FILE"] = str(files["client.pem"])
        env["NEXTPROXY_UPSTREAM_TLS_KEY_FILE"] = str(files["client.key"])
    return env


@dataclass(frozen=True, slots=True)
class DemoSetup:
    config: Config
    pki: DemoPki


def prepare_demo(port: int, admin_port: int, folder: Path, *, kept: bool) -> DemoSetup:
    """A fresh PKI in ``folder`` and the preset's configuration pointing at the demo upstreams;
    prints what to try."""
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
    return DemoSetup(config, pki)


async def with_demo_upstreams(pki: DemoPki, serve: Callable[[], Awaitable[int]]) -> int:
    """Run ``serve()`` (the proxy) with the demo's stand-in upstreams around it."""
    started = await start_demo_upstreams(pki=pki)
    try:
        return await serve()
    finally:
        for standin in started:
            await standin.close()


# The edge certificate of `nextproxy pki` also names the compose service, so that containers on
# the compose network can reach the proxy as https://nextproxy:8443 and verify it.
PKI_EDGE_SERVICE_NAMES = ("nextproxy",)
STANDIN_SERVICES = ("ns", "mc", "sfs")


@contextmanager
def demo_pki_folder(keep: str | None) -> Iterator[Path]:
    """Where ``nextproxy demo`` writes its PKI: ``keep`` if given (left in place), else a fresh temp
    folder removed on the way out, so a stopped demo leaves no CA private key behind.
    """
    if keep is not None:
        yield Path(keep)
        return
    folder = Path(tempfile.mkdtemp(prefix="nextproxy-demo-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def parse_owner(text: str) -> tuple[int, int]:
    """``UID:GID`` (numbers: the names on the host and in a container need not agree)."""
    uid, sep, gid = text.partition(":")
    if not (sep and uid.isdigit() and gid.isdigit()):
        raise ValueError(f"expected UID:GID (numbers), got {text!r}")
    return int(uid), int(gid)


def hand_over(folder: Path, files: Mapping[str, Path], owner: tuple[int, int]) -> None:
    """Give ``folder`` and ``files`` to ``owner``, keys readable by its group (0640).

    A container's root writes the PKI into a host folder for a host user, who must be able to use
    the client key and delete the folder; the group is for the container user (the image's gid
    10001) that has to read the edge and upstream keys. Needs root, or to be ``owner`` already.
    """
    uid, gid = owner
    for path in (folder, *files.values()):
        os.chown(path, uid, gid)
        if path.suffix == ".key":
            os.chmod(path, 0o640)


def write_pki(directory: str, owner: str | None = None) -> int:
    """Write the demo PKI into ``directory`` unless it already holds one (compose runs this on every
    ``up``); with ``owner`` (``UID:GID``) hand it to that user."""
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


def standin_plan(service: str, host: str | None) -> list[tuple[str, str, int, bool]]:
    """(stand-in name, host, port, is the TLS API) for every preset route of ``service``."""
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


def standins_healthcheck(service: str, host: str | None) -> int:
    """Exit 0 when every port of the stand-ins of ``service`` accepts a connection."""
    for name, bind_host, port, _ in standin_plan(service, host):
        target = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind_host, bind_host)
        try:
            socket.create_connection((target, port), timeout=3).close()
        except OSError as exc:
            print(f"nextproxy healthcheck: standins {name} on {target}:{port}: {exc}", file=sys.stderr)
            return 1
    return 0


def standin_api_tls(pki_dir: str | None) -> ssl.SSLContext:
    """The API ports' context: DIR/upstream.pem+key, asking (not requiring) client certs from DIR/ca.pem."""
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


def standins(service: str, host: str | None, pki_dir: str | None) -> Coroutine[Any, Any, int]:
    """Serve the stand-in upstreams of ``service`` on the preset's ports until SIGTERM/SIGINT
    (the coroutine returns 0). Bad arguments raise ConfigError here, before anything binds."""
    plan = standin_plan(service, host)
    tls = standin_api_tls(pki_dir) if any(is_api for *_, is_api in plan) else None
    return _serve_standins(plan, tls)


async def _serve_standins(plan: list[tuple[str, str, int, bool]], tls: ssl.SSLContext | None) -> int:
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
