"""The node's object store: tensors as safetensors files, indexed in a SQL database.

SQLite inside the store folder by default; any SQLAlchemy URL works (PostgreSQL for a
node that runs several worker processes). The database is the one source of truth that
the admin API (publish, unpublish) and the worker processes share.

The tables are :mod:`workers.storage.tables`.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from sqlalchemy import bindparam, create_engine, delete, event, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from protocol.codec import DTYPE_NAMES, dtype_name
from protocol.errors import InvalidRequest, JobFailed, NotFound
from protocol.messages import DatasetMeta, JobStatus
from workers.policy.bounds import outside
from workers.storage.tables import (
    Base,
    DatasetRow,
    GatewayPinRow,
    GrantRow,
    JobRow,
    MpcModelRow,
    MpcShareRow,
    NonceRow,
    ObjectRow,
    PublicationRow,
    RequestRow,
)

__all__ = ["FINISHED", "DatasetRow", "JobRow", "ObjectRow", "PublicationRow", "RequestRow", "Store"]

# a job's final statuses (pending_approval waits for its owner)
FINISHED = (JobStatus.DONE, JobStatus.FAILED, JobStatus.DENIED)

log = logging.getLogger(__name__)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # transactions are begun by _sqlite_begin, not by the driver
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # the admin API and the worker share the file
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    # Take the write lock when a transaction starts, not at its first write: a budget check
    # and its charge can then never interleave with another process's (no lost updates).
    conn.exec_driver_sql("BEGIN IMMEDIATE")


# One statement for every job, its values bound at execution: built per call with
# .values(reply=...), SQLAlchemy would derive a cache key from the reply (~0.2 ms of a job).
_FINISH_JOB = (update(JobRow).where(JobRow.job_id == bindparam("job"))
               .values(status=bindparam("status"), reply=bindparam("reply"), updated_at=bindparam("at")))


FileVersion = tuple[float, str, int, int]  # the row's updated_at, the file, its mtime (ns) and size


def _file_version(row: DatasetRow) -> FileVersion | None:
    try:
        stat = os.stat(row.file)
    except OSError:
        return None
    return row.updated_at, row.file, stat.st_mtime_ns, stat.st_size


def _verified(row: DatasetRow) -> torch.Tensor:
    """The stored values, if they are still what the owner published; else JobFailed for
    the requester (naming the dataset, and nothing about its values) and the details in the
    owner's log."""
    meta = DatasetMeta.model_validate(row.meta)
    try:
        tensor = load_file(row.file)["data"]
    except (OSError, SafetensorError, KeyError) as exc:
        problem = f"its file {row.file} cannot be read ({exc})"
    else:
        problem = _mismatch(meta, tensor)
    if problem:
        log.error("dataset %r is refused to every job: %s. Publish it again (publish(..., replace=True), or "
                  "restart the node to load its config)", meta.name, problem)
        raise JobFailed(f"dataset {meta.name!r} no longer matches what its owner published; its owner must "
                        "publish it again (the node's log says why)")
    return tensor


def _mismatch(meta: DatasetMeta, tensor: torch.Tensor) -> str:
    """How stored values differ from their metadata ('' if they do not)."""
    shape, dtype = tuple(tensor.shape), DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype))
    if shape != tuple(meta.shape) or dtype != meta.dtype:
        return f"its file holds {shape} {dtype}, it was published as {tuple(meta.shape)} {meta.dtype}"
    found = outside(tensor, meta.bounds, meta.columns) if meta.bounds else []
    return "; ".join(o.describe() for o in found)


def _owner_only(database: str | None) -> None:
    """A SQLite node database readable by its owner only (SQLite gives its WAL and shared-memory
    files the database file's permissions)."""
    if database and database != ":memory:" and os.path.exists(database):
        os.chmod(database, 0o600)


def _remove(files: list[str | None]) -> None:
    for file in files:
        if file:
            Path(file).unlink(missing_ok=True)


