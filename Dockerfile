# nextproxy: the edge proxy as a container. Ports: 8443 (TLS edge), 9613 (admin: metrics, health).
#
# Two stages: the first builds a wheel and installs it, with its dependencies, into a virtual
# environment at /opt/venv; the second copies only that environment. The final image holds no
# source tree, no build/ or egg-info, and no pip cache, so `python -m nextproxy` can only load the
# installed package. pip runs inside the venv, so it never warns about running as root, and is
# removed from it afterwards (with setuptools): nothing at run time needs them.
#
# Stopping: nextproxy drains for up to NEXTPROXY_SHUTDOWN_DELAY + NEXTPROXY_DRAIN_TIMEOUT
# (0 + 30 s by default) after SIGTERM. Docker waits only 10 s before SIGKILL, so run with
# `docker run --init --stop-timeout 40` (compose: `init: true`, `stop_grace_period: 40s`;
# Kubernetes: `terminationGracePeriodSeconds`). The Dockerfile format has no stop timeout of its own.
#
# Roles: `nextproxy run` (the default), `nextproxy standins --service ns|mc|sfs` (the demo
# upstreams) and `nextproxy pki DIR` (a demo PKI). `nextproxy healthcheck` sees which role this
# container runs and probes that: /readyz for the proxy, the listening ports for the stand-ins.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY nextproxy ./nextproxy
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install /wheels/nextproxy-*.whl \
 && /opt/venv/bin/python -m pip uninstall --yes pip setuptools

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
RUN groupadd --gid 10001 nextproxy \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nextproxy
COPY --from=build /opt/venv /opt/venv
WORKDIR /
USER 10001:10001
EXPOSE 8443 9613
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["nextproxy", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["nextproxy"]
CMD ["run"]
