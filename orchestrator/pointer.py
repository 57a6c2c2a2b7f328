"""Pointers and lazy expressions: the data scientist's handle on data that stays remote.

Every operation on a pointer returns a new :class:`Expression` and sends nothing: a chain
of operations becomes one plan, one job, one round trip, when you call ``.submit()`` (keep
the result at the node, get a :class:`~orchestrator.ticket.JobTicket`) or ``.get()``
(release the value, if the node's policy allows).

    births = grid.search("#birth-records")["hospital"][0]
    births["weight"].mean().get()          # one job
    (births[:, 1] / 100).max().submit()    # one job, result kept at the node
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, overload

import torch
from pydantic import ValidationError

from protocol.codec import dtype_name, parse_dtype
from protocol.errors import InvalidRequest
from protocol.interpret import evaluate, run_step, validate
from protocol.messages import AccessRequest, DatasetMeta, DPRelease, KeepRelease, RawRelease, RunJob
from protocol.plan import Const, InputRef, Plan, Ref, Step, TensorConst, TensorSpec

if TYPE_CHECKING:
    from orchestrator.grid import Grid
    from orchestrator.ticket import JobTicket, PrivateValue

class Expression:
    """A lazy computation on one node's data; nothing runs until submit() or get()."""

    def __init__(self, grid: Grid, node: str, inputs: Sequence[tuple[InputRef, TensorSpec]],
                 steps: Sequence[Step] = (), columns: Sequence[str] = (),
                 specs: Sequence[TensorSpec] | None = None) -> None:
        """``specs``: every value's, when the caller checked the steps already (``_apply``
        checks only the step it adds: checking the whole plan at each step would cost
        quadratic time — seconds for a plan of a hundred steps)."""
        self._grid = grid
        self.node = node
        self._inputs = tuple(inputs)
        self._steps = tuple(steps)
        self.columns = tuple(columns)
        # fail early, client side
        self._specs = tuple(specs if specs is not None else validate(self.plan, [spec for _, spec in self._inputs]))
        self.spec = self._specs[-1]

    # --- what it is ------------------------------------------------------------------------

    @property
    def plan(self) -> Plan:
        return Plan(inputs=[ref for ref, _ in self._inputs], steps=list(self._steps))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.spec.shape

    @property
    def dtype(self) -> str:
        return self.spec.dtype

    def __repr__(self) -> str:
        chain = " → ".join([", ".join(r.name for r, _ in self._inputs)] + [s.op for s in self._steps])
        return f"<Expression on {self.node}: {chain} shape={self.shape} {self.dtype}>"

    # --- running it -----------------------------------------------------------------------

    def submit(self, epsilon: float | None = None, delta: float = 0.0) -> JobTicket:
        """Run at the node and keep the result there; returns a ticket at once. With
        ``epsilon``, the job releases the value with DP instead: ``ticket.private_value()``."""
        dp = dp_release(epsilon, delta)
        return self._grid.submit(self.node, RunJob(plan=self.plan, release=KeepRelease() if dp is None else dp))

    @overload
    def get(self, *, timeout: float | None = None) -> torch.Tensor: ...
    @overload
    def get(self, epsilon: float, delta: float = 0.0, *, timeout: float | None = None) -> PrivateValue: ...

    def get(self, epsilon: float | None = None, delta: float = 0.0, *,
            timeout: float | None = None) -> torch.Tensor | PrivateValue:
        """Run at the node and release the value: exactly (allowed users, as policy says),
        or with differential privacy when ``epsilon`` is given — Laplace for a pure ε,
        Gaussian with a ``delta`` — charged to your budget on each dataset involved."""
        if dp_release(epsilon, delta) is None:
            return self._grid.submit(self.node, RunJob(plan=self.plan, release=RawRelease())).value(timeout)
        return self.submit(epsilon, delta).private_value(timeout)

    def mock(self) -> torch.Tensor:
        """Run this plan here, on the mock twins of its datasets: try it before you spend
        budget or wait for an approval. Nothing real is touched."""
        twins = []
        for ref, _ in self._inputs:
            if ref.kind != "dataset":
                raise InvalidRequest("mock twins exist for datasets; this plan reads a kept result")
            twins.append(self._grid.mock(self.node, ref.name))
        return evaluate(self.plan, twins)

    # --- building it ------------------------------------------------------------------------

    def _apply(self, op: str, *others: Any, constant_first: bool = False, **params: Any) -> Expression:
        """This expression, then ``op`` on it and ``others`` (``constant_first``: ``2 - x``,
        the one constant before it)."""
        exprs = [self] + [o for o in others if isinstance(o, Expression)]
        if any(e.node != self.node for e in exprs):
            raise InvalidRequest(f"cannot combine data of nodes {sorted({e.node for e in exprs})} in one plan: "
                             "a plan runs at one node")
        inputs: list[tuple[InputRef, TensorSpec]] = []
        for e in exprs:
            inputs.extend(i for i in e._inputs if i not in inputs)
        steps: list[Step] = []
        specs = [spec for _, spec in inputs]
        outs: dict[int, int] = {}
        for e in exprs:
            mapping = {i: inputs.index(item) for i, item in enumerate(e._inputs)}
            for j, step in enumerate(e._steps):
                mapping[len(e._inputs) + j] = len(inputs) + len(steps)
                steps.append(_remap(step, mapping))
                specs.append(e._specs[len(e._inputs) + j])
            outs[id(e)] = mapping[len(e._inputs) + len(e._steps) - 1]
        args: list[Ref | Const | TensorConst] = [Ref(ref=outs[id(self)])]
        for o in others:
            args.append(Ref(ref=outs[id(o)]) if isinstance(o, Expression) else _constant(o))
        if constant_first:
            args[0], args[1] = args[1], args[0]
        step = Step(op=op, args=args, params={k: v for k, v in params.items() if v is not None})
        steps.append(step)
        return Expression(self._grid, self.node, inputs, steps, specs=[*specs, _checked(step, len(steps) - 1, specs)])

    def __getitem__(self, index: Any) -> Expression:
        if isinstance(index, str):  # a column name selects that column of a table
            if index not in self.columns:
                raise KeyError(f"no column {index!r}; columns are {list(self.columns)}")
            index = (slice(None), self.columns.index(index))
        items = index if isinstance(index, tuple) else (index,)
        return self._apply("getitem", index=[_index_item(i) for i in items])

    def __add__(self, o: Any) -> Expression: return self._apply("add", o)
    def __radd__(self, o: Any) -> Expression: return _const_first("add", o, self)
    def __sub__(self, o: Any) -> Expression: return self._apply("sub", o)
    def __rsub__(self, o: Any) -> Expression: return _const_first("sub", o, self)
    def __mul__(self, o: Any) -> Expression: return self._apply("mul", o)
    def __rmul__(self, o: Any) -> Expression: return _const_first("mul", o, self)
    def __truediv__(self, o: Any) -> Expression: return self._apply("div", o)
    def __rtruediv__(self, o: Any) -> Expression: return _const_first("div", o, self)
    def __pow__(self, o: Any) -> Expression: return self._apply("pow", o)
    def __matmul__(self, o: Expression) -> Expression: return self._apply("matmul", o)
    def __neg__(self) -> Expression: return self._apply("neg")
    def __abs__(self) -> Expression: return self._apply("abs")
    def __lt__(self, o: Any) -> Expression: return self._apply("lt", o)
    def __le__(self, o: Any) -> Expression: return self._apply("le", o)
    def __gt__(self, o: Any) -> Expression: return self._apply("gt", o)
    def __ge__(self, o: Any) -> Expression: return self._apply("ge", o)
    # == stays identity, so expressions can be dict keys; use .eq()/.ne() for elementwise tests
    def eq(self, o: Any) -> Expression: return self._apply("eq", o)
    def ne(self, o: Any) -> Expression: return self._apply("ne", o)

    def sum(self, dim: int | list[int] | None = None, keepdim: bool = False) -> Expression:
        return self._apply("sum", dim=dim, keepdim=keepdim)

    def mean(self, dim: int | list[int] | None = None, keepdim: bool = False) -> Expression:
        return self._apply("mean", dim=dim, keepdim=keepdim)

    def min(self, dim: int | list[int] | None = None, keepdim: bool = False) -> Expression:
        return self._apply("min", dim=dim, keepdim=keepdim)

    def max(self, dim: int | list[int] | None = None, keepdim: bool = False) -> Expression:
        return self._apply("max", dim=dim, keepdim=keepdim)

    def std(self, dim: int | list[int] | None = None, keepdim: bool = False, correction: int = 1) -> Expression:
        return self._apply("std", dim=dim, keepdim=keepdim, correction=correction)

    def var(self, dim: int | list[int] | None = None, keepdim: bool = False, correction: int = 1) -> Expression:
        return self._apply("var", dim=dim, keepdim=keepdim, correction=correction)

    def count(self, dim: int | list[int] | None = None) -> Expression:
        """Number of non-zero (true) elements: ``(x > 4).count()`` counts rows above 4."""
        return self._apply("count", dim=dim)

    def clamp(self, min: float | None = None, max: float | None = None) -> Expression:
        return self._apply("clamp", min=min, max=max)

    def where(self, a: Any, b: Any) -> Expression:
        """Elementwise ``a if self else b``."""
        return self._apply("where", a, b)

    def to(self, dtype: str) -> Expression:
        return self._apply("cast", dtype=dtype)

    def reshape(self, *shape: int) -> Expression:
        return self._apply("reshape", shape=list(shape[0] if len(shape) == 1 and isinstance(shape[0], tuple | list)
                                                  else shape))

    def transpose(self, dim0: int = 0, dim1: int = 1) -> Expression:
        return self._apply("transpose", dim0=dim0, dim1=dim1)

    @property
    def T(self) -> Expression:  # noqa: N802 - torch's name
        return self.transpose(0, 1)

    def abs(self) -> Expression: return self._apply("abs")
    def exp(self) -> Expression: return self._apply("exp")
    def log(self) -> Expression: return self._apply("log")
    def sqrt(self) -> Expression: return self._apply("sqrt")


