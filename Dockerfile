# gridq: one image for the gateway, the nodes, Flower and the one-shot init (docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRIDQ_HOME=/var/lib/gridq

# torch first, the CPU build from PyTorch's CPU index (PyPI's torch is the CUDA build,
# gigabytes of nvidia packages). Its own layer, so a change to gridq's source does not
# reinstall it.
COPY ops/requirements/torch-cpu.txt /tmp/torch-cpu.txt
RUN pip install -r /tmp/torch-cpu.txt

WORKDIR /app
COPY . /app
RUN pip install . \
 && useradd --system --uid 10001 --home-dir /var/lib/gridq gridq \
 && mkdir -p /var/lib/gridq/broker \
 && chown -R gridq:gridq /var/lib/gridq

# Keys, data, node stores and the gateway's registry live in the volume mounted here;
# a named volume takes this folder's owner on first use, so the services run unprivileged.
VOLUME ["/var/lib/gridq"]
USER gridq

CMD ["gridq", "--help"]
