"""Job tickets: the handle a data scientist holds on a job while it runs at a node.

A ticket comes back at once from ``expr.submit()``. Its ``status`` moves through
``queued → pending_approval → running → done | failed | denied``, or ``queued → cancelled``;
``wait()`` blocks until the end; ``result()`` gives a
:class:`~orchestrator.pointer.DataPointer` to the result kept at the node; ``cancel()``
withdraws a job its node has not started yet (:mod:`protocol.cancel`).
``grid.ticket(ticket.id)`` picks a ticket up again, from any process.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

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
from protocol.messages import JobReply, NoiseInfo, TrainMetrics, parse_body
from protocol.plan import InputRef, TensorSpec

if TYPE_CHECKING:
    from orchestrator.grid import Grid
    from orchestrator.pointer import DataPointer

_STATES = {"PENDING": "queued", "RECEIVED": "queued", "STARTED": "running", "RETRY": "queued",
           PENDING_APPROVAL: "pending_approval",
           # final states that nothing signed: not an answer, the job may yet be run (redelivered)
           "FAILURE": "running", "REVOKED": "running"}


@dataclass(frozen=True)
class PrivateValue:
    """A differentially private release: the noisy value, and how it was made."""

    value: torch.Tensor
    noise: NoiseInfo

    def item(self) -> float:
        return float(self.value.item())

    def __float__(self) -> float:
        return self.item()

    def __repr__(self) -> str:
        n = self.noise
        shown = f"{self.item():.6g}" if self.value.numel() == 1 else f"tensor of shape {tuple(self.value.shape)}"
        privacy = f"ε={n.epsilon:g}" + (f", δ={n.delta:g}" if n.delta else "")
        after = " on its aggregates, then post-processed" if n.post_processed else ""
        return f"PrivateValue({shown}; {n.mechanism} noise of scale {n.scale:.4g}{after}, {privacy})"


class JobTicket:
    def __init__(self, grid: Grid, job_id: str) -> None:
        self._grid = grid
        self.id = job_id
        self.node = job_id.split(":", 1)[0]
        self._reply: JobReply | None = None
        self._cancelled = False  # this requester's cancellation is on the broker, before the node took the job up

    @classmethod
    def finished(cls, grid: Grid, job_id: str, state: str, result: Any) -> JobTicket:
        """A ticket on a job whose final state and result the caller has read already (a
        round of ``fit`` reads all its jobs' in one request)."""
        ticket = cls(grid, job_id)
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
            found = self._grid.transport.result(self.id)
            if found is None:
                if self._cancel_requested():
                    return "cancelled"
                state = _STATES.get(self._grid.transport.state(self.id), "queued")
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
        transport = self._grid.transport
        if self._reply is None and (found := transport.result(self.id)) is not None:
            self._reply = self._open(*found)
        if self._reply is not None:
            return self._finished_already()
        if not transport.sent(self.id):
            raise NotFound(f"job {self.id} was never sent on this broker, or its answer's lifetime is over: there is "
                           "nothing to cancel", job_id=self.id)
        first = transport.cancel(self.id, cancellation(self._grid.identity, self.id))
        if first is None or cancelled_by(first, self._grid.identity.public, self.id):
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
            info = self._grid.cancel_request(self.id)
        except InvalidRequest as exc:  # decided (or expired) in the meantime
            if (found := self._grid.transport.result(self.id)) is not None:
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
        hint = ("its result is there (ticket.result(), .value() or .metrics())" if self._reply.status == "done"
                else "ticket.wait() raises its error")
        raise CannotCancel(f"job {self.id} has already finished at {self.node!r} ({self._reply.status}): there is "
                           f"nothing left to cancel; {hint}", job_id=self.id)

    def _cancel_requested(self) -> bool:
        """Whether your signed cancellation of this job came before its node took it up (from
        this process, or read on the broker: a ticket picked up again with grid.ticket)."""
        if not self._cancelled:
            mark = self._grid.transport.cancel_mark(self.id)
            self._cancelled = mark is not None and cancelled_by(mark, self._grid.identity.public, self.id)
        return self._cancelled

    def _cancelled_error(self) -> JobCancelled:
        return JobCancelled(f"you cancelled job {self.id} before {self.node!r} ran it: it did not run",
                            job_id=self.id)

    def wait(self, timeout: float | None = None) -> JobTicket:
        """Block until the job ends; raise its typed error if it failed, was denied or
        cancelled."""
        if self._reply is None:
            timeout = self._grid.timeout if timeout is None else timeout
            # cancelled from here: the node may be busy with other jobs, and answers so only when it reaches this one
            found = self._grid.transport.result(self.id, 0.0 if self._cancelled else timeout)
            if found is None and self._cancel_requested():
                raise self._cancelled_error()
            if found is None:
                state = _STATES.get(self._grid.transport.state(self.id), "queued")
                if state == "pending_approval" and self._parked():
                    raise ApprovalRequired(
                        f"job {self.id} waits for the approval of {self.node!r}'s owner; wait longer, or pick it "
                        f"up later with grid.ticket({self.id!r})", job_id=self.id)
                hint = ("no worker of this node took it: is the node running?" if state == "queued"
                        else "it is still running")
                raise NodeUnavailable(
                    f"job {self.id} on {self.node!r} is {state} after {timeout:.0f} s; {hint}. "
                    f"Pick it up later with grid.ticket({self.id!r}).{self._grid.transport.unsigned(self.id)}",
                    job_id=self.id)
            self._reply = self._open(*found)
        if self._reply.error is not None:
            raise error_from_wire(self._reply.error.model_dump())
        return self

    def result(self, timeout: float | None = None) -> DataPointer:
        """A pointer to the result kept at the node."""
        from orchestrator.pointer import DataPointer

        reply = self.wait(timeout)._reply
        assert reply is not None
        if reply.ticket is None:
            raise JobFailed(f"job {self.id} released a value; it kept no result at the node", job_id=self.id)
        t = reply.ticket
        return DataPointer(self._grid, t.node, InputRef(kind="object", name=t.object_id),
                           TensorSpec(shape=t.shape, dtype=t.dtype))

    def value(self, timeout: float | None = None) -> torch.Tensor:
        """The released value, opened with the requester's key."""
        reply = self.wait(timeout)._reply
        assert reply is not None
        if reply.value is None:
            raise JobFailed(f"job {self.id} kept its result at the node; use .result()", job_id=self.id)
        if reply.value.claim_check is not None:
            sealed = reply.value.checked(self._grid.transport.claim(reply.value.claim_check))
        else:
            sealed = base64.b64decode(reply.value.sealed or "")
        return decode_tensor(self._grid.identity.unseal(sealed))

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
        return reply.metrics.open(self._grid.identity, self.id)

    def reply(self, timeout: float | None = None) -> JobReply:
        reply = self.wait(timeout)._reply
        assert reply is not None
        return reply

    def _parked(self) -> bool:
        """Whether the node's signed answer says it parked this job for its owner."""
        raw = self._grid.transport.parked(self.id)
        return raw is not None and self._open(PENDING_APPROVAL, raw).status == "pending_approval"

    def _open(self, state: str, result: Any) -> JobReply:
        """The node's signed reply to this job (an answer, or word that it is parked)."""
        if state not in ("SUCCESS", PENDING_APPROVAL):  # unsigned: no answer at all
            raise NodeUnavailable(f"job {self.id} has no signed answer from {self.node!r} (the backend says "
                                  f"{state}, which proves nothing)", job_id=self.id)
        env = self._grid.transport.verify(result, self.node, self.id)
        body = parse_body(env.body_json(), self.id)
        if not isinstance(body, JobReply) or (env.recipient == PUBLIC and body.error is None):
            raise JobFailed(f"node {self.node!r} answered job {self.id} with a {body.kind!r}", job_id=self.id)
        return body


def _was_cancelled(reply: JobReply) -> bool:
    """Whether the node answered that the job's requester cancelled it before it ran."""
    return reply.error is not None and reply.error.code == JobCancelled.code
