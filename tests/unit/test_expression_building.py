"""Building a plan client side (orchestrator.pointer.Expression): each operation checks
only the step it adds, so a plan of n steps costs n checks, not n²/2 — and what it infers
is what checking the whole plan infers."""

from __future__ import annotations

import pytest

import orchestrator.plans as plans
import orchestrator.pointer as pointer
from orchestrator.pointer import Expression
from protocol.errors import InvalidRequest
from protocol.interpret import validate
from protocol.plan import InputRef, TensorSpec

X = (InputRef(kind="dataset", name="x"), TensorSpec(shape=(6, 3), dtype="float32"))
Y = (InputRef(kind="dataset", name="y"), TensorSpec(shape=(6,), dtype="int64"))


def _leaf(*inputs: tuple[InputRef, TensorSpec]) -> Expression:
    return Expression(None, "n", list(inputs))  # type: ignore[arg-type]  # no grid: nothing is sent


def test_each_operation_checks_one_step(monkeypatch: pytest.MonkeyPatch):
    calls = []
    real = plans.run_step  # each step's spec is checked by orchestrator.plans.spec_of
    monkeypatch.setattr(plans, "run_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = _leaf(X)
    slow = x
    for _ in range(50):
        slow = (slow @ x.T).clamp(-1.0, 1.0) @ x
    assert len(slow.plan.steps) == 200 and len(calls) == 200  # transpose, matmul, clamp, matmul: 50 times


def test_what_it_infers_is_what_the_whole_plan_check_infers():
    x, y = _leaf(X), _leaf(Y)
    exprs = [x[:, 0] * y, 2 - x, (x.sum(0) / 3).reshape(3, 1), pointer.cat([x, x * 2]),
             pointer.stack([x[:, 1], y * 1.0]), (x > 1).sum(),
             1 / (x + 1), (y * 2 + x[:, 2]).mean()]
    for expr in exprs:
        whole = validate(expr.plan, [spec for _, spec in expr._inputs])
        assert list(expr._specs) == whole, expr


def test_a_constant_first_keeps_its_place():
    x = _leaf(X)
    assert (2 - x).plan.steps[-1].args[0].const == 2  # type: ignore[union-attr]


def test_a_step_that_cannot_run_is_refused_when_it_is_added():
    x = _leaf(X)
    with pytest.raises(InvalidRequest, match=r"step 1 \(matmul\) cannot run on these inputs"):
        x.sum(0) @ x
