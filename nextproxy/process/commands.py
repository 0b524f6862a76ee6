"""The process commands behind ``nextproxy [run] | check | healthcheck`` (``cli`` dispatches).

Every check that can fail (configuration, certificates, keys, upstream and admin TLS) runs in
``load_checked`` before anything is bound, so a bad configuration exits 2 with one line and
leaves the port free.
"""

from __future__ import annotations

import http.client
import os
import ssl
import sys

from nextproxy.config import admin_endpoint, load, unknown_variables
from nextproxy.config.model import Config, allow_list_warnings
from nextproxy.edge.listener import describe_routes
from nextproxy.edge.tlscontexts import ServerContexts, admin_ssl_context, upstream_ssl_context
from nextproxy.errors import ConfigError
from nextproxy.process.loop import run_loop


def load_checked(path: str | None) -> tuple[Config, ServerContexts]:
    """Config plus built TLS contexts: every check that can fail happens before binding."""
    config = load(os.environ, path)
    contexts = ServerContexts.build(config)
    for upstream in config.upstreams:
        if upstream.tls is not None:
            upstream_ssl_context(upstream.tls)
    if config.admin_tls is not None:
        admin_ssl_context(config.admin_tls)
    return config, contexts


def check(path: str | None) -> int:
    """``nextproxy check``: validate everything, print the listeners, certificates and routes."""
    from nextproxy.process.nofile import plan

    config, contexts = load_checked(path)
    config, files = plan(config)  # run would refuse a cap the open-file limit cannot hold
    for name in unknown_variables(os.environ):  # run logs these as unknown_variable
        print(f"nextproxy check: warning: {name} is no nextproxy variable (a typo?)", file=sys.stderr)
    for warning in allow_list_warnings(config):  # run logs these as config_warning
        print(f"nextproxy check: warning: {warning}", file=sys.stderr)
    print(f"configuration: {config.source}")
    listen = ", ".join(str(a) for a in (config.listen, *config.listen_also))
    print(f"listen: {listen}   admin: {config.admin_listen}   workers: {config.workers}")
    lowered = " (lowered to fit the open-file limit)" if files.lowered else ""
    print(f"max_connections: {files.max_connections}{lowered}   open files needed: {files.needed} (hard limit {_limit(files.hard)})")
    for policy in config.listener_policies:
        trusted = " ".join(policy.proxy_protocol_trusted) if policy.proxy_protocol_trusted is not None else "-"
        rate = f"{policy.new_connections_per_second:g}/s per client" if policy.new_connections_per_second is not None else "-"
        print(f"listener {policy.address}: PROXY protocol from {trusted}   new connections: {rate}")
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
            if upstream.proxy_protocol is not None:
                target += f" proxy-protocol {upstream.proxy_protocol}"
        print("  ".join(v.ljust(w) for v, w in zip((row[0], row[1], target), widths)))
    return 0


def _limit(value: int) -> str:
    import resource

    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def run(path: str | None) -> int:
    """``nextproxy run``: serve until SIGTERM/SIGINT, with workers if configured."""
    # Imported here, not at the top: the supervisor sets PROMETHEUS_MULTIPROC_DIR before
    # process.metrics is first imported, which is when prometheus-client reads it.
    from nextproxy.process.logs import Logger
    from nextproxy.process.nofile import fit

    config, contexts = load_checked(path)
    config, files = fit(config)  # before binding: a cap that cannot fit is a config error
    logger = Logger(config.log_level, config.log_format)
    logger.log("info", "open_files", **files.describe())
    for name in unknown_variables(os.environ):
        logger.log("warning", "unknown_variable", variable=name)
    for warning in allow_list_warnings(config):
        logger.log("warning", "config_warning", detail=warning)
    if config.workers > 1:
        from nextproxy.process.workers import supervise

        return supervise(config, logger, path)
    from nextproxy.process.lifecycle import serve

    return run_loop(serve(config, logger, config_path=path, contexts=contexts))


def healthcheck(path: str | None) -> int:
    """GET /readyz on the configured admin address (a wildcard address means this host).

    Exit 0 healthy, else 1, even for a configuration it cannot read (Docker reserves 2): only
    the admin address is read (``config.admin_endpoint``), so a certificate file rotated away
    under a proxy still serving on the one it loaded does not make a healthy proxy unhealthy."""
    try:
        address, tls = admin_endpoint(os.environ, path)
    except ConfigError as exc:
        print(f"nextproxy healthcheck: {exc}", file=sys.stderr)
        return 1
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
    conn: http.client.HTTPConnection
    if tls:
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
