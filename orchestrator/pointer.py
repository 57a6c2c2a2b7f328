"""Pointers and lazy expressions: the data scientist's handle on data that stays remote;
and job tickets, the handle on a job while it runs at a node.

Every operation on a pointer returns a new :class:`Expression` and sends nothing: a chain
of operations becomes one plan, one job, one round trip, when you call ``.submit()`` (keep
the result at the node, get a :class:`JobTicket`) or ``.get()`` (release the value, if the
node's policy allows).

    births = grid.search("#birth-records")["hospital"][0]
    births["weight"].mean().get()          # one job
    (births[:, 1] / 100).max().submit()    # one job, result kept at the node

A ticket comes back at once from ``expr.submit()``. Its ``status`` moves through
``queued → pending_approval → running → done | failed | denied``, or ``queued → cancelled``;
``wait()`` blocks until the end; ``result()`` gives a :class:`DataPointer` to the result
kept at the node; ``cancel()`` withdraws a job its node has not started yet
(:mod:`protocol.cancel`). ``grid.ticket(ticket.id)`` picks a ticket up again, from any
process. Tickets and pointers live in one module because each hands out the other: a
pointer's ``submit()`` is a ticket, a ticket's ``result()`` a pointer.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, overload

import torch

from orchestrator.plans import constant, index_item, remap, spec_of
from orchestrator.releases import PrivateValue, dp_release
from orchestrator.session import Job, Session
from protocol.cancel import STARTED, cancellation, cancelled_by, signer
from protocol.codec import decode_tensor
from protocol.contract import PENDING_APPROVAL, PUBLIC
from protocol.errors import (
    ApprovalRequired,
    CannotCancel,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    NodeUnavailable,
    NotFound,
    error_from_wire,
)
from protocol.interpret import evaluate, validate
from protocol.messages import (
    AccessRequest,
    CancelRequest,
    DatasetMeta,
    JobReply,
    JobStatus,
    KeepRelease,
    MockRequest,
    RawRelease,
    RunJob,
    TrainMetrics,
    parse_body,
)
from protocol.plan import Const, InputRef, Plan, Ref, Step, TensorConst, TensorSpec


class Expression:
    """A lazy computation on one node's data; nothing runs until submit() or get()."""

    def __init__(self, session: Session, node: str, inputs: Sequence[tuple[InputRef, TensorSpec]],
                 steps: Sequence[Step] = (), columns: Sequence[str] = (),
                 specs: Sequence[TensorSpec] | None = None) -> None:
        """``specs``: every value's, when the caller checked the steps already (``_apply``
        checks only the step it adds: checking the whole plan at each step would cost
        quadratic time — seconds for a plan of a hundred steps)."""
        self._session = session
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
        return submit(self._session, self.node, RunJob(plan=self.plan, release=KeepRelease() if dp is None else dp))

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
            return submit(self._session, self.node, RunJob(plan=self.plan, release=RawRelease())).value(timeout)
        return self.submit(epsilon, delta).private_value(timeout)

    def mock(self) -> torch.Tensor:
        """Run this plan here, on the mock twins of its datasets: try it before you spend
        budget or wait for an approval. Nothing real is touched."""
        twins = []
        for ref, _ in self._inputs:
            if ref.kind != "dataset":
                raise InvalidRequest("mock twins exist for datasets; this plan reads a kept result")
            twins.append(mock_twin(self._session, self.node, ref.name))
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
                steps.append(remap(step, mapping))
                specs.append(e._specs[len(e._inputs) + j])
            outs[id(e)] = mapping[len(e._inputs) + len(e._steps) - 1]
        args: list[Ref | Const | TensorConst] = [Ref(ref=outs[id(self)])]
        for o in others:
            args.append(Ref(ref=outs[id(o)]) if isinstance(o, Expression) else constant(o))
        if constant_first:
            args[0], args[1] = args[1], args[0]
        step = Step(op=op, args=args, params={k: v for k, v in params.items() if v is not None})
        steps.append(step)
        return Expression(self._session, self.node, inputs, steps,
                          specs=[*specs, spec_of(step, len(steps) - 1, specs)])

    def __getitem__(self, index: Any) -> Expression:
        if isinstance(index, str):  # a column name selects that column of a table
            if index not in self.columns:
                raise KeyError(f"no column {index!r}; columns are {list(self.columns)}")
            index = (slice(None), self.columns.index(index))
        items = index if isinstance(index, tuple) else (index,)
        return self._apply("getitem", index=[index_item(i) for i in items])

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

    def __init__(self, session: Session, node: str, ref: InputRef, spec: TensorSpec,
                 meta: DatasetMeta | None = None) -> None:
        super().__init__(session, node, [(ref, spec)], columns=meta.columns if meta else ())
        self.name = ref.name
        self.kind = ref.kind
        self.description = meta.description if meta else ""
        self.tags = tuple(meta.tags) if meta else ()

    def request_access(self, reason: str) -> JobTicket:
        """Ask the owner to make you an allowed user of this dataset; the ticket completes
        when the owner approves (or raises RequestDenied with the owner's reason)."""
        if self.kind != "dataset":
            raise InvalidRequest("access is granted to datasets; this pointer is a kept result")
        return submit(self._session, self.node, AccessRequest(dataset=self.name, reason=reason))

    def __repr__(self) -> str:
        tags = " ".join(self.tags)
        return f"<DataPointer {self.node}/{self.name} shape={self.shape} {self.dtype}{' ' + tags if tags else ''}>"