class DataPointer(Expression):
    """A dataset published on a node, or a result kept at a node: metadata here, values there."""

    def __init__(self, grid: Grid, node: str, ref: InputRef, spec: TensorSpec,
                 meta: DatasetMeta | None = None) -> None:
        super().__init__(grid, node, [(ref, spec)], columns=meta.columns if meta else ())
        self.name = ref.name
        self.kind = ref.kind
        self.description = meta.description if meta else ""
        self.tags = tuple(meta.tags) if meta else ()

    def request_access(self, reason: str) -> JobTicket:
        """Ask the owner to make you an allowed user of this dataset; the ticket completes
        when the owner approves (or raises RequestDenied with the owner's reason)."""
        if self.kind != "dataset":
            raise InvalidRequest("access is granted to datasets; this pointer is a kept result")
        return self._grid.submit(self.node, AccessRequest(dataset=self.name, reason=reason))

    def __repr__(self) -> str:
        tags = " ".join(self.tags)
        return f"<DataPointer {self.node}/{self.name} shape={self.shape} {self.dtype}{' ' + tags if tags else ''}>"


def cat(exprs: Sequence[Expression], dim: int = 0) -> Expression:
    return exprs[0]._apply("cat", *exprs[1:], dim=dim)


def stack(exprs: Sequence[Expression], dim: int = 0) -> Expression:
    return exprs[0]._apply("stack", *exprs[1:], dim=dim)


