# fedrad coordinator: the Flower SuperLink (which starts fedrad's ServerApp for each run),
# fedrad's gateway for the sites, `fedrad certs` and Flower's `flwr` CLI.
#
#   docker build -f deploy/coordinator.Dockerfile -t fedrad-coordinator .
#
# Runs as the unprivileged user 10001. The SuperLink listens on the container's loopback
# only; the gateway (same network namespace, see compose.yaml) is the one port the sites
# reach. Run outputs (metrics, checkpoints) go to the volume at /home/fedrad/runs.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 FLWR_HOME=/home/fedrad/.flwr PATH=/opt/fedrad/bin:$PATH \
    MALLOC_MMAP_THRESHOLD_=1048576

RUN python3 -m venv /opt/fedrad
COPY . /src/fedrad/
RUN pip install --index-url "${TORCH_INDEX}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && pip install /src/fedrad \
    && rm -rf /src/fedrad

RUN useradd --system --uid 10001 --create-home --home-dir /home/fedrad fedrad \
    && mkdir -p /home/fedrad/runs /home/fedrad/.flwr \
    && chown -R fedrad /home/fedrad
USER 10001
WORKDIR /home/fedrad
VOLUME ["/home/fedrad/runs"]
EXPOSE 9092

CMD ["flower-superlink", "--help"]
