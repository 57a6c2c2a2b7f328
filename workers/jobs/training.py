"""Local training at the node: a model rebuilt from its allow-listed graph, trained on the
values of two plans, by a loss and an optimizer picked by name. Deterministic for a given
seed (shuffling and dropout), so a federated run can be replayed and compared with plain
torch.

Training computes on private rows, so its failures must not speak of them: torch's
messages (which can quote a value: "Target 3790 is out of bounds") go to the node's log,
never into a reply. Where the figures would not reach the requester (``strict`` off:
weights kept, or DP-SGD), training is total: a label outside the model's classes counts as
no loss instead of raising, so whether a job fails says nothing of the data either."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from protocol.dp import DP_SGD, Charge
from protocol.errors import InvalidRequest
from protocol.messages import DPConfig, TrainConfig, TrainMetrics
from protocol.model import OPTIMIZERS, ModelSpec, build_model

log = logging.getLogger(__name__)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig,
          dp: DPConfig | None = None, *, strict: bool = True) -> TrainMetrics:
    """Train ``model`` in place; report loss (and accuracy, for classification) on the data.
    With ``dp``, by DP-SGD (Opacus): per-sample clipping, Gaussian noise, Poisson-sampled
    batches of expected size ``batch_size``; the metrics carry the ε it costs. ``strict``
    off: total on any labels (see the module's docstring)."""
    started = time.perf_counter()
    x, target = _tensors(x, y, config.loss)
    anchor = [p.detach().clone() for p in model.parameters()] if config.proximal_mu else []
    trained: nn.Module = model
    if dp:  # Opacus (and SciPy with it) loads with a process's first DP-SGD job, 0.6 s once,
        # rather than adding ~75 MB to every node process, most of which never train with DP
        from workers.jobs.dpsgd import private

        trained, optimizer = private(model, _optimizer(model, config), dp, config.batch_size)
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
                    loss = batch_loss(config.loss, trained(x[batch]), target[batch], strict)
                    if anchor:  # FedProx: (μ/2)·‖w - w_global‖²
                        loss = loss + config.proximal_mu / 2 * sum(
                            (p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                    loss.backward()
                    optimizer.step()
        metrics = evaluate(model, x, target, config.loss, time.perf_counter() - started, strict=strict)
    except (RuntimeError, IndexError, ValueError) as exc:  # shapes that do not fit the model
        raise _failed("training", exc, x, config.loss) from None
    finally:
        if dp:
            trained.remove_hooks()  # type: ignore[operator]  # take Opacus' hooks off the model
    if dp:
        metrics = metrics.model_copy(update={"epsilon": dp_charge(config, dp, len(x)).epsilon})
    return metrics


def score(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, *, strict: bool = True) -> TrainMetrics:
    """``model``'s loss (and accuracy, for classification) on ``x`` and ``y``, as ``train``
    reports it after training: a federated evaluation at the node."""
    x, target = _tensors(x, y, loss)
    try:
        return evaluate(model, x, target, loss, strict=strict)
    except (RuntimeError, IndexError, ValueError) as exc:  # shapes that do not fit the model
        raise _failed("evaluation", exc, x, loss) from None


def _failed(what: str, exc: Exception, x: torch.Tensor, loss: str) -> InvalidRequest:
    """The error a failure on private data answers with: its kind and the public shapes, not
    torch's message, which can quote values of the data; that goes to the node's log."""
    log.warning("%s failed on private data: %s", what, exc, exc_info=exc)
    return InvalidRequest(f"{what} failed on this data ({type(exc).__name__}; its details are in the node's log): "
                          f"check that rows of x, shaped {tuple(x.shape[1:])}, fit the model's input and that y "
                          f"suits the {loss} loss")


def batch_loss(loss: str, out: torch.Tensor, target: torch.Tensor, strict: bool) -> torch.Tensor:
    """The mean over the batch of each sample's loss, averaged over the batch size: a batch of
    ignored labels is 0, not NaN, and each sample's share is its own (DP-SGD's per-sample
    gradients assume Opacus' ``mean`` reduction, that is a sum divided by the batch size)."""
    return _each(loss, out, target, strict).sum() / max(1, len(out))


def _each(loss: str, out: torch.Tensor, target: torch.Tensor, strict: bool, ignored: float = 0.0) -> torch.Tensor:
    """Each sample's loss; a label outside the model's classes is ``ignored``'s value where
    not ``strict`` and an InvalidRequest (saying no value) where it is."""
    if loss == "mse":
        return F.mse_loss(out, _like(out, target), reduction="none").reshape(len(out), -1).mean(1)
    valid = _valid(out, target)
    if strict and not bool(valid.all()):
        raise InvalidRequest(f"y holds values that are not classes of the model's {out.shape[1]} outputs: "
                             f"cross_entropy takes class indices 0 … {out.shape[1] - 1}")
    each = F.cross_entropy(out, torch.where(valid, target, 0), reduction="none")
    return torch.where(valid, each, ignored).reshape(len(out), -1).mean(1)


def _valid(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if out.dim() < 2:
        raise InvalidRequest(f"cross_entropy takes class scores per sample; the model's output is shaped "
                             f"{tuple(out.shape)}")
    return (target >= 0) & (target < out.shape[1])


def _like(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``target`` in the output's shape: (n,) and (n, 1) compare sample by sample. Never
    broadcast: (n, 1) against (n,) would compare every sample with every target."""
    if target.numel() != out.numel():
        raise InvalidRequest(f"mse compares the model's output, shaped {tuple(out.shape)}, with y, shaped "
                             f"{tuple(target.shape)}: give each sample as many targets as outputs")
    return target.reshape(out.shape)


def per_sample(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str,
               bound: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each sample's loss (a label outside the classes, NaN and +inf count as ``bound``) and,
    for classification, whether the model's answer is right (0/1): functions of one row each,
    which private figures average."""
    x, target = _tensors(x, y, loss)
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
            losses = torch.nan_to_num(_each(loss, out, target, False, ignored=bound), nan=bound, posinf=bound)
            hits = None
            if loss == "cross_entropy":
                hits = ((out.argmax(dim=1) == target) & _valid(out, target)).double().reshape(len(x), -1).mean(1)
    except (RuntimeError, IndexError, ValueError) as exc:  # shapes that do not fit the model
        raise _failed("evaluation", exc, x, loss) from None
    return losses.double(), hits


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


def dp_charge(config: TrainConfig, dp: DPConfig, samples: int, also_epsilon: float = 0.0) -> Charge:
    """What DP-SGD with these settings costs (:data:`protocol.dp.DP_SGD`) — known before
    training, so an exhausted budget refuses the job before it runs."""
    rate = min(1.0, config.batch_size / samples)
    steps = config.epochs * _steps_per_epoch(samples, config.batch_size)
    return DP_SGD.cost(dp.noise_multiplier, rate, steps, dp.delta, also_epsilon)


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


def evaluate(model: nn.Module, x: torch.Tensor, target: torch.Tensor, loss: str, seconds: float = 0.0, *,
             strict: bool = True) -> TrainMetrics:
    """The exact figures (what the raw and approved doors release); a loss that is not a
    finite number is None, and ``withheld`` says why."""
    model.eval()
    with torch.no_grad():
        out = model(x)
        value = float(_each(loss, out, target, strict).mean())
        accuracy = float(((out.argmax(dim=1) == target) & _valid(out, target)).float().mean()) \
            if loss == "cross_entropy" else None
    if math.isfinite(value):
        return TrainMetrics(samples=len(x), loss=value, accuracy=accuracy, seconds=seconds)
    return TrainMetrics(samples=len(x), accuracy=accuracy, seconds=seconds,
                        withheld="the loss is not a finite number: NaN or infinite values in x or y, or training "
                                 "diverged")


def warm_up() -> None:
    """Build each optimizer once, in the worker's parent process before it forks: torch's
    first optimizer imports torch._dynamo (1.7 s, measured), which the pool's processes
    then inherit, shared, instead of each paying it on its first training job."""
    layer = nn.Linear(1, 1)
    for name in sorted(OPTIMIZERS):
        OPTIMIZERS[name](layer.parameters(), lr=0.1)  # type: ignore[call-arg]
