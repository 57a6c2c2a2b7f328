"""The node's object store: tensors as safetensors files, indexed in a SQL database.

SQLite inside the store folder by default; any SQLAlchemy URL works (PostgreSQL for a
node that runs several worker processes). The database is the one source of truth that
the admin API (publish, unpublish) and the worker processes share.

Tables: ``datasets`` (published data and who may see it raw), ``objects`` (results kept
for their requester), ``jobs`` (one row per job id: status, attempts and the signed
reply, so a redelivered job answers the same) and ``nonces`` (replay protection).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import (
    JSON,
    Float,
    Index,
    Integer,
    String,
    Text,
    bindparam,
    create_engine,
    delete,
    event,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from protocol.codec import dtype_name
from protocol.errors import InvalidRequest, NotFound
from protocol.messages import DatasetMeta


class Base(DeclarativeBase):
    pass


class DatasetRow(Base):
    __tablename__ = "datasets"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    file: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)
    allowed_users: Mapped[list[str]] = mapped_column(JSON)
    updated_at: Mapped[float] = mapped_column(Float)
    mock_file: Mapped[str | None] = mapped_column(Text, nullable=True)  # the owner's synthetic twin


class ObjectRow(Base):
    __tablename__ = "objects"
    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(80), unique=True)
    owner: Mapped[str] = mapped_column(String(64))
    file: Mapped[str] = mapped_column(Text)
    shape: Mapped[list[int]] = mapped_column(JSON)
    dtype: Mapped[str] = mapped_column(String(16))
    sources: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class JobRow(Base):
    __tablename__ = "jobs"
    job_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    requester: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(24))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    reply: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class BudgetRow(Base):
    """A budget the owner set for one user on one dataset (else the config's applies)."""

    __tablename__ = "budgets"
    user: Mapped[str] = mapped_column(String(64), primary_key=True)
    dataset: Mapped[str] = mapped_column(String(128), primary_key=True)
    epsilon: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)


class ChargeRow(Base):
    """The ledger: one row per DP release and dataset, keyed by job id (charged once)."""

    __tablename__ = "charges"
    __table_args__ = (Index("ix_charges_user_dataset", "user", "dataset"),)
    job_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    dataset: Mapped[str] = mapped_column(String(128), primary_key=True)
    user: Mapped[str] = mapped_column(String(64))
    mechanism: Mapped[str] = mapped_column(String(16))
    epsilon: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    rho: Mapped[float] = mapped_column(Float)
    scale: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)


class RequestRow(Base):
    """A job waiting for the owner's decision: what a person needs to judge it, and the
    verified envelope to run once approved."""

    __tablename__ = "requests"
    job_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    requester: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(24))
    datasets: Mapped[list[str]] = mapped_column(JSON)
    summary: Mapped[str] = mapped_column(Text)
    release: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text, default="")
    envelope: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending | approved | denied
    decision: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    decided_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class NonceRow(Base):
    __tablename__ = "nonces"
    sender: Mapped[str] = mapped_column(String(64), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    delivery_id: Mapped[str] = mapped_column(String(80))
    expires_at: Mapped[float] = mapped_column(Float, index=True)


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


class Store:
    """Datasets, result objects, jobs and nonces of one node."""

    def __init__(self, folder: Path, database_url: str) -> None:
        self.folder = folder
        (folder / "objects").mkdir(parents=True, exist_ok=True)
        (folder / "datasets").mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(database_url)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._cache: dict[str, tuple[float, torch.Tensor]] = {}
        self._remembered = 0

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    def close(self) -> None:
        self.engine.dispose()

    # --- datasets ------------------------------------------------------------------------

    def put_dataset(self, meta: DatasetMeta, tensor: torch.Tensor, allowed_users: list[str],
                    mock: torch.Tensor | None = None) -> None:
        file = self.folder / "datasets" / f"{meta.name}.safetensors"
        save_file({"data": tensor.contiguous()}, str(file))
        mock_file = None
        if mock is not None:
            mock_file = str(self.folder / "datasets" / f"{meta.name}.mock.safetensors")
            save_file({"data": mock.contiguous()}, mock_file)
        with self.session() as s:
            s.merge(DatasetRow(name=meta.name, file=str(file), meta=meta.model_dump(mode="json"),
                               allowed_users=sorted(allowed_users), updated_at=time.time(), mock_file=mock_file))

    def mock(self, name: str) -> torch.Tensor | None:
        """The owner's synthetic twin of a dataset, if one was supplied."""
        row = self.dataset_row(name)
        return load_file(row.mock_file)["data"] if row.mock_file else None

    def allow(self, name: str, user: str) -> None:
        """Make ``user`` an allowed user of dataset ``name`` (an approved access request)."""
        with self.session() as s:
            row = s.get(DatasetRow, name, with_for_update=True)
            if row is None:
                raise NotFound(f"no dataset {name!r} is published on this node")
            row.allowed_users = sorted({*row.allowed_users, user})
            row.updated_at = time.time()

    def remove_dataset(self, name: str) -> None:
        with self.session() as s:
            row = s.get(DatasetRow, name)
            if row is None:
                raise NotFound(f"no dataset {name!r} is published on this node")
            s.delete(row)

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
        row = self.dataset_row(name)
        cached = self._cache.get(name)
        if cached is None or cached[0] != row.updated_at:
            cached = (row.updated_at, load_file(row.file)["data"])
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
        """Record an attempt at a job; returns the row (with the reply if already finished)."""
        now = time.time()
        with self.session() as s:
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None:
                row = JobRow(job_id=job_id, requester=requester, status="running", attempts=0,
                             reply=None, created_at=now, updated_at=now)
                s.add(row)
            elif row.requester != requester:
                raise InvalidRequest(f"job id {job_id!r} is already used by another requester")
            if row.reply is None:
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