class Store:
    """Datasets, result objects, jobs and nonces of one node."""

    def __init__(self, folder: Path, database_url: str) -> None:
        self.folder = folder
        for sub in (folder, folder / "objects", folder / "datasets"):
            sub.mkdir(parents=True, exist_ok=True)
            sub.chmod(0o700)  # private data, kept results, shares and request envelopes: the owner's only
        self.engine = create_engine(database_url)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        Base.metadata.create_all(self.engine)
        for index in Base.metadata.tables[JobRow.__tablename__].indexes:  # a database from before it gets it
            index.create(self.engine, checkfirst=True)
        _owner_only(self.engine.url.database if self.engine.dialect.name == "sqlite" else None)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._cache: dict[str, tuple[FileVersion | None, torch.Tensor]] = {}
        self._remembered = 0

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    def close(self) -> None:
        self.engine.dispose()

    # --- datasets ------------------------------------------------------------------------

    def put_dataset(self, meta: DatasetMeta, tensor: torch.Tensor, allowed_users: list[str],
                    mock: torch.Tensor | None = None, *, replace: bool = False, clamped: int = 0) -> None:
        """Store a dataset and record its publication (``clamped``: values its owner had
        clamped to the bounds). A name already published is refused unless ``replace``,
        which sets data and policy together; the ledger's charges on the name stay. Each
        version gets files of its own, so a job never reads new values with old metadata."""
        version = uuid.uuid4().hex[:12]
        file = self.folder / "datasets" / f"{meta.name}.{version}.safetensors"
        save_file({"data": tensor.contiguous()}, str(file))
        mock_file = None
        if mock is not None:
            mock_file = str(self.folder / "datasets" / f"{meta.name}.{version}.mock.safetensors")
            save_file({"data": mock.contiguous()}, mock_file)
        try:
            with self.session() as s:
                old = s.get(DatasetRow, meta.name, with_for_update=True)
                if old is not None and not replace:
                    raise InvalidRequest(
                        f"{meta.name!r} is already published; publish(..., replace=True) replaces its data and its "
                        "policy together: give tags, allowed users and bounds again")
                stale = [] if old is None else [old.file, old.mock_file]
                now = time.time()
                s.merge(DatasetRow(name=meta.name, file=str(file), meta=meta.model_dump(mode="json"),
                                   allowed_users=sorted(allowed_users), updated_at=now, mock_file=mock_file))
                s.add(PublicationRow(name=meta.name, published_at=now, rows=meta.shape[0] if meta.shape else 1,
                                     dtype=meta.dtype, clamped=clamped, replaced=old is not None))
        except BaseException:
            _remove([str(file), mock_file])
            raise
        _remove(stale)

    def publications(self, name: str | None = None) -> list[PublicationRow]:
        """The owner's record of publications (of ``name``, or of every dataset), oldest first."""
        query = select(PublicationRow).order_by(PublicationRow.id)
        if name is not None:
            query = query.where(PublicationRow.name == name)
        with self.session() as s:
            return list(s.scalars(query))

    def mock(self, name: str) -> torch.Tensor | None:
        """The owner's synthetic twin of a dataset, if one was supplied."""
        row = self.dataset_row(name)
        return load_file(row.mock_file)["data"] if row.mock_file else None

    def allow(self, name: str, user: str, job_id: str) -> None:
        """Make ``user`` an allowed user of dataset ``name``: the access request ``job_id``
        was approved. A grant of its own, so a restart (which publishes the config's datasets
        again) keeps it."""
        with self.session() as s:
            if s.get(DatasetRow, name) is None:
                raise NotFound(f"no dataset {name!r} is published on this node")
            s.merge(GrantRow(dataset=name, user=user, job_id=job_id, granted_at=time.time()))

    def allowed_users(self, name: str) -> list[str]:
        """Who may see dataset ``name`` raw: its published ``allowed_users`` and every user
        an approved access request granted it to."""
        with self.session() as s:
            row = s.get(DatasetRow, name)
            if row is None:
                raise NotFound(f"no dataset {name!r} is published on this node")
            granted = s.scalars(select(GrantRow.user).where(GrantRow.dataset == name))
            return sorted({*row.allowed_users, *granted})

    def remove_dataset(self, name: str) -> None:
        with self.session() as s:
            row = s.get(DatasetRow, name)
            if row is None:
                raise NotFound(f"no dataset {name!r} is published on this node")
            s.delete(row)
            s.execute(delete(GrantRow).where(GrantRow.dataset == name))  # a dataset of that name later is another
        _remove([row.file, row.mock_file])

    def dataset_rows(self) -> list[DatasetRow]:
        with self.session() as s:
            return list(s.scalars(select(DatasetRow).order_by(DatasetRow.name)))

    def dataset_row(self, name: str) -> DatasetRow:
        with self.session() as s:
            row = s.get(DatasetRow, name)
        if row is None:
            raise NotFound(f"no dataset {name!r} on this node; search the grid for what is published")
        return row

    def dataset(self, name: str) -> tuple[DatasetRow, torch.Tensor]:
        """A dataset's row and values, for a job. The stored file is checked against what
        its owner published (shape, dtype, bounds) once per version of it, then cached:
        whatever happens to the file later, computation runs only on in-bound data."""
        return self._checked(name, self.dataset_row(name))

    def job_input(self, name: str) -> tuple[DatasetRow, torch.Tensor, list[str]]:
        """A dataset as a job reads it: its row and checked values (:meth:`dataset`) and who
        may see it raw (:meth:`allowed_users`), the row and the grants read in one transaction."""
        with self.session() as s:
            row = s.get(DatasetRow, name)
            if row is None:
                raise NotFound(f"no dataset {name!r} on this node; search the grid for what is published")
            users = sorted({*row.allowed_users, *s.scalars(select(GrantRow.user).where(GrantRow.dataset == name))})
        return (*self._checked(name, row), users)

    def _checked(self, name: str, row: DatasetRow) -> tuple[DatasetRow, torch.Tensor]:
        version = _file_version(row)
        if version is None:  # its file went away: replaced since the row was read, most likely
            row = self.dataset_row(name)
            version = _file_version(row)
        cached = self._cache.get(name)
        if cached is None or version is None or cached[0] != version:
            cached = (version, _verified(row))
            self._cache[name] = cached
        return row, cached[1]

    # --- result objects --------------------------------------------------------------------

    def put_object(self, object_id: str, job_id: str, owner: str, tensor: torch.Tensor,
                   sources: list[str]) -> ObjectRow:
        file = self.folder / "objects" / f"{object_id}.safetensors"
        save_file({"data": tensor.contiguous()}, str(file))
        row = ObjectRow(id=object_id, job_id=job_id, owner=owner, file=str(file),
                        shape=list(tensor.shape), dtype=dtype_name(tensor.dtype),
                        sources=sorted(set(sources)), created_at=time.time())
        with self.session() as s:
            existing = s.get(ObjectRow, object_id)
            if existing is not None:
                return existing
            s.add(row)
        return row

    def object(self, object_id: str, requester: str) -> tuple[ObjectRow, torch.Tensor]:
        with self.session() as s:
            row = s.get(ObjectRow, object_id)
        if row is None or row.owner != requester:  # another user's result does not exist for you
            raise NotFound(f"no object {object_id!r} of {requester!r} on this node")
        return row, load_file(row.file)["data"]

    def count_objects(self, job_id: str) -> int:
        with self.session() as s:
            return len(list(s.scalars(select(ObjectRow.id).where(ObjectRow.job_id == job_id))))

    # --- jobs ------------------------------------------------------------------------------

    def begin_job(self, job_id: str, requester: str) -> JobRow:
        """Record an attempt at a job; returns the row (with the reply if already finished; a
        finished job whose reply was pruned keeps its final status and no reply)."""
        now = time.time()
        with self.session() as s:
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None:
                row = JobRow(job_id=job_id, requester=requester, status="running", attempts=0,
                             reply=None, created_at=now, updated_at=now)
                s.add(row)
            elif row.requester != requester:
                raise InvalidRequest(f"job id {job_id!r} is already used by another requester")
            if row.reply is None and row.status not in FINISHED:
                row.attempts += 1
                row.status = "running"
                row.updated_at = now
            s.flush()
            return row

    def finish_job(self, job_id: str, status: str, reply: dict[str, Any], session: Session | None = None) -> None:
        """Record the job's reply (in ``session``, for a caller that writes more with it)."""
        if session is None:
            with self.session() as s:
                self.finish_job(job_id, status, reply, s)
            return
        session.connection().execute(_FINISH_JOB, {"job": job_id, "status": status, "reply": reply,
                                                   "at": time.time()})

    def job(self, job_id: str) -> JobRow | None:
        with self.session() as s:
            return s.get(JobRow, job_id)

    def repark_job(self, job_id: str, reply: dict[str, Any]) -> bool:
        """Replace a parked job's word that it waits (a fresh signature) if it still waits:
        False if it was decided, and its answer recorded, meanwhile."""
        with self.session() as s:
            done = s.connection().execute(update(JobRow).where(JobRow.job_id == job_id,
                                                               JobRow.status == JobStatus.PENDING_APPROVAL)
                                          .values(reply=reply, updated_at=time.time()))
            return bool(done.rowcount)

    def prune_replies(self, before: float, limit: int) -> int:
        """Drop the reply bodies of finished jobs last updated before ``before``, at most
        ``limit``, oldest first; how many. Their rows stay, with their status; parked jobs
        keep theirs. Reads only replies still kept (``ix_jobs_unpruned``), never the pruned.

        Each row is deleted and written again without its reply, not updated: SQLite leaves
        the space an UPDATE frees inside a page unused (new rows go to the last page), so the
        file would grow as if nothing were pruned; deleted in the order they were written,
        whole pages come free and are reused."""
        kept = (JobRow.job_id, JobRow.requester, JobRow.status, JobRow.attempts, JobRow.created_at,
                JobRow.updated_at)
        with self.session() as s:
            rows = [dict(row._mapping) for row in s.execute(
                select(*kept).where(JobRow.reply.is_not(None), JobRow.updated_at < before, JobRow.status.in_(FINISHED))
                .order_by(JobRow.updated_at).limit(limit))]
            if rows:
                s.execute(delete(JobRow).where(JobRow.job_id.in_([row["job_id"] for row in rows])))
                s.execute(insert(JobRow), [{**row, "reply": None} for row in rows])
            return len(rows)

    # --- nonces (protocol.envelope.NonceStore) ----------------------------------------------

    def remember(self, sender: str, nonce: str, delivery_id: str, expires_at: float) -> bool:
        self._remembered += 1
        if self._remembered % 512 == 1:  # sweep expired nonces now and then, not on every job
            with self.session() as s:
                s.execute(delete(NonceRow).where(NonceRow.expires_at < time.time()))
        try:
            with self.session() as s:
                s.add(NonceRow(sender=sender, nonce=nonce, delivery_id=delivery_id, expires_at=expires_at))
        except IntegrityError:
            with self.session() as s:
                row = s.get(NonceRow, (sender, nonce))
                return row is not None and row.delivery_id == delivery_id
        return True

    # --- the gateway key pinned per broker (protocol.pinning.GatewayPins) ----------------------

    @property
    def where(self) -> str:
        return f"the node's database ({self.engine.url.render_as_string(hide_password=True)}, table gateway_pins)"

    def pinned_gateway(self, address: str) -> str | None:
        with self.session() as s:
            row = s.get(GatewayPinRow, address)
            return None if row is None else row.public_key

    def pin_gateway(self, address: str, key: str, *, replace: bool = False) -> str:
        """Pin ``key`` for ``address`` if none is (or, with ``replace``, whatever is); the key
        pinned now. Two first contacts at once (pool processes) keep the one that wrote first."""
        try:
            with self.session() as s:
                row = s.get(GatewayPinRow, address)
                if row is not None and not replace:
                    return row.public_key
                s.merge(GatewayPinRow(address=address, public_key=key, pinned_at=time.time()))
                return key
        except IntegrityError:
            pinned = self.pinned_gateway(address)
            assert pinned is not None
            return pinned

    # --- the MPC worker's: models hosted, shares held -------------------------------------------

    def served_card(self, name: str) -> dict[str, Any] | None:
        with self.session() as s:
            row = s.get(MpcModelRow, name)
            return None if row is None else row.card

    def serve_card(self, name: str, card: dict[str, Any]) -> None:
        with self.session() as s:
            s.merge(MpcModelRow(name=name, card=card, created_at=time.time()))

    def held(self, owner: str, model: str) -> tuple[dict[str, Any], bytes] | None:
        """A party's pinned card of ``owner``'s ``model`` (as its owner signed it) and its share."""
        with self.session() as s:
            row = s.get(MpcShareRow, (owner, model))
            return None if row is None else (row.card, row.data)

    def pinned(self, owner: str, model: str) -> dict[str, Any] | None:
        """The card a party pinned for ``owner``'s ``model``, without its share."""
        with self.session() as s:
            return s.scalar(select(MpcShareRow.card).where(MpcShareRow.owner == owner, MpcShareRow.model == model))

    def hold(self, owner: str, model: str, card: dict[str, Any], data: bytes,
             check: Callable[[dict[str, Any]], None]) -> None:
        """Pin ``card`` and keep ``data``; if a card is pinned already, ``check(pinned)`` first
        (it raises to refuse), in the same transaction: two stores cannot both pass it."""
        with self.session() as s:
            row = s.get(MpcShareRow, (owner, model))
            if row is not None:
                check(row.card)
            s.merge(MpcShareRow(owner=owner, model=model, card=card, data=data))
