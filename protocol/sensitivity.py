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
   reductions over a row's own cells. Combining different rows (``w[1:] * w[:-1]``),
   copying rows (``cat`` along the rows), reshaping across rows or contracting over them is
   refused: no row may reach a release twice.
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
from protocol.ops import (
    REGISTRY,
    CastParams,
    ClampParams,
    CountParams,
    IndexParams,
    JoinParams,
    Params,
    ReduceParams,
    SliceItem,
    TransposeParams,
)
from protocol.plan import Const, Plan, Ref, TensorConst, TensorSpec

F64 = torch.float64


@dataclass(frozen=True)
class Rows:
    """A dataset as a DP release sees it: its name, its number of rows and the declared
    bounds of one row's cells (``±inf`` where nothing is declared)."""

    name: str
    n: int
    lo: torch.Tensor
    hi: torch.Tensor


@dataclass(frozen=True)
class RowValue:
    """One row out per stored row in: ``rows`` are the dataset's rows it holds, in order."""

    dataset: str
    rows: range
    lo: torch.Tensor  # bounds of one row's cells, float64
    hi: torch.Tensor


@dataclass(frozen=True)
class Public:
    value: torch.Tensor


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

Rule = Callable[["Step_"], Abstract]


@dataclass(frozen=True)
class Step_:
    """One step as a rule sees it."""

    number: int
    op: str
    args: list[Abstract]
    arg_shapes: list[tuple[int, ...]]
    params: Any
    out: TensorSpec

    @property
    def where(self) -> str:
        return f"step {self.number} ({self.op})"

    def unknown(self, why: str) -> SensitivityUnknown:
        return SensitivityUnknown(f"{self.where}: {why}")


def _walk(plan: Plan, inputs: Sequence[Rows], specs: Sequence[TensorSpec]) -> tuple[list[Abstract], list[TensorSpec]]:
    shapes = validate(plan, specs)  # every op allowed, every shape known: the rules may trust both
    if any(ref.kind != "dataset" for ref in plan.inputs):
        raise SensitivityUnknown("a DP release runs on a plan over datasets: a kept result has no declared bounds; "
                                 "send the whole computation as one plan")
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
    rows = _same_rows(s)
    out = rule(s)
    if isinstance(out, RowValue):
        if not s.out.shape or s.out.shape[0] != len(out.rows) or out.dataset != rows.dataset:
            raise s.unknown("the rows must stay the first dimension")
        _check_overflow(s, out)
    return out


def _same_rows(s: Step_) -> RowValue:
    """The rows the step reads: every row argument must hold the same rows, in the same
    layout (one row in, one row out), else a row could reach another row's output."""
    rows = [a for a in s.args if isinstance(a, RowValue)]
    first = rows[0]
    for a in rows[1:]:
        if (a.dataset, a.rows) != (first.dataset, first.rows):
            raise s.unknown(f"combines rows {_describe(first)} with rows {_describe(a)}: a DP release computes "
                            "row by row, on the same rows of one dataset")
    return first


def _describe(r: RowValue) -> str:
    step = f":{r.rows.step}" if r.rows.step != 1 else ""
    return f"{r.rows.start}:{r.rows.stop}{step} of {r.dataset}"


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

