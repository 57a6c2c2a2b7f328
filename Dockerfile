# gridq: one image for the gateway, the nodes, Flower and the one-shot init (docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRIDQ_HOME=/var/lib/gridq

# torch first and pinned: an unpinned torch would pull gigabytes of CUDA packages. Pass
# PyTorch's CPU wheel index as TORCH_INDEX_URL for a CPU-only image. Its own layer, so a
# change to gridq's source does not reinstall it.
ARG TORCH_INDEX_URL=""
RUN pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

WORKDIR /app
COPY . /app
RUN pip install . \
 && useradd --system --uid 10001 --home-dir /var/lib/gridq gridq \
 && mkdir -p /var/lib/gridq \
 && chown gridq:gridq /var/lib/gridq

# Keys, data, node stores and the gateway's registry live in the volume mounted here;
# a named volume takes this folder's owner on first use, so the services run unprivileged.
VOLUME ["/var/lib/gridq"]
USER gridq

CMD ["gridq", "--help"]
