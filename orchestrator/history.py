"""The history of federated runs, in the orchestrator's database (SQLite under
``$GRIDQ_HOME/runs.db``, ``~/.gridq/runs.db``, unless told otherwise; any SQLAlchemy URL works): one row per run,
with how it was asked (DP-SGD and secure aggregation included), and one per node and
round — who answered, with how many samples, what loss, accuracy and ε, and who dropped
out and why.

Rounds are stored numbered from 0; everything shown to people — ``gridq runs``,
:func:`round_rows` (``FitResult.to_dataframe``), :func:`plot_rounds` — numbers them from 1,
as ``fit``'s progress bar does ("round 1/10" is the first)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from sqlalchemy import (
    JSON,
    Engine,
    Float,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    create_engine,
    delete,
    inspect,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from protocol.contract import gridq_home
from protocol.errors import InvalidRequest, NotFound
from protocol.messages import TrainMetrics
from protocol.model import ModelSpec

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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
    epsilon: float | None = None  # DP-SGD: the ε the node charged for this round, at the run's δ


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
    epsilon: Mapped[float | None] = mapped_column(Float, nullable=True)  # None: no DP, or written before ε was kept


class EvaluationRow(_Base):
    """A node's figures for the global model after a round (``fit(..., evaluate=...)``)."""

    __tablename__ = "fl_evaluations"
    run_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    node: Mapped[str] = mapped_column(String(64), primary_key=True)
    samples: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)


class CheckpointRow(_Base):
    """The global model after a round, and the strategy's state (FedAdam's moments), to resume
    the run from (``fit(..., checkpoint_every=N)``, ``fit(..., resume=RUN)``): safetensors
    bytes, ``model/<name>`` and ``strategy/<name>`` — tensors only, never a pickle."""

    __tablename__ = "fl_checkpoints"
    run_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    saved_at: Mapped[float] = mapped_column(Float)
    tensors: Mapped[bytes] = mapped_column(LargeBinary)


@dataclass(frozen=True)
class Checkpoint:
    round: int  # the last whole round whose model this is (from 0)
    model: dict[str, torch.Tensor]
    strategy: dict[str, torch.Tensor]


