"""A node's audit trail, for a compliance officer (``gridq audit export``): every release and
every decision its database records, one row each, in a stable column order.

* **Releases** — values that left the node: by the raw door (an allowed user) or the
  approved door (a job the owner approved), from the ``releases`` log the job runner writes in
  the transaction that records the reply (:func:`released`, :func:`record`); by the DP door,
  from the privacy ledger's ``charges`` (one release per job, on each dataset it read, with
  its mechanism, ε and δ). A result kept at the node is no release; a mock twin is synthetic.
* **Decisions** — how each request of the approval queue ended: ``approved`` or ``denied``
  by the owner, ``cancelled`` by its requester, ``expired`` undecided.

Releases made before the ``releases`` log existed (a node database from an earlier version)
are in the export only if they were DP (the ledger has always kept those).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from protocol.envelope import Envelope
from protocol.messages import DPRelease, EvalJob, JobReply, RequestStatus, RunJob, TrainJob, parse_body
from workers.storage.store import RequestRow, Store
from workers.storage.tables import ChargeRow, ObjectRow, ReleaseRow

# the export's columns, in this order (CSV header, JSON keys): append new ones at the end
COLUMNS = ("time", "event", "node", "request_id", "user", "datasets", "door", "kind", "what", "mechanism",
           "epsilon", "delta", "status", "decided_by", "reason", "request_reason", "requested_at")
FORMATS = ("csv", "jsonl")
# the door a request's release leaves by, by its kind (workers.policy.doors): what the owner decided on
_DOOR_OF_KIND = {"compute": "keep", "raw_if_allowed": "raw", "raw": "approved", "train": "approved", "dp": "dp",
                 "access": "access"}


def iso(when: float | None) -> str | None:
    """ISO-8601 in UTC, to the microsecond, with a ``Z`` (``2026-12-06T22:46:38.123456Z``)."""
    if when is None:
        return None
    return datetime.fromtimestamp(when, tz=UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# --- logging releases as they happen (the job runner) -------------------------------------------

@dataclass(frozen=True)
class Released:
    """A value a job's reply releases by the raw or approved door, and what it derives from."""

    door: str  # raw | approved
    what: str  # value | weights and figures | figures | weights (secure aggregation shares) …
    datasets: tuple[str, ...]


def released(env: Envelope, reply: JobReply, approved: bool, store: Store) -> Released | None:
    """What ``reply`` (to the verified request ``env``; not a DP release: the ledger records
    those) lets out of the node, or None if nothing private leaves. Read before the reply is
    recorded (it opens sessions of its own)."""
    if reply.status != "done":
        return None
    body = parse_body(env.body_json(), env.job_id)
    if isinstance(body, RunJob):
        if reply.value is None:
            return None  # kept at the node: a pointer came back
        return Released(_door(approved), "value", _datasets(store, env.sender, [body.plan]))
    if isinstance(body, EvalJob):
        return Released(_door(approved), "figures", _datasets(store, env.sender, [body.x, body.y]))
    if isinstance(body, TrainJob):
        datasets = _datasets(store, env.sender, [body.x, body.y], body.start)
        if reply.shares:
            return Released(_door(approved), "weights (secure aggregation shares) and figures", datasets)
        if reply.value is not None:
            return Released(_door(approved), "weights and figures", datasets)
        from workers.policy import figures  # loads training: only for a training's figures
        from workers.policy.doors import Source

        sources = [Source(d, _allowed(store, d)) for d in datasets]
        shown = figures.door(env.sender, approved, body.dp, sources)
        return Released(_door(approved), "figures", datasets) if shown is not None else None
    return None  # budgets, access, mock twins, the requester's own requests: nothing private


def record(session: Session, job_id: str, user: str, release: Released | None, at: float) -> None:
    """Log ``release`` in ``session`` (the one that records the job's reply)."""
    if release is None:
        return
    for dataset in release.datasets:
        session.merge(ReleaseRow(job_id=job_id, dataset=dataset, user=user, door=release.door, what=release.what,
                                 created_at=at))


def _door(approved: bool) -> str:
    return "approved" if approved else "raw"


def _datasets(store: Store, requester: str, plans: Iterable[Any], start: str | None = None) -> tuple[str, ...]:
    """The datasets the plans' values derive from (kept results carry theirs)."""
    names: set[str] = set()
    objects = [ref.name for plan in plans for ref in plan.inputs if ref.kind == "object"]
    names.update(ref.name for plan in plans for ref in plan.inputs if ref.kind == "dataset")
    if start is not None:
        objects.append(start)
    if not objects:
        return tuple(sorted(names))
    with store.session() as s:
        for object_id in objects:
            row = s.get(ObjectRow, object_id)
            if row is not None and row.owner == requester:
                names.update(row.sources)
    return tuple(sorted(names))


