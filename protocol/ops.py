"""The allow-list of plan operations.

A plan may name only the operations registered here. Each entry says how many tensor (or
constant) arguments it takes, which keyword parameters it accepts (a pydantic model with
``extra="forbid"``, so types are checked and nothing else gets in) and the function that
computes it. The same function runs on ``meta`` tensors to infer shapes and dtypes before
anything runs on data, and on real tensors at the node. Workers never look a name up
anywhere else: there is no ``getattr`` on a name that came from the wire.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.codec import ALLOWED_DTYPES

Value = torch.Tensor | float | int | bool
Dim = int | Annotated[list[int], Field(max_length=8)] | None


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class NoParams(Params):
    pass


class ReduceParams(Params):
    dim: Dim = None
    keepdim: bool = False


class SpreadParams(ReduceParams):
    correction: Annotated[int, Field(ge=0, le=1)] = 1


class CountParams(Params):
    dim: Dim = None


class ClampParams(Params):
    min: int | float | None = None  # an int bound keeps an integer tensor integer
    max: int | float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> ClampParams:
        # torch.clamp(x, 7, 0) silently gives 0 everywhere: an inverted clamp is a mistake (or a trick)
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class CastParams(Params):
    dtype: Literal[tuple(ALLOWED_DTYPES)]  # type: ignore[valid-type]


class ReshapeParams(Params):
    shape: Annotated[list[Annotated[int, Field(ge=-1)]], Field(max_length=8)]


class TransposeParams(Params):
    dim0: int = 0
    dim1: int = 1


class JoinParams(Params):
    dim: int = 0


class SliceItem(Params):
    start: int | None = None
    stop: int | None = None
    step: Annotated[int, Field(ge=1)] | None = None


IndexItem = int | SliceItem | Literal["...", "newaxis"]


class IndexParams(Params):
    index: Annotated[list[IndexItem], Field(max_length=8)]

    def to_torch(self) -> tuple[Any, ...]:
        def one(item: IndexItem) -> Any:
            if isinstance(item, SliceItem):
                return slice(item.start, item.stop, item.step)
            if item == "...":
                return Ellipsis
            if item == "newaxis":
                return None
            return item

        return tuple(one(i) for i in self.index)


def _dim(dim: int | list[int] | None) -> Any:
    return tuple(dim) if isinstance(dim, list) else dim


def _reduce(fn: Callable[..., torch.Tensor]) -> Callable[[Sequence[Value], Any], torch.Tensor]:
    def run(args: Sequence[Value], p: ReduceParams) -> torch.Tensor:
        (x,) = args
        assert isinstance(x, torch.Tensor)
        if p.dim is None and (not p.keepdim or x.ndim == 0):
            return fn(x)
        dim = tuple(range(x.ndim)) if p.dim is None else _dim(p.dim)
        return fn(x, dim=dim, keepdim=p.keepdim)

    return run


def _spread(fn: Callable[..., torch.Tensor]) -> Callable[[Sequence[Value], Any], torch.Tensor]:
    def run(args: Sequence[Value], p: SpreadParams) -> torch.Tensor:
        (x,) = args
        return fn(x, dim=_dim(p.dim), correction=p.correction, keepdim=p.keepdim)

    return run


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Sequence[Value], Any], Value]:
    return lambda args, _p: fn(args[0])  # type: ignore[arg-type]


def _binary(fn: Callable[[Any, Any], Value]) -> Callable[[Sequence[Value], Any], Value]:
    return lambda args, _p: fn(args[0], args[1])


# Where torch's CPU kernels refuse a dtype that its meta kernels accept, the op adapts, so that
# a plan that validates also runs (tests/unit/test_dp_door.py checks it over the allow-list):
def _on_bool_identity(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    # abs, floor, ceil and round of a bool are the bool; torch's CPU has no kernel for them
    return lambda x: x.clone() if x.dtype == torch.bool else fn(x)


def _bools_as_ints(fn: Callable[[Any, Any], Value]) -> Callable[[Any, Any], Value]:
    # torch refuses bool - bool and bool ** bool on the CPU: count True as 1, as sum does
    def run(a: Any, b: Any) -> Value:
        def numeric(x: Any) -> Any:
            return x.to(torch.int64) if isinstance(x, torch.Tensor) and x.dtype == torch.bool else x
        return fn(numeric(a), numeric(b))

    return run


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # torch's CPU matmul wants one dtype (and none for bool), while its meta kernel checks
    # neither: promote here, so a plan that validates also runs
    dtype = torch.promote_types(a.dtype, b.dtype)
    dtype = torch.int64 if dtype == torch.bool else dtype
    return torch.matmul(a.to(dtype), b.to(dtype))


@dataclass(frozen=True)
class OpSpec:
    """One allow-listed operation: its arity, its parameter schema and its function."""

    name: str
    arity: tuple[int, int]  # least and most positional arguments
    params: type[Params]
    fn: Callable[[Sequence[Value], Any], Value]
    tensors_only: bool = False  # every positional argument must be a tensor, not a constant
    doc: str = ""


def _specs() -> list[OpSpec]:
    unary: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "neg": torch.neg, "abs": _on_bool_identity(torch.abs), "exp": torch.exp, "log": torch.log,
        "sqrt": torch.sqrt, "square": torch.square, "sign": torch.sign, "floor": _on_bool_identity(torch.floor),
        "ceil": _on_bool_identity(torch.ceil), "round": _on_bool_identity(torch.round), "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "logical_not": torch.logical_not, "isnan": torch.isnan,
    }
    binary = {
        "add": operator.add, "sub": _bools_as_ints(operator.sub), "mul": operator.mul,
        "div": operator.truediv, "pow": _bools_as_ints(operator.pow),
        "eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le,
        "gt": operator.gt, "ge": operator.ge,
        "logical_and": torch.logical_and, "logical_or": torch.logical_or,
    }
    reductions: dict[str, Callable[..., torch.Tensor]] = {
        "sum": torch.sum, "mean": torch.mean, "min": torch.amin, "max": torch.amax,
    }
    specs = [OpSpec(n, (1, 1), NoParams, _unary(f), True) for n, f in unary.items()]
    specs += [OpSpec(n, (2, 2), NoParams, _binary(f)) for n, f in binary.items()]
    specs += [OpSpec(n, (1, 1), ReduceParams, _reduce(f), True) for n, f in reductions.items()]
    specs += [
        OpSpec("std", (1, 1), SpreadParams, _spread(torch.std), True),
        OpSpec("var", (1, 1), SpreadParams, _spread(torch.var), True),
        OpSpec("count", (1, 1), CountParams,
               lambda a, p: torch.count_nonzero(a[0], dim=_dim(p.dim)), True,  # type: ignore[arg-type]
               "number of non-zero (true) elements; with a comparison, a histogram count"),
        OpSpec("matmul", (2, 2), NoParams, _binary(_matmul), True),
        OpSpec("clamp", (1, 1), ClampParams, lambda a, p: torch.clamp(a[0], p.min, p.max), True),  # type: ignore[arg-type]
        OpSpec("where", (3, 3), NoParams, lambda a, _p: torch.where(a[0], a[1], a[2])),  # type: ignore[arg-type]
        OpSpec("cast", (1, 1), CastParams, lambda a, p: a[0].to(ALLOWED_DTYPES[p.dtype]), True),  # type: ignore[union-attr]
        OpSpec("reshape", (1, 1), ReshapeParams, lambda a, p: a[0].reshape(p.shape), True),  # type: ignore[union-attr]
        OpSpec("transpose", (1, 1), TransposeParams,
               lambda a, p: a[0].transpose(p.dim0, p.dim1), True),  # type: ignore[union-attr]
        OpSpec("cat", (1, 16), JoinParams, lambda a, p: torch.cat(list(a), dim=p.dim), True),  # type: ignore[arg-type]
        OpSpec("stack", (1, 16), JoinParams, lambda a, p: torch.stack(list(a), dim=p.dim), True),  # type: ignore[arg-type]
        OpSpec("getitem", (1, 1), IndexParams, lambda a, p: a[0][p.to_torch()], True),  # type: ignore[index]
    ]
    return specs


REGISTRY: dict[str, OpSpec] = {spec.name: spec for spec in _specs()}
