"""Running a plan through the DP door, as :mod:`protocol.sensitivity` analysed it:

1. the row phase runs as any plan does (:func:`protocol.interpret.run_step`);
2. each aggregate takes every row's contribution, replaces NaN by the lower bound, and has
   OpenDP clamp it to the analysed bounds and sum or average it over the rows
   (:func:`protocol.dp.bounded_aggregate`) — the computation whose stability was proven;
3. all aggregates are noised together, once (``noise``: the calibrated mechanism);
4. the remaining steps run on the noisy values only.

    >>> value = run_release(plan, inputs, analysis, lambda v: add_noise(v, charge))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from protocol.dp import bounded_aggregate
from protocol.interpret import run_step
from protocol.ops import Value
from protocol.plan import Plan, Ref
from protocol.sensitivity import Aggregate, Analysis


def run_release(plan: Plan, inputs: Sequence[torch.Tensor], analysis: Analysis,
                noise: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The released value of ``plan`` on ``inputs`` (float64 where it is noisy)."""
    first = len(inputs)
    aggregates = {a.step: a for a in analysis.aggregates}
    values: list[Value | None] = list(inputs)
    for number, step in enumerate(plan.steps):
        if number in analysis.post:
            values.append(None)  # computed once the aggregates are noised
        elif number in aggregates:
            (arg,) = step.args
            assert isinstance(arg, Ref)
            x = values[arg.ref]
            assert isinstance(x, torch.Tensor)
            values.append(aggregate(aggregates[number], x))
        else:
            values.append(run_step(step, number, values))
    if analysis.aggregates:
        exact = [values[first + a.step] for a in analysis.aggregates]
        flat = torch.cat([v.flatten() for v in exact if isinstance(v, torch.Tensor)])
        noisy = noise(flat).split([v.numel() for v in exact if isinstance(v, torch.Tensor)])  # type: ignore[no-untyped-call]
        for a, v, n in zip(analysis.aggregates, exact, noisy, strict=True):
            assert isinstance(v, torch.Tensor)
            values[first + a.step] = n.reshape(v.shape)
    for number in sorted(analysis.post):
        values[first + number] = run_step(plan.steps[number], number, values)
    out = values[-1]
    assert isinstance(out, torch.Tensor)
    return out


def contributions(agg: Aggregate, x: torch.Tensor) -> torch.Tensor:
    """Each row's contribution to ``agg`` (rows first), in float64, NaN replaced by the lower
    bound — a function of that row alone."""
    if agg.op == "count":
        x = x != 0
    if agg.inner:
        reduce = torch.mean if agg.op == "mean" else torch.sum
        x = reduce(x.to(torch.float64), dim=agg.inner, keepdim=agg.keepdim)
    x = x.to(torch.float64)
    return torch.where(x.isnan(), agg.lo.expand_as(x), x)


def aggregate(agg: Aggregate, x: torch.Tensor) -> torch.Tensor:
    """``agg`` over the rows of ``x``, cell by cell, by OpenDP."""
    rows = contributions(agg, x)
    columns = rows.reshape(len(rows), -1).T.contiguous().numpy()
    bounds = zip(agg.lo.flatten().tolist(), agg.hi.flatten().tolist(), strict=True)
    out = torch.tensor([bounded_aggregate(agg.kind, column, lo, hi) for column, (lo, hi) in zip(columns, bounds,
                                                                                                   strict=True)],
                       dtype=torch.float64).reshape(agg.lo.shape)
    return out.unsqueeze(0) if agg.keepdim else out
