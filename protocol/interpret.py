"""Checking and running plans (:mod:`protocol.plan`) with torch: :func:`validate` walks the
steps on ``meta`` tensors (no data, no memory) before anything runs — every op on the
allow-list, every argument of the right type, every shape inferred, no value over the
element cap — and :func:`evaluate` walks the same steps on real tensors.

    >>> from protocol.plan import InputRef, Plan, Ref, Step, TensorSpec
    >>> plan = Plan(inputs=[InputRef(kind="dataset", name="births")],
    ...             steps=[Step(op="mean", args=[Ref(ref=0)])])
    >>> validate(plan, [TensorSpec(shape=(31, 2), dtype="float32")])[-1]
    TensorSpec(shape=(), dtype='float32')
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from pydantic import ValidationError

from protocol.codec import MAX_ELEMENTS, check_size, dtype_name, parse_dtype
from protocol.errors import ForbiddenOperation, InvalidRequest, JobFailed, LimitExceeded
from protocol.ops import REGISTRY, Value
from protocol.plan import Plan, Ref, Step, TensorConst, TensorSpec

log = logging.getLogger(__name__)


def constant(const: TensorConst, device: str = "cpu") -> torch.Tensor:
    """A tensor constant of a plan as a tensor (on ``meta`` when validating)."""
    if math.prod(const.shape) != len(const.values):
        raise InvalidRequest(f"a tensor constant of shape {list(const.shape)} needs {math.prod(const.shape)} "
                             f"values, it has {len(const.values)}")
    return torch.tensor(const.values, dtype=parse_dtype(const.dtype), device=device).reshape(const.shape)


def run_step(step: Step, number: int, values: Sequence[Value | None], limit: int = MAX_ELEMENTS,
             device: str = "cpu") -> torch.Tensor:
    """One step of a plan on the values before it (``meta`` tensors when validating).

    On ``meta`` tensors an error says what is wrong with the plan. On data, an error could
    say something of the data (a value, that a value exists), so it says only where it
    happened; the details go to the owner's log."""
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
            value = values[arg.ref]
            assert value is not None, "a value was let go before its last reader"  # _run's liveness
            args.append(value)
        elif isinstance(arg, TensorConst):
            args.append(constant(arg, device))
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
        if device != "meta":
            log.warning("%s failed on the data", where, exc_info=exc)
            raise JobFailed(f"{where} failed on the data; its owner's log has the details") from None
        raise InvalidRequest(f"{where} cannot run on these inputs: {exc}") from None
    if not isinstance(out, torch.Tensor):
        raise InvalidRequest(f"{where} did not produce a tensor")
    check_size(out.shape, limit)
    dtype_name(out.dtype)
    return out


def _last_reads(plan: Plan, n_inputs: int) -> list[int]:
    """For each value (inputs, then one per step), the last step that reads it; a step's
    value nobody reads lives only through its own step, the plan's result to the end."""
    last = [-1] * n_inputs + list(range(len(plan.steps)))
    for number, step in enumerate(plan.steps):
        for arg in step.args:
            if isinstance(arg, Ref) and arg.ref < len(last):
                last[arg.ref] = max(last[arg.ref], number)
    if plan.steps:
        last[-1] = len(plan.steps)
    return last


def _run(plan: Plan, inputs: Sequence[torch.Tensor], limit: int, device: str = "cpu") -> list[Value | None]:
    """Every value of the plan; on data, a value is let go after the last step that reads it
    (the estimate of :func:`peak_bytes` counts on that), so only the result is left."""
    values: list[Value | None] = list(inputs)
    last = _last_reads(plan, len(inputs))
    for number, step in enumerate(plan.steps):
        values.append(run_step(step, number, values, limit, device))
        if device != "meta":
            for index in range(len(inputs), len(values)):
                if last[index] <= number:
                    values[index] = None
    return values


def peak_bytes(plan: Plan, values: Sequence[Value | None], n_inputs: int) -> tuple[int, int]:
    """The most bytes the plan's steps hold at once when :func:`evaluate` runs it, and the
    step where that happens, from the ``meta`` values :func:`validate` made: a step's result
    lives from its step to its last reader, and a view keeps the whole of what it views.
    The inputs are not counted (they exist before the plan); what torch uses inside one op
    is not either."""
    last = _last_reads(plan, n_inputs)
    inputs = {id(_root(v)) for v in values[:n_inputs] if isinstance(v, torch.Tensor)}
    held: dict[int, tuple[int, int]] = {}  # storage -> (bytes, last step it is needed)
    peak, at = 0, 0
    for number in range(len(plan.steps)):
        value = values[n_inputs + number]
        if isinstance(value, torch.Tensor) and id(root := _root(value)) not in inputs:
            size, until = held.get(id(root), (root.untyped_storage().nbytes(), number))
            held[id(root)] = (size, max(until, last[n_inputs + number]))
        now = sum(size for size, until in held.values() if until >= number)
        if now > peak:
            peak, at = now, number
    return peak, at


def _root(tensor: torch.Tensor) -> torch.Tensor:
    return tensor._base if tensor._base is not None else tensor


def validate(plan: Plan, inputs: Sequence[TensorSpec], limit: int = MAX_ELEMENTS,
             memory: int | None = None) -> list[TensorSpec]:
    """Check the plan without running it on data; return the spec of every value. With
    ``memory`` (bytes), a plan whose steps would hold more at once is refused."""
    if len(inputs) != len(plan.inputs):
        raise InvalidRequest(f"plan has {len(plan.inputs)} inputs, {len(inputs)} were given")
    metas = [torch.empty(s.shape, dtype=parse_dtype(s.dtype), device="meta") for s in inputs]
    values = _run(plan, metas, limit, device="meta")
    if memory is not None:
        peak, step = peak_bytes(plan, values, len(metas))
        if peak > memory:
            raise LimitExceeded(f"the plan would hold {_mib(peak)} of values at once (at step {step}, "
                                f"{plan.steps[step].op}); this node runs a plan in at most {_mib(memory)}. "
                                "Split it into smaller plans, or reduce what each step makes")
    return [TensorSpec(shape=tuple(v.shape), dtype=dtype_name(v.dtype)) for v in values]  # type: ignore[union-attr]


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB" if size < 2**30 else f"{size / 2**30:,.1f} GiB"


def evaluate(plan: Plan, inputs: Sequence[torch.Tensor], limit: int = MAX_ELEMENTS) -> torch.Tensor:
    """Run a plan on real tensors (validate first: this is the same walk, for real)."""
    out = _run(plan, inputs, limit)[-1]
    assert isinstance(out, torch.Tensor)
    return out
