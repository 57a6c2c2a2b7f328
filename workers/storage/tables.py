"""The node database's tables (SQLAlchemy models); :class:`workers.storage.store.Store` owns the
engine and the sessions, and is the only way in.

``datasets`` (published data and who may see it raw), ``publications`` (the owner's
record of each publish: rows, values clamped, replaced or not), ``objects`` (results
kept for their requester), ``jobs`` (one row per job id: status, attempts and the signed
reply, so a redelivered job answers the same), ``budgets``, ``charges`` and ``charge_totals`` (the privacy ledger),
``requests`` (the approval queue), ``grants`` (access the owner approved), ``releases`` (values
released raw or approved, for the audit trail), ``nonces``
(replay protection), ``gateway_pins`` (the gateway key pinned per broker), and for the MPC worker
``mpc_models`` (cards of models this node hosts) and ``mpc_shares`` (its shares of models
it computes on as a party).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Boolean, Float, Index, Integer, LargeBinary, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


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


class GrantRow(Base):
    """An approved access request: ``user`` may see ``dataset`` raw, as if the owner had
    listed them. Kept apart from the dataset's own ``allowed_users`` (which its config or a
    ``publish(replace=True)`` sets again at every start), so that a decision outlives a restart;
    it goes with the dataset when that is unpublished."""

    __tablename__ = "grants"
    dataset: Mapped[str] = mapped_column(String(128), primary_key=True)
    user: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(128))  # the approved access request
    granted_at: Mapped[float] = mapped_column(Float)


class PublicationRow(Base):
    """The owner's record of each publish: when, how many rows, how many values were clamped
    to the declared bounds, and whether it replaced an earlier publication. It stays at the
    node: a count of clamped values says something about the data, so it is not metadata."""

    __tablename__ = "publications"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    published_at: Mapped[float] = mapped_column(Float)
    rows: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(16))
    clamped: Mapped[int] = mapped_column(Integer)
    replaced: Mapped[bool] = mapped_column(Boolean)


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
    """One row per job id: its status, attempts and signed reply (a redelivered job answers
    the same). The reply's body is dropped once the node's ``[retention] replies`` has passed
    (``workers.storage.retention``); the row stays, with its status, as the record that the job ran."""

    __tablename__ = "jobs"
    # the replies not yet dropped, oldest first: what a pruning pass reads (never the pruned rows)
    __table_args__ = (Index("ix_jobs_unpruned", "updated_at", sqlite_where=text("reply IS NOT NULL"),
                            postgresql_where=text("reply IS NOT NULL")),)
    job_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    requester: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(24))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # none_as_null: a job without a reply (running, or pruned) is SQL NULL, out of ix_jobs_unpruned
    reply: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
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


class ChargeTotalRow(Base):
    """The ledger's running totals: what is spent of each user's budget on each dataset, per
    mechanism, updated in the transaction that adds each charge row (``workers.policy.ledger``).
    A budget check reads these, never the charge rows: its cost stays the same at the
    millionth release. The charge rows stay as the audit log; the totals are their sums."""

    __tablename__ = "charge_totals"
    user: Mapped[str] = mapped_column(String(64), primary_key=True)
    dataset: Mapped[str] = mapped_column(String(128), primary_key=True)
    mechanism: Mapped[str] = mapped_column(String(16), primary_key=True)
    epsilon: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    rho: Mapped[float] = mapped_column(Float)
    releases: Mapped[int] = mapped_column(Integer)


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


class ReleaseRow(Base):
    """The audit log of values released by the raw and approved doors (``workers.audit``):
    one row per job and dataset the value derives from, written in the transaction that
    records the job's reply. DP releases are the ledger's ``charges``. Never pruned."""

    __tablename__ = "releases"
    job_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    dataset: Mapped[str] = mapped_column(String(128), primary_key=True)
    user: Mapped[str] = mapped_column(String(64))
    door: Mapped[str] = mapped_column(String(16))  # raw | approved
    what: Mapped[str] = mapped_column(String(64))  # value | weights and figures | figures | ...
    created_at: Mapped[float] = mapped_column(Float)


class NonceRow(Base):
    __tablename__ = "nonces"
    sender: Mapped[str] = mapped_column(String(64), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    delivery_id: Mapped[str] = mapped_column(String(80))
    expires_at: Mapped[float] = mapped_column(Float, index=True)


class GatewayPinRow(Base):
    """The gateway key this node pinned for a broker (``host:port/db``) on first contact
    (``protocol.pinning``): the key it checks the gateway's node list with, whatever the
    broker posts later. ``gridq trust-gateway --node`` replaces it."""

    __tablename__ = "gateway_pins"
    address: Mapped[str] = mapped_column(String(300), primary_key=True)
    public_key: Mapped[str] = mapped_column(Text)
    pinned_at: Mapped[float] = mapped_column(Float)


class MpcModelRow(Base):
    """At an MPC host: a model it serves (its card: structure, parties, who may query)."""

    __tablename__ = "mpc_models"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    card: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class MpcShareRow(Base):
    """At an MPC party: its share of a model's parameters (safetensors bytes of ring tensors),
    under the owner's name and the model's, with the card its owner signed (pinned: every
    session is checked against it; only a newer card signed by the same key replaces it)."""

    __tablename__ = "mpc_held_shares"  # keyed by (owner, model): the table before was by model name alone
    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    card: Mapped[dict[str, Any]] = mapped_column(JSON)
    data: Mapped[bytes] = mapped_column(LargeBinary)