def _allowed(store: Store, dataset: str) -> list[str]:
    from protocol.errors import NotFound

    try:
        return store.allowed_users(dataset)
    except NotFound:  # unpublished meanwhile
        return []


# --- the export ------------------------------------------------------------------------------------

def rows(store: Store, node: str) -> list[dict[str, Any]]:
    """Every release and decision, oldest first, as dicts of :data:`COLUMNS` (``datasets`` a
    list; a value that does not apply is None)."""
    out: list[tuple[float, int, str, dict[str, Any]]] = []
    with store.session() as s:
        requests = {r.job_id: r for r in s.scalars(select(RequestRow))}
        for r in requests.values():
            if r.status == RequestStatus.PENDING:
                continue
            epsilon, delta = _asked(r)
            by = {"approved": "owner", "denied": "owner", "expired": "expiry", "cancelled": r.requester}.get(r.status)
            at = r.decided_at if r.decided_at is not None else r.created_at
            out.append((at, 0, r.job_id, _row(
                time=iso(at), event="decision", node=node, request_id=r.job_id, user=r.requester,
                datasets=sorted(r.datasets), door=_DOOR_OF_KIND.get(r.kind, r.kind), kind=r.kind,
                what=r.release, epsilon=epsilon, delta=delta, status=r.status, decided_by=by,
                reason=r.decision or None, request_reason=r.reason or None, requested_at=iso(r.created_at))))
        for job_id, group in _by_job(s.scalars(select(ChargeRow).order_by(ChargeRow.job_id, ChargeRow.dataset))):
            first = group[0]
            request = requests.get(job_id)
            out.append((first.created_at, 1, job_id, _row(
                time=iso(first.created_at), event="release", node=node, request_id=job_id, user=first.user,
                datasets=[c.dataset for c in group], door="dp", kind=request.kind if request else None,
                mechanism=first.mechanism, epsilon=first.epsilon, delta=first.delta, status="released",
                requested_at=iso(request.created_at) if request else None)))
        for job_id, group in _by_job(s.scalars(select(ReleaseRow).order_by(ReleaseRow.job_id, ReleaseRow.dataset))):
            first = group[0]
            request = requests.get(job_id)
            out.append((first.created_at, 1, job_id, _row(
                time=iso(first.created_at), event="release", node=node, request_id=job_id, user=first.user,
                datasets=[r.dataset for r in group], door=first.door, kind=request.kind if request else None,
                what=first.what, status="released", requested_at=iso(request.created_at) if request else None)))
    out.sort(key=lambda entry: entry[:3])
    return [row for *_, row in out]


def write(records: Iterable[dict[str, Any]], out: IO[str], fmt: str) -> int:
    """Write ``records`` to ``out`` as CSV (a header, then one line each; datasets joined
    with ``;``, what does not apply empty) or JSON Lines (one object each, keys in column
    order); how many records."""
    if fmt not in FORMATS:
        from protocol.errors import InvalidRequest

        raise InvalidRequest(f"the audit is exported as {' or '.join(FORMATS)}, not {fmt!r}")
    count = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        for record_ in records:
            writer.writerow([_csv_cell(record_[c]) for c in COLUMNS])
            count += 1
        return count
    for record_ in records:
        out.write(json.dumps({c: record_[c] for c in COLUMNS}, ensure_ascii=False, allow_nan=False) + "\n")
        count += 1
    return count


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ";".join(value)  # dataset names hold no ';'
    if isinstance(value, float):
        return repr(value)  # exact: float(cell) gives the value back
    return str(value)


def _row(**values: Any) -> dict[str, Any]:
    unknown = set(values) - set(COLUMNS)
    assert not unknown, unknown
    return {c: values.get(c) for c in COLUMNS}


def _by_job(rows_: Iterable[Any]) -> Iterator[tuple[str, list[Any]]]:
    group: list[Any] = []
    for row in rows_:
        if group and row.job_id != group[0].job_id:
            yield group[0].job_id, group
            group = []
        group.append(row)
    if group:
        yield group[0].job_id, group


def _asked(request: RequestRow) -> tuple[float | None, float | None]:
    """The (ε, δ) a request asked to be released with, if it was a DP release."""
    try:
        body = parse_body(Envelope.model_validate(request.envelope).body_json())
    except Exception:  # noqa: BLE001 - a request recorded by an older version, or by a test: nothing to read
        return None, None
    release = getattr(body, "release", None)
    if isinstance(release, DPRelease):
        return release.epsilon, release.delta
    return None, None
