"""Calibrating a DP release before anything runs: the datasets' declared bounds give the
sensitivity (range for a sum, range / n for a mean), the sensitivity and (ε, δ) give the
mechanism, its scale and the charge."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

from protocol.dp import rho_to_approx
from protocol.errors import InvalidRequest, SensitivityUnknown
from protocol.messages import DatasetMeta, DPRelease
from protocol.plan import Const, InputRef, Plan, Ref, Step
from workers.policy.release import PendingCharge, calibrate_release, declared_rows

# 100 rows of (weight in kg, mother's age): one row per birth
BIRTHS = DatasetMeta(node="ward", name="births", shape=(100, 2), dtype="float32", bounds=[(0.0, 7.0), (20.0, 65.0)])
COL0: dict[str, Any] = {"index": [{}, 0]}


def _plan(*steps: tuple[str, list[Any], dict[str, Any]], inputs: tuple[str, ...] = ("births",)) -> Plan:
    return Plan(inputs=[InputRef(kind="dataset", name=n) for n in inputs],
                steps=[Step(op=op, args=args, params=params) for op, args, params in steps])


def _meta(**changes: Any) -> dict[str, Any]:
    return BIRTHS.model_copy(update=changes).model_dump(mode="json")


def test_laplace_mean_of_a_bounded_column_moves_by_its_range_over_n() -> None:
    plan = _plan(("getitem", [Ref(ref=0)], COL0), ("mean", [Ref(ref=1)], {}))
    done = calibrate_release(plan, DPRelease(epsilon=0.5), [_meta()])
    # one birth replaced moves the mean weight by at most (7 - 0) / 100; Laplace b = Δ₁ / ε
    assert done.noise.mechanism == done.charge.mechanism == "laplace"
    assert done.noise.sensitivity == pytest.approx(0.07)
    assert done.charge.scale == done.noise.scale == pytest.approx(0.14)
    assert done.charge.epsilon == pytest.approx(0.5) and done.charge.delta == 0.0 == done.noise.delta


def test_laplace_column_sums_take_the_l1_of_the_ranges() -> None:
    done = calibrate_release(_plan(("sum", [Ref(ref=0)], {"dim": 0})), DPRelease(epsilon=2.0), [_meta()])
    assert done.noise.sensitivity == pytest.approx(7.0 + 45.0)  # L1 over both columns
    assert done.charge.scale == pytest.approx(52.0 / 2.0) and done.noise.epsilon == pytest.approx(2.0)


def test_gaussian_takes_the_l2_and_carries_epsilon_and_delta() -> None:
    release = DPRelease(epsilon=1.0, delta=1e-6)
    both = calibrate_release(_plan(("sum", [Ref(ref=0)], {"dim": 0})), release, [_meta()])
    one = calibrate_release(_plan(("getitem", [Ref(ref=0)], COL0), ("sum", [Ref(ref=1)], {})), release, [_meta()])
    l2 = math.hypot(7.0, 45.0)
    assert both.charge.mechanism == both.noise.mechanism == "gaussian"
    assert (both.charge.epsilon, both.charge.delta) == (1.0, 1e-6) == (both.noise.epsilon, both.noise.delta)
    assert both.noise.sensitivity == pytest.approx(l2) and one.noise.sensitivity == pytest.approx(7.0)
    # ρ = Δ₂² / (2σ²), and σ grows linearly with Δ₂ at a fixed (ε, δ)
    assert both.charge.rho == pytest.approx(l2**2 / (2 * both.charge.scale**2))
    assert both.charge.scale / l2 == pytest.approx(one.charge.scale / 7.0, rel=1e-6)
    assert 0.99 < rho_to_approx(both.charge.rho, 1e-6) <= 1.0 + 1e-9  # spends ε, not more


def test_aggregates_of_two_datasets_are_calibrated_on_the_dataset_one_row_moves_most() -> None:
    # a birth replaced moves only the births' sum (by 7), a death only the deaths' (by 3): each
    # dataset's neighbours are its own, and each dataset is charged ε
    deaths = _meta(name="deaths", shape=(30, 1), bounds=[(0.0, 3.0)])
    plan = _plan(("getitem", [Ref(ref=0)], COL0), ("sum", [Ref(ref=2)], {}), ("sum", [Ref(ref=1)], {}),
                 ("sub", [Ref(ref=3), Ref(ref=4)], {}), inputs=("births", "deaths"))
    done = calibrate_release(plan, DPRelease(epsilon=2.0), [_meta(), deaths])
    assert done.noise.sensitivity == pytest.approx(7.0) and done.charge.scale == pytest.approx(3.5)
    assert [a.dataset for a in done.analysis.aggregates] == ["births", "deaths"] and done.noise.post_processed


def test_clamping_bounds_an_undeclared_column_and_tightens_a_declared_one() -> None:
    clipped = _plan(("clamp", [Ref(ref=0)], {"min": -1, "max": 2}), ("mean", [Ref(ref=1)], {}))
    done = calibrate_release(clipped, DPRelease(epsilon=1.0), [_meta(shape=(40,), bounds=None)])
    assert done.noise.sensitivity == pytest.approx(3.0 / 40)
    tighter = _plan(("clamp", [Ref(ref=0)], {"min": 0, "max": 10}), ("sum", [Ref(ref=1)], {}),
                    ("mul", [Ref(ref=2), Const(const=0.5)], {}))
    done = calibrate_release(tighter, DPRelease(epsilon=1.0), [_meta(shape=(40,), bounds=[(0.0, 100.0)])])
    assert done.noise.sensitivity == pytest.approx(10.0)  # the sum's; × 0.5 applies to its noisy value
    assert done.noise.post_processed


def test_a_dataset_without_bounds_cannot_be_released_unclamped() -> None:
    with pytest.raises(SensitivityUnknown, match=r"declare the dataset's bounds \(births declare\(s\) no bounds\)"):
        calibrate_release(_plan(("sum", [Ref(ref=0)], {"dim": 0})), DPRelease(epsilon=1.0), [_meta(bounds=None)])


def test_each_input_needs_its_description() -> None:
    two = _plan(("add", [Ref(ref=0), Ref(ref=1)], {}), inputs=("births", "births"))
    with pytest.raises(InvalidRequest, match="each of the plan's 2 inputs; 1 given"):
        calibrate_release(two, DPRelease(epsilon=1.0), [_meta()])


@pytest.mark.parametrize("changes, message", [
    ({"shape": (), "bounds": None}, "births is a single value"),
    ({"shape": (10, 3), "bounds": [(0.0, 1.0), (0.0, 2.0)]}, "births declares 2 bounds for rows of 3 values"),
])
def test_unusable_declarations_name_the_dataset(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(SensitivityUnknown, match=message):
        calibrate_release(_plan(("sum", [Ref(ref=0)], {})), DPRelease(epsilon=1.0), [_meta(**changes)])


def test_declared_rows_spread_one_pair_over_every_value() -> None:
    rows = declared_rows(BIRTHS.model_copy(update={"shape": (50, 2, 3), "bounds": [(-1.0, 4.0)]}))
    assert rows.n == 50
    torch.testing.assert_close(rows.lo, torch.full((2, 3), -1.0, dtype=torch.float64))
    torch.testing.assert_close(rows.hi, torch.full((2, 3), 4.0, dtype=torch.float64))
    unbounded = declared_rows(BIRTHS.model_copy(update={"bounds": None}))
    assert unbounded.n == 100 and torch.isinf(unbounded.hi).all() and (unbounded.lo == -math.inf).all()


def test_a_kept_result_has_no_declared_bounds() -> None:
    plan = Plan(inputs=[InputRef(kind="object", name="ward:obj1")], steps=[Step(op="sum", args=[Ref(ref=0)])])
    with pytest.raises(SensitivityUnknown, match="kept result"):
        calibrate_release(plan, DPRelease(epsilon=1.0), [_meta()])


def test_a_pending_charge_is_frozen() -> None:
    charge = calibrate_release(_plan(("sum", [Ref(ref=0)], {"dim": 0})), DPRelease(epsilon=1.0), [_meta()]).charge
    pending = PendingCharge(datasets=["births"], charge=charge)
    assert pending.charge.epsilon == pytest.approx(1.0) and list(pending.datasets) == ["births"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        pending.charge = charge  # type: ignore[misc]
