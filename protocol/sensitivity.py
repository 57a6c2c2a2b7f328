"""What a differentially private release may compute, and how far one row can move it.

**The unit of privacy is one stored row of a dataset**: neighbouring datasets differ by
replacing one row with any other row within the declared bounds (dataset sizes are public).

The DP door accepts plans of one shape, the shape whose sensitivity is proven rather than
guessed::

    rows of a dataset ─▶ row-wise maps ─▶ clamp ─▶ sum | mean | count over the rows ─▶ noise ─▶ anything
                         (one row in,      (to the      (OpenDP: bounded, float-safe,      (post-processing
                          one row out)      bounds)       with their stability maps)        of noisy values)

1. **Row phase.** Each value derived from a dataset is tracked as :class:`RowValue`: which
   dataset, which of its stored rows in which order (a ``range``, composed through row
   slices), and interval bounds of every cell of one row. Every operation allowed here maps
   each row to one row on its own: elementwise arithmetic between values of the *same* rows
   or with public constants, column selection, casts, ``x @ W`` with a public ``W``,
   reductions over a row's own cells (the rules: :mod:`protocol.row_maps`). Combining
   different rows (``w[1:] * w[:-1]``), copying rows (``cat`` along the rows), reshaping
   across rows or contracting over them is refused: no row may reach a release twice.
2. **Aggregation.** ``sum``/``mean``/``count`` over the rows become :class:`Aggregate`\\ s:
   at run time each row's contribution is clamped to the bounds derived here (NaN replaced
   by the lower bound) and summed or averaged by OpenDP (:mod:`protocol.dp`), whose
   stability map gives each output cell's float-safe sensitivity. The bounds are *enforced*,
   not only derived, so overflow, wrap-around or a NaN in the row phase cannot move an
   aggregate further than its sensitivity says.
3. **Noise, then post-processing.** All aggregates are noised together (their joint L1/L2
   sensitivity per dataset: a row may reach several aggregates); every later step computes
   on noisy values only, which differential privacy allows without further cost.

Beyond that guarantee, the row phase refuses what can only give garbage: a cast that wraps
around, a step that can overflow its dtype from finite bounds, ``log``/``sqrt`` of values
that may be negative, division by values that may be zero, inverted clamps. Anything else is
:class:`SensitivityUnknown` naming the step.

    >>> from protocol.plan import InputRef, Plan, Ref, Step, TensorSpec
    >>> births = Rows("births", 100, torch.tensor([0.0, 20.0]), torch.tensor([7.0, 65.0]))
    >>> plan = Plan(inputs=[InputRef(kind="dataset", name="births")],
    ...             steps=[Step(op="getitem", args=[Ref(ref=0)], params={"index": [{}, 0]}),
    ...                    Step(op="mean", args=[Ref(ref=1)])])
    >>> round(analyse(plan, [births], [TensorSpec(shape=(100, 2), dtype="float64")]).l1, 9)
    0.07
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from protocol.codec import parse_dtype
from protocol.dp import aggregate_sensitivity
from protocol.errors import SensitivityUnknown
from protocol.interpret import constant, validate
from protocol.ops import REGISTRY, CountParams, Params, ReduceParams
from protocol.plan import Const, Plan, Ref, TensorConst, TensorSpec
from protocol.row_maps import F64, ROW_RULES, Public, RowValue, Step_, row, same_rows, within_rows


@dataclass(frozen=True)
class Rows:
    """A dataset as a DP release sees it: its name, its number of rows and the declared
    bounds of one row's cells (``±inf`` where nothing is declared)."""

    name: str
    n: int
    lo: torch.Tensor
    hi: torch.Tensor


@dataclass(frozen=True)
class Noisy:
    """Computed from aggregates: noised before it is used, so anything may follow."""


@dataclass(frozen=True)
class Aggregate:
    """A sum or mean over rows, computed by OpenDP on contributions clamped to ``lo``/``hi``."""

    step: int  # the plan step that computes it
    kind: str  # "sum" | "mean" (a count sums 0/1 indicators)
    op: str  # the plan's op: sum | mean | count
    dataset: str
    rows: int
    inner: tuple[int, ...]  # a row's own dims reduced into each contribution (dims of the full value)
    keepdim: bool
    lo: torch.Tensor  # per output cell: bounds of one row's contribution
    hi: torch.Tensor
    sensitivity: torch.Tensor  # per output cell: the most one replaced row moves it (OpenDP)


