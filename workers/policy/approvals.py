"""The owner's approval queue: jobs that wait for a person's decision.

A job the node's ``[approval]`` policy does not run automatically is *parked*: recorded
here with what a person needs to judge it (who, when, which datasets, the plan as readable
operations, the release asked for) and its verified envelope, so that approving it later
runs exactly what was asked. Pending requests live in the node database: they survive a
restart. The scientist's ticket reads ``pending_approval`` meanwhile.

A request ends once: ``approved`` or ``denied`` by the owner, ``cancelled`` by its
requester (:class:`OwnRequests`, the requester's own view of the queue), or ``expired`` —
no decision within ``[approval] expire_after`` seconds of its arrival. The last two never
run; their requester's ticket ends with ``JobCancelled`` or ``RequestExpired``
(:func:`refusal`), answered by whoever closes them, or by the worker's sweep
(``Node.expire_requests``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from protocol.errors import (
    GridError,
    InvalidRequest,
    JobCancelled,
    NotFound,
    PermissionDenied,
    RequestDenied,
    RequestExpired,
)
from protocol.messages import CancelRequest, JobKind, JobReply, JobStatus, MyRequests, RequestInfo, RequestStatus
from workers.jobs.context import Job, Outcome
from workers.storage.store import JobRow, RequestRow, Store

CLOSED = (RequestStatus.EXPIRED, RequestStatus.CANCELLED)  # ended without the owner's decision: they never run
MAX_LISTED = 1000  # a requester's requests in one answer (JobReply.requests), the newest
Rows = list[RequestRow]  # (inside Requests, ``list`` is its method)


class Parked(Exception):  # noqa: N818 - a signal inside the runner, not an error for users
    """Raised inside the runner: this job waits for the owner."""

    def __init__(self, kind: JobKind, datasets: list[str], summary: str, release: str, reason: str = "") -> None:
        super().__init__(kind)
        self.kind, self.datasets, self.summary, self.release, self.reason = kind, datasets, summary, release, reason


def iso(when: float) -> str:
    """A time as ISO-8601 in UTC, to the second (``2026-12-06T22:46:38Z``)."""
    return datetime.fromtimestamp(when, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sweep_every(expire_after: float) -> float:
    """How often a worker sweeps its approval queue (closes expired requests, keeps the word
    that a job waits signed): a quarter of ``expire_after``, between half a second and a
    minute; a minute if requests never expire (0)."""
    return min(60.0, max(0.5, expire_after / 4)) if expire_after > 0 else 60.0


class Requests:
    """The approval queue in the node database. ``expire_after`` (seconds, ``[approval]
    expire_after``; 0: never) closes requests left undecided that long."""

    def __init__(self, store: Store, expire_after: float = 0.0) -> None:
        self.store = store
        self.expire_after = expire_after

    def park(self, job_id: str, requester: str, envelope: dict[str, Any], parked: Parked) -> None:
        with self.store.session() as s:
            if s.get(RequestRow, job_id) is not None:
                return  # delivered again: it is already waiting
            s.add(RequestRow(job_id=job_id, requester=requester, kind=parked.kind, datasets=parked.datasets,
                             summary=parked.summary, release=parked.release, reason=parked.reason,
                             envelope=envelope, status=RequestStatus.PENDING, decision="", created_at=time.time(),
                             decided_at=None))

    def list(self, status: str | None = RequestStatus.PENDING, *, requester: str | None = None,
             newest: int | None = None) -> Rows:
        """Requests of ``status`` (None: all), of ``requester`` (None: everyone's), oldest
        first; with ``newest``, only the newest that many."""
        if status is not None and status not in tuple(RequestStatus):
            raise InvalidRequest(f"a request is {', '.join(RequestStatus)}, not {status!r}")
        with self.store.session() as s:
            query = select(RequestRow)
            if status is not None:
                query = query.where(RequestRow.status == status)
            if requester is not None:
                query = query.where(RequestRow.requester == requester)
            if newest is None:
                return list(s.scalars(query.order_by(RequestRow.created_at)))
            return list(reversed(list(s.scalars(query.order_by(RequestRow.created_at.desc()).limit(newest)))))

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

    def deadline(self, row: RequestRow) -> float | None:
        """When a request expires if nobody decides it (None: never)."""
        return row.created_at + self.expire_after if self.expire_after > 0 else None

    def decide(self, job_id: str, status: str, decision: str = "") -> RequestRow:
        """Mark a pending request approved or denied (once: a decision is final). One past
        its deadline is closed as expired instead, and the decision refused."""
        if status not in (RequestStatus.APPROVED, RequestStatus.DENIED):
            raise InvalidRequest(f"a request is approved or denied, not {status!r}")
        job_id = self.resolve(job_id)
        with self.store.session() as s:
            row = s.get(RequestRow, job_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no request {job_id!r} on this node")
            if row.status != RequestStatus.PENDING:
                raise self._closed(row)
            if not self._expire(row, time.time()):
                row.status, row.decision, row.decided_at = status, decision, time.time()
                return row
        raise self._closed(row)  # expired just now: that is recorded, the decision is not

    def cancel(self, job_id: str, requester: str) -> RequestRow:
        """Withdraw ``requester``'s pending request ``job_id`` (its whole id): it never runs.
        Cancelling one cancelled before is no error (its answer may not have left)."""
        with self.store.session() as s:
            row = s.get(RequestRow, job_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no request {job_id!r} is in this node's approval queue; grid.requests() lists "
                               "yours (a job the node has not taken up yet is withdrawn with ticket.cancel())",
                               job_id=job_id)
            if row.requester != requester:  # ids are unguessable: whoever names one was shown it
                raise PermissionDenied(f"request {job_id} is not {requester!r}'s: only the user who sent it may "
                                       "cancel it", job_id=job_id)
            if row.status == RequestStatus.CANCELLED:
                return row
            if row.status != RequestStatus.PENDING:
                raise self._closed(row)
            if not self._expire(row, time.time()):
                row.status, row.decided_at = RequestStatus.CANCELLED, time.time()
                row.decision = f"cancelled by {requester}"
                return row
        raise self._closed(row)

    def expire_due(self, now: float | None = None) -> Rows:
        """Close every pending request past its deadline as ``expired``; those closed now."""
        if self.expire_after <= 0:
            return []
        now = time.time() if now is None else now
        with self.store.session() as s:
            due = list(s.scalars(select(RequestRow).where(RequestRow.status == RequestStatus.PENDING,
                                                          RequestRow.created_at <= now - self.expire_after)))
            for row in due:
                self._expire(row, now)
            return due

    def unanswered(self) -> Rows:
        """Requests closed without the owner (expired, cancelled) whose job still reads
        ``pending_approval``: their requester has not been told yet."""
        with self.store.session() as s:
            return list(s.scalars(select(RequestRow).join(JobRow, JobRow.job_id == RequestRow.job_id).where(
                RequestRow.status.in_(CLOSED), JobRow.status == JobStatus.PENDING_APPROVAL
            ).order_by(RequestRow.created_at)))

    def info(self, row: RequestRow) -> RequestInfo:
        """A request as its requester may see it (not the plan: they wrote it)."""
        return RequestInfo(id=row.job_id, kind=row.kind, datasets=row.datasets[:64], release=row.release[:512],
                           status=row.status, created_at=row.created_at, decided_at=row.decided_at,
                           expires_at=self.deadline(row) if row.status == RequestStatus.PENDING else None,
                           decision=row.decision[:4096])

    def _expire(self, row: RequestRow, now: float) -> bool:
        """Close ``row`` (pending, in the caller's session) as expired if it is past its deadline."""
        deadline = self.deadline(row)
        if deadline is None or now < deadline:
            return False
        row.status, row.decided_at = RequestStatus.EXPIRED, deadline
        row.decision = f"no decision within {self.expire_after:g} s ([approval] expire_after)"
        return True

    def _closed(self, row: RequestRow) -> InvalidRequest:
        """Why a request that is no longer pending cannot be decided or cancelled."""
        if row.status == RequestStatus.EXPIRED:
            return InvalidRequest(f"request {row.job_id} expired at {iso(row.decided_at or 0)} ({row.decision}) "
                                  f"before anyone decided it; {row.requester!r} is told so (RequestExpired) and may "
                                  "send the work again")
        if row.status == RequestStatus.CANCELLED:
            return InvalidRequest(f"request {row.job_id} was cancelled by its requester, {row.requester!r}")
        return InvalidRequest(f"request {row.job_id} was already {row.status}")


def refusal(request: RequestRow, node: str) -> GridError:
    """What the requester's ticket raises for a request that will not run."""
    datasets = ", ".join(request.datasets)
    if request.status == RequestStatus.EXPIRED:
        return RequestExpired(
            f"{request.requester!r}'s {request.kind} request on {datasets} waited in {node!r}'s approval queue "
            f"until {iso(request.decided_at or 0)} without a decision ({request.decision}); it will not run. Send "
            "the work again as a new job, or ask the owner to decide sooner", job_id=request.job_id)
    if request.status == RequestStatus.CANCELLED:
        return JobCancelled(f"{request.requester!r} cancelled this {request.kind} request on {datasets} while it "
                            f"waited in {node!r}'s approval queue: it never ran", job_id=request.job_id)
    return RequestDenied(f"the owner of {node!r} denied {request.requester!r}'s {request.kind} request on "
                         f"{datasets}: {request.decision}", job_id=request.job_id)


class OwnRequests:
    """A requester's own view of the approval queue: the routes of :class:`MyRequests` and
    :class:`CancelRequest`. ``closed`` answers a request closed here (records its refusal
    and delivers it to the requester's ticket)."""

    def __init__(self, requests: Requests, closed: Callable[[RequestRow], None]) -> None:
        self.requests = requests
        self.closed = closed

    def list(self, job: Job, query: MyRequests) -> Outcome:
        for row in self.requests.expire_due():  # what is shown is what holds
            self.closed(row)
        rows = self.requests.list(query.status, requester=job.requester, newest=MAX_LISTED)
        return Outcome(JobReply(status=JobStatus.DONE, requests=[self.requests.info(r) for r in rows]))

    def cancel(self, job: Job, body: CancelRequest) -> Outcome:
        row = self.requests.cancel(body.request, job.requester)
        parked = self.requests.store.job(row.job_id)
        if parked is None or parked.status == JobStatus.PENDING_APPROVAL:  # not answered yet (a second cancel: it was)
            self.closed(row)
        return Outcome(JobReply(status=JobStatus.DONE, requests=[self.requests.info(row)]))
