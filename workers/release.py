"""Calibrating a differentially private release: from the plan and the datasets' declared
bounds to a mechanism, a noise scale and a cost — before anything runs on data."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from protocol.dp import Charge, calibrate
from protocol.errors import InvalidRequest, SensitivityUnknown
from protocol.messages import DatasetMeta, DPRelease, NoiseInfo
from protocol.plan import Plan
from protocol.sensitivity import Rows, rows_of, sensitivity


@dataclass(frozen=True)
class PendingCharge:
    """What a DP release will be charged, on which datasets, once its reply is recorded."""

    datasets: Sequence[str]
    charge: Charge


@dataclass(frozen=True)
class Calibrated:
    charge: Charge
    noise: NoiseInfo


def calibrate_release(plan: Plan, release: DPRelease, metas: Sequence[dict[str, Any]]) -> Calibrated:
    if any(ref.kind != "dataset" for ref in plan.inputs):
        raise SensitivityUnknown("a DP release runs on a plan over datasets: a kept result has no declared bounds; "
                                 "send the whole computation as one plan")
    described = [DatasetMeta.model_validate(m) for m in metas]
    if len(described) != len(plan.inputs):
        raise InvalidRequest(f"a DP release needs the description of each of the plan's {len(plan.inputs)} "
                             f"inputs; {len(described)} given")
    try:
        sens = sensitivity(plan, [declared_rows(meta) for meta in described])
    except SensitivityUnknown as exc:
        unbounded = [meta.name for meta in described if meta.bounds is None]
        if unbounded:
            raise SensitivityUnknown(f"{exc.message} ({', '.join(unbounded)} declare(s) no bounds)") from None
        raise
    charge = calibrate(sens.l1, sens.l2, release.epsilon, release.delta)
    noise = NoiseInfo(mechanism=charge.mechanism, epsilon=charge.epsilon, delta=charge.delta, scale=charge.scale,  # type: ignore[arg-type]
                      sensitivity=sens.l1 if charge.mechanism == "laplace" else sens.l2)
    return Calibrated(charge, noise)


def declared_rows(meta: DatasetMeta) -> Rows:
    """The dataset's rows as its declared bounds describe them (unbounded without bounds)."""
    if not meta.shape:
        raise SensitivityUnknown(f"{meta.name} is a single value, not rows")
    row_shape = tuple(meta.shape[1:])
    cells = math.prod(row_shape)
    if meta.bounds is None:
        return rows_of(meta.shape[0], row_shape, None, None)
    pairs = meta.bounds * cells if len(meta.bounds) == 1 else meta.bounds
    if len(pairs) != cells:
        raise SensitivityUnknown(f"{meta.name} declares {len(meta.bounds)} bounds for rows of {cells} values")
    return rows_of(meta.shape[0], row_shape, [lo for lo, _ in pairs], [hi for _, hi in pairs])
