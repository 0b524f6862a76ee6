"""One serving process from start to exit: listeners, admin port, signals, reload, drain.

SIGTERM/SIGINT: readiness fails at once; after ``shutdown_delay`` the listener stops accepting,
in-flight requests finish, WebSocket sessions get Close 1001, and the process exits 0 once all
is done or the drain timeout passes. SIGHUP (or a changed certificate file, polled) reloads:
the new configuration is validated completely before it replaces the old one, and a bad one is
logged in one line and counted, while the last good one keeps serving.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

from nextproxy import __version__
from nextproxy.process import metrics
from nextproxy.process.admin import AdminState, start_configured_admin
from nextproxy.config.model import Address, Config
from nextproxy.config import load
from nextproxy.errors import ConfigError
from nextproxy.process.logs import Logger
from nextproxy.process.nofile import fit
from nextproxy.process.observe import Observer
from nextproxy.process.status import Facts, route_kinds, write_facts
from nextproxy.edge.listener import ProxyServer, bind, build_runtime, denial_series
from nextproxy.edge.tlscontexts import ServerContexts

CERT_POLL_INTERVAL = 2.0
"""Seconds between checks of certificate files; a change is reloaded after one quiet interval."""


def watched_files(config: Config) -> list[str]:
    paths = []
    for pair in (*config.certificates, *( [config.admin_tls] if config.admin_tls else [])):
        for source in (pair.certificate, pair.key):
            if source.path:
                paths.append(source.path)
    return paths


def _stamp(paths: list[str]) -> tuple[tuple[str, float, int], ...]:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((path, st.st_mtime, st.st_size))
        except OSError:
            out.append((path, -1.0, -1))
    return tuple(out)


@dataclass
class Process:
    """The state of this serving process, shared with the admin port."""

    config: Config
    logger: Logger
    config_path: str | None = None
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    server: ProxyServer | None = None
    admin_state: AdminState | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    reload_requested: asyncio.Event = field(default_factory=asyncio.Event)
    facts: Facts = field(default_factory=Facts)

    def publish_configuration(self, config: Config, contexts: ServerContexts) -> None:
        """What a newly applied configuration shows on /metrics before any traffic (and what it
        no longer has, gone)."""
        upstreams = {u.name for u in config.upstreams}
        metrics.forget_removed(upstreams, {c.name for c in contexts.certificates})
        for name in set(self.facts.errors) - upstreams:  # the status page's row of a removed one
            del self.facts.errors[name]
        self.publish_certificates(contexts)
        for route, reason in denial_series(config):
            metrics.route_metrics(route).denied(reason)  # created at 0

    def publish_certificates(self, contexts: ServerContexts) -> None:
        for cert in contexts.certificates:
            metrics.set_certificate_expiry(cert.name, cert.not_after)
        state = self.admin_state
        if state is not None:
            state.certificates = [(c.name, c.not_after) for c in contexts.certificates]

    def reload(self) -> bool:
        """Load, validate and swap in a new configuration; keep the old one on any error."""
        assert self.server is not None
        try:
            config, _ = fit(load(self.env, self.config_path))
            if (config.listen, config.admin_listen) != (self.config.listen, self.config.admin_listen):
                self.logger.log("warning", "reload_listen_changed", detail="listen addresses change only on restart")
            contexts = ServerContexts.build(config)
            self.server.reload(config, self.server.runtime.observer, contexts)
        except ConfigError as exc:
            metrics.config_reload(False)
            self.facts.reloaded(time.time(), False, str(exc))
            self.logger.log("error", "reload_failed", error=str(exc))
            return False
        self.config = config
        self.publish_configuration(config, contexts)
        metrics.config_reload(True)
        self.facts.reloaded(time.time(), True, config.source)
        self.logger.log("info", "reloaded", source=config.source)
        return True


async def serve(
    config: Config,
    logger: Logger,
    *,
    config_path: str | None = None,
    edge_socket: socket.socket | None = None,
    serve_admin: bool = True,
    shared_port: bool = False,
    ready: Callable[[ProxyServer], None] | None = None,
    heartbeat: Callable[[], None] | None = None,
    contexts: ServerContexts | None = None,
) -> int:
    """Run until a stop signal; returns the exit code. ``contexts``: already built by the CLI.
    ``shared_port``: this is one of a supervisor's workers, which share the edge port."""
    loop = asyncio.get_running_loop()
    observer = Observer(logger)
    contexts = contexts or ServerContexts.build(config)
    runtime = build_runtime(config, observer, contexts)
    proc = Process(config=config, logger=logger, config_path=config_path, facts=observer.facts)
    state = AdminState(version=__version__, config_source=config.source, route_kinds=route_kinds(config))
    state.facts = lambda: observer.facts
    proc.admin_state = state
    edge = edge_socket or bind(config.listen, config.key_name("listen"), shared=shared_port)
    admin_server = await _start_admin(config, state, edge) if serve_admin else None
    server = ProxyServer(runtime)
    proc.server = server
    await server.start(edge, shared=shared_port)
    proc.publish_configuration(config, contexts)
    state.routes = runtime.routes.describe()
    state.upstreams = runtime.pool.health
    state.ready = True
    state.not_ready_reason = ""
    admin = admin_server.sockets[0].getsockname() if admin_server is not None else None
    logger.log(
        "info", "started", listen=server.bound(), admin=str(Address(str(admin[0]), int(admin[1]))) if admin else "-",
        pid=os.getpid(), source=config.source, version=__version__,
    )  # fmt: skip
    if ready is not None:
        ready(server)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, proc.stopping.set)
    loop.add_signal_handler(signal.SIGHUP, proc.reload_requested.set)
    watcher = loop.create_task(_watch_certificates(proc))
    reloader = loop.create_task(_reload_loop(proc, state))
    stats = loop.create_task(_publish_stats(proc, state, heartbeat))
    await proc.stopping.wait()

    state.ready = False
    state.not_ready_reason = "draining"
    timeouts = proc.config.timeouts
    logger.log("info", "draining", shutdown_delay=timeouts.shutdown_delay, drain_timeout=timeouts.drain)
    if timeouts.shutdown_delay > 0:
        await asyncio.sleep(timeouts.shutdown_delay)
    clean = await server.drain(timeouts.drain)
    observer.flush()  # the last tallied counts reach prometheus-client (and a worker's files)
    for task in (watcher, reloader, stats):
        task.cancel()
    if admin_server is not None:
        admin_server.close()
    logger.log("info", "stopped", clean=clean)
    logger.close()
    return 0


