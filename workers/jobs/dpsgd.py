"""DP-SGD's moving parts (Opacus), loaded with a process's first DP-SGD job only: Opacus
and SciPy with it are ~75 MB that most node processes never need (:mod:`workers.jobs.training`
imports this module lazily)."""

from __future__ import annotations

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from protocol.errors import InvalidRequest
from protocol.messages import DPConfig


class FiniteDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer, but every non-finite value of a per-sample gradient becomes 0
    before clipping. Otherwise one row with a NaN (or a loss that overflows) makes the
    clipped sum NaN, then every weight: whether the weights come out NaN would tell of the
    data. The replacement reads each sample's own gradient only, so clipping still bounds
    what one sample adds, and the accountant's guarantee stands."""

    def clip_and_accumulate(self) -> None:
        for p in self.params:
            samples = p.grad_sample
            if isinstance(samples, list):
                p.grad_sample = [_finite(s) for s in samples]
            elif samples is not None:
                p.grad_sample = _finite(samples)
        super().clip_and_accumulate()


def _finite(t: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


def private(model: nn.Module, optimizer: torch.optim.Optimizer, dp: DPConfig,
            batch_size: int) -> tuple[nn.Module, DPOptimizer]:
    """``model`` wrapped to compute per-sample gradients, and ``optimizer`` made to clip
    and noise them (Poisson batches of expected size ``batch_size``)."""
    try:
        wrapped = GradSampleModule(model)
    except NotImplementedError as exc:  # a layer Opacus has no per-sample gradient for: the model, not the data
        raise InvalidRequest(f"DP-SGD cannot train this model: {str(exc)[:300]}") from None
    return wrapped, FiniteDPOptimizer(optimizer, noise_multiplier=dp.noise_multiplier,
                                      max_grad_norm=dp.max_grad_norm, expected_batch_size=batch_size)
