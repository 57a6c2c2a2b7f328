"""Job tickets: the handle a data scientist holds on a job while it runs at a node.

A ticket comes back at once from ``expr.submit()``. Its ``status`` moves through
``queued → pending_approval → running → done | failed | denied``; ``wait()`` blocks until the end;
``result()`` gives a :class:`~orchestrator.pointer.DataPointer` to the result kept at the
node. ``grid.ticket(ticket.id)`` picks a ticket up again, from any process.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from protocol.codec import decode_tensor
from protocol.contract import PENDING_APPROVAL, PUBLIC
from protocol.errors import ApprovalRequired, JobFailed, NodeUnavailable, error_from_wire
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
        """queued → pending_approval → running → done | failed | denied: ``done``, ``failed``,
        ``denied`` and ``pending_approval`` only on the node's signed word."""
        if self._reply is None:
            found = self._grid.transport.result(self.id)
            if found is None:
                state = _STATES.get(self._grid.transport.state(self.id), "queued")
                return "queued" if state == "pending_approval" and not self._parked() else state
            self._reply = self._open(*found)
        return self._reply.status

    def wait(self, timeout: float | None = None) -> JobTicket:
        """Block until the job ends; raise its typed error if it failed or was denied."""
        if self._reply is None:
            timeout = self._grid.timeout if timeout is None else timeout
            found = self._grid.transport.result(self.id, timeout)
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