async def _start_admin(config: Config, state: AdminState, edge: socket.socket) -> asyncio.Server:
    """The admin port; if it cannot bind, the edge socket is closed too (nothing half-started)."""
    try:
        return await start_configured_admin(config, state)
    except ConfigError:
        edge.close()
        raise


async def _reload_loop(proc: Process, state: AdminState) -> None:
    while True:
        await proc.reload_requested.wait()
        proc.reload_requested.clear()
        if proc.reload() and proc.server is not None:
            state.route_kinds = route_kinds(proc.config)
            state.routes = proc.server.runtime.routes.describe()
            state.upstreams = proc.server.runtime.pool.health


async def _watch_certificates(proc: Process) -> None:
    """Poll certificate files; reload after a change has been quiet for one interval (debounce)."""
    last = _stamp(watched_files(proc.config))
    pending = None
    while True:
        await asyncio.sleep(CERT_POLL_INTERVAL)
        now = _stamp(watched_files(proc.config))
        if now != last:
            last, pending = now, now
            continue
        if pending is not None:
            pending = None
            proc.logger.log("info", "certificate_files_changed")
            proc.reload_requested.set()


async def _publish_stats(proc: Process, state: AdminState, heartbeat: Callable[[], None] | None) -> None:
    """Once a second: status-page numbers, and (in a worker) the proof that this loop turns.

    A worker also leaves its status facts where the supervisor reads them (``status``), and
    only when they changed: most seconds cost one JSON dump and a string compare.
    """
    directory = metrics.multiprocess_dir() if heartbeat is not None else None
    written = ""
    while True:
        if heartbeat is not None:
            heartbeat()
        server = proc.server
        if server is not None:
            state.connections_active = server.active()
            state.websocket_sessions_active = server.websocket_sessions()
            proc.facts.pool = server.runtime.pool.counts()
        metrics.ASYNCIO_TASKS.set(len(asyncio.all_tasks()))
        if directory is not None:
            text = proc.facts.to_json()
            if text != written:
                try:
                    write_facts(directory, os.getpid(), text)
                    written = text
                except OSError as exc:
                    proc.logger.log("warning", "status_facts_not_written", error=str(exc))
        await asyncio.sleep(1.0)
