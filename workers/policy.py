"""The release policy (ARCHITECTURE.md §6): when may a value leave this node?

Computing is always allowed: a result kept at the node (``keep``) leaves nothing. A value
leaves only through a door, checked in order:

1. **raw** — the requester is in ``allowed_users`` of every private input of the plan;
2. **approved** — the owner approved this exact job (approval queue, next issue);
3. **differentially private** — an (ε, δ) release charged to a budget (:mod:`workers.ledger`).

Everything else is :class:`PermissionDenied`, naming the datasets whose door was closed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from protocol.errors import PermissionDenied
from protocol.messages import DPRelease, KeepRelease, RawRelease


@dataclass(frozen=True)
class Source:
    """A private input of a plan, as the policy sees it."""

    dataset: str
    allowed_users: Sequence[str]


def authorize(requester: str, release: KeepRelease | RawRelease | DPRelease, sources: Sequence[Source],
              node: str, job_id: str | None = None) -> str:
    """Return the door the value leaves by (``keep``, ``raw`` or ``dp``), or raise why not.
    A DP release is asked for explicitly; its budget is checked by the ledger."""
    if isinstance(release, KeepRelease):
        return "keep"
    if isinstance(release, DPRelease):
        return "dp"
    closed = sorted({s.dataset for s in sources if requester not in s.allowed_users})
    if not closed:
        return "raw"
    raise PermissionDenied(
        f"{requester!r} may not see raw values derived from {', '.join(closed)} on {node!r}: "
        f"only its allowed users may. Ask for a differentially private release (.get(epsilon=…)), "
        f"keep the result at the node and compute further on it, or ask the owner for access",
        job_id=job_id,
    )