def _interval(x: Abstract, s: Step_) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of an argument as a row sees it: a constant with a dimension along the rows
    contributes its range over them."""
    if isinstance(x, RowValue):
        return x.lo, x.hi
    assert isinstance(x, Public)
    v = x.value.to(F64)
    if v.ndim == len(s.out.shape):
        return v.amin(0), v.amax(0)
    return v, v


def _rowwise(s: Step_) -> None:
    """Every row argument must have the full dimensions of the result (no row broadcast
    against a row's cells)."""
    for a, shape in zip(s.args, s.arg_shapes, strict=True):
        if isinstance(a, RowValue) and len(shape) != len(s.out.shape):
            raise s.unknown(f"a value of shape {list(shape)} is broadcast to {list(s.out.shape)}, across rows")


def _hull(corners: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    stacked = torch.stack(torch.broadcast_tensors(*corners))  # type: ignore[no-untyped-call]
    lo, hi = stacked.amin(0), stacked.amax(0)
    unknown = stacked.isnan().any(0)  # inf · 0, inf − inf: no bound
    return lo.masked_fill(unknown, -math.inf), hi.masked_fill(unknown, math.inf)


def _row(s: Step_, lo: torch.Tensor, hi: torch.Tensor) -> RowValue:
    r = _same_rows(s)
    row_shape = tuple(s.out.shape[1:])
    return RowValue(r.dataset, r.rows, lo.expand(row_shape).clone(), hi.expand(row_shape).clone())


def _arith(op: str) -> Rule:
    def rule(s: Step_) -> Abstract:
        _rowwise(s)
        (alo, ahi), (blo, bhi) = (_interval(a, s) for a in s.args)
        if op == "add":
            return _row(s, alo + blo, ahi + bhi)
        if op == "sub":
            return _row(s, alo - bhi, ahi - blo)
        if op == "div":
            if ((blo <= 0) & (bhi >= 0)).any():
                raise s.unknown("division by values that may be zero; clamp the divisor away from zero first")
            blo, bhi = 1.0 / bhi, 1.0 / blo
        return _row(s, *_hull([alo * blo, alo * bhi, ahi * blo, ahi * bhi]))

    return rule


def _pow(s: Step_) -> Abstract:
    base, exponent = s.args
    if not isinstance(base, RowValue) or not isinstance(exponent, Public) or exponent.value.numel() != 1:
        raise s.unknown("a DP release raises row values to a public scalar power only")
    e = float(exponent.value)
    if not (e.is_integer() and 0 <= e <= 64):
        raise s.unknown(f"a DP release raises row values to whole powers 0…64, not {e:g}")
    lo, hi = _interval(base, s)
    a, b = lo.pow(e), hi.pow(e)
    if e % 2 == 1:
        return _row(s, a, b)
    low = torch.where((lo < 0) & (hi > 0), torch.zeros_like(lo), torch.minimum(a, b))
    return _row(s, low, torch.maximum(a, b))


def _indicator(s: Step_) -> Abstract:
    _rowwise(s)
    zero = torch.zeros(s.out.shape[1:], dtype=F64)
    return _row(s, zero, zero + 1)


def _monotone(fn: Callable[[torch.Tensor], torch.Tensor], *, domain: float | None = None) -> Rule:
    """An increasing function of each cell; ``domain``: the least input it is defined for."""

    def rule(s: Step_) -> Abstract:
        (x,) = s.args
        lo, hi = _interval(x, s)
        if domain is not None and (lo < domain).any():
            raise s.unknown(f"{s.op} of values that may be below {domain:g} (down to {float(lo.min()):.4g}) is "
                            f"not a number; clamp them to [{domain:g}, …] first")
        return _row(s, fn(lo), fn(hi))

    return rule


def _neg(s: Step_) -> Abstract:
    lo, hi = _interval(s.args[0], s)
    return _row(s, -hi, -lo)


def _abs(s: Step_) -> Abstract:
    lo, hi = _interval(s.args[0], s)
    low = torch.where(lo >= 0, lo, torch.where(hi <= 0, -hi, torch.zeros_like(lo)))
    return _row(s, low, torch.maximum(lo.abs(), hi.abs()))


def _square(s: Step_) -> Abstract:
    return _pow(Step_(s.number, s.op, [s.args[0], Public(torch.tensor(2))], s.arg_shapes, s.params, s.out))


def _clamp(s: Step_) -> Abstract:
    p = s.params
    assert isinstance(p, ClampParams)
    lo, hi = _interval(s.args[0], s)
    low = -math.inf if p.min is None else float(p.min)
    high = math.inf if p.max is None else float(p.max)
    return _row(s, lo.clamp(low, high), hi.clamp(low, high))


def _cast(s: Step_) -> Abstract:
    p = s.params
    assert isinstance(p, CastParams)
    lo, hi = _interval(s.args[0], s)
    dtype = parse_dtype(p.dtype)
    if dtype == torch.bool:
        return _indicator(s)
    finite = bool(torch.isfinite(lo).all() and torch.isfinite(hi).all())
    if dtype.is_floating_point:
        top = torch.finfo(dtype).max
        if finite and (lo.min() < -top or hi.max() > top):
            raise s.unknown(f"a cast to {p.dtype} overflows values within the bounds (up to "
                            f"[{float(lo.min()):.4g}, {float(hi.max()):.4g}]); scale or clamp them first")
        return _row(s, lo, hi)
    if not finite:
        raise s.unknown(f"a cast of unbounded values to {p.dtype} wraps around; clamp them first")
    lo, hi = lo.trunc(), hi.trunc()
    info = torch.iinfo(dtype)
    if lo.min() < info.min or hi.max() > info.max:
        raise s.unknown(f"a cast to {p.dtype} wraps values within the bounds (up to "
                        f"[{float(lo.min()):.4g}, {float(hi.max()):.4g}]) around; clamp them to "
                        f"[{info.min}, {info.max}] first")
    return _row(s, lo, hi)


def _where(s: Step_) -> Abstract:
    _rowwise(s)
    _cond, a, b = s.args
    (alo, ahi), (blo, bhi) = _interval(a, s), _interval(b, s)
    lo, hi = torch.broadcast_tensors(torch.minimum(alo, blo), torch.maximum(ahi, bhi))  # type: ignore[no-untyped-call]
    return _row(s, lo, hi)


def _getitem(s: Step_) -> Abstract:
    p = s.params
    assert isinstance(p, IndexParams)
    (x,) = s.args
    assert isinstance(x, RowValue)
    first, rest = (p.index[0], p.index[1:]) if p.index else (SliceItem(), [])
    if first == "..." and not rest:
        return x
    if not isinstance(first, SliceItem):
        raise s.unknown("a DP release selects rows by slices (x[a:b], x[:, j]), not single rows, a new axis or "
                        "'…' before the rows")
    rows = x.rows[slice(first.start, first.stop, first.step)]
    index = IndexParams(index=rest).to_torch()
    return RowValue(x.dataset, rows, x.lo[index], x.hi[index])


def _reshape(s: Step_) -> Abstract:
    (x,) = s.args
    assert isinstance(x, RowValue)
    if not len(x.rows) or not s.out.shape or s.out.shape[0] != len(x.rows):
        raise s.unknown("the rows must stay the first dimension: reshape each row, x.reshape(n, …)")
    return _row(s, x.lo.reshape(s.out.shape[1:]), x.hi.reshape(s.out.shape[1:]))


def _transpose(s: Step_) -> Abstract:
    p = s.params
    assert isinstance(p, TransposeParams)
    (x,) = s.args
    assert isinstance(x, RowValue)
    ndim = len(s.arg_shapes[0])
    d0, d1 = p.dim0 % ndim, p.dim1 % ndim
    if 0 in (d0, d1):
        raise s.unknown("transposing the rows away from the first dimension")
    return _row(s, x.lo.transpose(d0 - 1, d1 - 1), x.hi.transpose(d0 - 1, d1 - 1))


def _matmul(s: Step_) -> Abstract:
    x, w = s.args
    if not (isinstance(x, RowValue) and isinstance(w, Public) and len(s.arg_shapes[0]) >= 2 and w.value.ndim <= 2):
        raise s.unknown("matmul in a DP release multiplies each row by a public matrix (x @ W); a product over "
                        "the rows aggregates them without a known sensitivity")
    weights = w.value.to(F64)
    pos, neg = weights.clamp(min=0), weights.clamp(max=0)
    if not (torch.isfinite(x.lo).all() and torch.isfinite(x.hi).all()):
        unbounded = torch.full(s.out.shape[1:], math.inf, dtype=F64)
        return _row(s, -unbounded, unbounded)
    return _row(s, x.lo @ pos + x.hi @ neg, x.hi @ pos + x.lo @ neg)


def _join(stack: bool) -> Rule:
    def rule(s: Step_) -> Abstract:
        p = s.params
        assert isinstance(p, JoinParams)
        if not all(isinstance(a, RowValue) for a in s.args):
            raise s.unknown("a DP release joins row values of the same rows only, not constants")
        ndim = len(s.out.shape)
        dim = p.dim % ndim
        if dim == 0:
            raise s.unknown("joining along the rows copies rows; a row may reach a DP release once")
        parts = [a for a in s.args if isinstance(a, RowValue)]
        join = torch.stack if stack else torch.cat
        return _row(s, join([a.lo for a in parts], dim - 1), join([a.hi for a in parts], dim - 1))

    return rule


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
    lo, hi = _within_rows(s, x, inner, keepdim)
    if 0 not in dims:
        return _row(s, lo, hi)
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


def _within_rows(s: Step_, x: RowValue, inner: tuple[int, ...], keepdim: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of each row's reduction over its own dims ``inner`` (of the full value)."""
    lo, hi = x.lo, x.hi
    if s.op == "count":
        lo, hi = torch.zeros_like(lo), torch.ones_like(hi)
    if s.op in ("std", "var"):
        raise s.unknown(f"{s.op} has no proven sensitivity here; release a sum of squares and a sum instead")
    if not inner:
        return lo, hi
    row_dims = [d - 1 for d in inner]
    if s.op in ("min", "max"):
        reduce = torch.amin if s.op == "min" else torch.amax
        return reduce(lo, row_dims, keepdim), reduce(hi, row_dims, keepdim)
    lo, hi = lo.sum(row_dims, keepdim), hi.sum(row_dims, keepdim)
    if s.op == "mean":
        cells = math.prod(s.arg_shapes[0][d] for d in inner)
        lo, hi = lo / cells, hi / cells
    return lo, hi


_RULES: dict[str, Rule] = {
    **{op: _arith(op) for op in ("add", "sub", "mul", "div")},
    **{op: _indicator for op in ("eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not",
                                 "isnan")},
    "pow": _pow, "square": _square, "neg": _neg, "abs": _abs, "clamp": _clamp, "cast": _cast, "where": _where,
    "exp": _monotone(torch.exp), "sigmoid": _monotone(torch.sigmoid), "tanh": _monotone(torch.tanh),
    "floor": _monotone(torch.floor), "ceil": _monotone(torch.ceil), "round": _monotone(torch.round),
    "sign": _monotone(torch.sign), "log": _monotone(torch.log, domain=0.0),
    "sqrt": _monotone(torch.sqrt, domain=0.0),
    "getitem": _getitem, "reshape": _reshape, "transpose": _transpose, "matmul": _matmul,
    "cat": _join(stack=False), "stack": _join(stack=True),
    **{op: _reduce for op in ("sum", "mean", "count", "min", "max", "std", "var")},
}
