"""A session: what the client's parts need of a grid, and no more.

Tickets, pointers and their expressions, federated training and evaluation, and MPC
requests act as one identity, wait as long as its timeout says, send signed jobs to nodes
and read their verified answers. That is a :class:`Session`. ``Grid`` holds one — a
:class:`TransportSession`, over Redis and Celery — and hands it to what it builds; ``Grid``
is one too, so anything built on a session may be given a grid.

What a round of ``grid.fit`` needs (send jobs, wait for many answers, verify one, seal
weights, take a value left by claim-check) is here as methods, so a session can live in
memory and the round loop be tested without a broker. The rest — a job's state, cancelling
it, MPC's requests and lists — goes by ``transport``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator.transport import Transport
from protocol.contract import Tasks, node_queue
from protocol.envelope import Envelope
from protocol.identity import Identity, PublicIdentity
from protocol.messages import (
    AccessRequest,
    BudgetQuery,
    CancelRequest,
    EvalJob,
    MockRequest,
    MyRequests,
    RunJob,
    TrainJob,
)

if TYPE_CHECKING:
    import torch

Job = RunJob | TrainJob | EvalJob | BudgetQuery | AccessRequest | MockRequest | MyRequests | CancelRequest
# job id → (seconds it took to answer, its result's meta: status and the signed reply)
Answers = dict[str, tuple[float, dict[str, Any]]]


class Session(Protocol):
    """One identity's way to the grid's nodes."""

    @property
    def transport(self) -> Transport: ...

    @property
    def identity(self) -> Identity: ...

    @property
    def timeout(self) -> float:
        """How long a call waits for an answer, unless told otherwise."""
        ...

    @property
    def mocks(self) -> dict[tuple[str, str], torch.Tensor]:
        """Datasets' mock twins fetched so far, by (node, dataset): they are public, fetched once."""
        ...

    def node_key(self, node: str) -> PublicIdentity:
        """``node``'s key as the gateway lists it; NotFound for a node it does not know."""
        ...

    def send_job(self, node: str, job: Job) -> str:
        """Send one signed job to ``node``: its id, at once."""
        ...

    def send_jobs(self, jobs: Sequence[tuple[str, Job]], *, ttl: float, label: str) -> dict[str, str]:
        """Send one job to each node at once (``label``: what Flower shows as their arguments);
        their ids, by node."""
        ...

    def answers(self, job_ids: Sequence[str], timeout: float, also: tuple[str, ...] = ()) -> Answers:
        """Wait up to ``timeout`` for the answers of ``job_ids`` (or for them to reach one of
        the states ``also``): those that came, with the seconds each took."""
        ...

    def verify(self, raw: Any, node: str, job_id: str) -> Envelope:
        """``node``'s signed reply to ``job_id``, verified."""
        ...

    def leave(self, data: bytes) -> str:
        """Leave sealed bytes for a node by claim-check; the key."""
        ...

    def claim(self, key: str) -> bytes:
        """Take sealed bytes left for you by claim-check."""
        ...


class TransportSession:
    """The session over a grid's broker (:class:`~orchestrator.transport.Transport`)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.mocks: dict[tuple[str, str], torch.Tensor] = {}

    @property
    def identity(self) -> Identity:
        return self.transport.identity

    @property
    def timeout(self) -> float:
        return self.transport.timeout

    def node_key(self, node: str) -> PublicIdentity:
        return self.transport.node_key(node)

    def send_job(self, node: str, job: Job) -> str:
        self.transport.node_key(node)  # an unknown node fails now, not after a timeout
        job_id = f"{node}:{uuid.uuid4().hex}"
        self.transport.send(node, Tasks.RUN_JOB, node_queue(node), job, job_id)
        return job_id

    def send_jobs(self, jobs: Sequence[tuple[str, Job]], *, ttl: float, label: str) -> dict[str, str]:
        ids = {node: f"{node}:{uuid.uuid4().hex}" for node, _ in jobs}
        self.transport.send_all([(node, Tasks.RUN_JOB, node_queue(node), body, ids[node]) for node, body in jobs],
                                ttl=ttl, label=label)
        return ids

    def answers(self, job_ids: Sequence[str], timeout: float, also: tuple[str, ...] = ()) -> Answers:
        return self.transport.results(job_ids, timeout, also)

    def verify(self, raw: Any, node: str, job_id: str) -> Envelope:
        return self.transport.verify(raw, node, job_id)

    def leave(self, data: bytes) -> str:
        return self.transport.leave(data)

    def claim(self, key: str) -> bytes:
        return self.transport.claim(key)