def _const_first(op: str, const: Any, expr: Expression) -> Expression:
    """``2 - x``: the plan's arguments keep their order, the constant comes first."""
    return expr._apply(op, const, constant_first=True)


def dp_release(epsilon: float | None, delta: float) -> DPRelease | None:
    """The DP release asked for, or None for none. A ``delta`` without an ``epsilon`` is a
    mistake, not a request for the exact value: it is refused, naming both fixes."""
    if epsilon is None:
        if delta:
            raise InvalidRequest(f"delta={delta} asks for a differentially private release, which needs an epsilon "
                                 f"too: get(epsilon=0.2, delta={delta}); or leave delta out for the exact value "
                                 "(released only if you may see it)")
        return None
    try:
        return DPRelease(epsilon=epsilon, delta=delta)
    except ValidationError:
        raise InvalidRequest(f"a DP release needs 0 < epsilon ≤ 100 and 0 ≤ delta < 1, not epsilon={epsilon}, "
                             f"delta={delta}") from None


def _checked(step: Step, number: int, specs: Sequence[TensorSpec]) -> TensorSpec:
    """The spec of ``step``'s value, checked on ``meta`` tensors of the values it reads."""
    values: list[torch.Tensor | None] = [None] * len(specs)
    for arg in step.args:
        if isinstance(arg, Ref):
            spec = specs[arg.ref]
            values[arg.ref] = torch.empty(spec.shape, dtype=parse_dtype(spec.dtype), device="meta")
    out = run_step(step, number, values, device="meta")
    return TensorSpec(shape=tuple(out.shape), dtype=dtype_name(out.dtype))


def _remap(step: Step, mapping: dict[int, int]) -> Step:
    args = [Ref(ref=mapping[a.ref]) if isinstance(a, Ref) else a for a in step.args]
    return Step(op=step.op, args=args, params=step.params)


def _constant(value: Any) -> Const | TensorConst:
    """A public constant of a plan: a number, or a (small) tensor of numbers."""
    if isinstance(value, torch.Tensor):
        return Const(const=value.item()) if value.dim() == 0 else TensorConst.of(value)
    if isinstance(value, bool | int | float):
        return Const(const=value)
    raise InvalidRequest(f"a plan combines remote values with numbers and tensors, not {type(value).__name__}")


def _index_item(item: Any) -> Any:
    if isinstance(item, slice):
        return {"start": item.start, "stop": item.stop, "step": item.step}
    if item is Ellipsis:
        return "..."
    if item is None:
        return "newaxis"
    if isinstance(item, int):
        return item
    raise TypeError(f"cannot index a remote tensor with {type(item).__name__}; use ints, slices or column names")

