# syntax=docker/dockerfile:1.7
# eventrouter container image: `docker build -t eventrouter .` (BuildKit, the default builder).
# Stage 1 builds wheels for eventrouter and every dependency of every built-in sink (extras "all"),
# at the versions pinned in image-constraints.txt;
# stage 2 installs only those wheels into a clean python:3.11-slim, with no source tree, compiler
# or pip left behind, and runs as the unprivileged user 65532.

# The base of both stages. Override it only for a mirror or a stand-in (scripts/image-test.sh).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# .dockerignore sends only pyproject.toml, README/LICENSE, image-constraints.txt and the
# eventrouter/ and sinks/ packages.
COPY . .
# Every dependency at the version pinned in image-constraints.txt (scripts/image-lock.sh), so a
# later build holds what the image tests ran against.
RUN pip wheel --wheel-dir /wheels --constraint image-constraints.txt ".[all]"


FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="eventrouter" \
      org.opencontainers.image.description="Routes every Kubernetes Event occurrence to Loki, Kafka, Elasticsearch/OpenSearch, webhooks, DingTalk, WeCom, SLS, stdout or files without losing any" \
      org.opencontainers.image.source="https://github.com/eventrouter/eventrouter" \
      org.opencontainers.image.url="https://github.com/eventrouter/eventrouter" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"

# The root filesystem is read-only in the chart: no bytecode writes at run time (pip compiles at install).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The wheels are bind-mounted from the builder, so they never become a layer of this image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "eventrouter[all]" \
    && pip uninstall -y pip setuptools wheel \
    && groupadd --system --gid 65532 eventrouter \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin eventrouter \
    && mkdir -p /etc/eventrouter /var/lib/eventrouter \
    && chown 65532:65532 /var/lib/eventrouter

USER 65532:65532
WORKDIR /var/lib/eventrouter
# /metrics, /healthz and /readyz (--metrics-addr 0.0.0.0:8080).
EXPOSE 8080
ENTRYPOINT ["eventrouter"]
CMD ["run", "--help"]
