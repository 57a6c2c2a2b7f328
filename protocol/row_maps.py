"""The row phase of a DP release: how each allow-listed operation maps the bounds of one
row's cells, and which rows it reads (:mod:`protocol.sensitivity` walks a plan with these).

Every rule here computes one row out from one row in — its own, or the same row of another
value of the same rows (:func:`same_rows`) — with interval arithmetic on the bounds of its
cells, or refuses the step with :class:`SensitivityUnknown` saying why. The bounds they
derive are enforced when the release runs (:mod:`protocol.dp_release`), so a rule that is
too optimistic costs accuracy, never privacy; a rule that refuses what can only give
garbage (a wrapping cast, an overflow, a NaN) spares the scientist a useless release.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from protocol.codec import parse_dtype
from protocol.errors import SensitivityUnknown
from protocol.ops import (
    CastParams,
    ClampParams,
    IndexParams,
    JoinParams,
    SliceItem,
    TransposeParams,
)
from protocol.plan import TensorSpec

F64 = torch.float64


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
class Step_:
    """One step as a rule sees it."""

    number: int
    op: str
    args: list[Any]  # RowValue | Public (the walk decides the rest)
    arg_shapes: list[tuple[int, ...]]
    params: Any
    out: TensorSpec

    @property
    def where(self) -> str:
        return f"step {self.number} ({self.op})"

    def unknown(self, why: str) -> SensitivityUnknown:
        return SensitivityUnknown(f"{self.where}: {why}")



Rule = Callable[[Step_], RowValue]


def same_rows(s: Step_) -> RowValue:
    """The rows the step reads: every row argument must hold the same rows, in the same
    layout (one row in, one row out), else a row could reach another row's output."""
    rows = [a for a in s.args if isinstance(a, RowValue)]
    first = rows[0]
    for a in rows[1:]:
        if (a.dataset, a.rows) != (first.dataset, first.rows):
            raise s.unknown(f"combines rows {describe(first)} with rows {describe(a)}: a DP release computes "
                            "row by row, on the same rows of one dataset")
    return first


class HeldRows(Protocol):
    @property
    def dataset(self) -> str: ...
    @property
    def rows(self) -> range: ...


def describe(r: HeldRows) -> str:
    """Which stored rows of which dataset, as a slice: ``1:240 of births``."""
    step = f":{r.rows.step}" if r.rows.step != 1 else ""
    return f"{r.rows.start}:{r.rows.stop}{step} of {r.dataset}"



# --- rules ---------------------------------------------------------------------------------------

def _interval(x: object, s: Step_) -> tuple[torch.Tensor, torch.Tensor]:
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


def row(s: Step_, lo: torch.Tensor, hi: torch.Tensor) -> RowValue:
    r = same_rows(s)
    row_shape = tuple(s.out.shape[1:])
    return RowValue(r.dataset, r.rows, lo.expand(row_shape).clone(), hi.expand(row_shape).clone())


def _arith(op: str) -> Rule:
    def rule(s: Step_) -> RowValue:
        _rowwise(s)
        (alo, ahi), (blo, bhi) = (_interval(a, s) for a in s.args)
        if op == "add":
            return row(s, alo + blo, ahi + bhi)
        if op == "sub":
            return row(s, alo - bhi, ahi - blo)
        if op == "div":
            if ((blo <= 0) & (bhi >= 0)).any():
                raise s.unknown("division by values that may be zero; clamp the divisor away from zero first")
            blo, bhi = 1.0 / bhi, 1.0 / blo
        return row(s, *_hull([alo * blo, alo * bhi, ahi * blo, ahi * bhi]))

    return rule


def _pow(s: Step_) -> RowValue:
    base, exponent = s.args
    if not isinstance(base, RowValue) or not isinstance(exponent, Public) or exponent.value.numel() != 1:
        raise s.unknown("a DP release raises row values to a public scalar power only")
    e = float(exponent.value)
    if not (e.is_integer() and 0 <= e <= 64):
        raise s.unknown(f"a DP release raises row values to whole powers 0…64, not {e:g}")
    lo, hi = _interval(base, s)
    a, b = lo.pow(e), hi.pow(e)
    if e % 2 == 1:
        return row(s, a, b)
    low = torch.where((lo < 0) & (hi > 0), torch.zeros_like(lo), torch.minimum(a, b))
    return row(s, low, torch.maximum(a, b))


def _indicator(s: Step_) -> RowValue:
    _rowwise(s)
    zero = torch.zeros(s.out.shape[1:], dtype=F64)
    return row(s, zero, zero + 1)


