# syntax=docker/dockerfile:1
#
# The gateway as a small image: a builder stage installs it into a virtualenv, the final stage copies
# only that virtualenv onto python:3.11-slim (no compiler, no pip cache, no source tree).
#
#   docker build -t llm-gateway .
#   docker run -p 8000:8000 llm-gateway                      # built-in mock backend, model "mock"
#   docker run -p 8000:8000 -e LLM_BASE_URL=http://host:8000/v1 llm-gateway
#   docker run -p 8000:8000 -v "$PWD/config/gateway.toml:/etc/gateway/gateway.toml:ro"
#       -e GATEWAY_CONFIG=/etc/gateway/gateway.toml llm-gateway
#
# Both stages must use the same base image: the virtualenv's python is a symlink to the base's.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, in their own layer, so that editing the gateway's code does not reinstall them.
# Every dependency ships wheels for linux x86_64 and aarch64, so no compiler is needed. The `otel`
# extra is included: tracing stays off until OTEL_EXPORTER_OTLP_ENDPOINT is set.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['otel']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY README.md ./
COPY gateway ./gateway
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps .


FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="llm-gateway" \
      org.opencontainers.image.description="An OpenAI-compatible gateway in front of vLLM, Ollama and OpenAI."

# A fixed uid/gid, so that mounted files can be given to it; no home, no login shell.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin gateway \
    && mkdir -p /etc/gateway

COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Configuration: GATEWAY_CONFIG names a TOML file (mount one, e.g. at /etc/gateway/gateway.toml, as
# the compose files do). Left unset, the gateway reads LLM_BASE_URL, LLM_MODEL, LLM_API_KEY,
# REDIS_URL, LOG_LEVEL, OPENAI_API_KEY... from the environment, and with none of them runs its
# built-in mock backend.

# Numeric, so that Kubernetes runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8000

# slim has no curl: ask python. urlopen raises, so the command fails, on a refused connection, a
# timeout or any status >= 400. Set GATEWAY_HEALTH_URL if you change the port in CMD.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('GATEWAY_HEALTH_URL', 'http://127.0.0.1:8000/health'), timeout=4)"]

ENTRYPOINT ["gateway"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
