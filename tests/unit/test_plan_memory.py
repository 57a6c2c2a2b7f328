"""A node's memory budget per plan (issue 15, part 5): what a plan's steps would hold at
once is estimated on shapes alone before anything runs (protocol.interpret.peak_bytes), and
a plan over the budget is refused with a message that says how much and where."""

from __future__ import annotations

import pytest
import torch

from protocol.errors import LimitExceeded
from protocol.interpret import _run, evaluate, peak_bytes, validate
from protocol.plan import InputRef, Plan, Step, TensorSpec

X = [InputRef(kind="dataset", name="x")]
MB4 = 1000 * 1000 * 4  # one float32 value of 1000 x 1000


def _ref(i: int) -> dict[str, int]:
    return {"ref": i}


def _peak(plan: Plan, shape: tuple[int, ...] = (1000, 1000), dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    values = _run(plan, [torch.empty(shape, dtype=dtype, device="meta")], 2**40, device="meta")
    return peak_bytes(plan, values, 1)


def test_a_chain_holds_two_values_at_a_time_not_all_of_them():
    steps = [Step(op="mul", args=[_ref(0), {"const": 2.0}])]
    steps += [Step(op="mul", args=[_ref(i), {"const": 1.0}]) for i in range(1, 31)]
    steps.append(Step(op="sum", args=[_ref(31)]))
    assert _peak(Plan(inputs=X, steps=steps)) == (2 * MB4, 1)


def test_values_read_at_the_end_are_all_held_until_then():
    steps = [Step(op="mul", args=[_ref(0), {"const": float(i)}]) for i in range(10)]
    steps.append(Step(op="stack", args=[_ref(i) for i in range(1, 11)]))  # stack takes at most 16
    assert _peak(Plan(inputs=X, steps=steps)) == (20 * MB4, 10)  # ten values and their stack


def test_a_view_keeps_the_whole_of_what_it_views():
    steps = [Step(op="mul", args=[_ref(0), {"const": 2.0}]),  # 1: y, 4 MB
             Step(op="getitem", args=[_ref(1)], params={"index": [{"start": 0, "stop": 1}]}),  # 2: a view of y
             Step(op="mul", args=[_ref(0), {"const": 3.0}]),  # 3: w, 4 MB, while y's view is still needed
             Step(op="sum", args=[_ref(2)]), Step(op="sum", args=[_ref(3)]), Step(op="add", args=[_ref(4), _ref(5)])]
    assert _peak(Plan(inputs=X, steps=steps)) == (2 * MB4 + 4, 3)  # y, w and the sum of the view


def _hoarding(copies: int) -> Plan:
    """``copies`` full-size products of the input, all kept until they are summed at the end."""
    steps = [Step(op="mul", args=[_ref(0), {"const": float(i)}]) for i in range(copies)]
    steps += [Step(op="sum", args=[_ref(1 + i)]) for i in range(copies)]
    return Plan(inputs=X, steps=steps)


def test_a_plan_that_would_hold_64_gib_is_refused_before_it_runs():
    spec = [TensorSpec(shape=(8192, 8192), dtype="float64")]  # 512 MiB: within the element cap
    with pytest.raises(LimitExceeded, match=r"hold 64\.0 GiB of values at once \(at step 128, sum\); this node "
                                            r"runs a plan in at most 2\.0 GiB"):
        validate(_hoarding(128), spec, memory=2048 * 2**20)
    assert validate(_hoarding(128), spec)[-1] == TensorSpec(shape=(), dtype="float64")  # no budget: no refusal


def test_evaluate_lets_each_value_go_after_its_last_reader():
    steps = [Step(op="mul", args=[_ref(0), {"const": 2.0}])]
    steps += [Step(op="mul", args=[_ref(i), {"const": 1.0}]) for i in range(1, 6)]
    steps.append(Step(op="sum", args=[_ref(6)]))
    x = torch.ones(1000, 1000)
    values = _run(Plan(inputs=X, steps=steps), [x], 2**40)
    assert values[0] is x and all(v is None for v in values[1:-1])  # only the input and the result remain
    assert values[-1].item() == 2_000_000.0  # type: ignore[union-attr]


def test_the_estimate_is_the_evaluated_result_unchanged():
    x = torch.arange(12.0).reshape(3, 4)
    steps = [Step(op="mul", args=[_ref(0), {"const": 2.0}]), Step(op="add", args=[_ref(1), _ref(0)]),
             Step(op="mul", args=[_ref(1), _ref(2)]), Step(op="sum", args=[_ref(3)])]
    assert evaluate(Plan(inputs=X, steps=steps), [x]).item() == pytest.approx(float(((2 * x) * (3 * x)).sum()))
