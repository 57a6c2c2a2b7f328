"""Plans: the op graph that lazy pointer operations build (schemas only, without torch: the
gateway and the CLI carry plans without loading it; :mod:`protocol.interpret` checks and runs them).

A plan names its inputs (datasets or stored objects at one node), then a list of steps.
Values are numbered: inputs first, then one value per step. A step's positional
arguments are references to earlier values or finite constants; its keyword parameters
are checked against the operation's schema in :mod:`protocol.ops`.

:func:`protocol.interpret.validate` runs the whole plan on ``meta`` tensors (no data, no memory) before
anything runs, so every op is on the allow-list, every argument has the right type,
every shape is inferred and no value exceeds the element cap. :func:`~protocol.interpret.evaluate`
then runs the same steps on real tensors.

    >>> from protocol.interpret import validate
    >>> plan = Plan(inputs=[InputRef(kind="dataset", name="births")],
    ...             steps=[Step(op="getitem", args=[Ref(ref=0)],
    ...                         params={"index": [{"start": None}, 0]}),
    ...                    Step(op="mean", args=[Ref(ref=1)])])
    >>> validate(plan, [TensorSpec(shape=(31, 2), dtype="float32")])[-1]
    TensorSpec(shape=(), dtype='float32')
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    import torch

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
        from protocol.codec import dtype_name  # torch is loaded: the caller holds a tensor

        return cls(shape=tuple(tensor.shape), dtype=dtype_name(tensor.dtype),
                   values=tensor.detach().cpu().flatten().tolist())

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
