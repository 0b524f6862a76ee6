"""NEXTPROXY_WORKERS=N: a supervisor process and N worker processes sharing the edge port.

Each worker binds the edge address itself with SO_REUSEPORT, so the kernel spreads new
connections across workers and a worker's death never closes the others' listeners. Since
SO_REUSEPORT would as well let the workers join a port another proxy serves, the supervisor
first binds each edge address without it (``edge.listener.probe``): a port in use is one line
and exit 2 before any worker exists. A worker that still fails to start on a ConfigError (the
port taken in between) ends the supervisor the same way: replacing it would fail again, forever.
The supervisor serves the admin port once, aggregates metrics from every worker through
prometheus-client's multiprocess mode, restarts a worker that dies after it started, and
forwards SIGTERM and SIGHUP. Workers are started with ``spawn`` (never ``fork`` from a process
that runs a loop). The multiprocess directory must be set before prometheus_client is imported
anywhere, which is why this module imports the metrics and admin modules only inside functions.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from dataclasses import replace
from multiprocessing.context import SpawnProcess
from typing import TYPE_CHECKING, Any

from nextproxy.config.model import Config
from nextproxy.errors import ConfigError
from nextproxy.process.logs import Logger
from nextproxy.process.loop import run_loop

if TYPE_CHECKING:  # imported where used: metrics must not load before PROMETHEUS_MULTIPROC_DIR is set
    from nextproxy.process.admin import AdminState

RESTART_DELAY = 1.0
"""Seconds before a dead worker is replaced, so a crash loop cannot spin the CPU."""
WORKER_STALL = 10.0
"""Seconds without a heartbeat (sent every second from each worker's loop) before a worker is
considered wedged and killed, to be replaced. The supervisor's /livez only proves its own loop
turns; this is what catches a worker whose loop is stuck."""
WORKER_START_FAILED = 2
"""A worker's exit code when its start failed on a ConfigError (the CLI's configuration code)."""


def worker_main(config: Config, config_path: str | None, events: Any, replacement: bool = False) -> None:
    """Entry point of one worker process (spawned: imports happen here, after the env is set)."""
    from nextproxy.process.lifecycle import serve

    logger = Logger(config.log_level, config.log_format)
    if replacement:
        config = _current(config, config_path, logger)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which forwards SIGTERM
    pid = os.getpid()
    try:
        code = run_loop(
            serve(
                config, logger, config_path=config_path, serve_admin=False, shared_port=True,
                ready=lambda _server: events.put(("ready", pid)),
                heartbeat=lambda: events.put(("beat", pid)),
            )  # fmt: skip
        )
    except ConfigError as exc:  # at start (a reload's errors are logged, never raised): no traceback
        events.put(("failed", pid, exc.key, exc.reason))  # flushed before exit: the queue's thread is joined
        code = WORKER_START_FAILED
    raise SystemExit(code)


def _current(config: Config, config_path: str | None, logger: Logger) -> Config:
    """A replacement worker's configuration: what the others serve now (the file and the
    certificates as reloaded since start-up, by SIGHUP or a certificate file's change), not the
    start-up one the supervisor holds. If that no longer loads, the supervisor's: a broken file
    must not keep a dead worker from being replaced (the others keep their last good one too)."""
    from nextproxy.config import load
    from nextproxy.edge.tlscontexts import ServerContexts
    from nextproxy.process.nofile import fit

    try:
        current, _ = fit(load(os.environ, config_path))
        ServerContexts.build(current)
    except ConfigError as exc:
        logger.log("warning", "worker_config_kept", error=str(exc))
        return config
    # Addresses and the worker count change only on restart, as a reload keeps them: a
    # replacement must not serve another port than its siblings (found by review).
    return replace(
        current, listen=config.listen, listen_also=config.listen_also, admin_listen=config.admin_listen, workers=config.workers
    )


class Supervisor:
    def __init__(self, config: Config, logger: Logger, config_path: str | None) -> None:
        self.config = config
        self.logger = logger
        self.config_path = config_path
        self.context = multiprocessing.get_context("spawn")
        self.events = self.context.Queue()
        self.workers: dict[int, SpawnProcess] = {}
        self.ready: set[int] = set()
        self.beats: dict[int, float] = {}
        self.stopping = False
        self.failure: ConfigError | None = None
        """The first ConfigError a worker reported at start: the supervisor stops with it."""

    def spawn(self, replacement: bool = False) -> None:
        """Start a worker; a ``replacement`` loads the configuration afresh (``_current``)."""
        process = self.context.Process(
            target=worker_main, args=(self.config, self.config_path, self.events, replacement),
            name="nextproxy-worker", daemon=False,
        )  # fmt: skip
        process.start()
        assert process.pid is not None
        self.workers[process.pid] = process
        self.logger.log("info", "worker_started", pid=process.pid)

    def signal_all(self, signum: int) -> None:
        for process in self.workers.values():
            if process.is_alive() and process.pid is not None:
                try:
                    os.kill(process.pid, signum)
                except ProcessLookupError:
                    pass

    def reap(self) -> list[int]:
        """Pids of workers that exited since the last call."""
        dead = [pid for pid, p in self.workers.items() if not p.is_alive()]
        for pid in dead:
            process = self.workers.pop(pid)
            process.join(0)
            self.ready.discard(pid)
            self.beats.pop(pid, None)
            if not self.stopping:
                self.logger.log("error", "worker_died", pid=pid, exitcode=process.exitcode)
        return dead

    def drain_events(self) -> None:
        while True:
            try:
                kind, pid, *detail = self.events.get_nowait()
            except Exception:  # queue.Empty, or a half-written item from a killed worker
                return
            if kind in ("ready", "beat"):
                self.beats[pid] = time.monotonic()
            if kind == "ready":
                self.ready.add(pid)
            if kind == "failed":
                self.logger.log("error", "worker_start_failed", pid=pid, error=f"{detail[0]}: {detail[1]}")
                self.failure = self.failure or ConfigError(detail[0], detail[1])

    def kill_stalled(self) -> None:
        """SIGKILL ready workers whose loop has not beaten for WORKER_STALL; reap() replaces them."""
        now = time.monotonic()
        for pid in list(self.ready):
            if now - self.beats.get(pid, now) > WORKER_STALL and pid in self.workers:
                self.logger.log("error", "worker_stalled", pid=pid, seconds=round(now - self.beats[pid], 1))
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.beats.pop(pid, None)


def supervise(config: Config, logger: Logger, config_path: str | None) -> int:
    """Run the supervisor until SIGTERM/SIGINT; returns the exit code. Raises ConfigError when
    an edge or admin address is in use, or a worker fails to start (``Supervisor.failure``)."""
    from nextproxy.edge import listener

    listener.probe(config)
    directory = tempfile.mkdtemp(prefix="nextproxy-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        return run_loop(_supervise(config, logger, config_path))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _supervise(config: Config, logger: Logger, config_path: str | None) -> int:
    from nextproxy import __version__
    from nextproxy.process import metrics
    from nextproxy.process.admin import AdminState, start_configured_admin
    from nextproxy.process.status import merge_facts, read_facts

    loop = asyncio.get_running_loop()
    supervisor = Supervisor(config, logger, config_path)
    state = AdminState()
    state.version = __version__
    state.config_source = config.source
    _show_config(state, config)
    # Workers write their facts next to their metric files; only live workers' files count.
    state.facts = lambda: merge_facts(read_facts(metrics.multiprocess_dir() or "", list(supervisor.workers)))
    admin = await start_configured_admin(config, state)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    def reload() -> None:
        supervisor.signal_all(signal.SIGHUP)
        _reload_view(state, config_path)

    loop.add_signal_handler(signal.SIGHUP, reload)
    for _ in range(config.workers):
        supervisor.spawn()
    logger.log("info", "supervisor_started", pid=os.getpid(), workers=config.workers, admin=str(config.admin_listen))

    ticks = 0
    while not stop.is_set():
        supervisor.drain_events()
        supervisor.kill_stalled()
        dead = supervisor.reap()
        for pid in dead:
            metrics.mark_process_dead(pid)
        supervisor.drain_events()  # a worker's "failed" is queued before it exits: seen by now
        if supervisor.failure is not None:
            break
        for pid in dead:
            await asyncio.sleep(RESTART_DELAY)
            supervisor.spawn(replacement=True)
        state.ready = len(supervisor.ready) >= config.workers
        state.not_ready_reason = "" if state.ready else "starting workers"
        if ticks % 4 == 0:  # the status numbers once a second; collecting reads every file
            _refresh(state)
        ticks += 1
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            pass

    state.ready = False
    state.not_ready_reason = "draining"
    await _stop_workers(supervisor, config, logger)
    admin.close()
    logger.log("info", "supervisor_stopped")
    logger.close()
    if supervisor.failure is not None:
        raise supervisor.failure  # the CLI prints its one line and exits 2
    return 0


def _reload_view(state: AdminState, config_path: str | None) -> None:
    """SIGHUP: the status page's route table and upstream list follow the workers' reload.

    Loaded and checked the way a worker does (configuration, then certificates); on an error the
    workers keep their configuration (and log why), so the page keeps the table it had."""
    from nextproxy.config import load
    from nextproxy.edge.tlscontexts import ServerContexts

    try:
        config = load(path=config_path)
        ServerContexts.build(config)
    except ConfigError:
        return
    _show_config(state, config)


def _show_config(state: AdminState, config: Config) -> None:
    """What the status page shows of a configuration: its route table and upstreams (health
    already known is kept; a new upstream starts as up, as at start-up)."""
    from nextproxy.edge.listener import describe_routes
    from nextproxy.process.status import route_kinds

    state.routes = describe_routes(config)
    state.route_kinds = route_kinds(config)
    state.upstreams = {u.name: state.upstreams.get(u.name, True) for u in config.upstreams}


async def _stop_workers(supervisor: Supervisor, config: Config, logger: Logger) -> None:
    """SIGTERM every worker (each drains), then SIGKILL whoever outlives the drain."""
    from nextproxy.process import metrics

    loop = asyncio.get_running_loop()
    supervisor.stopping = True
    logger.log("info", "supervisor_draining", workers=len(supervisor.workers))
    supervisor.signal_all(signal.SIGTERM)
    deadline = loop.time() + config.timeouts.shutdown_delay + config.timeouts.drain + 5
    while supervisor.workers and loop.time() < deadline:
        for pid in supervisor.reap():
            metrics.mark_process_dead(pid)
        await asyncio.sleep(0.1)
    if supervisor.workers:
        supervisor.signal_all(signal.SIGKILL)
        supervisor.reap()


def _refresh(state: Any) -> None:
    """Status-page numbers from the workers' aggregated metrics (the supervisor serves no traffic)."""
    from nextproxy.process.metrics import registry_for_exposition

    connections = sessions = 0.0
    upstreams: dict[str, bool] = {}
    certificates: dict[str, float] = {}
    for family in registry_for_exposition().collect():
        for sample in family.samples:
            if sample.name == "nextproxy_connections_active" and sample.labels.get("listener") == "edge":
                connections += sample.value
            elif sample.name == "nextproxy_websocket_sessions_active":
                sessions += sample.value
            elif sample.name == "nextproxy_upstream_up":
                upstreams[sample.labels["upstream"]] = sample.value >= 1
            elif sample.name == "nextproxy_certificate_expiry_timestamp_seconds":
                certificates[sample.labels["name"]] = sample.value
    state.connections_active = int(connections)
    state.websocket_sessions_active = int(sessions)
    if upstreams:
        state.upstreams = upstreams
    if certificates:
        state.certificates = sorted(certificates.items())
