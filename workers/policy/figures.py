"""A model job's figures — loss and accuracy — are computed from private rows: they leave
by the doors a value leaves by (ARCHITECTURE.md §6), or not at all.

* **raw** — the requester is an allowed user of every dataset the job reads;
* **approved** — the owner approved this job, whose description said the figures go
  with the weights (not for DP-SGD: its owner approved a noisy release);
* **dp** — the requester asked for private figures (``DPConfig.metrics_epsilon``, or an
  evaluation's ``DPRelease``): the mean of each sample's loss clamped to [0, bound] and
  the share of hits, both by OpenDP's bounded mean, noised together; the privacy unit is
  a stored row, as for DP-SGD.

Otherwise only what is public leaves — the number of samples (from the plans' shapes)
and the ε charged — with ``withheld`` saying why and what to do instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from protocol.dp import Charge, add_noise, aggregate_sensitivity, bounded_aggregate, calibrate
from protocol.errors import SensitivityUnknown
from protocol.messages import DPConfig, TrainMetrics
from protocol.plan import Plan
from protocol.row_maps import describe
from protocol.sensitivity import RowSource
from workers.jobs.training import per_sample
from workers.policy.doors import Door, Source
from workers.policy.release import private_rows


def door(requester: str, approved: bool, dp: DPConfig | None, sources: Sequence[Source]) -> Door | None:
    """The door a training's figures leave by, or None: withheld."""
    if dp is not None and dp.metrics_epsilon > 0:
        return Door.DP  # asked for, and paid for, with noise
    if all(requester in s.allowed_users for s in sources):
        return Door.RAW
    if approved and dp is None:
        return Door.APPROVED
    return None


def withheld(samples: int, requester: str, dp: DPConfig | None, sources: Sequence[Source],
             epsilon: float | None = None) -> TrainMetrics:
    """The figures a requester who may not see them receives: public ones, and the way out."""
    if dp is not None:
        why = ("DP-SGD releases loss and accuracy only with noise: ask for them with "
               "DPConfig(metrics_epsilon=...), charged with the training")
    else:
        closed = sorted({s.dataset for s in sources if requester not in s.allowed_users})
        why = (f"loss and accuracy are figures of {', '.join(closed)}, closed to {requester}: ask for the weights "
               "(once the owner approves, these figures come with them), or train by DP-SGD with "
               "DPConfig(metrics_epsilon=...)")
    plain = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in why)  # what the field takes
    return TrainMetrics(samples=samples, epsilon=epsilon, withheld=plain[:240])


def sample_rows(x: Plan, y: Plan, metas: Callable[[Plan], list[dict[str, Any]]]) -> RowSource:
    """The stored rows that x's and y's samples are — the same rows of one dataset, each at
    most once, sample i being stored row i in both — or SensitivityUnknown saying why not:
    a per-sample guarantee (DP-SGD, private figures) is a per-row guarantee only then."""
    found = []
    for name, plan in (("x", x), ("y", y)):
        try:
            found.append(private_rows(plan, metas(plan)))
        except SensitivityUnknown as exc:
            raise SensitivityUnknown(f"DP-SGD and private figures take one sample per stored row, each row "
                                     f"once; {name}: {exc.message}") from None
    xs, ys = found
    if xs != ys:
        raise SensitivityUnknown(f"DP-SGD and private figures pair x's sample i with y's sample i, which must "
                                 f"be the same stored row: x holds rows {describe(xs)}, y rows {describe(ys)}")
    return xs


def sensitivity(samples: int, bound: float, classification: bool) -> tuple[float, float]:
    """L1 and L2 sensitivity of (mean clamped loss, accuracy) over ``samples`` rows, jointly."""
    parts = [aggregate_sensitivity("mean", samples, 0.0, bound)]
    if classification:
        parts.append(aggregate_sensitivity("mean", samples, 0.0, 1.0))
    return sum(parts), sum(p * p for p in parts) ** 0.5


def figures_charge(samples: int, bound: float, classification: bool, epsilon: float, delta: float = 0.0) -> Charge:
    """The mechanism and cost of releasing the figures of ``samples`` rows at (ε, δ)."""
    return calibrate(*sensitivity(samples, bound, classification), epsilon, delta)


def private(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, bound: float,
            charge: Charge) -> TrainMetrics:
    """The figures with noise: each sample's loss (clamped to [0, bound], NaN as ``bound``)
    and hit, averaged by OpenDP over the rows — the computation :func:`sensitivity`
    bounds — then noised together by ``charge``'s mechanism."""
    losses, hits = per_sample(model, x, y, loss, bound)
    exact = [bounded_aggregate("mean", losses.numpy(), 0.0, bound)]
    if hits is not None:
        exact.append(bounded_aggregate("mean", hits.numpy(), 0.0, 1.0))
    noisy = add_noise(torch.tensor(exact, dtype=torch.float64), charge).tolist()
    return TrainMetrics(samples=len(x), loss=noisy[0], accuracy=noisy[1] if hits is not None else None,
                        epsilon=charge.epsilon)
