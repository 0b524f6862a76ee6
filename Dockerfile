# nextproxy: the edge proxy as a container. Ports: 8443 (TLS edge), 9613 (admin: metrics, health).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/nextproxy
COPY pyproject.toml README.md ./
COPY nextproxy ./nextproxy
RUN pip install . \
 && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin nextproxy

USER 10001
EXPOSE 8443 9613
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["nextproxy", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["nextproxy"]
CMD ["run"]
