"""Plans: validation on meta tensors, evaluation on real ones, and every refusal."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from protocol.codec import ALLOWED_DTYPES, MAX_ELEMENTS, dtype_name
from protocol.errors import ForbiddenOperation, GridError, InvalidRequest, JobFailed, LimitExceeded
from protocol.interpret import evaluate, validate
from protocol.ops import REGISTRY
from protocol.plan import (
    MAX_INPUTS,
    MAX_STEPS,
    Const,
    InputRef,
    Plan,
    Ref,
    Step,
    TensorSpec,
)

FAST = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

_G = torch.Generator().manual_seed(1234)
X = torch.randn(3, 4, generator=_G)                     # float32, mixed signs
Y = torch.randn(3, 4, generator=_G)
PX = X.abs() + 0.5                                      # strictly positive
IX = torch.arange(12, dtype=torch.int64).reshape(3, 4)   # int64
B = X > 0                                               # bool
V = torch.randn(4, generator=_G)
M = torch.randn(4, 2, generator=_G)
T3 = torch.randn(2, 3, 4, generator=_G)


# --- helpers ------------------------------------------------------------------------------

def R(i: int) -> dict[str, int]:
    return {"ref": i}


def S(op: str, *args: Any, **params: Any) -> dict[str, Any]:
    """A step as it comes off the wire: refs stay refs, anything else becomes a constant."""
    return {"op": op, "args": [a if isinstance(a, dict) else {"const": a} for a in args],
            "params": params}


def make_plan(steps: list[dict[str, Any]], n_inputs: int = 1) -> Plan:
    return Plan.model_validate({
        "inputs": [{"kind": "dataset", "name": f"d{i}"} for i in range(n_inputs)],
        "steps": steps,
    })


def spec_of(t: torch.Tensor) -> TensorSpec:
    return TensorSpec(shape=tuple(t.shape), dtype=dtype_name(t.dtype))


def run(steps: list[dict[str, Any]], *inputs: torch.Tensor, limit: int = MAX_ELEMENTS) -> torch.Tensor:
    """Validate then evaluate; the inferred spec must match the real output exactly."""
    plan = make_plan(steps, len(inputs))
    specs = validate(plan, [spec_of(x) for x in inputs], limit=limit)
    assert len(specs) == len(inputs) + len(steps)
    assert specs[: len(inputs)] == [spec_of(x) for x in inputs]
    out = evaluate(plan, list(inputs), limit=limit)
    assert isinstance(out, torch.Tensor)
    assert out.device.type == "cpu"
    assert specs[-1] == spec_of(out), (specs[-1], spec_of(out))
    return out


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-6, atol=1e-6)


# --- validate + evaluate vs torch -----------------------------------------------------------

Case = tuple[list[dict[str, Any]], tuple[torch.Tensor, ...], Callable[..., torch.Tensor]]

GETITEM: dict[str, Case] = {
    "int": ([S("getitem", R(0), index=[1])], (X,), lambda x: x[1]),
    "neg_int": ([S("getitem", R(0), index=[-1])], (X,), lambda x: x[-1]),
    "two_ints": ([S("getitem", R(0), index=[1, 2])], (X,), lambda x: x[1, 2]),
    "empty": ([S("getitem", R(0), index=[])], (X,), lambda x: x[()]),
    "slice_start": ([S("getitem", R(0), index=[{"start": 1}])], (X,), lambda x: x[1:]),
    "slice_full": ([S("getitem", R(0), index=[{"start": 0, "stop": 3, "step": 2}])], (X,),
                   lambda x: x[0:3:2]),
    "slice_neg_stop": ([S("getitem", R(0), index=[{"stop": -1}, {"step": 3}])], (X,),
                       lambda x: x[:-1, ::3]),
    "slice_empty": ([S("getitem", R(0), index=[{"start": 3}])], (X,), lambda x: x[3:]),
    "column": ([S("getitem", R(0), index=[{"start": None}, 0])], (X,), lambda x: x[:, 0]),
    "ellipsis": ([S("getitem", R(0), index=["...", 0])], (T3,), lambda x: x[..., 0]),
    "ellipsis_mid": ([S("getitem", R(0), index=[1, "...", {"stop": 2}])], (T3,),
                     lambda x: x[1, ..., :2]),
    "newaxis": ([S("getitem", R(0), index=["newaxis"])], (X,), lambda x: x[None]),
    "newaxis_mid": ([S("getitem", R(0), index=[{}, "newaxis", 2])], (X,), lambda x: x[:, None, 2]),
    "ellipsis_newaxis": ([S("getitem", R(0), index=["...", "newaxis"])], (X,),
                         lambda x: x[..., None]),
    "int_tensor": ([S("getitem", R(0), index=[{"step": 2}, -2])], (IX,), lambda x: x[::2, -2]),
    "bool_tensor": ([S("getitem", R(0), index=[0])], (B,), lambda x: x[0]),
}

ARITH: dict[str, Case] = {}
for _name, _fn in {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "pow": lambda a, b: a**b,
}.items():
    ARITH[f"{_name}_tt"] = ([S(_name, R(0), R(1))], (PX, Y), _fn)
    ARITH[f"{_name}_tc"] = ([S(_name, R(0), 2.5)], (PX,), lambda x, f=_fn: f(x, 2.5))
    ARITH[f"{_name}_ct"] = ([S(_name, 2.5, R(0))], (PX,), lambda x, f=_fn: f(2.5, x))
    ARITH[f"{_name}_int_tc"] = ([S(_name, R(0), 2)], (IX,), lambda x, f=_fn: f(x, 2))
    ARITH[f"{_name}_int_ct"] = ([S(_name, 3, R(0))], (IX + 1,), lambda x, f=_fn: f(3, x))
    ARITH[f"{_name}_broadcast"] = ([S(_name, R(0), R(1))], (PX, V.abs() + 1), _fn)
ARITH["mul_int_by_float"] = ([S("mul", R(0), 0.5)], (IX,), lambda x: x * 0.5)
ARITH["add_bool_const"] = ([S("add", R(0), True)], (IX,), lambda x: x + True)
ARITH["neg_const"] = ([S("sub", R(0), -1e30)], (X,), lambda x: x - -1e30)

REDUCE: dict[str, Case] = {}
for _name, _fn in {"sum": torch.sum, "mean": torch.mean, "min": torch.amin, "max": torch.amax}.items():
    REDUCE[f"{_name}_all"] = ([S(_name, R(0))], (X,), lambda x, f=_fn: f(x))
    REDUCE[f"{_name}_dim0"] = ([S(_name, R(0), dim=0)], (X,), lambda x, f=_fn: f(x, dim=0))
    REDUCE[f"{_name}_dim_neg"] = ([S(_name, R(0), dim=-1)], (T3,), lambda x, f=_fn: f(x, dim=-1))
    REDUCE[f"{_name}_keepdim"] = ([S(_name, R(0), dim=1, keepdim=True)], (X,),
                                  lambda x, f=_fn: f(x, dim=1, keepdim=True))
    REDUCE[f"{_name}_dims"] = ([S(_name, R(0), dim=[0, 2])], (T3,), lambda x, f=_fn: f(x, dim=(0, 2)))
    REDUCE[f"{_name}_dims_keep"] = ([S(_name, R(0), dim=[0, 1], keepdim=True)], (X,),
                                    lambda x, f=_fn: f(x, dim=(0, 1), keepdim=True))
for _name in ("sum", "min", "max"):
    REDUCE[f"{_name}_int"] = ([S(_name, R(0), dim=0)], (IX,),
                              lambda x, n=_name: {"sum": torch.sum, "min": torch.amin,
                                                  "max": torch.amax}[n](x, dim=0))
for _name, _fn in {"std": torch.std, "var": torch.var}.items():
    REDUCE[f"{_name}_all"] = ([S(_name, R(0))], (X,), lambda x, f=_fn: f(x))
    REDUCE[f"{_name}_dim0"] = ([S(_name, R(0), dim=0)], (X,), lambda x, f=_fn: f(x, dim=0))
    REDUCE[f"{_name}_keepdim_pop"] = ([S(_name, R(0), dim=1, keepdim=True, correction=0)], (X,),
                                      lambda x, f=_fn: f(x, dim=1, keepdim=True, correction=0))
    REDUCE[f"{_name}_dims"] = ([S(_name, R(0), dim=[1, 2])], (T3,), lambda x, f=_fn: f(x, dim=(1, 2)))
REDUCE["count_all"] = ([S("gt", R(0), 0.0), S("count", R(1))], (X,), lambda x: torch.count_nonzero(x > 0))
REDUCE["count_dim"] = ([S("gt", R(0), 0.0), S("count", R(1), dim=0)], (X,),
                       lambda x: torch.count_nonzero(x > 0, dim=0))
REDUCE["count_dims"] = ([S("count", R(0), dim=[0, 1])], (T3,),
                        lambda x: torch.count_nonzero(x, dim=(0, 1)))
REDUCE["count_int"] = ([S("count", R(0))], (IX,), lambda x: torch.count_nonzero(x))

LINALG_SHAPE: dict[str, Case] = {
    "matmul_mm": ([S("matmul", R(0), R(1))], (X, M), torch.matmul),
    "matmul_mv": ([S("matmul", R(0), R(1))], (X, V), torch.matmul),
    "matmul_vm": ([S("matmul", R(0), R(1))], (V, M), torch.matmul),
    "matmul_dot": ([S("matmul", R(0), R(1))], (V, V), torch.matmul),
    "matmul_batched": ([S("matmul", R(0), R(1))], (T3, M), torch.matmul),
    "matmul_int": ([S("matmul", R(0), R(1))], (IX, IX.T.contiguous()), torch.matmul),
    "reshape": ([S("reshape", R(0), shape=[4, 3])], (X,), lambda x: x.reshape(4, 3)),
    "reshape_flat": ([S("reshape", R(0), shape=[-1])], (X,), lambda x: x.reshape(-1)),
    "reshape_infer": ([S("reshape", R(0), shape=[2, -1, 2])], (X,), lambda x: x.reshape(2, -1, 2)),
    "reshape_scalar": ([S("getitem", R(0), index=[0, 0]), S("reshape", R(1), shape=[1, 1])], (X,),
                       lambda x: x[0, 0].reshape(1, 1)),
    "transpose": ([S("transpose", R(0))], (X,), lambda x: x.transpose(0, 1)),
    "transpose_neg": ([S("transpose", R(0), dim0=-1, dim1=0)], (T3,), lambda x: x.transpose(-1, 0)),
    "cat0": ([S("cat", R(0), R(1))], (X, Y), lambda x, y: torch.cat([x, y])),
    "cat1": ([S("cat", R(0), R(1), R(0), dim=1)], (X, Y), lambda x, y: torch.cat([x, y, x], dim=1)),
    "cat_one": ([S("cat", R(0))], (X,), lambda x: torch.cat([x])),
    "stack0": ([S("stack", R(0), R(1))], (X, Y), lambda x, y: torch.stack([x, y])),
    "stack_last": ([S("stack", R(0), R(1), dim=-1)], (X, Y), lambda x, y: torch.stack([x, y], dim=-1)),
    "cat_of_steps": ([S("neg", R(0)), S("abs", R(0)), S("cat", R(1), R(2), R(0))], (X,),
                     lambda x: torch.cat([-x, x.abs(), x])),
}

ELEMENTWISE: dict[str, Case] = {
    "abs": ([S("abs", R(0))], (X,), torch.abs),
    "abs_int": ([S("abs", R(0))], (IX - 6,), torch.abs),
    "exp": ([S("exp", R(0))], (X,), torch.exp),
    "log": ([S("log", R(0))], (PX,), torch.log),
    "log_negative_is_nan": ([S("log", R(0))], (X,), torch.log),
    "sqrt": ([S("sqrt", R(0))], (PX,), torch.sqrt),
    "sqrt_int": ([S("sqrt", R(0))], (IX,), torch.sqrt),
    "neg": ([S("neg", R(0))], (X,), torch.neg),
    "square": ([S("square", R(0))], (X,), torch.square),
    "sign": ([S("sign", R(0))], (X,), torch.sign),
    "floor": ([S("floor", R(0))], (X * 3,), torch.floor),
    "ceil": ([S("ceil", R(0))], (X * 3,), torch.ceil),
    "round": ([S("round", R(0))], (X * 3,), torch.round),
    "sigmoid": ([S("sigmoid", R(0))], (X,), torch.sigmoid),
    "tanh": ([S("tanh", R(0))], (X,), torch.tanh),
    "logical_not": ([S("logical_not", R(0))], (B,), torch.logical_not),
    "isnan": ([S("log", R(0)), S("isnan", R(1))], (X,), lambda x: torch.isnan(torch.log(x))),
    "clamp_min": ([S("clamp", R(0), min=0.0)], (X,), lambda x: torch.clamp(x, min=0.0)),
    "clamp_max": ([S("clamp", R(0), max=0.5)], (X,), lambda x: torch.clamp(x, max=0.5)),
    "clamp_both": ([S("clamp", R(0), min=-0.5, max=0.5)], (X,), lambda x: torch.clamp(x, -0.5, 0.5)),
    "where_tt": ([S("gt", R(0), 0.0), S("where", R(2), R(0), R(1))], (X, Y),
                 lambda x, y: torch.where(x > 0, x, y)),
    "where_tc": ([S("gt", R(0), 0.0), S("where", R(1), R(0), 0.0)], (X,),
                 lambda x: torch.where(x > 0, x, 0.0)),
    "where_cc": ([S("where", R(0), 1.0, -1.0)], (B,), lambda b: torch.where(b, 1.0, -1.0)),
    "where_broadcast": ([S("where", R(0), R(1), R(2))], (B, V, Y), torch.where),
    "logical_and": ([S("logical_and", R(0), R(1))], (B, Y > 0), torch.logical_and),
    "logical_or": ([S("logical_or", R(0), R(1))], (B, Y > 0), torch.logical_or),
    "histogram_bin": (
        [S("ge", R(0), -0.5), S("lt", R(0), 0.5), S("logical_and", R(1), R(2)), S("count", R(3))],
        (X,), lambda x: torch.count_nonzero((x >= -0.5) & (x < 0.5))),
    "standardize": (
        [S("mean", R(0), dim=0, keepdim=True), S("std", R(0), dim=0, keepdim=True),
         S("sub", R(0), R(1)), S("div", R(3), R(2))],
        (X,), lambda x: (x - x.mean(0, keepdim=True)) / x.std(0, keepdim=True)),
    "births_mean": ([S("getitem", R(0), index=[{"start": None}, 0]), S("mean", R(1))], (X,),
                    lambda x: x[:, 0].mean()),
}

COMPARE: dict[str, Case] = {}
for _name, _fn in {
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
}.items():
    COMPARE[f"{_name}_tt"] = ([S(_name, R(0), R(1))], (X, Y), _fn)
    COMPARE[f"{_name}_tc"] = ([S(_name, R(0), 0.25)], (X,), lambda x, f=_fn: f(x, 0.25))
    COMPARE[f"{_name}_ct"] = ([S(_name, 0.25, R(0))], (X,), lambda x, f=_fn: f(0.25, x))
    COMPARE[f"{_name}_int"] = ([S(_name, R(0), 5)], (IX,), lambda x, f=_fn: f(x, 5))
    COMPARE[f"{_name}_same"] = ([S(_name, R(0), R(0))], (X,), lambda x, f=_fn: f(x, x))

CAST: dict[str, Case] = {
    f"cast_{name}": ([S("cast", R(0), dtype=name)], (X * 10,), lambda x, d=dtype: x.to(d))
    for name, dtype in ALLOWED_DTYPES.items()
}
CAST["cast_bool_to_int"] = ([S("cast", R(0), dtype="int64")], (B,), lambda b: b.to(torch.int64))
CAST["cast_then_sum"] = ([S("cast", R(0), dtype="float64"), S("sum", R(1))], (IX,),
                         lambda x: x.to(torch.float64).sum())

ALL_CASES: dict[str, Case] = {**GETITEM, **ARITH, **REDUCE, **LINALG_SHAPE, **ELEMENTWISE,
                              **COMPARE, **CAST}


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_validate_and_evaluate_match_torch(name: str) -> None:
    steps, inputs, expected = ALL_CASES[name]
    got = run(steps, *inputs)
    assert_same(got, expected(*inputs))


def test_every_registered_op_is_exercised() -> None:
    used = {s["op"] for steps, _, _ in ALL_CASES.values() for s in steps}
    assert set(REGISTRY) <= used, sorted(set(REGISTRY) - used)


def test_evaluate_does_not_modify_inputs() -> None:
    x = X.clone()
    run([S("getitem", R(0), index=[0]), S("mul", R(1), 0.0)], x)
    assert torch.equal(x, X)


def test_validate_returns_a_spec_per_value() -> None:
    plan = make_plan([S("getitem", R(0), index=[{"start": None}, 0]), S("mean", R(1))])
    specs = validate(plan, [TensorSpec(shape=(31, 2), dtype="float32")])
    assert specs == [
        TensorSpec(shape=(31, 2), dtype="float32"),
        TensorSpec(shape=(31,), dtype="float32"),
        TensorSpec(shape=(), dtype="float32"),
    ]


def test_validate_does_not_touch_data() -> None:
    # specs far too big to allocate are validated instantly on meta tensors
    plan = make_plan([S("mul", R(0), 2.0), S("sum", R(1), dim=0)])
    big = TensorSpec(shape=(8_000, 8_000), dtype="float64")  # 512 MB if it were real
    specs = validate(plan, [big])
    assert specs[-1] == TensorSpec(shape=(8_000,), dtype="float64")


def test_plan_without_steps_returns_its_input() -> None:
    plan = make_plan([])
    assert validate(plan, [spec_of(X)]) == [spec_of(X)]
    assert torch.equal(evaluate(plan, [X]), X)


def test_plan_of_many_steps_up_to_the_maximum() -> None:
    steps = [S("neg", R(i)) for i in range(MAX_STEPS)]
    out = run(steps, X)
    assert torch.equal(out, X)  # an even number of negations


# --- inferred shapes equal real shapes (hypothesis) ----------------------------------------

small_shapes = st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=3).map(tuple)


@st.composite
def shape_and_steps(draw: st.DrawFn) -> tuple[tuple[int, ...], list[dict[str, Any]]]:
    shape = draw(small_shapes)
    nd = len(shape)
    dim = draw(st.integers(min_value=-nd, max_value=nd - 1))
    keep = draw(st.booleans())
    options = [
        [S("sum", R(0), dim=dim, keepdim=keep)],
        [S("mean", R(0), dim=dim, keepdim=keep)],
        [S("max", R(0), dim=dim, keepdim=keep)],
        [S("var", R(0), dim=dim, keepdim=keep, correction=0)],
        [S("count", R(0), dim=dim)],
        [S("sum", R(0))],
        [S("reshape", R(0), shape=[-1])],
        [S("reshape", R(0), shape=[1, *shape])],
        [S("transpose", R(0), dim0=dim, dim1=0)],
        [S("getitem", R(0), index=[{"start": draw(st.integers(-3, 3)),
                                    "step": draw(st.integers(1, 3))}])],
        [S("getitem", R(0), index=["...", draw(st.integers(-shape[-1], shape[-1] - 1))])],
        [S("getitem", R(0), index=["newaxis", "...", "newaxis"])],
        [S("cat", R(0), R(0), dim=dim)],
        [S("stack", R(0), R(0), dim=draw(st.integers(-nd - 1, nd)))],
        [S("transpose", R(0), dim0=-2 if nd > 1 else 0, dim1=-1), S("matmul", R(0), R(1))],  # x @ x.mT
        [S("gt", R(0), 0.0), S("where", R(1), R(0), 0.0), S("sum", R(2), dim=dim, keepdim=keep)],
        [S("mean", R(0), dim=dim, keepdim=True), S("sub", R(0), R(1))],
        [S("cast", R(0), dtype="int32"), S("mul", R(1), 2.5)],
    ]
    steps = draw(st.sampled_from(options))
    return shape, steps


@FAST
@given(case=shape_and_steps(), seed=st.integers(0, 2**16))
def test_inferred_specs_equal_real_outputs(case: tuple[tuple[int, ...], list[dict[str, Any]]],
                                           seed: int) -> None:
    shape, steps = case
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    run(steps, x)  # run() asserts that validate's spec equals the real output's


@FAST
@given(shape=small_shapes, data=st.data())
def test_broadcast_specs_equal_real_outputs(shape: tuple[int, ...], data: st.DataObject) -> None:
    keep = data.draw(st.integers(0, len(shape)))
    other = tuple(1 if data.draw(st.booleans()) else d for d in shape[len(shape) - keep:])
    op = data.draw(st.sampled_from(["add", "sub", "mul", "div", "lt", "eq", "logical_or"]))
    a, b = torch.randn(shape), torch.randn(other)
    out = run([S(op, R(0), R(1))], a, b)
    assert out.shape == torch.broadcast_shapes(shape, other)


# --- forbidden operations -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["os.system", "eval", "__import__", "getattr", "torch.load",
                                  "unknown_op", "exec", "torch.add", "Tensor.add", "__add__",
                                  "SUM", " sum", "numpy.sum"])
def test_forbidden_names(name: str) -> None:
    plan = make_plan([S(name, R(0))])
    with pytest.raises(ForbiddenOperation) as info:
        validate(plan, [spec_of(X)])
    assert name in info.value.message
    assert isinstance(info.value, InvalidRequest)
    with pytest.raises(ForbiddenOperation):
        evaluate(plan, [X])


def test_forbidden_name_later_in_the_plan_stops_everything() -> None:
    plan = make_plan([S("neg", R(0)), S("abs", R(1)), S("os.system", R(2))])
    with pytest.raises(ForbiddenOperation, match="os.system"):
        validate(plan, [spec_of(X)])


# --- bad parameters and arguments ------------------------------------------------------------

@pytest.mark.parametrize(
    "step,field",
    [
        (S("sum", R(0), axis=0), "axis"),
        (S("clamp", R(0), min=0.0, out="x"), "out"),
        (S("neg", R(0), inplace=True), "inplace"),
        (S("sum", R(0), dim="rows"), "dim"),
        (S("sum", R(0), dim=[0] * 9), "dim"),
        (S("mean", R(0), keepdim=[1]), "keepdim"),
        (S("std", R(0), correction=2), "correction"),
        (S("cast", R(0), dtype="complex64"), "dtype"),
        (S("cast", R(0), dtype="torch.float32"), "dtype"),
        (S("cast", R(0)), "dtype"),
        (S("reshape", R(0), shape="12"), "shape"),
        (S("reshape", R(0), shape=[-2, 6]), "shape"),
        (S("transpose", R(0), dim0=1.5), "dim0"),
        (S("getitem", R(0), index=[1.5]), "index"),
        (S("getitem", R(0), index=["..", 0]), "index"),
        (S("getitem", R(0), index=[{"step": 0}]), "index"),
        (S("getitem", R(0), index=[{"step": -1}]), "index"),
        (S("getitem", R(0), index=[{"begin": 1}]), "index"),
        (S("getitem", R(0)), "index"),
        (S("clamp", R(0), min=float("nan")), "min"),
        (S("clamp", R(0), max=float("inf")), "max"),
    ],
)
def test_bad_params_are_invalid_request(step: dict[str, Any], field: str) -> None:
    plan = make_plan([step])  # the plan itself accepts any params dict...
    with pytest.raises(InvalidRequest) as info:  # ...the op's schema refuses it
        validate(plan, [spec_of(X)])
    assert not isinstance(info.value, ForbiddenOperation)
    assert field in info.value.message
    assert step["op"] in info.value.message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_constant_is_refused_by_the_plan_model(value: float) -> None:
    data = {"inputs": [{"kind": "dataset", "name": "d"}],
            "steps": [{"op": "add", "args": [{"ref": 0}, {"const": value}]}]}
    with pytest.raises(ValidationError):
        Plan.model_validate(data)
    with pytest.raises(ValidationError):
        Const(const=value)
    assert not issubclass(ValidationError, GridError)


def test_constants_keep_their_type() -> None:
    assert type(Const(const=True).const) is bool
    assert type(Const(const=3).const) is int
    assert type(Const(const=2.5).const) is float
    out = run([S("add", R(0), 3)], IX)
    assert out.dtype == torch.int64  # an int constant does not turn ints into floats


@pytest.mark.parametrize("ref", [1, 2, 100])
def test_ref_to_a_value_not_yet_defined(ref: int) -> None:
    plan = make_plan([S("add", R(0), R(ref))])
    with pytest.raises(InvalidRequest, match=f"value {ref}"):
        validate(plan, [spec_of(X)])
    with pytest.raises(InvalidRequest):
        evaluate(plan, [X])


def test_ref_to_a_later_step() -> None:
    plan = make_plan([S("neg", R(2)), S("neg", R(0))])
    with pytest.raises(InvalidRequest, match="not defined"):
        validate(plan, [spec_of(X)])


def test_negative_ref_is_refused_by_the_model() -> None:
    with pytest.raises(ValidationError):
        make_plan([S("neg", R(-1))])


@pytest.mark.parametrize(
    "step",
    [
        S("add", R(0), R(0), R(0)),
        S("neg", R(0), R(0)),
        S("where", R(0), R(0)),
        S("matmul", R(0)),
        S("sum"),
        S("cat"),
        S("clamp", R(0), 0.0),
    ],
    ids=["add3", "neg2", "where2", "matmul1", "sum0", "cat0", "clamp2"],
)
def test_wrong_number_of_args(step: dict[str, Any]) -> None:
    plan = make_plan([step])
    with pytest.raises(InvalidRequest, match="arguments"):
        validate(plan, [spec_of(X)])


def test_more_than_sixteen_args_is_refused_by_the_model() -> None:
    with pytest.raises(ValidationError):
        make_plan([S("cat", *[R(0)] * 17)])
    assert run([S("cat", *[R(0)] * 16)], X).shape == (48, 4)


@pytest.mark.parametrize(
    "step",
    [S("add", 1.0, 2.0), S("neg", 3.0), S("matmul", R(0), 2.0), S("cat", R(0), 1.0),
     S("where", True, R(0), R(0)), S("sum", 4)],
    ids=["add", "neg", "matmul", "cat", "where", "sum"],
)
def test_constants_only_or_constant_where_a_tensor_is_needed(step: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        validate(make_plan([step]), [spec_of(X)])


@pytest.mark.parametrize(
    "steps,inputs",
    [
        ([S("matmul", R(0), R(0))], (X,)),                      # (3,4) @ (3,4)
        ([S("add", R(0), R(1))], (X, torch.zeros(2))),          # no broadcast
        ([S("getitem", R(0), index=[3])], (X,)),                # out of bounds
        ([S("getitem", R(0), index=[0, 0, 0])], (X,)),          # too many indices
        ([S("reshape", R(0), shape=[5])], (X,)),
        ([S("transpose", R(0), dim0=0, dim1=5)], (X,)),
        ([S("sum", R(0), dim=2)], (X,)),
        ([S("std", R(0), dim=[0, 0])], (X,)),
        ([S("cat", R(0), R(1), dim=1)], (X, torch.zeros(2, 4))),
        ([S("stack", R(0), R(1))], (X, torch.zeros(4, 3))),
        ([S("where", R(0), R(0), R(0))], (X,)),                 # float condition
        ([S("clamp", R(0))], (X,)),                             # neither min nor max
        ([S("min", R(0))], (torch.zeros(0),)),                  # empty reduction
    ],
)
def test_ops_that_cannot_run_are_invalid_request(steps: list[dict[str, Any]],
                                                 inputs: tuple[torch.Tensor, ...]) -> None:
    plan = make_plan(steps, len(inputs))
    with pytest.raises(InvalidRequest, match="cannot run"):
        validate(plan, [spec_of(x) for x in inputs])
    # on data, a failure may say something of the data: it names the step, the details stay in the log
    with pytest.raises(JobFailed, match=r"^step 0 \(\w+\) failed on the data; its owner's log has the details$"):
        evaluate(plan, list(inputs))


def test_input_count_must_match() -> None:
    plan = make_plan([S("add", R(0), R(1))], n_inputs=2)
    with pytest.raises(InvalidRequest, match="2 inputs"):
        validate(plan, [spec_of(X)])
    with pytest.raises(InvalidRequest):
        validate(plan, [spec_of(X)] * 3)


def test_input_dtype_must_be_allowed() -> None:
    plan = make_plan([S("neg", R(0))])
    with pytest.raises(InvalidRequest):
        validate(plan, [TensorSpec(shape=(2,), dtype="complex64")])


# --- element limits --------------------------------------------------------------------------

@pytest.mark.parametrize("n", [4, 30, 1000])
def test_outer_product_over_the_limit(n: int) -> None:
    plan = make_plan([S("matmul", R(0), R(1))], n_inputs=2)
    specs = [TensorSpec(shape=(n, 1), dtype="float32"), TensorSpec(shape=(1, n), dtype="float32")]
    assert validate(plan, specs, limit=n * n)[-1].shape == (n, n)
    with pytest.raises(LimitExceeded, match=str(n * n)):
        validate(plan, specs, limit=n * n - 1)


def test_limit_applies_to_intermediate_values() -> None:
    # the final value is small, but the step before it is not
    plan = make_plan([S("matmul", R(0), R(1)), S("sum", R(2))], n_inputs=2)
    specs = [TensorSpec(shape=(100, 1), dtype="float32"), TensorSpec(shape=(1, 100), dtype="float32")]
    with pytest.raises(LimitExceeded):
        validate(plan, specs, limit=1000)


def test_default_limit_stops_huge_outer_products_without_allocating() -> None:
    n = 1_000_000
    plan = make_plan([S("matmul", R(0), R(1))], n_inputs=2)
    specs = [TensorSpec(shape=(n, 1), dtype="float32"), TensorSpec(shape=(1, n), dtype="float32")]
    with pytest.raises(LimitExceeded):
        validate(plan, specs)


def test_limit_on_growth_by_cat_and_evaluate() -> None:
    steps = [S("cat", R(0), R(0)), S("cat", R(1), R(1)), S("cat", R(2), R(2))]
    assert run(steps, torch.ones(4), limit=32).shape == (32,)
    with pytest.raises(LimitExceeded):
        validate(make_plan(steps), [spec_of(torch.ones(4))], limit=31)
    with pytest.raises(LimitExceeded):
        evaluate(make_plan(steps), [torch.ones(4)], limit=31)


# --- the plan model ----------------------------------------------------------------------------

def test_max_steps_exceeded_is_a_validation_error() -> None:
    steps = [S("neg", R(i)) for i in range(MAX_STEPS + 1)]
    with pytest.raises(ValidationError):
        make_plan(steps)
    assert len(make_plan(steps[:MAX_STEPS]).steps) == MAX_STEPS


def test_inputs_are_bounded() -> None:
    with pytest.raises(ValidationError):
        make_plan([], n_inputs=0)
    with pytest.raises(ValidationError):
        make_plan([], n_inputs=MAX_INPUTS + 1)
    assert len(make_plan([], n_inputs=MAX_INPUTS).inputs) == MAX_INPUTS


@pytest.mark.parametrize(
    "data",
    [
        {"inputs": [{"kind": "file", "name": "/etc/passwd"}]},
        {"inputs": [{"kind": "dataset", "name": ""}]},
        {"inputs": [{"kind": "dataset", "name": "d"}], "steps": [{"op": ""}]},
        {"inputs": [{"kind": "dataset", "name": "d"}], "steps": [{"op": "x" * 129}]},
        {"inputs": [{"kind": "dataset", "name": "d"}], "steps": [{"op": "neg", "fn": "x"}]},
        {"inputs": [{"kind": "dataset", "name": "d"}], "steps": [{"op": "neg", "args": [{"x": 1}]}]},
        {"inputs": [{"kind": "dataset", "name": "d"}],
         "steps": [{"op": "neg", "params": {f"k{i}": i for i in range(17)}}]},
        {"inputs": [{"kind": "dataset", "name": "d"}], "code": "import os"},
    ],
)
def test_malformed_plans_are_validation_errors(data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Plan.model_validate(data)


def test_plan_is_frozen() -> None:
    plan = make_plan([S("neg", R(0))])
    with pytest.raises(ValidationError):
        plan.steps = []  # type: ignore[misc]


def test_plan_survives_json() -> None:
    plan = make_plan([S("getitem", R(0), index=[{"start": 1}, "...", "newaxis", 0]),
                      S("add", 2.5, R(1)), S("clamp", R(2), min=0.0), S("cast", R(3), dtype="int8")])
    again = Plan.model_validate_json(plan.model_dump_json())
    assert again == plan
    assert torch.equal(evaluate(again, [T3]), evaluate(plan, [T3]))


# --- describe ------------------------------------------------------------------------------------

def test_describe_is_readable() -> None:
    plan = Plan(inputs=[InputRef(kind="dataset", name="births")],
                steps=[Step(op="getitem", args=[Ref(ref=0)], params={"index": [{"start": None}, 0]}),
                       Step(op="mean", args=[Ref(ref=1)]),
                       Step(op="mul", args=[Const(const=2.5), Ref(ref=2)])])
    text = plan.describe()
    assert isinstance(text, str)
    for piece in ("getitem", "mean", "mul", "dataset:births", "2.5", "index="):
        assert piece in text, (piece, text)
    assert text.splitlines() == [
        "v0 = dataset:births",
        "v1 = getitem(v0, index=[{'start': None}, 0])",
        "v2 = mean(v1)",
        "v3 = mul(2.5, v2)",
    ]


def test_describe_names_objects_and_params() -> None:
    plan = make_plan([S("sum", R(0), dim=1, keepdim=True), S("add", R(1), R(2))], n_inputs=2)
    plan = plan.model_copy(update={"inputs": [InputRef(kind="dataset", name="a"),
                                              InputRef(kind="object", name="obj-7")]})
    text = plan.describe()
    assert "add(" in text and "sum(" in text
    assert "dataset:a" in text and "object:obj-7" in text
    assert "dim=1" in text and "keepdim=True" in text


def test_describe_without_steps_and_with_bad_refs() -> None:
    assert make_plan([]).describe() == "v0 = dataset:d0"
    text = make_plan([S("neg", R(5))]).describe()  # describe never raises on an invalid plan
    assert text.splitlines()[-1] == "v1 = neg(v5)"


def test_describe_grows_linearly_with_the_plan() -> None:
    steps = [S("add", R(i), R(i)) for i in range(200)]  # each step uses the last value twice
    assert len(make_plan(steps).describe()) < 200 * 40


def test_outputs_never_have_disallowed_dtypes() -> None:
    for steps, inputs, _ in ALL_CASES.values():
        out = evaluate(make_plan(steps, len(inputs)), list(inputs))
        assert out.dtype in ALLOWED_DTYPES.values()
        assert math.prod(out.shape) <= MAX_ELEMENTS


def test_a_tensor_constant_is_public_and_bounded() -> None:
    from protocol.plan import MAX_TENSOR_CONST, TensorConst

    shift = torch.tensor([[1.0, 2.0]])
    plan = Plan(inputs=[InputRef(kind="dataset", name="t")],
                steps=[Step(op="add", args=[Ref(ref=0), TensorConst.of(shift)])])
    assert validate(plan, [TensorSpec(shape=(3, 2), dtype="float32")])[-1].shape == (3, 2)
    data = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(evaluate(plan, [data]), data + shift)
    assert "tensor(shape=[1, 2], dtype=float32)" in plan.describe()
    with pytest.raises(ValidationError):
        TensorConst(shape=(MAX_TENSOR_CONST + 1,), dtype="float32", values=[0.0] * (MAX_TENSOR_CONST + 1))
    with pytest.raises(InvalidRequest, match="needs 4 values"):
        evaluate(Plan(inputs=plan.inputs, steps=[Step(op="add", args=[Ref(ref=0), TensorConst(
            shape=(2, 2), dtype="float32", values=[1.0])])]), [data])
