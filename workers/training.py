"""Local training at the node: a model rebuilt from its allow-listed graph, trained on the
values of two plans, by a loss and an optimizer picked by name. Deterministic for a given
seed (shuffling and dropout), so a federated run can be replayed and compared with plain
torch."""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from protocol.dp import Charge
from protocol.errors import InvalidRequest
from protocol.messages import DPConfig, TrainConfig, TrainMetrics
from protocol.model import LOSSES, OPTIMIZERS, ModelSpec, build_model


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig,
          dp: DPConfig | None = None) -> TrainMetrics:
    """Train ``model`` in place; report loss (and accuracy, for classification) on the data.
    With ``dp``, by DP-SGD (Opacus): per-sample clipping, Gaussian noise, Poisson-sampled
    batches of expected size ``batch_size``; the metrics carry the ε it costs."""
    started = time.perf_counter()
    x, target = _tensors(x, y, config.loss)
    loss_fn = LOSSES[config.loss]
    anchor = [p.detach().clone() for p in model.parameters()] if config.proximal_mu else []
    trained: nn.Module = model
    if dp:  # Opacus (and SciPy with it) loads with a process's first DP-SGD job, 0.6 s once,
        # rather than adding ~75 MB to every node process, most of which never train with DP
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        trained = GradSampleModule(model)
        optimizer = DPOptimizer(_optimizer(trained, config), noise_multiplier=dp.noise_multiplier,
                                max_grad_norm=dp.max_grad_norm, expected_batch_size=config.batch_size)
    else:
        optimizer = _optimizer(model, config)
    # dropout, DP noise and other layer randomness. The CPU generator alone: torch.manual_seed
    # also queues seeds for CUDA, XPU and MTIA, formatting a stack trace for each (~1 ms a job)
    torch.default_generator.manual_seed(config.seed)
    order = torch.Generator().manual_seed(config.seed)
    trained.train()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus' hooks, harmless
            for _ in range(config.epochs):
                for batch in _batches(len(x), config.batch_size, order, poisson=dp is not None):
                    optimizer.zero_grad()
                    loss = loss_fn(trained(x[batch]), target[batch])
                    if anchor:  # FedProx: (μ/2)·‖w - w_global‖²
                        loss = loss + config.proximal_mu / 2 * sum(
                            (p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                    loss.backward()
                    optimizer.step()
    except (RuntimeError, IndexError) as exc:  # shapes that do not fit the model, labels out of range
        raise InvalidRequest(f"training failed on this data: {str(exc)[:300]}") from None
    if dp:
        trained.remove_hooks()  # type: ignore[operator]  # take Opacus' hooks off the model
    metrics = evaluate(model, x, target, config.loss, time.perf_counter() - started)
    if dp:
        metrics = metrics.model_copy(update={"epsilon": dp_charge(config, dp, len(x)).epsilon})
    return metrics


def score(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> TrainMetrics:
    """``model``'s loss (and accuracy, for classification) on ``x`` and ``y``, as ``train``
    reports it after training: a federated evaluation at the node."""
    x, target = _tensors(x, y, loss)
    try:
        return evaluate(model, x, target, loss)
    except (RuntimeError, IndexError) as exc:  # shapes that do not fit the model, labels out of range
        raise InvalidRequest(f"evaluation failed on this data: {str(exc)[:300]}") from None


def _tensors(x: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs as float32 and targets as the loss wants them (class indices or values)."""
    if x.dim() < 1 or len(x) != len(y) or len(x) == 0:
        raise InvalidRequest(f"x and y must have the same, non-zero number of rows; got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
    return x.to(torch.float32), y.to(torch.long) if loss == "cross_entropy" else y.to(torch.float32)


class Models:
    """Models rebuilt from their graphs, kept for the next job with the same graph: a
    federated run sends one graph every round, and rebuilding it (torch.fx generates and
    compiles its forward) is ~1 ms of a job's ~5 ms here. A model is lent to one job at a
    time, and only given back by a job that ends normally and did not wrap it (DP-SGD hooks
    its layers); every job replaces all its weights and buffers before use (load_state)."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._idle: OrderedDict[str, torch.fx.GraphModule] = OrderedDict()

    @contextmanager
    def lend(self, spec: ModelSpec, *, give_back: bool = True) -> Iterator[torch.fx.GraphModule]:
        key = spec.model_dump_json()
        model = self._idle.pop(key, None) or build_model(spec)
        for p in model.parameters():
            p.grad = None  # nothing of the previous job (perhaps another user's) is left on it
        yield model  # an exception in the job ends here: the model is dropped, not given back
        if give_back:
            self._idle[key] = model
            while len(self._idle) > self.size:
                self._idle.popitem(last=False)


def dp_charge(config: TrainConfig, dp: DPConfig, samples: int) -> Charge:
    """What DP-SGD with these settings costs, by Opacus' RDP accountant — known before
    training, so an exhausted budget refuses the job before it runs."""
    rate = min(1.0, config.batch_size / samples)
    steps = config.epochs * _steps_per_epoch(samples, config.batch_size)
    return Charge("dpsgd", _rdp_epsilon(dp.noise_multiplier, rate, steps, dp.delta), dp.delta)


@lru_cache(maxsize=256)
def _rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Opacus' RDP accountant (~0.2 s a call here: cached, as rounds repeat their settings)."""
    from opacus.accountants import RDPAccountant  # loaded on first use: see train()

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta=delta))


def _steps_per_epoch(samples: int, batch_size: int) -> int:
    return max(1, -(-samples // batch_size))


def _batches(n: int, batch_size: int, order: torch.Generator, poisson: bool) -> list[torch.Tensor]:
    """Shuffled fixed-size batches; or, for DP-SGD, Poisson sampling (each sample in each
    batch with probability batch_size / n), which is what its accountant assumes."""
    if not poisson:
        return list(torch.randperm(n, generator=order).split(batch_size))
    rate = min(1.0, batch_size / n)
    draws = (torch.rand(n, generator=order) < rate for _ in range(_steps_per_epoch(n, batch_size)))
    return [idx for mask in draws if len(idx := torch.nonzero(mask).flatten())]


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.optimizer == "sgd":
        kwargs["momentum"] = config.momentum
    return OPTIMIZERS[config.optimizer](model.parameters(), **kwargs)  # type: ignore[call-arg]


def evaluate(model: nn.Module, x: torch.Tensor, target: torch.Tensor, loss: str,
             seconds: float = 0.0) -> TrainMetrics:
    model.eval()
    with torch.no_grad():
        out = model(x)
        value = float(LOSSES[loss](out, target))
        accuracy = float((out.argmax(dim=1) == target).float().mean()) if loss == "cross_entropy" else None
    return TrainMetrics(samples=len(x), loss=value, accuracy=accuracy, seconds=seconds)


def warm_up() -> None:
    """Build each optimizer once, in the worker's parent process before it forks: torch's
    first optimizer imports torch._dynamo (1.7 s, measured), which the pool's processes
    then inherit, shared, instead of each paying it on its first training job."""
    layer = nn.Linear(1, 1)
    for name in sorted(OPTIMIZERS):
        OPTIMIZERS[name](layer.parameters(), lr=0.1)  # type: ignore[call-arg]
