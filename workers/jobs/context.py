"""What every kind of job at a node works with: who asks, the node's data and keys, and the
steps all jobs share — reading a plan's inputs, keeping a result, sealing a value for its
requester, taking a sealed value from the broker."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from protocol.codec import dtype_name, encode_tensor
from protocol.contract import CLAIM_CHECK_THRESHOLD
from protocol.errors import InvalidRequest
from protocol.identity import Identity, PublicIdentity
from protocol.interpret import validate
from protocol.messages import (
    DPRelease,
    EvalJob,
    JobReply,
    KeepRelease,
    PointerTicket,
    RawRelease,
    SealedValue,
    TrainJob,
)
from protocol.plan import Plan, TensorSpec
from workers.config import ApprovalSection, RetentionSection
from workers.policy.doors import Door, Source, authorize
from workers.policy.ledger import Ledger
from workers.policy.release import PendingCharge
from workers.storage.store import DatasetRow, Store

ClaimCheck = Callable[[bytes], str]  # stores sealed bytes, returns their key
ClaimTake = Callable[[str], bytes]  # takes (fetches and deletes) bytes left by claim-check
# takes a job up: marks it started unless something came first (its requester's cancellation,
# protocol.cancel); None if the node was first, else what is there
TakeUp = Callable[[str], bytes | None]


def _taken_up_here(job_id: str) -> bytes | None:
    return None  # without a broker (tests of the runner alone): nothing can cancel a job


@dataclass(frozen=True)
class Job:
    """Who asks, under which job id, and whether the owner already approved it."""

    requester: str
    job_id: str
    approved: bool = False


@dataclass(frozen=True)
class Outcome:
    """A job's reply, and the privacy charge it must be recorded with (a DP release)."""

    reply: JobReply
    charge: PendingCharge | None = None


@dataclass
class NodeContext:
    node_id: str
    identity: Identity
    keyring: dict[str, PublicIdentity]  # the node's users
    store: Store
    ledger: Ledger
    approval: ApprovalSection
    claim_check: ClaimCheck
    claim_take: ClaimTake
    node_key: Callable[[str], PublicIdentity]  # another node's key, as the gateway lists it
    memory_limit: int | None = None  # bytes a plan may hold at once ([worker] memory_limit_mb)
    slots_per_user: int = 0  # worker processes one requester may hold at once (workers.jobs.slots); 0: no cap
    retention: RetentionSection = field(default_factory=RetentionSection)  # [retention]: workers.storage.retention
    take_up: TakeUp = _taken_up_here  # workers.node: SET NX of the job's cancel key on the broker

    def door(self, job: Job, release: KeepRelease | RawRelease | DPRelease, sources: list[Source],
             training: bool = False) -> Door:
        return authorize(job.requester, release, sources, self.node_id, self.approval, approved=job.approved,
                         job_id=job.job_id, training=training)

    def inputs(self, plan: Plan, requester: str,
               seen: dict[str, tuple[DatasetRow, torch.Tensor, list[str]]] | None = None
               ) -> tuple[list[torch.Tensor], list[Source]]:
        """A plan's input tensors, validated against it, and the datasets they come from
        (``seen``: datasets already looked up by this job, e.g. for x when reading y)."""
        seen = {} if seen is None else seen
        inputs, specs, sources = [], [], []
        for ref in plan.inputs:
            if ref.kind == "dataset":
                if ref.name not in seen:
                    seen[ref.name] = self.store.job_input(ref.name)
                _, tensor, users = seen[ref.name]
                sources.append(Source(ref.name, users))
            else:  # a kept result carries the datasets it was derived from
                obj, tensor = self.store.object(ref.name, requester)
                sources.extend(self.sources(obj.sources))
            inputs.append(tensor)
            specs.append(TensorSpec(shape=tuple(tensor.shape), dtype=dtype_name(tensor.dtype)))
        validate(plan, specs, memory=self.memory_limit)
        return inputs, sources

    def xy_inputs(self, job: TrainJob | EvalJob, requester: str
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[Source]]:
        """The inputs of a model job's x and y plans, and the datasets they come from (x and
        y are most often columns of one table: it is looked up once)."""
        seen: dict[str, tuple[DatasetRow, torch.Tensor, list[str]]] = {}
        x_inputs, x_sources = self.inputs(job.x, requester, seen)
        y_inputs, y_sources = self.inputs(job.y, requester, seen)
        return x_inputs, y_inputs, x_sources + y_sources

    def sources(self, datasets: list[str]) -> list[Source]:
        return [Source(n, self.store.allowed_users(n)) for n in datasets]

    def keep(self, job: Job, result: torch.Tensor, datasets: list[str]) -> PointerTicket:
        object_id = "obj-" + hashlib.sha256(job.job_id.encode()).hexdigest()[:32]  # safe as a file name
        obj = self.store.put_object(object_id, job.job_id, job.requester, result, datasets)
        return PointerTicket(node=self.node_id, object_id=obj.id, job_id=job.job_id,
                             shape=tuple(obj.shape), dtype=obj.dtype, sources=obj.sources)

    def seal(self, requester: str, value: torch.Tensor) -> SealedValue:
        sealed = self.keyring[requester].seal(encode_tensor(value))
        if len(sealed) > CLAIM_CHECK_THRESHOLD:
            return SealedValue.left(self.claim_check(sealed), sealed)
        return SealedValue(sealed=base64.b64encode(sealed).decode(), size=len(sealed))

    def unseal(self, value: SealedValue) -> bytes:
        if value.claim_check is not None:
            data = value.checked(self.claim_take(value.claim_check))
        elif value.sealed is not None:
            data = base64.b64decode(value.sealed)
        else:
            raise InvalidRequest("a sealed value must carry its bytes or a claim-check key")
        return self.identity.unseal(data)


def describe(release: KeepRelease | RawRelease | DPRelease) -> str:
    """A release as the approval queue shows it."""
    if isinstance(release, DPRelease):
        return f"dp (ε={release.epsilon:g}" + (f", δ={release.delta:g})" if release.delta else ")")
    return release.door
