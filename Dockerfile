# convserve: image-classification inference service (Flask + gunicorn + ONNX Runtime).
#
#   make image                       # docker if an engine answers, else buildah; see deploy/build-image.sh
#   docker run -p 8080:8080 convserve:latest
#
# BASE must be a Debian-based image with python3 >= 3.11 and its venv module: the official image (default, python at
# /usr/local/bin/python3) or the local debootstrap one from deploy/make-base-image.sh (python at /usr/bin/python3).
# Both stages use the same BASE, so the venv's interpreter symlink resolves in the final stage.
ARG BASE=python:3.11-slim-bookworm

# ---- builder: a venv with the runtime dependencies and the service only (no torch, no dev/train extras, no pip) --
FROM ${BASE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/venv
WORKDIR /src
# README* : pyproject.toml names README.md as the long description (a glob, so a checkout without it still builds)
COPY pyproject.toml README* ./
# Exact versions of every runtime dependency: rebuilds are reproducible (how to update: see the file).
COPY deploy/constraints.txt ./
COPY service/ service/
COPY training/ training/
# ca_bundle (optional build secret): a CA bundle for pip where HTTPS goes through an intercepting proxy;
# deploy/build-image.sh passes the host's. As a secret it never lands in a layer.
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && /opt/venv/bin/pip install --no-cache-dir --constraint constraints.txt . \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -c "import service, onnxruntime, numpy, PIL, flask, gunicorn, prometheus_client" \
    && /opt/venv/bin/python -m pip uninstall --yes --quiet pip setuptools wheel \
    && /opt/venv/bin/python -c "import pathlib, swagger_ui_bundle as s; from service.api.docs import SWAGGER_UI_FILES as keep; \
[p.unlink() for p in pathlib.Path(s.swagger_ui_path).iterdir() if p.is_file() and p.name not in keep]"
# The model store, readable by the non-root runtime user whatever the modes in the build context were.
COPY model_store/ /app/model_store/
RUN chmod -R u=rwX,go=rX /app/model_store

# ---- runtime ------------------------------------------------------------------------------------------------------
FROM ${BASE}
# A fixed UID/GID (10001) so that runAsUser/runAsNonRoot and file ownership agree everywhere; no home, no shell.
RUN groupadd --gid 10001 convserve \
    && useradd --uid 10001 --gid 10001 --no-log-init --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin convserve

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app/model_store /app/model_store

# HOME=/tmp: the user has no home and the root filesystem may be read-only (Kubernetes mounts an emptyDir on /tmp).
# ORT_DISABLE_TELEMETRY=1: ONNX Runtime's telemetry otherwise tries to persist a device id and upload events, and
# its uploader aborts the worker process (SIGABRT) on a graceful shutdown.
# Settings (service/settings.py, which checks them at start): only those the image sets otherwise than the defaults;
# override any with -e / the pod's env. MODEL_STORE: the image's store (the default is the repository's).
# INFERENCE_THREADS=1, not 0 (automatic): a container may see the host's CPUs rather than its limit; with the default
# WORKERS (2), inference runs on 2 threads.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1 \
    MODEL_STORE=/app/model_store \
    INFERENCE_THREADS=1

WORKDIR /app
USER 10001:10001
# The default PORT and GRPC_PORT (tests/test_deploy.py checks them).
EXPOSE 8080 8081
# Ready = models loaded and warmed; needs no curl; the port as the service reads it. (Kubernetes ignores HEALTHCHECK
# and uses its own probes.)
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; from service.settings import Settings; urllib.request.urlopen('http://127.0.0.1:%d/readyz' % Settings.from_env().PORT, timeout=4)"]
# A bad setting stops it before any worker starts: one line naming the setting and what it allows, exit status 2.
CMD ["gunicorn", "-c", "python:service.gunicorn_config"]

# Last, so that a new commit does not invalidate the layers above. build-image.sh passes both.
ARG VERSION=unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="convserve" \
      org.opencontainers.image.description="Image-classification inference service: four-class ConvNet on ONNX Runtime" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
