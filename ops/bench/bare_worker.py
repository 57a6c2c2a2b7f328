"""A bare Celery worker for the baselines: the same broker, the same Celery settings
(``protocol.contract.celery_settings``) and the same pool options as a gridq node, but no
envelope, no signature, no sealing, no policy, no store. ``add`` and ``echo_size`` do
nothing (the latency baseline); ``train`` does a federated round's local training as a
gridq node does, on a shard named in the task (the federated-learning baseline).

    GRIDQ_BROKER=redis://127.0.0.1:PORT/0 python -m celery -A ops.bench.bare_worker worker \\
        --queues bench.bare --pool prefork --concurrency 1 --without-mingle --without-gossip --task-events
"""

from __future__ import annotations

import base64
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from celery import Celery

from protocol.broker import connection_settings
from protocol.contract import celery_settings
from protocol.messages import TrainConfig
from protocol.model import ModelSpec, build_model, flatten_state, unflatten_state
from workers.jobs.training import train as train_locally
from workers.jobs.training import warm_up

QUEUE = "bench.bare"
ADD = "bench.bare.add"
ECHO_SIZE = "bench.bare.echo_size"
TRAIN = "bench.bare.train"

broker = os.environ.get("GRIDQ_BROKER", "redis://127.0.0.1:6379/0")
app = Celery("gridq-bench-bare", set_as_current=False)
app.conf.update(connection_settings(broker, celery_settings()))
app.conf.task_default_queue = QUEUE


@app.task(name=ADD)
def add(x: int, y: int) -> int:
    return x + y


@app.task(name=ECHO_SIZE)
def echo_size(data: bytes) -> int:
    """Receive a payload as a task argument; answer only its size."""
    return len(data)


@app.task(name=TRAIN)
def train(shard: str, spec: str, weights: str, config: dict[str, Any]) -> tuple[str, int]:
    """Train the model (graph as JSON, float32 weights as base64) on ``$GRIDQ_HOME/data/<shard>.npy``
    (64 feature columns, then the label); answer the trained weights and the sample count."""
    model = _model(spec)
    model.load_state_dict(unflatten_state(_decode(weights), model.state_dict()))
    x, y = _shard(shard)
    metrics = train_locally(model, x, y, TrainConfig.model_validate(config))
    return _encode(flatten_state(model.state_dict())), metrics.samples


@lru_cache(maxsize=8)
def _model(spec: str) -> torch.nn.Module:
    return build_model(ModelSpec.model_validate_json(spec))  # reused, as a gridq node reuses it


@lru_cache(maxsize=64)
def _shard(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    table = torch.tensor(np.load(Path(os.environ["GRIDQ_HOME"]) / "data" / f"{name}.npy"))
    return table[:, :64], table[:, 64]


def _encode(flat: torch.Tensor) -> str:
    return base64.b64encode(flat.numpy().tobytes()).decode()


def _decode(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.float32).copy())


torch.set_num_threads(1)  # as a node (WorkerSection.torch_threads)
warm_up()  # as a node: torch's first optimizer is built before the pool forks
