# syntax=docker/dockerfile:1
#
# relay container image. Build and run:
#   docker build -t relay .
#   docker run -d -p 8080:8080 -v relay-data:/data -e RELAY_QINGSTOR_TOKEN=... relay

# --- build: wheels for relay and every dependency ---------------------------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip wheel --wheel-dir /wheels . && sha256sum /wheels/*.whl > /wheels.sha256

# --- runtime: the wheels installed, no source tree, no build tools ----------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RELAY_CONFIG=/etc/relay/relay.yaml

# Installed offline from the build stage's wheels; the bind mount keeps them out of
# the image's layers. A builder may not key its cache on a mount's content (buildah
# does not): the wheels' checksums, copied first, make a new relay a new layer.
COPY --from=build /wheels.sha256 /usr/local/share/relay-wheels.sha256
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels qingstor-relay

RUN groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin relay \
 && mkdir -p /data \
 && chown relay:relay /data

COPY config/docker.yaml /etc/relay/relay.yaml

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /data
VOLUME /data
EXPOSE 8080
STOPSIGNAL SIGTERM

# Liveness of the process only (/readyz is the readiness probe). slim has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=3)"]

ENTRYPOINT ["relay"]
CMD ["serve"]
