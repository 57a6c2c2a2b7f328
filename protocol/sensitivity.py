"""Automatic sensitivity: how much can a plan's output move when one row of its dataset is
replaced by another (the neighbour relation; dataset sizes are public metadata)?

The owner declares bounds per column. The plan is walked step by step with interval
arithmetic on those bounds (no data is touched), tracking for each value one of:

* ``Rows``   — still one row per individual: ``lo``/``hi`` bound every row elementwise;
* ``Agg``    — an aggregate over rows: ``sens`` bounds how far each element can move;
* ``Public`` — a constant.

Supported: column and row selection, ``clamp`` (which also bounds unbounded columns),
arithmetic with public constants and between rows of the same data, ``abs``, comparisons
and casts (histogram-style indicators), ``sum``/``mean``/``count`` over rows, and sums or
differences of aggregates. Anything else raises :class:`SensitivityUnknown` naming the
step, so a DP release is never calibrated on a guess.

    >>> rows = Rows(n=100, lo=torch.tensor([0.0, 20.0]), hi=torch.tensor([7.0, 65.0]))
    >>> s = sensitivity(mean_of_column_0_plan, [rows])          # doctest: +SKIP
    >>> s.l1                                                    # doctest: +SKIP
    0.07
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from protocol.errors import SensitivityUnknown
from protocol.ops import REGISTRY, ClampParams, CountParams, IndexParams, ReduceParams
from protocol.plan import Const, Plan, Ref, TensorConst


@dataclass(frozen=True)
class Rows:
    n: int
    lo: torch.Tensor  # bounds of one row (shape: a row's shape), float64
    hi: torch.Tensor


@dataclass(frozen=True)
class Agg:
    sens: torch.Tensor  # per output element: the most it moves when one row is replaced


@dataclass(frozen=True)
class Public:
    value: float


Abstract = Rows | Agg | Public


@dataclass(frozen=True)
class Sensitivity:
    l1: float
    l2: float
    size: int


def rows_of(n: int, row_shape: tuple[int, ...], lo: Sequence[float] | None, hi: Sequence[float] | None) -> Rows:
    """Declared bounds of a dataset (per column, or none: unbounded until clamped)."""
    if lo is None or hi is None:
        full = torch.full(row_shape, math.inf, dtype=torch.float64)
        return Rows(n, -full, full)
    return Rows(n, torch.tensor(lo, dtype=torch.float64).reshape(row_shape),
                torch.tensor(hi, dtype=torch.float64).reshape(row_shape))


def sensitivity(plan: Plan, inputs: Sequence[Rows]) -> Sensitivity:
    values: list[Abstract] = list(inputs)
    for number, step in enumerate(plan.steps):
        where = f"step {number} ({step.op})"
        rule = _RULES.get(step.op)
        if rule is None:
            raise SensitivityUnknown(f"{where}: the sensitivity of {step.op!r} is not known; a DP release can "
                                     f"use {', '.join(sorted(_RULES))}")
        args: list[Abstract] = [values[a.ref] if isinstance(a, Ref) else _public(where, a) for a in step.args]
        params = REGISTRY[step.op].params.model_validate(step.params)
        values.append(rule(where, args, params))
    out = values[-1]
    if isinstance(out, Rows):
        raise SensitivityUnknown("the plan releases one value per row; a DP release must aggregate over the rows "
                                 "(sum, mean, count)")
    if isinstance(out, Public):
        return Sensitivity(0.0, 0.0, 1)
    if not torch.isfinite(out.sens).all():
        raise SensitivityUnknown("the result is unbounded: clamp the columns first, or declare their bounds")
    return Sensitivity(float(out.sens.sum()), float(out.sens.pow(2).sum().sqrt()), out.sens.numel())


# --- rules -----------------------------------------------------------------------------------

def _public(where: str, const: Const | TensorConst) -> Public:
    if isinstance(const, Const):
        return Public(float(const.const))
    values = set(const.values)
    if len(values) > 1:
        raise _unknown(where, "a DP release combines rows with scalar constants only; this tensor constant "
                              "varies (it may still be used in a plan released raw or kept)")
    return Public(float(values.pop()) if values else 0.0)


def _unknown(where: str, why: str) -> SensitivityUnknown:
    return SensitivityUnknown(f"{where}: {why}")


def _interval(op: str, a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    (alo, ahi), (blo, bhi) = a, b
    if op == "add":
        return alo + blo, ahi + bhi
    if op == "sub":
        return alo - bhi, ahi - blo
    corners = torch.stack([alo * blo, alo * bhi, ahi * blo, ahi * bhi]).nan_to_num(0.0)
    return corners.amin(0), corners.amax(0)


def _bounds(x: Rows | Public) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(x, Rows):
        return x.lo, x.hi
    c = torch.tensor(x.value, dtype=torch.float64)
    return c, c


def _arith(op: str) -> Callable[[str, list[Abstract], object], Abstract]:
    def rule(where: str, args: list[Abstract], _p: object) -> Abstract:
        a, b = args
        if isinstance(a, Public) and isinstance(b, Public):
            return Public(float(_PY[op](a.value, b.value)))
        if op == "pow":
            raise _unknown(where, "powers are not bounded here; use mul")
        if op == "div":
            if isinstance(b, Public) and b.value != 0:
                return _scale(where, a, 1.0 / b.value)
            raise _unknown(where, "division is supported by a non-zero public constant only")
        if isinstance(a, Rows) or isinstance(b, Rows):
            if isinstance(a, Agg) or isinstance(b, Agg):
                raise _unknown(where, "row values and aggregates cannot be combined")
            counts = {x.n for x in (a, b) if isinstance(x, Rows)}
            if len(counts) > 1:
                raise _unknown(where, "rows of different sizes cannot be combined row by row")
            lo, hi = _interval(op, _bounds(a), _bounds(b))
            return Rows(counts.pop(), lo, hi)
        if op in ("add", "sub"):
            if isinstance(a, Agg) and isinstance(b, Agg):
                return Agg(a.sens + b.sens)  # triangle inequality
            return a if isinstance(a, Agg) else b  # shifted by a public constant
        if op == "mul" and isinstance(b, Public):
            return _scale(where, a, b.value)
        if op == "mul" and isinstance(a, Public):
            return _scale(where, b, a.value)
        raise _unknown(where, f"{op} of two aggregates is not bounded (they combine only by + and −)")

    return rule


_PY: dict[str, Callable[[float, float], float]] = {
    "add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y,
    "div": lambda x, y: x / y, "pow": lambda x, y: x ** y,
}


def _scale(where: str, a: Abstract, c: float) -> Abstract:
    if isinstance(a, Agg):
        return Agg(a.sens * abs(c))
    if isinstance(a, Rows):
        lo, hi = a.lo * c, a.hi * c
        return Rows(a.n, torch.minimum(lo, hi), torch.maximum(lo, hi))
    raise _unknown(where, "nothing to scale")


def _compare(where: str, args: list[Abstract], _p: object) -> Abstract:
    rows = [a for a in args if isinstance(a, Rows)]
    if len(rows) != 1 or not all(isinstance(a, Rows | Public) for a in args):
        raise _unknown(where, "comparisons are supported between row values and public constants")
    return Rows(rows[0].n, torch.zeros_like(rows[0].lo), torch.ones_like(rows[0].hi))  # an indicator


def _clamp(where: str, args: list[Abstract], p: object) -> Abstract:
    assert isinstance(p, ClampParams)
    (a,) = args
    lo = -math.inf if p.min is None else float(p.min)
    hi = math.inf if p.max is None else float(p.max)
    if isinstance(a, Rows):
        return Rows(a.n, a.lo.clamp(lo, hi), a.hi.clamp(lo, hi))
    if isinstance(a, Agg):
        return Agg(torch.minimum(a.sens, torch.tensor(hi - lo, dtype=torch.float64)))
    return Public(min(max(a.value, lo), hi))


def _abs(where: str, args: list[Abstract], _p: object) -> Abstract:
    (a,) = args
    if isinstance(a, Rows):
        lo = torch.where(a.lo >= 0, a.lo, torch.where(a.hi <= 0, -a.hi, torch.zeros_like(a.lo)))
        hi = torch.maximum(a.lo.abs(), a.hi.abs())
        return Rows(a.n, lo, hi)
    if isinstance(a, Agg):
        return a  # | |x| - |y| | ≤ |x - y|
    return Public(abs(a.value))


def _neg(where: str, args: list[Abstract], p: object) -> Abstract:
    return _scale(where, args[0], -1.0) if not isinstance(args[0], Public) else Public(-args[0].value)


def _cast(where: str, args: list[Abstract], _p: object) -> Abstract:
    return args[0]


def _getitem(where: str, args: list[Abstract], p: object) -> Abstract:
    assert isinstance(p, IndexParams)
    (a,) = args
    index = p.to_torch()
    if isinstance(a, Agg):
        return Agg(a.sens[index])
    if not isinstance(a, Rows):
        raise _unknown(where, "indexing a constant")
    first, rest = (index[0], index[1:]) if index else (slice(None), ())
    if not isinstance(first, slice):
        raise _unknown(where, "selecting single rows is a per-person release; select columns or slices of rows")
    rows = len(range(*first.indices(a.n)))
    return Rows(rows, a.lo[rest] if rest else a.lo, a.hi[rest] if rest else a.hi)


def _over_rows(dim: int | list[int] | None, ndim: int) -> tuple[bool, list[int]]:
    dims = list(range(ndim)) if dim is None else [dim] if isinstance(dim, int) else list(dim)
    dims = [d % ndim for d in dims]
    return 0 in dims, [d - 1 for d in dims if d != 0]


def _reduce(kind: str) -> Callable[[str, list[Abstract], object], Abstract]:
    def rule(where: str, args: list[Abstract], p: object) -> Abstract:
        (a,) = args
        dim = p.dim if isinstance(p, ReduceParams | CountParams) else None
        keepdim = p.keepdim if isinstance(p, ReduceParams) else False
        if not isinstance(a, Rows):
            raise _unknown(where, f"{kind} of an aggregate; aggregate the rows once")
        across_rows, inner = _over_rows(dim, a.lo.ndim + 1)
        lo, hi = (torch.zeros_like(a.lo), torch.ones_like(a.hi)) if kind == "count" else (a.lo, a.hi)
        if inner:
            cells = math.prod(a.lo.shape[d] for d in inner)
            lo, hi = lo.sum(dim=inner, keepdim=keepdim), hi.sum(dim=inner, keepdim=keepdim)
            if kind == "mean":
                lo, hi = lo / cells, hi / cells
        if not across_rows:
            return Rows(a.n, lo, hi)
        width = hi - lo
        if kind == "mean":
            if a.n == 0:
                raise _unknown(where, "the mean of no rows")
            width = width / a.n
        return Agg(width.unsqueeze(0) if keepdim else width)

    return rule


_RULES: dict[str, Callable[[str, list[Abstract], object], Abstract]] = {
    **{op: _arith(op) for op in ("add", "sub", "mul", "div", "pow")},
    **{op: _compare for op in ("eq", "ne", "lt", "le", "gt", "ge")},
    "clamp": _clamp, "abs": _abs, "neg": _neg, "cast": _cast, "getitem": _getitem,
    "sum": _reduce("sum"), "mean": _reduce("mean"), "count": _reduce("count"),
}
