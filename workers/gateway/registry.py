"""The gateway's registry: which nodes are enrolled, which are registered, their datasets' metadata.

Only a node the operator **enrolled** (its id and public key, ``gridq enrol``) may register
or publish, and only with that key: a broker user cannot bring in a node of its own, nor
claim a node id before the real node does (there is no trust on first use). Enrolment is
read in one place, :meth:`Registry.enrolments`, for whatever else must follow it (the
broker's per-node users).

A node's messages are also ordered: the registry keeps the issue time of the newest message
it accepted about each dataset (and about the node's registration), and refuses an older one
even if its nonce is new, so a withheld or replayed publication cannot bring back a
dataset withdrawn since (:class:`StaleMessage`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import JSON, Float, ForeignKey, Select, String, Text, create_engine, delete, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from protocol.contract import node_queue
from protocol.envelope import Name
from protocol.errors import AuthenticationError, InvalidRequest, NotEnrolled, NotFound, StaleMessage
from protocol.identity import PublicIdentity
from protocol.messages import DatasetMeta, NodeInfo

_REGISTRATION = ""  # the stamp of a node's registration: never a dataset's name (names are non-empty)


class Base(DeclarativeBase):
    pass


class EnrolledRow(Base):
    """A node the operator admitted: the only key its messages may be signed with."""

    __tablename__ = "enrolled"
    node: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(256))
    enrolled_at: Mapped[float] = mapped_column(Float)


class NodeRow(Base):
    __tablename__ = "nodes"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(256))
    last_seen: Mapped[float] = mapped_column(Float)


class DatasetRow(Base):
    __tablename__ = "datasets"
    node: Mapped[str] = mapped_column(ForeignKey("nodes.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    description: Mapped[str] = mapped_column(Text)
    tags: Mapped[list[str]] = mapped_column(JSON)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)


class StampRow(Base):
    """The newest message accepted about a node's dataset (``dataset`` ``""``: its registration).
    Kept after a withdrawal, and after the node's registration is dropped: it is what makes an
    older publication stale."""

    __tablename__ = "stamps"
    node: Mapped[str] = mapped_column(String(64), primary_key=True)
    dataset: Mapped[str] = mapped_column(String(128), primary_key=True)
    issued_at: Mapped[float] = mapped_column(Float)
    nonce: Mapped[str] = mapped_column(String(64))  # the same message redelivered is not stale


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def enrol_command(node: str, replace: bool = False) -> str:
    """The operator's command that enrols ``node``: refusals quote it."""
    return f"gridq enrol {node} --key {node}.pub" + (" --replace" if replace else "")


def not_enrolled(node: str, enrolled: str | None, presented: str | None = None) -> NotEnrolled:
    """Why a message of ``node`` is refused: not enrolled, or enrolled with another key."""
    if enrolled is None:
        return NotEnrolled(f"node {node!r} is not enrolled at this gateway, so it may not register or publish; "
                           f"if it is yours, its operator enrols its public key on the gateway's host: "
                           f"`{enrol_command(node)}`")
    return NotEnrolled(f"node {node!r} presents key {_short(presented)}, but it is enrolled with "
                       f"{_short(enrolled)}; if the node's key changed, its operator enrols the new one: "
                       f"`{enrol_command(node, replace=True)}`")


def _short(key: str | None) -> str:
    return "(none)" if key is None else f"{key[:16]}…"


