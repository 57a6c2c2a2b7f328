"""Local training at the node: a model rebuilt from its allow-listed graph, trained on the
values of two plans, by a loss and an optimizer picked by name. Deterministic for a given
seed (shuffling and dropout), so a federated run can be replayed and compared with plain
torch."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from protocol.errors import InvalidRequest
from protocol.messages import TrainConfig, TrainMetrics
from protocol.model import LOSSES, OPTIMIZERS


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> TrainMetrics:
    """Train ``model`` in place; report loss (and accuracy, for classification) on the data."""
    if x.dim() < 1 or len(x) != len(y) or len(x) == 0:
        raise InvalidRequest(f"x and y must have the same, non-zero number of rows; got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
    started = time.perf_counter()
    x = x.to(torch.float32)
    target = y.to(torch.long) if config.loss == "cross_entropy" else y.to(torch.float32)
    loss_fn = LOSSES[config.loss]
    kwargs: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.optimizer == "sgd":
        kwargs["momentum"] = config.momentum
    optimizer = OPTIMIZERS[config.optimizer](model.parameters(), **kwargs)
    anchor = [p.detach().clone() for p in model.parameters()] if config.proximal_mu else []
    torch.manual_seed(config.seed)  # dropout and other layer randomness
    order = torch.Generator().manual_seed(config.seed)
    model.train()
    try:
        for _ in range(config.epochs):
            for batch in torch.randperm(len(x), generator=order).split(config.batch_size):
                optimizer.zero_grad()
                loss = loss_fn(model(x[batch]), target[batch])
                if anchor:  # FedProx: (μ/2)·‖w - w_global‖²
                    loss = loss + config.proximal_mu / 2 * sum(
                        (p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                loss.backward()
                optimizer.step()
    except (RuntimeError, IndexError) as exc:  # shapes that do not fit the model, labels out of range
        raise InvalidRequest(f"training failed on this data: {str(exc)[:300]}") from None
    return evaluate(model, x, target, config, time.perf_counter() - started)


def evaluate(model: nn.Module, x: torch.Tensor, target: torch.Tensor, config: TrainConfig,
             seconds: float = 0.0) -> TrainMetrics:
    model.eval()
    with torch.no_grad():
        out = model(x)
        loss = float(LOSSES[config.loss](out, target))
        accuracy = float((out.argmax(dim=1) == target).float().mean()) if config.loss == "cross_entropy" else None
    return TrainMetrics(samples=len(x), loss=loss, accuracy=accuracy, seconds=seconds)


def warm_up() -> None:
    """Build each optimizer once, in the worker's parent process before it forks: torch's
    first optimizer imports torch._dynamo (1.7 s, measured), which the pool's processes
    then inherit, shared, instead of each paying it on its first training job."""
    layer = nn.Linear(1, 1)
    for name in sorted(OPTIMIZERS):
        OPTIMIZERS[name](layer.parameters(), lr=0.1)  # type: ignore[call-arg]