def _figures_may_be_missing(engine: Engine) -> None:
    """History files written before figures could be withheld declare ``loss NOT NULL``:
    relax it (SQLite cannot alter a column, so there the table is rebuilt)."""
    found = inspect(engine)
    for row in (RoundRow, EvaluationRow):
        table = row.__table__
        assert isinstance(table, Table)
        had = found.get_columns(table.name)
        loss = next(c for c in had if c["name"] == "loss")
        if loss["nullable"]:
            continue
        with engine.begin() as conn:
            if engine.dialect.name != "sqlite":
                conn.exec_driver_sql(f"ALTER TABLE {table.name} ALTER COLUMN loss DROP NOT NULL")
                continue
            conn.exec_driver_sql(f"ALTER TABLE {table.name} RENAME TO {table.name}_before")
            table.create(conn)
            columns = ", ".join(c.name for c in table.columns if c.name in {h["name"] for h in had})  # not added ones
            conn.exec_driver_sql(f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM {table.name}_before")
            conn.exec_driver_sql(f"DROP TABLE {table.name}_before")


def _runs_have_a_status(engine: Engine) -> None:
    """History files written before runs recorded how they ended, or rounds their ε, lack
    those columns: add them (an added nullable column needs no rebuild, on SQLite or
    elsewhere)."""
    found = inspect(engine)
    runs = {c["name"] for c in found.get_columns(RunRow.__tablename__)}
    rounds = {c["name"] for c in found.get_columns(RoundRow.__tablename__)}
    with engine.begin() as conn:
        for table, have, column, kind in ((RunRow.__tablename__, runs, "status", "VARCHAR(16)"),
                                          (RunRow.__tablename__, runs, "reason", "TEXT"),
                                          (RoundRow.__tablename__, rounds, "epsilon", "FLOAT")):
            if column not in have:
                conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


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

    def reopen(self, run_id: str) -> None:
        """A run resumed: running again, from its last checkpoint; what it recorded of the
        rounds after that checkpoint (a round cut short, a crash) is dropped, to be run again."""
        last = self.checkpoint(run_id)
        after = -1 if last is None else last.round
        with self._sessions.begin() as s:
            for table in (RoundRow, EvaluationRow, CheckpointRow):
                s.execute(delete(table).where(table.run_id == run_id, table.round > after))
            row = s.get(RunRow, run_id)
            if row is not None:
                row.status, row.reason = "running", f"resumed after round {after + 1}"

    def save_checkpoint(self, run_id: str, round: int, model: Mapping[str, torch.Tensor],
                        strategy: Mapping[str, torch.Tensor]) -> None:
        tensors = {**{f"model/{k}": v.detach().contiguous() for k, v in model.items()},
                   **{f"strategy/{k}": v.detach().contiguous() for k, v in strategy.items()}}
        with self._sessions.begin() as s:
            s.merge(CheckpointRow(run_id=run_id, round=round, saved_at=time.time(), tensors=save_tensors(tensors)))

    def checkpoint(self, run_id: str) -> Checkpoint | None:
        """The run's last checkpoint, or None if it saved none."""
        with self._sessions() as s:
            row = s.scalars(select(CheckpointRow).where(CheckpointRow.run_id == run_id)
                            .order_by(CheckpointRow.round.desc()).limit(1)).first()
        if row is None:
            return None
        tensors = load_tensors(row.tensors)
        part = {prefix: {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{prefix}/")}
                for prefix in ("model", "strategy")}
        return Checkpoint(row.round, part["model"], part["strategy"])

    def model(self, run_id: str) -> dict[str, Any]:
        """The model the run trains, as it was described when it started (layers, shapes)."""
        return self._run(run_id).model

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

    def resolve(self, given: str) -> str:
        """The whole id of the run ``given`` names: the id itself, or a unique prefix of it (as
        ``gridq requests`` takes a request's, or git a commit's). ``NotFound`` if none has it,
        ``InvalidRequest`` listing them if several do."""
        with self._sessions() as s:
            if given and s.get(RunRow, given) is not None:
                return given
            ids = list(s.scalars(select(RunRow.id).where(RunRow.id.startswith(given, autoescape=True))
                                 .order_by(RunRow.started_at.desc(), RunRow.id.desc()))) if given else []
        if len(ids) == 1:
            return ids[0]
        if not ids:
            raise NotFound(f"no federated run {given!r} in {self.engine.url}; "
                           "`gridq runs list` shows them")
        shown = ", ".join(ids[:4]) + (", …" if len(ids) > 4 else "")
        raise InvalidRequest(f"{given!r} names {len(ids)} runs ({shown}); give more of the id")

    def config(self, run_id: str) -> dict[str, Any]:
        """How the run was asked: rounds, strategy, learning rates, nodes …"""
        return self._run(run_id).config

    def _run(self, run_id: str) -> RunRow:
        with self._sessions() as s:
            row = s.get(RunRow, run_id)
        if row is None:
            raise KeyError(f"no federated run {run_id!r} in {self.engine.url}")
        return row

    def rounds(self, run_id: str) -> list[RoundRecord]:
        with self._sessions() as s:
            rows = s.scalars(select(RoundRow).where(RoundRow.run_id == run_id).order_by(RoundRow.round, RoundRow.node))
            return [RoundRecord(r.round, r.node, r.status, r.samples, r.loss, r.accuracy, r.seconds, r.error,
                                r.epsilon) for r in rows]

    def evaluated(self, run_id: str) -> dict[int, tuple[float | None, float | None]]:
        """Per round (from 0), the global model's evaluation loss and accuracy, weighted by
        the evaluating nodes' samples (``fit(..., evaluate=...)``; empty if it did not ask)."""
        return {r: (weighted_mean([(m.loss, m.samples) for m in nodes.values()]),
                    weighted_mean([(m.accuracy, m.samples) for m in nodes.values()]))
                for r, nodes in self.evaluations(run_id).items()}


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


# --- what people see of a run: rounds as rows, privacy settings, the learning curve ------------------

ROUND_COLUMNS = ("round", "nodes", "asked", "samples", "loss", "accuracy", "eval_loss", "eval_accuracy", "dropouts",
                 "dropped", "seconds", "epsilon")
NODE_COLUMNS = ("round", "node", "status", "samples", "loss", "accuracy", "seconds", "epsilon", "error")


def round_rows(records: list[RoundRecord],
               evaluated: Mapping[int, tuple[float | None, float | None]] | None = None) -> list[dict[str, Any]]:
    """One row per round, numbered from 1 as ``fit``'s progress bar counts them: ``nodes``
    that answered of the ``asked``, their ``samples``; ``loss`` and ``accuracy`` of their
    trained models on their training data (weighted by samples; None where withheld);
    ``eval_loss`` and ``eval_accuracy`` of the global model after the round on held-out data
    (``fit(..., evaluate=...)``, else None); ``dropouts`` and who (``dropped``: "node
    (status)"); ``seconds`` the round waited for its nodes (its slowest answer, or the round
    timeout for a late node); ``epsilon`` the largest ε one node charged for it (DP-SGD, else
    None)."""
    evaluated = evaluated or {}
    out = []
    for summary in summarize(records):
        these = [h for h in records if h.round == summary.round]
        done = [h for h in these if h.status == "done"]
        charged = [h.epsilon for h in done if h.epsilon is not None]
        eval_loss, eval_accuracy = evaluated.get(summary.round, (None, None))
        out.append({"round": summary.round + 1, "nodes": summary.nodes, "asked": len(these),
                    "samples": sum(h.samples for h in done), "loss": summary.loss, "accuracy": summary.accuracy,
                    "eval_loss": eval_loss, "eval_accuracy": eval_accuracy, "dropouts": len(these) - len(done),
                    "dropped": "; ".join(f"{h.node} ({h.status})" for h in these if h.status != "done"),
                    "seconds": max((h.seconds for h in these), default=0.0),
                    "epsilon": max(charged) if charged else None})
    return out


def node_rows(records: list[RoundRecord]) -> list[dict[str, Any]]:
    """One row per node and round (rounds numbered from 1), as the history keeps them."""
    return [{**asdict(h), "round": h.round + 1} for h in sorted(records, key=lambda h: (h.round, h.node))]


def privacy_settings(config: Mapping[str, Any]) -> dict[str, str]:
    """How the run protected the nodes' data, for people: DP-SGD's parameters and secure
    aggregation's parties, "off", or "not recorded" for runs recorded before gridq kept them."""
    out = {}
    if "dp" not in config:
        out["dp-sgd"] = "not recorded (a run of an earlier gridq)"
    elif not config["dp"]:
        out["dp-sgd"] = "off"
    else:
        dp = config["dp"]
        figures = (f"loss and accuracy released with noise at ε {dp.get('metrics_epsilon'):g} (each sample's loss "
                   f"clamped to [0, {dp.get('loss_bound', 10.0):g}])" if dp.get("metrics_epsilon")
                   else "loss and accuracy withheld")
        out["dp-sgd"] = (f"noise multiplier {dp.get('noise_multiplier'):g}, max grad norm {dp.get('max_grad_norm'):g}, "
                         f"δ {dp.get('delta'):g}; {figures}")
    if "secure_aggregation" not in config:
        out["secure agg"] = "not recorded (a run of an earlier gridq)"
    elif not config["secure_aggregation"]:
        out["secure agg"] = "off"
    else:
        secure = config["secure_aggregation"]
        out["secure agg"] = (f"on: updates summed by {', '.join(secure.get('aggregators', []))}, "
                             f"{secure.get('frac_bits', 16)} fractional bits")
    return out


def plot_rounds(rows: list[dict[str, Any]], title: str = "", size: tuple[float, float] = (8.0, 6.0),
                dpi: int = 100) -> Figure:
    """The learning curve of a run's :func:`round_rows`: loss (top) and accuracy (bottom) per
    round, training figures solid, the global model's evaluation dashed, and rounds where
    nodes dropped out marked (a red band and the count). A matplotlib Figure drawn with the
    Agg backend (no display needed): ``plot_rounds(rows).savefig("curve.png")``."""
    from matplotlib.figure import Figure  # matplotlib loads only here: `gridq runs list` does without it

    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    loss_ax, acc_ax = fig.subplots(2, 1, sharex=True)
    x = [r["round"] for r in rows]
    nan = float("nan")

    def series(column: str) -> list[float]:
        return [nan if r[column] is None else float(r[column]) for r in rows]

    for ax, column, name in ((loss_ax, "loss", "loss"), (acc_ax, "accuracy", "accuracy")):
        drawn = False
        for prefix, label, style in (("", "training", "-"), ("eval_", "evaluation (global model)", "--")):
            values = series(prefix + column)
            if any(v == v for v in values):  # not all NaN (withheld, or not asked)
                ax.plot(x, values, style, marker="o", markersize=3, label=f"{label} {name}")
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, f"no {name}: withheld by the nodes, or not computed", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")
        for r in rows:
            if r["dropouts"]:
                ax.axvspan(r["round"] - 0.4, r["round"] + 0.4, color="tab:red", alpha=0.15, linewidth=0)
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    dropped = [r for r in rows if r["dropouts"]]
    for r in dropped:
        acc_ax.annotate(f"{r['dropouts']} out", (r["round"], 0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", color="tab:red", fontsize=8)
    if dropped:
        from matplotlib.patches import Patch

        loss_ax.legend(handles=[*loss_ax.get_legend_handles_labels()[0],
                                Patch(color="tab:red", alpha=0.15, label=f"nodes dropped out ({len(dropped)} rounds)")],
                       fontsize=8)
    elif loss_ax.lines:
        loss_ax.legend(fontsize=8)
    if acc_ax.lines:
        acc_ax.legend(fontsize=8)
    acc_ax.set_xlabel("round")
    if x:
        acc_ax.set_xlim(min(x) - 0.5, max(x) + 0.5)
        from matplotlib.ticker import MaxNLocator

        acc_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
