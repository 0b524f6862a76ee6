"""Fit the connection cap into the open-file limit (RLIMIT_NOFILE), at start-up and on reload.

Every client connection holds a descriptor and, while it talks to an upstream, a second one;
pools, listeners and the process itself need a few more. A cap the limit cannot hold does not
protect anything: past the limit, accept and upstream connects fail with EMFILE instead. So, as
HAProxy does, the soft limit is raised toward the hard one (an unprivileged process may), and:

- an explicit ``limits.max_connections`` that cannot fit under the hard limit refuses to start
  (``ConfigError``: one line, exit 2), or fails the reload;
- the default one is lowered to what fits, and the start-up line says so.

The outcome is one line (``open_files`` in the log) saying what was set.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, replace

from nextproxy.config.model import Config
from nextproxy.errors import ConfigError

DESCRIPTORS_PER_CONNECTION = 2
"""The client's socket and, while a request is in flight or a session is spliced, the upstream's."""
RESERVE = 64
"""stdio, the event loop's epoll, log and metrics files, certificate reads, health probes."""


@dataclass(frozen=True, slots=True)
class OpenFiles:
    """What was decided: the limits before and after, and the cap that fits."""

    soft_before: int
    soft: int
    hard: int
    needed: int
    max_connections: int
    lowered: bool

    def describe(self) -> dict[str, int | bool]:
        return {
            "soft_limit": self.soft, "soft_limit_was": self.soft_before, "hard_limit": self.hard,
            "needed": self.needed, "max_connections": self.max_connections, "max_connections_lowered": self.lowered,
        }  # fmt: skip


def needed(config: Config, max_connections: int) -> int:
    """Descriptors for ``max_connections`` plus pools, listeners and the reserve."""
    servers = sum(len(u.servers) for u in config.upstreams)
    listeners = 2 + len(config.listen_also)  # the edge listeners and the admin port
    return DESCRIPTORS_PER_CONNECTION * max_connections + config.limits.pool_size * servers + listeners + RESERVE


def fit(config: Config) -> tuple[Config, OpenFiles]:
    """``config`` with a ``max_connections`` that fits, after raising the soft limit if needed.

    Raises ConfigError (key ``limits.max_connections``) when an explicit cap cannot fit."""
    config, files = plan(config)
    if files.soft != files.soft_before:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (files.soft, files.hard))
        except (ValueError, OSError) as exc:  # over the kernel's fs.nr_open, say
            raise ConfigError(
                "limits.max_connections",
                f"{files.max_connections} connections need about {files.needed} open files, "
                f"and the limit cannot be raised that far ({exc}): lower max_connections",
            ) from None
    return config, files


def plan(config: Config) -> tuple[Config, OpenFiles]:
    """What ``fit`` decides, without changing the limit: ``check`` refuses what ``run`` would."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = hard == resource.RLIM_INFINITY
    want = needed(config, config.limits.max_connections)
    cap = config.limits.max_connections
    lowered = False
    if not unlimited and want > hard:
        fitting = (hard - (want - DESCRIPTORS_PER_CONNECTION * cap)) // DESCRIPTORS_PER_CONNECTION
        if config.max_connections_given or fitting < 1:
            raise ConfigError(
                "limits.max_connections",
                f"{cap} connections need about {want} open files, but the hard limit (ulimit -Hn) is {hard}: "
                f"lower max_connections to {max(fitting, 0)} or raise the limit",
            )
        cap, lowered, want = fitting, True, needed(config, fitting)
    new_soft = soft
    if soft != resource.RLIM_INFINITY and soft < want:
        # Only as far as needed: a soft limit near a huge hard one (2^30 in some containers)
        # makes every descriptor table and select()-using library pay for it.
        new_soft = want if unlimited else min(hard, want)
    if lowered:
        config = replace(config, limits=replace(config.limits, max_connections=cap))
    return config, OpenFiles(soft, new_soft, hard, want, cap, lowered)
