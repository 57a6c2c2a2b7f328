"""A bare Celery worker for the latency baseline: the same broker, the same Celery settings
(``protocol.contract.celery_settings``) and the same pool options as a gridq node, but tasks
that do nothing — no envelope, no signature, no policy, no store.

    GRIDQ_BROKER=redis://127.0.0.1:PORT/0 python -m celery -A ops.bench.bare_worker worker \\
        --queues bench.bare --pool prefork --concurrency 1 --without-mingle --without-gossip --task-events
"""

from __future__ import annotations

import os

from celery import Celery

from protocol.contract import celery_settings

QUEUE = "bench.bare"
ADD = "bench.bare.add"
ECHO_SIZE = "bench.bare.echo_size"

broker = os.environ.get("GRIDQ_BROKER", "redis://127.0.0.1:6379/0")
app = Celery("gridq-bench-bare", broker=broker, backend=broker, set_as_current=False)
app.conf.update(celery_settings())
app.conf.task_default_queue = QUEUE


@app.task(name=ADD)
def add(x: int, y: int) -> int:
    return x + y


@app.task(name=ECHO_SIZE)
def echo_size(data: bytes) -> int:
    """Receive a payload as a task argument; answer only its size."""
    return len(data)