def _monotone(fn: Callable[[torch.Tensor], torch.Tensor], *, domain: float | None = None) -> Rule:
    """An increasing function of each cell; ``domain``: the least input it is defined for."""

    def rule(s: Step_) -> RowValue:
        (x,) = s.args
        lo, hi = _interval(x, s)
        if domain is not None and (lo < domain).any():
            raise s.unknown(f"{s.op} of values that may be below {domain:g} (down to {float(lo.min()):.4g}) is "
                            f"not a number; clamp them to [{domain:g}, …] first")
        return row(s, fn(lo), fn(hi))

    return rule


def _neg(s: Step_) -> RowValue:
    lo, hi = _interval(s.args[0], s)
    return row(s, -hi, -lo)


def _abs(s: Step_) -> RowValue:
    lo, hi = _interval(s.args[0], s)
    low = torch.where(lo >= 0, lo, torch.where(hi <= 0, -hi, torch.zeros_like(lo)))
    return row(s, low, torch.maximum(lo.abs(), hi.abs()))


def _square(s: Step_) -> RowValue:
    return _pow(Step_(s.number, s.op, [s.args[0], Public(torch.tensor(2))], s.arg_shapes, s.params, s.out))


def _clamp(s: Step_) -> RowValue:
    p = s.params
    assert isinstance(p, ClampParams)
    lo, hi = _interval(s.args[0], s)
    low = -math.inf if p.min is None else float(p.min)
    high = math.inf if p.max is None else float(p.max)
    return row(s, lo.clamp(low, high), hi.clamp(low, high))


def _cast(s: Step_) -> RowValue:
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
        return row(s, lo, hi)
    if not finite:
        raise s.unknown(f"a cast of unbounded values to {p.dtype} wraps around; clamp them first")
    lo, hi = lo.trunc(), hi.trunc()
    info = torch.iinfo(dtype)
    if lo.min() < info.min or hi.max() > info.max:
        raise s.unknown(f"a cast to {p.dtype} wraps values within the bounds (up to "
                        f"[{float(lo.min()):.4g}, {float(hi.max()):.4g}]) around; clamp them to "
                        f"[{info.min}, {info.max}] first")
    return row(s, lo, hi)


def _where(s: Step_) -> RowValue:
    _rowwise(s)
    _cond, a, b = s.args
    (alo, ahi), (blo, bhi) = _interval(a, s), _interval(b, s)
    lo, hi = torch.broadcast_tensors(torch.minimum(alo, blo), torch.maximum(ahi, bhi))  # type: ignore[no-untyped-call]
    return row(s, lo, hi)


def _getitem(s: Step_) -> RowValue:
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


def _reshape(s: Step_) -> RowValue:
    (x,) = s.args
    assert isinstance(x, RowValue)
    if not len(x.rows) or not s.out.shape or s.out.shape[0] != len(x.rows):
        raise s.unknown("the rows must stay the first dimension: reshape each row, x.reshape(n, …)")
    return row(s, x.lo.reshape(s.out.shape[1:]), x.hi.reshape(s.out.shape[1:]))


def _transpose(s: Step_) -> RowValue:
    p = s.params
    assert isinstance(p, TransposeParams)
    (x,) = s.args
    assert isinstance(x, RowValue)
    ndim = len(s.arg_shapes[0])
    d0, d1 = p.dim0 % ndim, p.dim1 % ndim
    if 0 in (d0, d1):
        raise s.unknown("transposing the rows away from the first dimension")
    return row(s, x.lo.transpose(d0 - 1, d1 - 1), x.hi.transpose(d0 - 1, d1 - 1))


def _matmul(s: Step_) -> RowValue:
    x, w = s.args
    if not (isinstance(x, RowValue) and isinstance(w, Public) and len(s.arg_shapes[0]) >= 2 and w.value.ndim <= 2):
        raise s.unknown("matmul in a DP release multiplies each row by a public matrix (x @ W); a product over "
                        "the rows aggregates them without a known sensitivity")
    weights = w.value.to(F64)
    pos, neg = weights.clamp(min=0), weights.clamp(max=0)
    if not (torch.isfinite(x.lo).all() and torch.isfinite(x.hi).all()):
        unbounded = torch.full(s.out.shape[1:], math.inf, dtype=F64)
        return row(s, -unbounded, unbounded)
    return row(s, x.lo @ pos + x.hi @ neg, x.hi @ pos + x.lo @ neg)


def _join(stack: bool) -> Rule:
    def rule(s: Step_) -> RowValue:
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
        return row(s, join([a.lo for a in parts], dim - 1), join([a.hi for a in parts], dim - 1))

    return rule



def within_rows(s: Step_, x: RowValue, inner: tuple[int, ...], keepdim: bool) -> tuple[torch.Tensor, torch.Tensor]:
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


ROW_RULES: dict[str, Rule] = {
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
}
