# The qwen-image-server image (README.md, "Containers").
#
#   GPU hosts (the default: CUDA 13.0 base, PyPI's torch, which is the CUDA 13.0 build):
#     docker build -t qwen-image-server .
#   CPU only, any Debian-like base:
#     docker build -t qwen-image-server:cpu --build-arg BASE=debian:bookworm-slim \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu --build-arg EXTRA_APT_PACKAGES= .
#   Without an index: wheels in deploy/wheelhouse/ and --build-arg OFFLINE=1.
#   Behind a TLS-intercepting proxy: --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt
#   With podman/buildah add --format docker, or the HEALTHCHECK is dropped (OCI images have none).
#
# Stages: system (python on the base), deps and build (the virtual environment in
# /opt/qis), runtime (the image), test (starts the server and calls it;
# scripts/container-test.sh builds it with --target test), and the image again as the
# last, default stage, so that a plain build never contains or runs the test.

ARG BASE=nvidia/cuda:13.0.2-base-ubuntu24.04

FROM ${BASE} AS system
# On every stage: scripts/container-test.sh removes only this project's untagged images.
LABEL org.opencontainers.image.title="qwen-image-server" \
      org.opencontainers.image.description="OpenAI-compatible image generation and editing server for the Qwen-Image family" \
      org.opencontainers.image.licenses="Apache-2.0"
# gcc and the Python headers let torch.compile (--compile) build its kernels on GPUs.
ARG EXTRA_APT_PACKAGES="gcc libc6-dev python3-dev"
ARG EXTRAS=s3
# python3 and venv come from apt unless the base has them; KubeRay's probes need wget.
RUN set -eu; \
    pkgs="$EXTRA_APT_PACKAGES"; \
    if ! python3 -m venv /tmp/venv-probe >/dev/null 2>&1; then pkgs="python3 python3-venv ca-certificates $pkgs"; fi; \
    rm -rf /tmp/venv-probe; \
    case ",$EXTRAS," in *,ray,*) pkgs="$pkgs wget" ;; esac; \
    if [ -n "$(echo $pkgs)" ]; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs; \
        rm -rf /var/lib/apt/lists/*; \
    fi

# The dependencies, from pyproject.toml alone (with a placeholder package), so that a
# change of the sources does not reinstall torch.
FROM system AS deps
ARG TORCH_VERSION=2.13.0
# PyPI's Linux torch wheels are the CUDA build (13.0 for 2.13.0); https://download.pytorch.org/whl/cpu for CPU ones.
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG INDEX_URL=https://pypi.org/simple
ARG OFFLINE=0
ARG EXTRAS=s3
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/qis
COPY pyproject.toml /src/
# (The wheelhouse is mounted, not copied: podman does not see its changes, but it
# follows pyproject.toml, which is copied.)
RUN --mount=type=bind,source=deploy/wheelhouse,target=/wheelhouse \
    --mount=type=secret,id=ca \
    set -eu; \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    if [ "$OFFLINE" = 1 ]; then torch_index=--no-index; index=--no-index; \
    else torch_index="--index-url $TORCH_INDEX_URL"; index="--index-url $INDEX_URL"; fi; \
    pip="/opt/qis/bin/pip install --find-links /wheelhouse"; \
    $pip $torch_index "torch==$TORCH_VERSION"; \
    mkdir -p /src/src/qwen_image_server; \
    touch /src/src/qwen_image_server/__init__.py /src/README.md; \
    $pip $index "setuptools>=69" "/src${EXTRAS:+[$EXTRAS]}"; \
    /opt/qis/bin/pip uninstall -y qwen-image-server; \
    rm -rf /src/src /src/README.md /src/build

# The package itself (pure Python) and the HEALTHCHECK's script, on top.
# (One COPY: with podman's vfs storage every step copies the whole tree.)
FROM deps AS build
COPY scripts/container_healthcheck.py src/ /src/src/
RUN mv /src/src/container_healthcheck.py /opt/qis/healthcheck.py \
    && /opt/qis/bin/pip install --no-deps --no-build-isolation /src && rm -rf /src

# The image. Everything but the virtual environment comes first, while the layer is small.
FROM system AS runtime
ARG QIS_UID=10001
RUN groupadd --gid "$QIS_UID" qis \
    && useradd --uid "$QIS_UID" --gid qis --home-dir /home/qis --create-home --shell /bin/bash qis \
    && mkdir -p /models /cache/huggingface /data \
    && chown qis:qis /models /cache /cache/huggingface /data
# QIS_HOST and QIS_MODELS_DIR are the lowest-ranked names of their settings, so HOST,
# MODEL_PATH, QWEN_IMAGE_LOCATION, QIS_MODELS or --model given at run time win.
ENV PATH=/opt/qis/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    QIS_HOST=0.0.0.0 \
    QIS_MODELS_DIR=/models \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface
USER qis
WORKDIR /data
VOLUME ["/models", "/cache/huggingface"]
EXPOSE 8000
# Loading a 20B model from disk (and --compile's warm-up) takes minutes: failures count after 20.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 CMD ["/opt/qis/bin/python", "/opt/qis/healthcheck.py"]
ENTRYPOINT ["qwen-image-server"]
CMD ["serve"]
COPY --from=build /opt/qis /opt/qis

# The image's test (scripts/container_smoke.py): serve tiny models, generate, edit.
FROM runtime AS test
COPY scripts/container_smoke.py /tmp/container_smoke.py
RUN python /tmp/container_smoke.py

FROM runtime