class Registry:
    def __init__(self, database_url: str) -> None:
        self.engine = create_engine(database_url)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    # --- enrolment (the operator's) -------------------------------------------------------------

    def enrol(self, node: str, public_key: str, *, replace: bool = False) -> bool:
        """Admit ``node`` with ``public_key``; False if it was enrolled with that key already.
        Another key is refused unless ``replace``: then the node's registration and datasets
        are dropped until it registers with its new key."""
        _check_name(node)
        public_key = PublicIdentity.parse(node, public_key.strip()).text()
        with self.session() as s:
            row = s.get(EnrolledRow, node)
            if row is not None and row.public_key == public_key:
                return False
            if row is not None and not replace:
                raise InvalidRequest(f"node {node!r} is enrolled with another key ({_short(row.public_key)}); "
                                     f"to replace it (the node then registers again with the new one): "
                                     f"`{enrol_command(node, replace=True)}`")
            self._drop_registration(s, node)
            s.merge(EnrolledRow(node=node, public_key=public_key, enrolled_at=time.time()))
        return True

    def unenrol(self, node: str) -> None:
        """Withdraw ``node``'s admission: its registration and datasets leave the registry."""
        with self.session() as s:
            row = s.get(EnrolledRow, node)
            if row is None:
                raise NotFound(f"node {node!r} is not enrolled; `gridq enrolled` lists the nodes that are")
            self._drop_registration(s, node)
            s.delete(row)

    def enrolled_key(self, node: str) -> str | None:
        with self.session() as s:
            row = s.get(EnrolledRow, node)
            return row.public_key if row else None

    def enrolments(self) -> list[tuple[str, str]]:
        """Every enrolled node and its public key, by id: who may take part as a node."""
        with self.session() as s:
            return [(r.node, r.public_key) for r in s.scalars(select(EnrolledRow).order_by(EnrolledRow.node))]

    @staticmethod
    def _drop_registration(s: Session, node: str) -> None:
        s.execute(delete(DatasetRow).where(DatasetRow.node == node))
        s.execute(delete(NodeRow).where(NodeRow.id == node))

    # --- what nodes send (verified envelopes: ``issued_at`` and ``nonce`` are the envelope's) --

    def register(self, node: str, public_key: str, datasets: list[DatasetMeta], *, issued_at: float,
                 nonce: str) -> None:
        """The node and its datasets, replacing what it registered before. Newer than every
        message accepted from this node, or stale."""
        with self.session() as s:
            enrolled = s.get(EnrolledRow, node)
            if enrolled is None or enrolled.public_key != public_key:
                raise not_enrolled(node, enrolled.public_key if enrolled else None, public_key)
            _fresh(s, node, None, issued_at, nonce, "registration")
            s.merge(NodeRow(id=node, public_key=public_key, last_seen=time.time()))
            s.execute(delete(DatasetRow).where(DatasetRow.node == node))
            s.flush()
            for meta in datasets:
                s.add(_dataset_row(node, meta))
            s.merge(StampRow(node=node, dataset=_REGISTRATION, issued_at=issued_at, nonce=nonce))

    def publish(self, node: str, meta: DatasetMeta, *, issued_at: float, nonce: str) -> None:
        with self.session() as s:
            row = s.get(NodeRow, node)
            if row is None:  # only enrolled nodes register: nothing else reaches here unregistered
                raise NotFound(f"node {node!r} publishes before it registered; restart it to register")
            _fresh(s, node, meta.name, issued_at, nonce, "publication")
            s.merge(_dataset_row(node, meta))
            s.merge(StampRow(node=node, dataset=meta.name, issued_at=issued_at, nonce=nonce))
            row.last_seen = time.time()

    def unpublish(self, node: str, name: str, *, issued_at: float, nonce: str) -> None:
        """Withdraw a dataset. The withdrawal is recorded even if the registry did not list it
        (a publication older than it stays refused); NotFound then says nothing was listed."""
        with self.session() as s:
            _fresh(s, node, name, issued_at, nonce, "withdrawal")
            s.merge(StampRow(node=node, dataset=name, issued_at=issued_at, nonce=nonce))
            removed = s.execute(delete(DatasetRow).where(DatasetRow.node == node, DatasetRow.name == name))
        if not removed.rowcount:  # type: ignore[attr-defined]
            raise NotFound(f"node {node!r} has no dataset {name!r} in the registry")

    # --- what anyone may read ---------------------------------------------------------------

    def search(self, tags: list[str], words: list[str], node: str | None = None) -> list[DatasetMeta]:
        """Datasets carrying every tag and every word (in name or description, any case)."""
        with self.session() as s:
            query = _admitted(select(DatasetRow).join(NodeRow)).order_by(DatasetRow.node, DatasetRow.name)
            if node is not None:
                query = query.where(DatasetRow.node == node)
            rows = list(s.scalars(query))
        wanted = {t.lower() for t in tags}
        lowered = [w.lower() for w in words]
        return [
            DatasetMeta.model_validate(r.meta) for r in rows
            if wanted <= {t.lower() for t in r.tags}
            and all(w in f"{r.name} {r.description}".lower() for w in lowered)
        ]

    def nodes(self) -> list[NodeInfo]:
        with self.session() as s:
            rows = list(s.scalars(_admitted(select(NodeRow)).order_by(NodeRow.id)))
        return [NodeInfo(node=r.id, public_key=r.public_key, queue=node_queue(r.id), last_seen=r.last_seen)
                for r in rows]


def _admitted(query: Select[Any]) -> Select[Any]:
    """``query`` (over NodeRow) limited to nodes registered under their enrolled key: a
    registry kept from before enrolment existed lists none of its self-registered nodes."""
    return query.join(EnrolledRow, (EnrolledRow.node == NodeRow.id) & (EnrolledRow.public_key == NodeRow.public_key))


def _fresh(s: Session, node: str, dataset: str | None, issued_at: float, nonce: str, what: str) -> None:
    """Refuse a message older than the newest one accepted about the same thing: for a
    dataset, its own stamp and the node's registration (which replaced every dataset); for a
    registration (``dataset`` None), every stamp of the node. The very message again (same
    time, same nonce: a redelivery) is not stale."""
    query = select(StampRow).where(StampRow.node == node)
    if dataset is not None:
        query = query.where(StampRow.dataset.in_([_REGISTRATION, dataset]))
    newest = max(s.scalars(query), key=lambda r: r.issued_at, default=None)
    if newest is None or issued_at > newest.issued_at or (issued_at == newest.issued_at and nonce == newest.nonce):
        return
    subject = f"dataset {dataset!r} of node {node!r}" if dataset is not None else f"node {node!r}"
    raise StaleMessage(f"a {what} about {subject} issued at {_when(issued_at)} is older than one the gateway "
                       f"accepted (issued at {_when(newest.issued_at)}): refused, so that a delayed or replayed "
                       "message cannot undo a newer one. If the node's clock went back, correct it and send again")


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def _check_name(node: str) -> None:
    try:
        TypeAdapter(Name).validate_python(node)
    except ValidationError:
        raise InvalidRequest(f"{node!r} is not a node id: 1 to 64 letters, digits, '_', '.' or '-'") from None


def _dataset_row(node: str, meta: DatasetMeta) -> DatasetRow:
    if meta.node != node:
        raise AuthenticationError(f"node {node!r} cannot publish a dataset of node {meta.node!r}")
    return DatasetRow(node=node, name=meta.name, description=meta.description, tags=list(meta.tags),
                      meta=meta.model_dump(mode="json"))
