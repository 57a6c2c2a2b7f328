"""Plans: the op graph that lazy pointer operations build, and its validator/interpreter.

A plan names its inputs (datasets or stored objects at one node), then a list of steps.
Values are numbered: inputs first, then one value per step. A step's positional
arguments are references to earlier values or finite constants; its keyword parameters
are checked against the operation's schema in :mod:`protocol.ops`.

:func:`validate` runs the whole plan on ``meta`` tensors (no data, no memory) before
anything runs, so every op is on the allow-list, every argument has the right type,
every shape is inferred and no value exceeds the element cap. :func:`evaluate` then runs
the same steps on real tensors.

    >>> plan = Plan(inputs=[InputRef(kind="dataset", name="births")],
    ...             steps=[Step(op="getitem", args=[Ref(ref=0)],
    ...                         params={"index": [{"start": None}, 0]}),
    ...                    Step(op="mean", args=[Ref(ref=1)])])
    >>> validate(plan, [TensorSpec(shape=(31, 2), dtype="float32")])[-1]
    TensorSpec(shape=(), dtype='float32')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from protocol.codec import MAX_ELEMENTS, check_size, dtype_name, parse_dtype
from protocol.errors import ForbiddenOperation, InvalidRequest
from protocol.ops import REGISTRY, Value

MAX_STEPS = 256
MAX_INPUTS = 16


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Ref(_Model):
    ref: Annotated[int, Field(ge=0)]


class Const(_Model):
    const: bool | int | float

    @field_validator("const", mode="before")
    @classmethod
    def _fits_int64(cls, value: Any) -> Any:
        # an int too big for int64 is refused, not silently rounded to a float
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            raise ValueError(f"integer constant {value} does not fit in int64")
        return value


MAX_TENSOR_CONST = 65_536  # elements: a public constant rides in the plan's JSON, so it stays small


class TensorConst(_Model):
    """A public tensor constant (``births["weight"] - torch.full((240,), 3.5)``), flat and
    row-major. Public: it is part of the plan the owner reads."""

    shape: tuple[Annotated[int, Field(ge=0)], ...]
    dtype: Literal["float32", "float64", "int64", "int32", "bool"]
    values: Annotated[list[bool | int | float], Field(max_length=MAX_TENSOR_CONST)]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorConst:
        return cls(shape=tuple(tensor.shape), dtype=dtype_name(tensor.dtype),
                   values=tensor.detach().cpu().flatten().tolist())

    def tensor(self, device: str = "cpu") -> torch.Tensor:
        if math.prod(self.shape) != len(self.values):
            raise InvalidRequest(f"a tensor constant of shape {list(self.shape)} needs {math.prod(self.shape)} "
                                 f"values, it has {len(self.values)}")
        return torch.tensor(self.values, dtype=parse_dtype(self.dtype), device=device).reshape(self.shape)

    def __repr__(self) -> str:
        return f"tensor(shape={list(self.shape)}, dtype={self.dtype})"


Arg = Ref | Const | TensorConst


class InputRef(_Model):
    kind: Literal["dataset", "object"]
    name: Annotated[str, Field(min_length=1, max_length=128)]


class Step(_Model):
    op: Annotated[str, Field(min_length=1, max_length=128)]
    args: Annotated[list[Arg], Field(max_length=16)] = []
    params: Annotated[dict[str, Any], Field(max_length=16)] = {}


class Plan(_Model):
    inputs: Annotated[list[InputRef], Field(min_length=1, max_length=MAX_INPUTS)]
    steps: Annotated[list[Step], Field(max_length=MAX_STEPS)] = []

    def describe(self) -> str:
        """The plan as readable operations, one line per value, e.g. for an owner judging a
        request::

            v0 = dataset:births
            v1 = getitem(v0, index=[…, 0])
            v2 = mean(v1)
        """
        lines = [f"v{i} = {ref.kind}:{ref.name}" for i, ref in enumerate(self.inputs)]
        for number, step in enumerate(self.steps, start=len(self.inputs)):
            args = [f"v{a.ref}" if isinstance(a, Ref) else repr(a.const) if isinstance(a, Const) else repr(a)
                    for a in step.args]
            args += [f"{k}={v!r}" for k, v in step.params.items()]
            lines.append(f"v{number} = {step.op}({', '.join(args)})")
        return "\n".join(lines)


class TensorSpec(_Model):
    shape: tuple[Annotated[int, Field(ge=0)], ...]
    dtype: str


def _run(plan: Plan, inputs: Sequence[torch.Tensor], limit: int, device: str = "cpu") -> list[Value]:
    values: list[Value] = list(inputs)
    for number, step in enumerate(plan.steps):
        spec = REGISTRY.get(step.op)
        if spec is None:
            raise ForbiddenOperation(
                f"operation {step.op!r} is not on the allow-list of plan operations; "
                f"allowed: {', '.join(sorted(REGISTRY))}"
            )
        where = f"step {number} ({step.op})"
        low, high = spec.arity
        if not low <= len(step.args) <= high:
            raise InvalidRequest(f"{where} takes {low}..{high} arguments, got {len(step.args)}")
        args: list[Value] = []
        for arg in step.args:
            if isinstance(arg, Ref):
                if arg.ref >= len(values):
                    raise InvalidRequest(f"{where} refers to value {arg.ref}, which is not defined yet")
                args.append(values[arg.ref])
            elif isinstance(arg, TensorConst):
                args.append(arg.tensor(device))
            else:
                args.append(arg.const)
        if not any(isinstance(a, torch.Tensor) for a in args) or (
            spec.tensors_only and not all(isinstance(a, torch.Tensor) for a in args)
        ):
            raise InvalidRequest(f"{where} needs tensor arguments, not only constants")
        try:
            params = spec.params.model_validate(step.params)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise InvalidRequest(f"{where}: parameter {field}: {first['msg']}") from None
        try:
            out = spec.fn(args, params)
        except (RuntimeError, IndexError, ValueError, TypeError, OverflowError) as exc:
            raise InvalidRequest(f"{where} cannot run on these inputs: {exc}") from None
        if not isinstance(out, torch.Tensor):
            raise InvalidRequest(f"{where} did not produce a tensor")
        check_size(out.shape, limit)
        dtype_name(out.dtype)
        values.append(out)
    return values


def validate(plan: Plan, inputs: Sequence[TensorSpec], limit: int = MAX_ELEMENTS) -> list[TensorSpec]:
    """Check the plan without running it on data; return the spec of every value."""
    if len(inputs) != len(plan.inputs):
        raise InvalidRequest(f"plan has {len(plan.inputs)} inputs, {len(inputs)} were given")
    metas = [torch.empty(s.shape, dtype=parse_dtype(s.dtype), device="meta") for s in inputs]
    values = _run(plan, metas, limit, device="meta")
    return [TensorSpec(shape=tuple(v.shape), dtype=dtype_name(v.dtype)) for v in values]  # type: ignore[union-attr]


def evaluate(plan: Plan, inputs: Sequence[torch.Tensor], limit: int = MAX_ELEMENTS) -> torch.Tensor:
    """Run a plan on real tensors (validate first: this is the same walk, for real)."""
    out = _run(plan, inputs, limit)[-1]
    assert isinstance(out, torch.Tensor)
    return out
