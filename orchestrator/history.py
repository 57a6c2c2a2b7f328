"""The history of federated runs, in the orchestrator's database (SQLite under
``$GRIDQ_HOME/runs.db``, ``~/.gridq/runs.db``, unless told otherwise; any SQLAlchemy URL works): one row per run,
one per node and round — who answered, with how many samples, what loss and accuracy,
and who dropped out and why."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import JSON, Engine, Float, Integer, String, Table, Text, create_engine, inspect, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from protocol.contract import gridq_home
from protocol.messages import TrainMetrics
from protocol.model import ModelSpec


@dataclass(frozen=True)
class RoundRecord:
    round: int
    node: str
    status: str  # done | late | failed | pending_approval
    samples: int
    loss: float | None  # None: the node withheld it (the requester may not see it), or not finite
    accuracy: float | None
    seconds: float
    error: str


class _Base(DeclarativeBase):
    pass


class RunRow(_Base):
    __tablename__ = "fl_runs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    started_at: Mapped[float] = mapped_column(Float)
    model: Mapped[dict[str, Any]] = mapped_column(JSON)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    # running (or killed) | done | interrupted | failed; None in files written before runs had one
    status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)  # why it ended so, for people


class RoundRow(_Base):
    __tablename__ = "fl_rounds"
    run_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    node: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    samples: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    seconds: Mapped[float] = mapped_column(Float)
    error: Mapped[str] = mapped_column(Text)


class EvaluationRow(_Base):
    """A node's figures for the global model after a round (``fit(..., evaluate=...)``)."""

    __tablename__ = "fl_evaluations"
    run_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    node: Mapped[str] = mapped_column(String(64), primary_key=True)
    samples: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)


def _figures_may_be_missing(engine: Engine) -> None:
    """History files written before figures could be withheld declare ``loss NOT NULL``:
    relax it (SQLite cannot alter a column, so there the table is rebuilt)."""
    found = inspect(engine)
    for row in (RoundRow, EvaluationRow):
        table = row.__table__
        assert isinstance(table, Table)
        loss = next(c for c in found.get_columns(table.name) if c["name"] == "loss")
        if loss["nullable"]:
            continue
        with engine.begin() as conn:
            if engine.dialect.name != "sqlite":
                conn.exec_driver_sql(f"ALTER TABLE {table.name} ALTER COLUMN loss DROP NOT NULL")
                continue
            conn.exec_driver_sql(f"ALTER TABLE {table.name} RENAME TO {table.name}_before")
            table.create(conn)
            columns = ", ".join(c.name for c in table.columns)
            conn.exec_driver_sql(f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM {table.name}_before")
            conn.exec_driver_sql(f"DROP TABLE {table.name}_before")


def _runs_have_a_status(engine: Engine) -> None:
    """History files written before runs recorded how they ended lack those columns: add
    them (an added nullable column needs no rebuild, on SQLite or elsewhere)."""
    have = {c["name"] for c in inspect(engine).get_columns(RunRow.__tablename__)}
    with engine.begin() as conn:
        for column, kind in (("status", "VARCHAR(16)"), ("reason", "TEXT")):
            if column not in have:
                conn.exec_driver_sql(f"ALTER TABLE {RunRow.__tablename__} ADD COLUMN {column} {kind}")


def default_url() -> str:
    folder = gridq_home()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'runs.db'}"


