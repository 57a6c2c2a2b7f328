"""The gateway's registry: which nodes exist, their public keys, their datasets' metadata.

A node's key is pinned the first time it registers (trust on first use, as SSH does);
a later registration under the same id with another key is refused.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, String, Text, create_engine, delete, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from protocol.contract import node_queue
from protocol.errors import AuthenticationError, NotFound
from protocol.messages import DatasetMeta, NodeInfo


class Base(DeclarativeBase):
    pass


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


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


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

    def pinned_key(self, node: str) -> str | None:
        with self.session() as s:
            row = s.get(NodeRow, node)
            return row.public_key if row else None

    def register(self, node: str, public_key: str, datasets: list[DatasetMeta]) -> None:
        with self.session() as s:
            row = s.get(NodeRow, node)
            if row is not None and row.public_key != public_key:
                raise AuthenticationError(
                    f"node {node!r} is registered with another key; its operator must remove "
                    "the old registration first"
                )
            s.merge(NodeRow(id=node, public_key=public_key, last_seen=time.time()))
            s.execute(delete(DatasetRow).where(DatasetRow.node == node))
            s.flush()
            for meta in datasets:
                s.add(_dataset_row(node, meta))

    def publish(self, node: str, meta: DatasetMeta) -> None:
        with self.session() as s:
            row = s.get(NodeRow, node)
            if row is None:  # the gateway pins keys at registration: nothing else reaches here unregistered
                raise NotFound(f"node {node!r} publishes before it registered; restart it to register")
            s.merge(_dataset_row(node, meta))
            row.last_seen = time.time()

    def unpublish(self, node: str, name: str) -> None:
        with self.session() as s:
            if s.get(DatasetRow, (node, name)) is None:
                raise NotFound(f"node {node!r} has no dataset {name!r} in the registry")
            s.execute(delete(DatasetRow).where(DatasetRow.node == node, DatasetRow.name == name))

    def search(self, tags: list[str], words: list[str], node: str | None = None) -> list[DatasetMeta]:
        """Datasets carrying every tag and every word (in name or description, any case)."""
        with self.session() as s:
            query = select(DatasetRow).order_by(DatasetRow.node, DatasetRow.name)
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
            rows = list(s.scalars(select(NodeRow).order_by(NodeRow.id)))
        return [NodeInfo(node=r.id, public_key=r.public_key, queue=node_queue(r.id), last_seen=r.last_seen)
                for r in rows]


def _dataset_row(node: str, meta: DatasetMeta) -> DatasetRow:
    if meta.node != node:
        raise AuthenticationError(f"node {node!r} cannot publish a dataset of node {meta.node!r}")
    return DatasetRow(node=node, name=meta.name, description=meta.description, tags=list(meta.tags),
                      meta=meta.model_dump(mode="json"))