def cat(exprs: Sequence[Expression], dim: int = 0) -> Expression:
    return exprs[0]._apply("cat", *exprs[1:], dim=dim)


def stack(exprs: Sequence[Expression], dim: int = 0) -> Expression:
    return exprs[0]._apply("stack", *exprs[1:], dim=dim)


_STATES = {"PENDING": "queued", "RECEIVED": "queued", "STARTED": "running", "RETRY": "queued",
           PENDING_APPROVAL: "pending_approval",
           # final states that nothing signed: not an answer, the job may yet be run (redelivered)
           "FAILURE": "running", "REVOKED": "running"}


class JobTicket:
    def __init__(self, session: Session, job_id: str) -> None:
        self._session = session
        self.id = job_id
        self.node = job_id.split(":", 1)[0]
        self._reply: JobReply | None = None
        self._cancelled = False  # this requester's cancellation is on the broker, before the node took the job up

    @classmethod
    def finished(cls, session: Session, job_id: str, state: str, result: Any) -> JobTicket:
        """A ticket on a job whose final state and result the caller has read already (a
        round of ``fit`` reads all its jobs' in one request)."""
        ticket = cls(session, job_id)
        ticket._reply = ticket._open(state, result)
        return ticket

    def __repr__(self) -> str:
        return f"<JobTicket {self.id} {self.status}>"

    @property
    def status(self) -> str:
        """queued → pending_approval → running → done | failed | denied, or queued →
        cancelled: ``done``, ``failed``, ``denied`` and ``pending_approval`` only on the node's
        signed word; ``cancelled`` on yours, signed, that came before the node took the job up
        (it then never runs; the node answers so when it reaches the job)."""
        if self._reply is None:
            found = self._session.transport.result(self.id)
            if found is None:
                if self._cancel_requested():
                    return "cancelled"
                state = _STATES.get(self._session.transport.state(self.id), "queued")
                return "queued" if state == "pending_approval" and not self._parked() else state
            self._reply = self._open(*found)
        return "cancelled" if _was_cancelled(self._reply) else self._reply.status

    def cancel(self) -> JobTicket:
        """Cancel the job if its node has not started it: it then never runs — nothing is
        read, charged or kept — and the ticket says ``cancelled`` at once (``wait()`` and
        ``result()`` raise ``JobCancelled``), even while the node is busy with other jobs; the
        node answers so when it reaches the job. ``CannotCancel`` if the node has started it
        (a running job is not stopped halfway) or answered it, saying which and what to do.
        A job waiting for its owner's approval is withdrawn from the owner's queue
        (``grid.cancel_request``). Cancelling a cancelled job again does nothing."""
        transport = self._session.transport
        if self._reply is None and (found := transport.result(self.id)) is not None:
            self._reply = self._open(*found)
        if self._reply is not None:
            return self._finished_already()
        if not transport.sent(self.id):
            raise NotFound(f"job {self.id} was never sent on this broker, or its answer's lifetime is over: there is "
                           "nothing to cancel", job_id=self.id)
        first = transport.cancel(self.id, cancellation(self._session.identity, self.id))
        if first is None or cancelled_by(first, self._session.identity.public, self.id):
            self._cancelled = True
            return self
        if (found := transport.result(self.id)) is not None:  # answered in the meantime
            self._reply = self._open(*found)
            return self._finished_already()
        if first == STARTED and self._parked():
            return self._withdraw()
        if first == STARTED:
            raise CannotCancel(f"job {self.id} has already started at {self.node!r}; a running job is not stopped "
                               f"halfway. Wait for it (ticket.wait()) or ignore its result", job_id=self.id)
        if not first:  # the key expired between the two commands
            raise CannotCancel(f"job {self.id} is past the time a job may wait in a queue: its node will not run it "
                               "now", job_id=self.id)
        who = signer(first)
        raise CannotCancel(f"job {self.id} has a mark on the broker that is not yours "
                           f"({f'a cancellation signed as {who!r}' if who else 'not a cancellation'}): someone who "
                           f"knows its id wrote there first. The node ignores it and runs the job: wait for it, or "
                           f"ignore its result", job_id=self.id)

    def _withdraw(self) -> JobTicket:
        """cancel() of a job parked for its owner's approval: its request is withdrawn from the
        owner's queue (``grid.cancel_request``), unless the owner decided it meanwhile."""
        try:
            info = submit(self._session, self.node, CancelRequest(request=self.id)).reply().requests[0]
        except InvalidRequest as exc:  # decided (or expired) in the meantime
            if (found := self._session.transport.result(self.id)) is not None:
                self._reply = self._open(*found)
                return self._finished_already()
            raise CannotCancel(f"job {self.id} waited for the approval of {self.node!r}'s owner, who has decided "
                               f"it since: {exc.message}", job_id=self.id) from None
        if info.status != "cancelled":
            raise CannotCancel(f"job {self.id}'s request at {self.node!r} is {info.status}: there is nothing left to "
                               "cancel", job_id=self.id)
        self._cancelled = True
        return self

    def _finished_already(self) -> JobTicket:
        """cancel() of a job that has its node's answer: nothing to do if it was a cancellation."""
        assert self._reply is not None
        if _was_cancelled(self._reply):
            return self
        hint = ("its result is there (ticket.result(), .value() or .metrics())" if self._reply.status == JobStatus.DONE
                else "ticket.wait() raises its error")
        raise CannotCancel(f"job {self.id} has already finished at {self.node!r} ({self._reply.status}): there is "
                           f"nothing left to cancel; {hint}", job_id=self.id)

    def _cancel_requested(self) -> bool:
        """Whether your signed cancellation of this job came before its node took it up (from
        this process, or read on the broker: a ticket picked up again with grid.ticket)."""
        if not self._cancelled:
            mark = self._session.transport.cancel_mark(self.id)
            self._cancelled = mark is not None and cancelled_by(mark, self._session.identity.public, self.id)
        return self._cancelled

    def _cancelled_error(self) -> JobCancelled:
        return JobCancelled(f"you cancelled job {self.id} before {self.node!r} ran it: it did not run",
                            job_id=self.id)

    def wait(self, timeout: float | None = None) -> JobTicket:
        """Block until the job ends; raise its typed error if it failed, was denied or
        cancelled."""
        if self._reply is None:
            timeout = self._session.timeout if timeout is None else timeout
            # cancelled from here: the node may be busy with other jobs, and answers so only when it reaches this one
            found = self._session.transport.result(self.id, 0.0 if self._cancelled else timeout)
            if found is None and self._cancel_requested():
                raise self._cancelled_error()
            if found is None:
                state = _STATES.get(self._session.transport.state(self.id), "queued")
                if state == "pending_approval" and self._parked():
                    raise ApprovalRequired(
                        f"job {self.id} waits for the approval of {self.node!r}'s owner; wait longer, or pick it "
                        f"up later with grid.ticket({self.id!r})", job_id=self.id)
                hint = ("no worker of this node took it: is the node running?" if state == "queued"
                        else "it is still running")
                raise NodeUnavailable(
                    f"job {self.id} on {self.node!r} is {state} after {timeout:.0f} s; {hint}. "
                    f"Pick it up later with grid.ticket({self.id!r}).{self._session.transport.unsigned(self.id)}",
                    job_id=self.id)
            self._reply = self._open(*found)
        if self._reply.error is not None:
            raise error_from_wire(self._reply.error.model_dump())
        return self

    def result(self, timeout: float | None = None) -> DataPointer:
        """A pointer to the result kept at the node."""
        reply = self.wait(timeout)._reply
        assert reply is not None
        if reply.ticket is None:
            raise JobFailed(f"job {self.id} released a value; it kept no result at the node", job_id=self.id)
        t = reply.ticket
        return DataPointer(self._session, t.node, InputRef(kind="object", name=t.object_id),
                           TensorSpec(shape=t.shape, dtype=t.dtype))

    def value(self, timeout: float | None = None) -> torch.Tensor:
        """The released value, opened with the requester's key."""
        reply = self.wait(timeout)._reply
        assert reply is not None
        if reply.value is None:
            raise JobFailed(f"job {self.id} kept its result at the node; use .result()", job_id=self.id)
        if reply.value.claim_check is not None:
            sealed = reply.value.checked(self._session.claim(reply.value.claim_check))
        else:
            sealed = base64.b64decode(reply.value.sealed or "")
        return decode_tensor(self._session.identity.unseal(sealed))

    def private_value(self, timeout: float | None = None) -> PrivateValue:
        """A DP release: the noisy value with its mechanism, ε, δ and noise scale."""
        reply = self.wait(timeout)._reply
        assert reply is not None
        if reply.noise is None:
            raise JobFailed(f"job {self.id} was not a differentially private release", job_id=self.id)
        return PrivateValue(self.value(), reply.noise)

    def metrics(self, timeout: float | None = None) -> TrainMetrics:
        """A training's or an evaluation's figures (samples, loss, accuracy, ε), opened with
        the requester's key: they travel sealed, as figures of private data. Loss and accuracy
        are None, with ``withheld`` saying why, where no door of the node's policy lets them
        out to you (raw, approved, or with DP noise)."""
        reply = self.wait(timeout)._reply
        assert reply is not None
        if reply.metrics is None:
            raise JobFailed(f"job {self.id} on {self.node!r} answered without training or evaluation figures",
                            job_id=self.id)
        return reply.metrics.open(self._session.identity, self.id)

    def reply(self, timeout: float | None = None) -> JobReply:
        reply = self.wait(timeout)._reply
        assert reply is not None
        return reply

    def _parked(self) -> bool:
        """Whether the node's signed answer says it parked this job for its owner."""
        raw = self._session.transport.parked(self.id)
        return raw is not None and self._open(PENDING_APPROVAL, raw).status == JobStatus.PENDING_APPROVAL

    def _open(self, state: str, result: Any) -> JobReply:
        """The node's signed reply to this job (an answer, or word that it is parked)."""
        if state not in ("SUCCESS", PENDING_APPROVAL):  # unsigned: no answer at all
            raise NodeUnavailable(f"job {self.id} has no signed answer from {self.node!r} (the backend says "
                                  f"{state}, which proves nothing)", job_id=self.id)
        env = self._session.verify(result, self.node, self.id)
        body = parse_body(env.body_json(), self.id)
        if not isinstance(body, JobReply) or (env.recipient == PUBLIC and body.error is None):
            raise JobFailed(f"node {self.node!r} answered job {self.id} with a {body.kind!r}", job_id=self.id)
        return body


def _was_cancelled(reply: JobReply) -> bool:
    """Whether the node answered that the job's requester cancelled it before it ran."""
    return reply.error is not None and reply.error.code == JobCancelled.code

def submit(session: Session, node: str, job: Job) -> JobTicket:
    """Send one job to ``node``: its ticket, at once."""
    return JobTicket(session, session.send_job(node, job))


def mock_twin(session: Session, node: str, dataset: str) -> torch.Tensor:
    """A dataset's mock twin, fetched once (it is public)."""
    key = (node, dataset)
    if key not in session.mocks:
        session.mocks[key] = submit(session, node, MockRequest(dataset=dataset)).value()
    return session.mocks[key]


def _const_first(op: str, const: Any, expr: Expression) -> Expression:
    """``2 - x``: the plan's arguments keep their order, the constant comes first."""
    return expr._apply(op, const, constant_first=True)
