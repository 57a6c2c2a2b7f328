"""The release policy (ARCHITECTURE.md §6): when may a value leave this node?

Computing is allowed by default: a result kept at the node (``keep``) leaves nothing. A
value leaves only through a door, checked in order:

1. **raw** — the requester is in ``allowed_users`` of every private input of the plan;
2. **approved** — the owner approved this exact job (:mod:`workers.policy.approvals`);
3. **differentially private** — an (ε, δ) release charged to a budget (:mod:`workers.policy.ledger`).

The node's ``[approval]`` policy decides which kinds of job wait for the owner first.
Everything else is :class:`PermissionDenied`, naming the datasets whose door was closed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from protocol.errors import PermissionDenied
from protocol.messages import DPRelease, JobKind, KeepRelease, RawRelease
from workers.config import ApprovalSection


class Door(StrEnum):
    """How a job's value leaves the node — or that it waits for the owner (``PARK``)."""

    KEEP = "keep"  # it does not: kept at the node, a pointer ticket comes back
    RAW = "raw"  # to an allowed user of every input
    APPROVED = "approved"  # the owner approved this job
    DP = "dp"  # with noise, charged to the privacy budget
    PARK = "park"  # not yet: the job waits in the approval queue


_DOOR_OF_KIND = {JobKind.COMPUTE: Door.KEEP, JobKind.DP: Door.DP, JobKind.RAW_IF_ALLOWED: Door.RAW,
                 JobKind.RAW: Door.APPROVED, JobKind.TRAIN: Door.APPROVED}


@dataclass(frozen=True)
class Source:
    """A private input of a plan, as the policy sees it."""

    dataset: str
    allowed_users: Sequence[str]


def job_kind(requester: str, release: KeepRelease | RawRelease | DPRelease, sources: Sequence[Source],
             training: bool = False) -> JobKind:
    """The kind of job, as the approval policy names it."""
    if isinstance(release, KeepRelease):
        return JobKind.COMPUTE
    if isinstance(release, DPRelease):
        return JobKind.DP
    if all(requester in s.allowed_users for s in sources):
        return JobKind.RAW_IF_ALLOWED
    return JobKind.TRAIN if training else JobKind.RAW


def authorize(requester: str, release: KeepRelease | RawRelease | DPRelease, sources: Sequence[Source],
              node: str, approval: ApprovalSection, *, approved: bool = False, job_id: str | None = None,
              training: bool = False) -> Door:
    """The door the value leaves by (``keep``, ``raw``, ``approved`` or ``dp``), ``park``
    if the job must wait for the owner, or PermissionDenied saying why not. Trained
    weights released to a user who may not see the data raw are kind ``train``."""
    kind = job_kind(requester, release, sources, training)
    door = _DOOR_OF_KIND[kind]
    if approved or approval.automatic(requester, kind):
        return door
    if kind == JobKind.RAW and approval.default == "auto":
        closed = sorted({s.dataset for s in sources if requester not in s.allowed_users})
        raise PermissionDenied(
            f"{requester!r} may not see raw values derived from {', '.join(closed)} on {node!r}: only its "
            "allowed users may. Ask for a differentially private release (.get(epsilon=…)), keep the result "
            "at the node and compute further on it, or ask the owner for access (.request_access(reason))",
            job_id=job_id)
    return Door.PARK
