"""Declared bounds are a contract: every value of a published dataset lies within them.

DP releases take their sensitivity from the declared bounds, so a value outside them
(or a NaN, which no bound contains) would let a release reveal more than its ε says: a
DP sum came back 1098.5 where in-bound data could not exceed 100.5. :func:`enforce`
checks a table at publish, and clamps it when its owner says so; :func:`outside` is the
same check, run again when the node loads the stored file for a job.

    >>> table = torch.tensor([[3.0, 50.0], [9.0, 51.0]])
    >>> outside(table, [(0.0, 7.0), (20.0, 65.0)], ["weight", "height"])[0].describe()
    "column 'weight': 1 value outside the declared [0, 7] (values seen: 3 to 9)"
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from protocol.codec import dtype_name
from protocol.errors import InvalidRequest
from workers.config import Bounds

Pairs = list[tuple[float, float]]


@dataclass(frozen=True)
class Outside:
    """One column's values outside its declared bounds: for its owner's eyes only (it
    tells about the values)."""

    column: str
    count: int  # values outside the bounds, NaN included
    nan: int
    seen: tuple[float, float] | None  # the column's smallest and largest value (None: every value is NaN)
    declared: tuple[float, float]

    def describe(self) -> str:
        lo, hi = self.declared
        what = f"{self.count} value{'s' if self.count != 1 else ''} outside the declared [{_num(lo)}, {_num(hi)}]"
        if self.nan:
            what += f" ({self.nan} of them NaN)"
        seen = f"{_num(self.seen[0])} to {_num(self.seen[1])}" if self.seen else "only NaN"
        return f"{self.column}: {what} (values seen: {seen})"


def declared_pairs(bounds: Bounds | None, columns: list[str], dataset: str) -> Pairs | None:
    """Declared bounds as one (lo, hi) per column, or a single pair for every value."""
    if bounds is None:
        return None
    if isinstance(bounds, dict):
        unknown = set(bounds) - set(columns)
        missing = [c for c in columns if c not in bounds]
        if unknown or missing:
            raise InvalidRequest(f"bounds of {dataset!r} must name every column {columns} and no other "
                                 f"(unknown: {sorted(unknown)}, missing: {missing})")
        pairs = [tuple(bounds[c]) for c in columns]
    else:
        pairs = [tuple(bounds)]
    for lo, hi in pairs:
        if not lo <= hi:  # also refuses a NaN bound
            raise InvalidRequest(f"bounds of {dataset!r}: lower bound {lo} is above upper bound {hi}")
    return [(float(lo), float(hi)) for lo, hi in pairs]


def outside(tensor: torch.Tensor, pairs: Pairs, columns: Sequence[str] = ()) -> list[Outside]:
    """The columns with values outside their bounds (NaN is outside every bound), compared
    exactly (in float64) and vectorised: one pass over the table."""
    values, lo, hi = _columns(tensor, pairs)
    if values.numel() == 0:
        return []
    nan = values.isnan()
    out = ~((values >= lo) & (values <= hi))
    counts, nans = out.sum(0).tolist(), nan.sum(0).tolist()
    smallest = torch.where(nan, math.inf, values).amin(0).tolist()
    largest = torch.where(nan, -math.inf, values).amax(0).tolist()
    found = []
    for i, count in enumerate(counts):
        if count:
            seen = None if nans[i] == values.shape[0] else (smallest[i], largest[i])
            found.append(Outside(_label(i, pairs, columns), count, nans[i], seen, pairs[i]))
    return found


def enforce(dataset: str, tensor: torch.Tensor, pairs: Pairs | None, columns: Sequence[str] = (),
            clamp: bool = False) -> tuple[torch.Tensor, int]:
    """The table as it may be published, and how many values were clamped: a table with
    values outside its bounds is refused (its owner reads why), or clamped to them if its
    owner asked; NaN is refused either way (no bound says where it belongs), and so are NaN
    and infinities in a table without bounds."""
    if pairs is None:
        if clamp:
            raise InvalidRequest(f"{dataset!r}: clamp=True clamps to the declared bounds, and none are declared")
        _finite(dataset, tensor, columns)
        return tensor, 0
    found = outside(tensor, pairs, columns)
    if not found:
        return tensor, 0
    with_nan = [o for o in found if o.nan]
    if with_nan:
        raise InvalidRequest(
            f"{dataset!r} holds NaN, which no bound contains and clamping cannot place: "
            f"{'; '.join(o.describe() for o in with_nan)}. Remove or fill the missing values, then publish again")
    if not clamp:
        raise InvalidRequest(
            f"{dataset!r} has values outside its declared bounds, which DP releases rest on: "
            f"{'; '.join(o.describe() for o in found)}. Publish with clamp=True to clamp them to the bounds "
            "(recorded at the node), or fix the bounds or the data")
    clamped = _clamp(tensor, pairs)
    if outside(clamped, pairs, columns):  # a bound the dtype cannot hold, e.g. 0.5 for integers
        raise InvalidRequest(f"{dataset!r}: clamped values stored as {dtype_name(tensor.dtype)} still fall outside "
                             "the declared bounds; declare bounds that this dtype holds exactly")
    return clamped, sum(o.count for o in found)


def _finite(dataset: str, tensor: torch.Tensor, columns: Sequence[str]) -> None:
    """A table without declared bounds must still hold numbers: NaN is a missing value and
    ±inf an overflow, and either makes every sum, mean or model trained on the table NaN or
    infinite — as OpenDP's aggregates refuse NaN domains, the node refuses them at the door
    (with bounds, ``clamp=True`` may clamp an infinity; NaN is refused there too)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    bad = ~tensor.isfinite()
    if not bool(bad.any()):
        return
    if tensor.ndim == 2 and len(columns) == tensor.shape[1]:
        counts = bad.sum(0).tolist()
        where = "; ".join(f"column {c!r}: {n}" for c, n in zip(columns, counts, strict=True) if n)
    else:
        where = f"{int(bad.sum())} of {tensor.numel()} values"
    nan = int(tensor.isnan().sum())
    raise InvalidRequest(
        f"{dataset!r} holds NaN or infinite values ({where}; {nan} NaN, {int(bad.sum()) - nan} infinite), which "
        "make every aggregate of the table NaN or infinite. Remove or fill the missing values (for infinities, "
        "declare bounds and publish with clamp=True to clamp them), then publish again")


def _clamp(tensor: torch.Tensor, pairs: Pairs) -> torch.Tensor:
    values, lo, hi = _columns(tensor, pairs)
    return values.clamp(min=lo, max=hi).to(tensor.dtype).reshape(tensor.shape)


def _columns(tensor: torch.Tensor, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The values as float64 columns (rows × one column per pair; one column of every value
    for a single pair) and the bounds as rows to compare them with."""
    if len(pairs) == 1:
        values = tensor.reshape(-1, 1)
    else:
        if tensor.ndim < 1 or math.prod(tensor.shape[1:]) != len(pairs):
            raise InvalidRequest(f"{len(pairs)} bounds declared for rows of shape {tuple(tensor.shape[1:])}")
        values = tensor.reshape(tensor.shape[0], len(pairs))
    lo = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    hi = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    return values.to(torch.float64), lo, hi


def _num(x: float) -> str:
    """A value as its owner would write it, to the last digit (float32's 0.1 is not 0.1)."""
    return repr(x).removesuffix(".0")


def _label(i: int, pairs: Pairs, columns: Sequence[str]) -> str:
    if len(columns) == len(pairs):
        return f"column {columns[i]!r}"
    return "every value" if len(pairs) == 1 else f"column {i}"
