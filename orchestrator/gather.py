"""One job to each of several nodes at once, and their answers as they come.

The round of ``grid.fit`` and a federated evaluation both send a signed job to every node
in one Celery group, then read all the results with one MGET a poll until every node has
answered or the time is up. A node answers with its reply, a typed error, or — when its
owner must approve the job first — ``ApprovalRequired``; a node that says nothing in time
is ``None``: the caller goes on without it.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from celery import Celery, group, states

from orchestrator.broker import broker_errors
from orchestrator.ticket import JobTicket
from protocol.codec import encode_tensor
from protocol.contract import CLAIM_CHECK_THRESHOLD, PENDING_APPROVAL, Tasks, node_queue
from protocol.envelope import seal_envelope
from protocol.errors import ApprovalRequired, GridError, InvalidRequest
from protocol.messages import EvalJob, SealedValue, TrainJob

if TYPE_CHECKING:
    from orchestrator.grid import Grid
    from orchestrator.pointer import Expression

Answer = tuple[float, JobTicket | GridError | None]  # seconds to answer, and the answer


def gather(grid: Grid, jobs: Sequence[tuple[str, TrainJob | EvalJob]], timeout: float, label: str
           ) -> dict[str, Answer]:
    """Send ``jobs`` (one per node) at once; each node's answer, in the order given.
    ``label`` is what Flower shows as the jobs' arguments (an envelope's repr is tens of
    KB of sealed weights)."""
    ids: dict[str, str] = {}
    what: dict[str, str] = {}
    signatures = []
    for node, body in jobs:
        job_id = ids[node] = f"{node}:{uuid.uuid4().hex}"
        what[node] = "evaluation" if isinstance(body, EvalJob) else "training"
        env = seal_envelope(grid.identity, recipient=node, kind=body.kind, job_id=job_id,
                            body=body.model_dump(mode="json"), now=time.time(), ttl=max(600.0, timeout))
        signatures.append(grid.app.signature(Tasks.RUN_JOB, args=[env.model_dump(mode="json")],
                                             queue=node_queue(node)).set(task_id=job_id, argsrepr=label))
    group(signatures).apply_async()
    answered = wait_ready(grid.app, list(ids.values()), timeout, also=(PENDING_APPROVAL,))
    out: dict[str, Answer] = {}
    for node, job_id in ids.items():
        if job_id not in answered:
            out[node] = (timeout, None)
            continue
        seconds, meta = answered[job_id]
        if meta["status"] == PENDING_APPROVAL:  # parked for the owner: the caller goes on without the node
            out[node] = (seconds, ApprovalRequired(
                f"{node!r} parked the {what[node]} job for its owner's approval (kind 'train': you may not "
                f"see what the model learns of its data); job id {job_id}", job_id=job_id))
            continue
        try:
            out[node] = (seconds, JobTicket.finished(grid, job_id, meta["status"], meta["result"]))
        except GridError as exc:
            out[node] = (seconds, exc)
    return out



def wait_ready(app: Celery, job_ids: Sequence[str], timeout: float, also: tuple[str, ...] = ()
               ) -> dict[str, tuple[float, dict[str, Any]]]:
    """Poll the result backend for ``job_ids`` — one MGET for all of them every 5 ms — until
    each is in a final state (or one of ``also``) or ``timeout`` has passed: for each that
    got there, the seconds it took and its result's meta (status, result)."""
    backend = app.backend
    keys = {job_id: backend.get_key_for_task(job_id) for job_id in job_ids}
    started = time.monotonic()
    answered: dict[str, tuple[float, dict[str, Any]]] = {}
    while len(answered) < len(keys) and time.monotonic() - started < timeout:
        waiting = [j for j in keys if j not in answered]
        with broker_errors(app.conf.broker_url):
            found = backend.client.mget([keys[j] for j in waiting])
        for job_id, raw in zip(waiting, found, strict=True):
            meta = backend.decode_result(raw) if raw is not None else None
            if meta is not None and meta["status"] in (*states.READY_STATES, *also):
                answered[job_id] = (time.monotonic() - started, meta)
        time.sleep(0.005)
    return answered


def seal_for(grid: Grid, node: str, flat: torch.Tensor) -> SealedValue:
    """Weights sealed to one node: inline if small, else left in Redis by claim-check."""
    sealed = grid._node_key(node).seal(encode_tensor(flat))
    if len(sealed) <= CLAIM_CHECK_THRESHOLD:
        return SealedValue(sealed=base64.b64encode(sealed).decode(), size=len(sealed))
    return SealedValue.left(grid._leave(sealed), sealed)


def same_node(node: str, *exprs: Expression) -> None:
    if any(e.node != node for e in exprs):
        raise InvalidRequest(f"x and y must be data on the same node ({node!r}); got "
                             f"{sorted({e.node for e in exprs})}")