Abstract = RowValue | Public | Aggregate | Noisy


@dataclass(frozen=True)
class Analysis:
    """A plan the DP door accepts: its aggregates, the steps computed after the noise, and
    the joint sensitivity (the largest over the datasets it reads)."""

    aggregates: tuple[Aggregate, ...]
    post: frozenset[int]  # steps computed on noisy values
    l1: float
    l2: float
    size: int  # noisy values drawn

    @property
    def post_processed(self) -> bool:
        return bool(self.post)


@dataclass(frozen=True)
class RowSource:
    """Where each row of a plan's value comes from: a dataset's stored rows, each once."""

    dataset: str
    rows: range


def declared(name: str, n: int, row_shape: tuple[int, ...], bounds: Sequence[tuple[float, float]] | None) -> Rows:
    """A dataset's rows from its declared bounds (per cell of a row, or one pair for all)."""
    if bounds is None:
        full = torch.full(row_shape, math.inf, dtype=F64)
        return Rows(name, n, -full, full)
    cells = math.prod(row_shape)
    pairs = list(bounds) * cells if len(bounds) == 1 else list(bounds)
    if len(pairs) != cells:
        raise SensitivityUnknown(f"{name} declares {len(bounds)} bounds for rows of {cells} values")
    lo = torch.tensor([p[0] for p in pairs], dtype=F64).reshape(row_shape)
    hi = torch.tensor([p[1] for p in pairs], dtype=F64).reshape(row_shape)
    return Rows(name, n, lo, hi)


def analyse(plan: Plan, inputs: Sequence[Rows], specs: Sequence[TensorSpec]) -> Analysis:
    """Check that ``plan`` has the shape the DP door accepts and derive its sensitivity, or
    raise :class:`SensitivityUnknown` naming the step that breaks it. ``specs`` are the
    inputs' shapes and dtypes (as published)."""
    values, shapes = _walk(plan, inputs, specs)
    out = values[-1]
    if isinstance(out, RowValue):
        raise SensitivityUnknown("the plan releases one value per row; a DP release must aggregate over the rows "
                                 "(sum, mean, count)")
    aggregates = tuple(v for v in values if isinstance(v, Aggregate))
    post = frozenset(i - len(inputs) for i, v in enumerate(values) if isinstance(v, Noisy))
    per_dataset: dict[str, list[torch.Tensor]] = {}
    for agg in aggregates:
        per_dataset.setdefault(agg.dataset, []).append(agg.sensitivity.flatten())
    joint = [torch.cat(s) for s in per_dataset.values()]
    l1 = max((float(s.sum()) for s in joint), default=0.0)
    l2 = max((float(s.pow(2).sum().sqrt()) for s in joint), default=0.0)
    return Analysis(aggregates, post, l1, l2, sum(a.sensitivity.numel() for a in aggregates))


def row_source(plan: Plan, inputs: Sequence[Rows], specs: Sequence[TensorSpec]) -> RowSource:
    """Where the rows of ``plan``'s value come from, for DP-SGD (whose privacy unit is a
    sample): one dataset, each stored row at most once, row by row — or SensitivityUnknown."""
    values, _ = _walk(plan, inputs, specs)
    out = values[-1]
    if not isinstance(out, RowValue):
        raise SensitivityUnknown("DP-SGD trains on one row per stored row of a dataset; this plan's value is "
                                 + ("an aggregate" if isinstance(out, Aggregate | Noisy) else "not read from data"))
    return RowSource(out.dataset, out.rows)


# --- the walk --------------------------------------------------------------------------------


def datasets_only(plan: Plan) -> None:
    """A DP release reads datasets only: a kept result has no declared bounds (or rows)."""
    if any(ref.kind != "dataset" for ref in plan.inputs):
        raise SensitivityUnknown("a DP release runs on a plan over datasets: a kept result has no declared bounds; "
                                 "send the whole computation as one plan")


def _walk(plan: Plan, inputs: Sequence[Rows], specs: Sequence[TensorSpec]) -> tuple[list[Abstract], list[TensorSpec]]:
    shapes = validate(plan, specs)  # every op allowed, every shape known: the rules may trust both
    datasets_only(plan)
    values: list[Abstract] = [RowValue(r.name, range(r.n), r.lo, r.hi) for r in inputs]
    for number, step in enumerate(plan.steps):
        args: list[Abstract] = []
        arg_shapes: list[tuple[int, ...]] = []
        for a in step.args:
            if isinstance(a, Ref):
                args.append(values[a.ref])
                arg_shapes.append(tuple(shapes[a.ref].shape))
            else:
                value = _const(a)
                args.append(Public(value))
                arg_shapes.append(tuple(value.shape))
        params = REGISTRY[step.op].params.model_validate(step.params)
        s = Step_(number, step.op, args, arg_shapes, params, shapes[len(inputs) + number])
        values.append(_apply(s))
    return values, shapes


