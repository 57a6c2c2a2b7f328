"""Issue 14's attacks on the DP door, replayed against a real node (the hospital, as carol,
who may not see the births raw): each is refused with a typed error naming the step and
costs no budget, and what the door accepts is released — post-processing included."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from ops.local import LocalGrid
from orchestrator import Grid
from orchestrator.pointer import DataPointer, Expression
from protocol.errors import InvalidRequest, SensitivityUnknown
from protocol.messages import DPRelease, RunJob
from protocol.plan import Plan, Step


@pytest.fixture()
def carol(local_grid: LocalGrid) -> Iterator[Grid]:
    with local_grid.connect("carol", timeout=30) as grid:
        yield grid


def births(grid: Grid) -> DataPointer:
    return grid.search("#birth-records", "#february")["hospital"][0]


def releases(grid: Grid) -> int:
    (info,) = grid.budget("hospital", "birth-records-feb")
    return info.releases


def release(grid: Grid, plan: Plan) -> object:
    """A DP release of ``plan`` as a client that skips its own checks would send it."""
    return grid.submit("hospital", RunJob(plan=plan, release=DPRelease(epsilon=1e-3))).private_value(timeout=30)


def test_an_inverted_clamp_is_refused_by_the_node(carol: Grid) -> None:
    before = releases(carol)
    w = births(carol)["weight"]
    plan = (w[3:4].sum() + w.sum().clamp(0, 7)).plan
    inverted = Plan(inputs=plan.inputs, steps=[
        Step(op="clamp", args=s.args, params={"min": 7, "max": 0}) if s.op == "clamp" else s for s in plan.steps])
    with pytest.raises(InvalidRequest, match=r"clamp.*min \(7(\.0)?\) is above max \(0(\.0)?\)"):
        release(carol, inverted)
    assert releases(carol) == before


@pytest.mark.parametrize("attack, named", [
    (lambda w: (w[:-1] * w[1:]).sum(), "combines rows"),
    (lambda w: (w - 3.5).to("uint8").sum(), "wraps"),
    (lambda w: (w * 1e308 * 0).sum(), "can overflow float64"),
    (lambda w: (w * 1e4).to("float16").sum(), "overflows"),
    (lambda w: (w - w.mean()).abs().sum(), "row values and an aggregate"),
])
def test_attacks_on_the_sensitivity_are_refused_and_cost_nothing(carol: Grid, attack, named: str) -> None:  # type: ignore[no-untyped-def]
    before = releases(carol)
    expr: Expression = attack(births(carol)["weight"])
    with pytest.raises(SensitivityUnknown, match=named):
        release(carol, expr.plan)
    assert releases(carol) == before


def test_post_processing_of_noisy_aggregates_is_released(local_grid: LocalGrid, births_feb: torch.Tensor) -> None:
    # an allowed user asking for DP all the same (alice: no other test counts her releases here)
    with local_grid.connect("alice", timeout=30) as alice:
        got = (births(alice)["weight"].mean() * 1000).get(epsilon=0.5)  # kg → g, after the noise
    n = births_feb.shape[0]
    assert got.noise.post_processed and got.noise.sensitivity == pytest.approx(7.0 / n)
    assert got.noise.scale == pytest.approx(7.0 / n / 0.5) and "then post-processed" in repr(got)
    # the mean's Laplace noise exceeds b·ln(1e6) with probability 1e-6, and is scaled by 1000 with it
    assert abs(got.item() - births_feb[:, 0].mean().item() * 1000) <= 1000 * got.noise.scale * math.log(1e6)