class History:
    def __init__(self, url: str | None = None) -> None:
        self.engine = create_engine(url or default_url())
        _Base.metadata.create_all(self.engine)
        _figures_may_be_missing(self.engine)
        _runs_have_a_status(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def start(self, spec: ModelSpec, config: dict[str, Any]) -> str:
        run_id = uuid.uuid4().hex
        with self._sessions.begin() as s:
            s.add(RunRow(id=run_id, started_at=time.time(), model=json.loads(spec.model_dump_json()), config=config,
                         status="running"))
        return run_id

    def finish(self, run_id: str, status: str, reason: str = "") -> None:
        """How the run ended — done, interrupted or failed — and why, for `gridq runs`."""
        with self._sessions.begin() as s:
            row = s.get(RunRow, run_id)
            if row is not None:
                row.status, row.reason = status, reason[:2000]

    def status(self, run_id: str) -> tuple[str, str]:
        """How the run ended and why ("running" while it runs, or if its process was killed)."""
        with self._sessions() as s:
            row = s.get(RunRow, run_id)
        if row is None:
            raise KeyError(f"no federated run {run_id!r} in {self.engine.url}")
        return row.status or "", row.reason or ""

    def record(self, run_id: str, records: list[RoundRecord]) -> None:
        with self._sessions.begin() as s:
            s.add_all(RoundRow(run_id=run_id, **asdict(r)) for r in records)

    def record_evaluation(self, run_id: str, round: int, nodes: dict[str, TrainMetrics]) -> None:
        with self._sessions.begin() as s:
            s.add_all(EvaluationRow(run_id=run_id, round=round, node=node, samples=m.samples, loss=m.loss,
                                    accuracy=m.accuracy) for node, m in nodes.items())

    def evaluations(self, run_id: str) -> dict[int, dict[str, TrainMetrics]]:
        """Per round, each node's figures for the global model after that round."""
        out: dict[int, dict[str, TrainMetrics]] = {}
        with self._sessions() as s:
            for e in s.scalars(select(EvaluationRow).where(EvaluationRow.run_id == run_id)
                               .order_by(EvaluationRow.round, EvaluationRow.node)):
                out.setdefault(e.round, {})[e.node] = TrainMetrics(samples=e.samples, loss=e.loss,
                                                                   accuracy=e.accuracy)
        return out

    def runs(self) -> list[tuple[str, float, dict[str, Any]]]:
        """Every run, newest first: its id, when it started, how it was asked."""
        with self._sessions() as s:
            return [(r.id, r.started_at, r.config)
                    for r in s.scalars(select(RunRow).order_by(RunRow.started_at.desc()))]

    def config(self, run_id: str) -> dict[str, Any]:
        """How the run was asked: rounds, strategy, learning rates, nodes …"""
        with self._sessions() as s:
            row = s.get(RunRow, run_id)
        if row is None:
            raise KeyError(f"no federated run {run_id!r} in {self.engine.url}")
        return row.config

    def rounds(self, run_id: str) -> list[RoundRecord]:
        with self._sessions() as s:
            rows = s.scalars(select(RoundRow).where(RoundRow.run_id == run_id).order_by(RoundRow.round, RoundRow.node))
            return [RoundRecord(r.round, r.node, r.status, r.samples, r.loss, r.accuracy, r.seconds, r.error)
                    for r in rows]


@dataclass(frozen=True)
class RoundSummary:
    """One round of a federated run: how many nodes answered, the loss and accuracy of
    their trained models on their training data (weighted by samples: not a held-out
    evaluation), and the nodes that did not answer (late, failed, pending approval). Loss
    and accuracy average the nodes that released them: None if none did."""

    round: int
    nodes: int
    loss: float | None
    accuracy: float | None
    dropped: list[str]


def summarize(records: list[RoundRecord]) -> list[RoundSummary]:
    """One summary per round of ``records``."""
    out = []
    for r in sorted({h.round for h in records}):
        done = [h for h in records if h.round == r and h.status == "done"]
        out.append(RoundSummary(round=r, nodes=len(done), loss=weighted_mean([(h.loss, h.samples) for h in done]),
                                accuracy=weighted_mean([(h.accuracy, h.samples) for h in done]),
                                dropped=[h.node for h in records if h.round == r and h.status != "done"]))
    return out


def weighted_mean(figures: list[tuple[float | None, int]]) -> float | None:
    """The mean of the figures that are there, weighted by their sample counts (equally if
    they have none); None if none is there (withheld, or not computed)."""
    there = [(value, n) for value, n in figures if value is not None]
    if not there:
        return None
    total = sum(n for _, n in there)
    if not total:
        return sum(value for value, _ in there) / len(there)
    return sum(value * n for value, n in there) / total


def figure(value: float | None, digits: int = 4) -> str:
    """A figure as tables and progress bars print it: "—" when it is not there."""
    return "—" if value is None else f"{value:.{digits}f}"