def _const(arg: Const | TensorConst) -> torch.Tensor:
    return constant(arg) if isinstance(arg, TensorConst) else torch.tensor(arg.const)


def _apply(s: Step_) -> Abstract:
    if all(isinstance(a, Public) for a in s.args):  # constants only: computed here, public
        spec = REGISTRY[s.op]
        result = spec.fn([a.value for a in s.args if isinstance(a, Public)], s.params)
        return Public(torch.as_tensor(result))
    if any(isinstance(a, Aggregate | Noisy) for a in s.args):
        if any(isinstance(a, RowValue) for a in s.args):
            raise s.unknown("row values and an aggregate cannot be combined: each row would reach the release "
                            "twice; aggregate once, at the end")
        return Noisy()
    rule = _RULES.get(s.op)
    if rule is None:
        raise s.unknown(f"{s.op!r} has no proven sensitivity; a DP release can use {', '.join(sorted(_RULES))}")
    rows = same_rows(s)
    out = rule(s)
    if isinstance(out, RowValue):
        if not s.out.shape or s.out.shape[0] != len(out.rows) or out.dataset != rows.dataset:
            raise s.unknown("the rows must stay the first dimension")
        _check_overflow(s, out)
    return out



def _check_overflow(s: Step_, out: RowValue) -> None:
    """Finite bounds in, a value beyond the dtype's range out: overflow (to inf, or wrapping).
    ``log(0)`` is −inf by definition, not by overflow: a later clamp bounds it."""
    rows = [a for a in s.args if isinstance(a, RowValue)]
    if s.op == "log" or not all(torch.isfinite(a.lo).all() and torch.isfinite(a.hi).all() for a in rows):
        return  # unbounded already: a clamp must come before the aggregate anyway
    dtype = parse_dtype(s.out.dtype)
    if dtype == torch.bool:
        return
    info: Any = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    if out.lo.numel() and (out.lo.min() < info.min or out.hi.max() > info.max or out.lo.isnan().any()):
        raise s.unknown(f"values within the bounds can overflow {s.out.dtype} here (up to "
                        f"[{float(out.lo.min()):.4g}, {float(out.hi.max()):.4g}]); clamp or scale them first")


# --- row rules -----------------------------------------------------------------------------------

def _reduce(s: Step_) -> Abstract:
    """A reduction within each row (a row map), or over the rows (an aggregate)."""
    (x,) = s.args
    assert isinstance(x, RowValue)
    p: Params = s.params
    ndim = len(s.arg_shapes[0])
    dim = p.dim if isinstance(p, ReduceParams | CountParams) else None
    keepdim = isinstance(p, ReduceParams) and p.keepdim
    dims = sorted({d % ndim for d in ([dim] if isinstance(dim, int) else dim or range(ndim))})
    inner = tuple(d for d in dims if d != 0)
    lo, hi = within_rows(s, x, inner, keepdim)
    if 0 not in dims:
        return row(s, lo, hi)
    if s.op not in ("sum", "mean", "count"):
        raise s.unknown(f"{s.op} over the rows; a DP release aggregates rows by sum, mean or count")
    if not len(x.rows):
        raise s.unknown(f"the {s.op} of no rows")
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise s.unknown(f"the values aggregated here are unbounded (up to [{float(lo.min()):.4g}, "
                        f"{float(hi.max()):.4g}]): clamp them first, or declare the dataset's bounds")
    kind = "mean" if s.op == "mean" else "sum"
    sens = torch.tensor([aggregate_sensitivity(kind, len(x.rows), float(a), float(b))
                         for a, b in zip(lo.flatten().tolist(), hi.flatten().tolist(), strict=True)],
                        dtype=F64).reshape(lo.shape)
    return Aggregate(s.number, kind, s.op, x.dataset, len(x.rows), inner, keepdim, lo, hi, sens)


_RULES: dict[str, Callable[[Step_], Abstract]] = {
    **ROW_RULES, **{op: _reduce for op in ("sum", "mean", "count", "min", "max", "std", "var")},
}
