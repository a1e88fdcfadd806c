# The guard sidecar image (CPU): `docker build -t activation-guard:0.1.0 .`
# No torch and no transformers: the sidecar's path never imports them (DESIGN.md), so the image
# stays small and starts fast. ONNX Runtime is the CPU wheel; Dockerfile.gpu is the CUDA one.
# Runs as the numeric non-root user 10001 and writes nothing outside its mounted volumes, so a
# read-only root filesystem works (the Helm chart mounts the config, the socket folder and /tmp).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY guard ./guard
COPY plugins ./plugins
# Byte code is compiled here, at build time: the running container cannot write it.
RUN python -m venv /opt/guard \
    && /opt/guard/bin/pip install . \
    && /opt/guard/bin/python -c "import guard.sidecar.server, onnxruntime" \
    && ! /opt/guard/bin/python -c "import torch" 2>/dev/null

FROM python:3.11-slim
LABEL org.opencontainers.image.title="activation-guard" \
      org.opencontainers.image.description="Activation Guard sidecar (CPU): SAE-based runtime guard for LLM activations" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/guard/bin:$PATH
RUN groupadd --system --gid 10001 guard \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin guard \
    && mkdir -p /var/run/guard /etc/guard \
    && chown 10001:10001 /var/run/guard
COPY --from=build /opt/guard /opt/guard
USER 10001:10001
# 8081: gRPC health (probes); 9464: Prometheus /metrics. The main listener is the Unix socket
# in /var/run/guard (a volume shared with the host container).
EXPOSE 8081 9464
ENTRYPOINT ["guard", "serve"]
CMD ["--config", "/etc/guard/guard.yaml"]
