"""Building a plan from expressions, on the client: the pure helpers — the spec of a step's
value (checked on ``meta`` tensors, so a wrong shape fails here, before anything is sent),
renumbering a step's references when two plans are joined, a plan's public constants, and
index items as the plan writes them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from protocol.codec import dtype_name, parse_dtype
from protocol.errors import InvalidRequest
from protocol.interpret import run_step
from protocol.plan import Const, Ref, Step, TensorConst, TensorSpec


def spec_of(step: Step, number: int, specs: Sequence[TensorSpec]) -> TensorSpec:
    """The spec of ``step``'s value, checked on ``meta`` tensors of the values it reads."""
    values: list[torch.Tensor | None] = [None] * len(specs)
    for arg in step.args:
        if isinstance(arg, Ref):
            spec = specs[arg.ref]
            values[arg.ref] = torch.empty(spec.shape, dtype=parse_dtype(spec.dtype), device="meta")
    out = run_step(step, number, values, device="meta")
    return TensorSpec(shape=tuple(out.shape), dtype=dtype_name(out.dtype))


def remap(step: Step, mapping: dict[int, int]) -> Step:
    """``step`` with its references renumbered by ``mapping`` (old → new)."""
    args = [Ref(ref=mapping[a.ref]) if isinstance(a, Ref) else a for a in step.args]
    return Step(op=step.op, args=args, params=step.params)


def constant(value: Any) -> Const | TensorConst:
    """A public constant of a plan: a number, or a (small) tensor of numbers."""
    if isinstance(value, torch.Tensor):
        return Const(const=value.item()) if value.dim() == 0 else TensorConst.of(value)
    if isinstance(value, bool | int | float):
        return Const(const=value)
    raise InvalidRequest(f"a plan combines remote values with numbers and tensors, not {type(value).__name__}")


def index_item(item: Any) -> Any:
    """One item of ``x[...]`` as a plan writes it."""
    if isinstance(item, slice):
        return {"start": item.start, "stop": item.stop, "step": item.step}
    if item is Ellipsis:
        return "..."
    if item is None:
        return "newaxis"
    if isinstance(item, int):
        return item
    raise TypeError(f"cannot index a remote tensor with {type(item).__name__}; use ints, slices or column names")
