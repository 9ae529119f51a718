# The worker image. Two stages: `build` installs into a virtualenv, the final
# stage copies only that virtualenv onto a clean base and runs as a non-root user.
#
#   docker build -t stream-app .
#   docker run --rm --init --stop-timeout 30 -e KAFKA_BOOTSTRAP_SERVERS=... \
#     -v state:/var/lib/stream-app stream-app
#
# --stop-timeout: above STREAM_APP_SHUTDOWN_TIMEOUT_S (10 s, Docker's default
# too), so a stop that needs its whole bound is not killed before it logs why.
#
# Both stages use the same base, so the virtualenv's interpreter path
# (/usr/local/bin/python3.11) exists in the final stage.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Layer 1, the dependencies: rebuilt only when pyproject.toml or constraints.txt
# change, never by a change to the code. The list comes from pyproject.toml's
# [project] dependencies, pinned by constraints.txt.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep=chr(10))" > requirements.txt \
 && pip install -c constraints.txt -r requirements.txt

# Layer 2, the package itself, without touching the dependencies above.
COPY README.md LICENSE ./
COPY stream_app ./stream_app
RUN pip install --no-deps . \
 && python -m compileall -q /opt/venv

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="stream-app" \
      org.opencontainers.image.description="Customer-session stream processor on Kafka" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid (10001), so Kubernetes' runAsNonRoot can verify it and
# fsGroup can hand the state volume to it (deploy/base/statefulset.yaml).
RUN groupadd --system --gid 10001 stream-app \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin stream-app \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/stream-app

COPY --from=build /opt/venv /opt/venv
COPY LICENSE /usr/share/doc/stream-app/LICENSE

# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only in Kubernetes.
# MALLOC_ARENA_MAX: glibc's per-thread arenas inflate RSS next to RocksDB's threads.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    STREAM_APP_DATA_DIR=/var/lib/stream-app

# RocksDB state: a volume, so it outlives the container (one PVC per pod in Kubernetes).
VOLUME ["/var/lib/stream-app"]
WORKDIR /var/lib/stream-app
USER 10001:10001
# /livez, /readyz and /metrics (STREAM_APP_HTTP_PORT).
EXPOSE 8080
STOPSIGNAL SIGTERM

# Exec form and no shell: SIGTERM reaches the worker directly (as PID 1, or
# under `docker run --init` / compose's `init: true`, which also pass on a
# signal sent before its handlers are in place, its first milliseconds), and
# it commits, closes its stores and exits within STREAM_APP_SHUTDOWN_TIMEOUT_S.
# No ENTRYPOINT, so `docker run IMAGE stream-app traffic` (and
# docker-compose.yml's `command:`) replace the whole command.
CMD ["stream-app", "worker"]
