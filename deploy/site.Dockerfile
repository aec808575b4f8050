# fedrad site client: `fedrad site prepare` and `fedrad site run` (a Flower SuperNode that
# runs only approved app bundles, with the ClientApp's dependencies).
#
# CPU (default):
#   docker build -f deploy/site.Dockerfile -t fedrad-site .
# CUDA (NVIDIA GPUs; run with --gpus all / compose's gpus):
#   docker build -f deploy/site.Dockerfile -t fedrad-site:cuda \
#       --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# Runs as the unprivileged user 10001. Mount the DICOM export read-only at /dicom (prepare
# only), the cache on a volume at /data/cache, the egress log at /var/log/fedrad, and the
# site's approved-apps.json read-only at /etc/fedrad. The container opens no port: the
# SuperNode only connects out to the coordinator.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 FLWR_HOME=/home/fedrad/.flwr PATH=/opt/fedrad/bin:$PATH \
    MALLOC_MMAP_THRESHOLD_=1048576

# The CUDA base images have no Python of their own; the slim Python image has one.
RUN if ! python3 -m venv --help >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/fedrad

COPY . /src/fedrad/
RUN pip install --index-url "${TORCH_INDEX}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && pip install /src/fedrad \
    && rm -rf /src/fedrad

RUN useradd --system --uid 10001 --create-home --home-dir /home/fedrad fedrad \
    && mkdir -p /data/cache /var/log/fedrad /etc/fedrad \
    && chown fedrad /data/cache /var/log/fedrad
USER 10001
WORKDIR /home/fedrad
VOLUME ["/data/cache", "/var/log/fedrad"]

ENTRYPOINT ["fedrad", "site"]
CMD ["--help"]
