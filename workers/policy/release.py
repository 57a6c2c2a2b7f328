"""Calibrating a differentially private release: from the plan and the datasets' declared
bounds to the analysis :mod:`protocol.sensitivity` proves, a mechanism, a noise scale and a
cost — before anything runs on data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from protocol.dp import Charge, calibrate
from protocol.errors import InvalidRequest, SensitivityUnknown
from protocol.messages import DatasetMeta, DPRelease, NoiseInfo
from protocol.plan import Plan, TensorSpec
from protocol.sensitivity import Analysis, Rows, RowSource, analyse, datasets_only, declared, row_source


@dataclass(frozen=True)
class PendingCharge:
    """What a DP release will be charged, on which datasets, once its reply is recorded."""

    datasets: Sequence[str]
    charge: Charge


@dataclass(frozen=True)
class Calibrated:
    analysis: Analysis
    charge: Charge
    noise: NoiseInfo


def calibrate_release(plan: Plan, release: DPRelease, metas: Sequence[dict[str, Any]]) -> Calibrated:
    """The analysis of ``plan`` as a DP release on these datasets (the metadata of each of
    its inputs, in order), and the mechanism and charge its (ε, δ) buys."""
    described = _described(plan, metas)
    try:
        analysis = analyse(plan, [declared_rows(m) for m in described], _specs(described))
    except SensitivityUnknown as exc:
        raise _naming_unbounded(exc, described) from None
    charge = calibrate(analysis.l1, analysis.l2, release.epsilon, release.delta)
    noise = NoiseInfo(mechanism=charge.mechanism, epsilon=charge.epsilon, delta=charge.delta, scale=charge.scale,  # type: ignore[arg-type]
                      sensitivity=getattr(analysis, charge.kind.metric),  # the norm its noise is calibrated to
                      post_processed=analysis.post_processed)
    return Calibrated(analysis, charge, noise)


def private_rows(plan: Plan, metas: Sequence[dict[str, Any]]) -> RowSource:
    """Which stored rows of which dataset ``plan``'s value holds, each at most once and in
    order — DP-SGD's privacy unit is a stored row — or SensitivityUnknown naming the step."""
    described = _described(plan, metas)
    return row_source(plan, [declared_rows(m) for m in described], _specs(described))


def declared_rows(meta: DatasetMeta) -> Rows:
    """The dataset's rows as its declared bounds describe them (unbounded without bounds)."""
    if not meta.shape:
        raise SensitivityUnknown(f"{meta.name} is a single value, not rows")
    return declared(meta.name, meta.shape[0], tuple(meta.shape[1:]), meta.bounds)


def _described(plan: Plan, metas: Sequence[dict[str, Any]]) -> list[DatasetMeta]:
    datasets_only(plan)  # before the metadata: a kept result has none
    described = [DatasetMeta.model_validate(m) for m in metas]
    if len(described) != len(plan.inputs):
        raise InvalidRequest(f"a DP release needs the description of each of the plan's {len(plan.inputs)} "
                             f"inputs; {len(described)} given")
    return described


def _specs(described: Sequence[DatasetMeta]) -> list[TensorSpec]:
    return [TensorSpec(shape=tuple(m.shape), dtype=m.dtype) for m in described]


def _naming_unbounded(exc: SensitivityUnknown, described: Sequence[DatasetMeta]) -> SensitivityUnknown:
    unbounded = sorted({m.name for m in described if m.bounds is None})
    if unbounded and "unbounded" in exc.message:
        return SensitivityUnknown(f"{exc.message} ({', '.join(unbounded)} declare(s) no bounds)")
    return exc
