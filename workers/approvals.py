"""The owner's approval queue: jobs that wait for a person's decision.

A job the node's ``[approval]`` policy does not run automatically is *parked*: recorded
here with what a person needs to judge it (who, when, which datasets, the plan as readable
operations, the release asked for) and its verified envelope, so that approving it later
runs exactly what was asked. Pending requests live in the node database: they survive a
restart. The scientist's ticket reads ``pending_approval`` meanwhile.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from protocol.errors import InvalidRequest, NotFound
from workers.store import RequestRow, Store


class Parked(Exception):  # noqa: N818 - a signal inside the runner, not an error for users
    """Raised inside the runner: this job waits for the owner."""

    def __init__(self, kind: str, datasets: list[str], summary: str, release: str, reason: str = "") -> None:
        super().__init__(kind)
        self.kind, self.datasets, self.summary, self.release, self.reason = kind, datasets, summary, release, reason


class Requests:
    def __init__(self, store: Store) -> None:
        self.store = store

    def park(self, job_id: str, requester: str, envelope: dict[str, Any], parked: Parked) -> None:
        with self.store.session() as s:
            if s.get(RequestRow, job_id) is not None:
                return  # delivered again: it is already waiting
            s.add(RequestRow(job_id=job_id, requester=requester, kind=parked.kind, datasets=parked.datasets,
                             summary=parked.summary, release=parked.release, reason=parked.reason,
                             envelope=envelope, status="pending", decision="", created_at=time.time(),
                             decided_at=None))

    def list(self, status: str | None = "pending") -> list[RequestRow]:
        with self.store.session() as s:
            query = select(RequestRow).order_by(RequestRow.created_at)
            if status is not None:
                query = query.where(RequestRow.status == status)
            return list(s.scalars(query))

    def resolve(self, given: str) -> str:
        """The whole id of the request ``given`` names: the id itself, or a unique prefix of it
        (with or without the ``node:`` part), as git takes a commit's."""
        with self.store.session() as s:
            if s.get(RequestRow, given) is not None:
                return given
            # ids read '<node>:<hex>' (one colon): a prefix of the whole id, or of its hex part
            ids = list(s.scalars(select(RequestRow.job_id).where(
                RequestRow.job_id.startswith(given, autoescape=True)
                | RequestRow.job_id.contains(":" + given, autoescape=True)))) if given else []
        if len(ids) == 1:
            return ids[0]
        if not ids:
            raise NotFound(f"no request {given!r} on this node; `gridq requests list --all` shows them")
        shown = ", ".join(sorted(ids)[:4]) + (", …" if len(ids) > 4 else "")
        raise InvalidRequest(f"{given!r} names {len(ids)} requests ({shown}); give more of the id")

    def get(self, job_id: str) -> RequestRow:
        job_id = self.resolve(job_id)
        with self.store.session() as s:
            row = s.get(RequestRow, job_id)
        if row is None:
            raise NotFound(f"no request {job_id!r} on this node; `gridq requests list` shows the pending ones")
        return row

    def decide(self, job_id: str, status: str, decision: str = "") -> RequestRow:
        """Mark a pending request approved or denied (once: a decision is final)."""
        if status not in ("approved", "denied"):
            raise InvalidRequest(f"a request is approved or denied, not {status!r}")
        job_id = self.resolve(job_id)
        with self.store.session() as s:
            row = s.get(RequestRow, job_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no request {job_id!r} on this node")
            if row.status != "pending":
                raise InvalidRequest(f"request {job_id} was already {row.status}")
            row.status, row.decision, row.decided_at = status, decision, time.time()
            return row
