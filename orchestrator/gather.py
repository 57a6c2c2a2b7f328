"""One job to each of several nodes at once, and their answers as they come.

The round of ``grid.fit`` and a federated evaluation both send a signed job to every node
at once, then read all the results with one request a poll until every node has
answered or the time is up. A node answers with its reply, a typed error, or — when its
owner must approve the job first — ``ApprovalRequired``; a node that says nothing in time
is ``None``: the caller goes on without it.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import torch

from orchestrator.pointer import Expression, JobTicket
from orchestrator.session import Session
from protocol.codec import encode_tensor
from protocol.contract import CLAIM_CHECK_THRESHOLD, PENDING_APPROVAL
from protocol.errors import ApprovalRequired, GridError, InvalidRequest
from protocol.messages import EvalJob, SealedValue, TrainJob

Answer = tuple[float, JobTicket | GridError | None]  # seconds to answer, and the answer


def gather(session: Session, jobs: Sequence[tuple[str, TrainJob | EvalJob]], timeout: float, label: str
           ) -> dict[str, Answer]:
    """Send ``jobs`` (one per node) at once; each node's answer, in the order given.
    ``label`` is what Flower shows as the jobs' arguments (an envelope's repr is tens of
    KB of sealed weights)."""
    what = {node: "evaluation" if isinstance(body, EvalJob) else "training" for node, body in jobs}
    ids = session.send_jobs(jobs, ttl=max(600.0, timeout), label=label)
    answered = session.answers(list(ids.values()), timeout, also=(PENDING_APPROVAL,))
    out: dict[str, Answer] = {}
    for node, job_id in ids.items():
        if job_id not in answered:
            out[node] = (timeout, None)
            continue
        seconds, meta = answered[job_id]
        try:
            ticket = JobTicket.finished(session, job_id, meta["status"], meta["result"])  # verified, both kinds
        except GridError as exc:
            out[node] = (seconds, exc)
            continue
        if ticket.status == "pending_approval":  # parked for the owner: the caller goes on without the node
            out[node] = (seconds, ApprovalRequired(
                f"{node!r} parked the {what[node]} job for its owner's approval (kind 'train': you may not "
                f"see what the model learns of its data); job id {job_id}", job_id=job_id))
        else:
            out[node] = (seconds, ticket)
    return out


def seal_for(session: Session, node: str, flat: torch.Tensor) -> SealedValue:
    """Weights sealed to one node: inline if small, else left in Redis by claim-check."""
    sealed = session.node_key(node).seal(encode_tensor(flat))
    if len(sealed) <= CLAIM_CHECK_THRESHOLD:
        return SealedValue(sealed=base64.b64encode(sealed).decode(), size=len(sealed))
    return SealedValue.left(session.leave(sealed), sealed)


def pairs(data: object, what: str) -> list[tuple[Expression, Expression]]:
    """``data`` as (x, y) pairs, one per node, each on one node — or an InvalidRequest that
    shows the shape to give (a bare ``(x, y)`` would otherwise fail deep inside with
    ``too many values to unpack``)."""

    def pair(p: object) -> bool:
        return isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(e, Expression) for e in p)

    if pair(data):
        raise InvalidRequest(f"{what} is a list of (x, y) pairs, one per node: pass [(x, y)], not (x, y)")
    if not isinstance(data, list | tuple) or not data or not all(pair(p) for p in data):
        raise InvalidRequest(f"{what} must be a non-empty list of (x, y) pairs of pointers (or expressions on them), "
                             "one per node, e.g. [(t[:, :64], t[:, 64]) for t in tables]")
    for x, y in data:
        same_node(x.node, x, y)
    return [(x, y) for x, y in data]


def same_node(node: str, *exprs: Expression) -> None:
    if any(e.node != node for e in exprs):
        raise InvalidRequest(f"x and y must be data on the same node ({node!r}); got "
                             f"{sorted({e.node for e in exprs})}")
