"""A run's rounds leave the history for a scientist's own tools (issue 19, point 3): as a
pandas DataFrame or CSV (``FitResult.to_dataframe``/``to_csv``), as a learning curve
(``gridq runs plot``, matplotlib's Agg backend), and ``gridq runs show`` takes an id prefix,
numbers rounds from 1 as fit's progress bar does, and shows DP-SGD and secure aggregation.
No grid: fit runs with its rounds stubbed, the history is a temporary SQLite file."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import orchestrator.fl as fl
from ops.cli import app
from orchestrator.evaluation import Evaluation
from orchestrator.history import History, RoundRecord, plot_rounds, round_rows
from orchestrator.pointer import Expression
from protocol.errors import InvalidRequest, NotFound
from protocol.messages import DPConfig, TrainMetrics
from protocol.model import describe_model
from protocol.plan import InputRef, TensorSpec

# three rounds over two nodes: round 2 loses clinic (late), round 3 has its figures withheld at one node
RECORDS = [
    RoundRecord(0, "clinic", "done", 10, 2.0, 0.5, 1.5, "", 0.25),
    RoundRecord(0, "hospital", "done", 30, 1.0, 0.7, 2.5, "", 0.5),
    RoundRecord(1, "clinic", "late", 0, 0.0, None, 120.0, "no answer within the round"),
    RoundRecord(1, "hospital", "done", 30, 0.8, 0.8, 2.0, "", 0.5),
    RoundRecord(2, "clinic", "done", 10, None, None, 1.0, "withheld", 0.25),
    RoundRecord(2, "hospital", "done", 30, 0.6, 0.9, 3.0, "", 0.5),
]
EVALUATIONS = [Evaluation(loss=loss, accuracy=accuracy, samples=40, nodes={}, missing={})
               for loss, accuracy in ((1.9, 0.55), (1.1, 0.75), (0.7, 0.85))]


def _result() -> fl.FitResult:
    return fl.FitResult(torch.nn.Linear(2, 2), list(RECORDS), "f" * 32, list(EVALUATIONS))


def test_to_dataframe_has_a_row_per_round_numbered_from_1() -> None:
    frame = _result().to_dataframe()
    assert list(frame.columns) == ["round", "nodes", "asked", "samples", "loss", "accuracy", "eval_loss",
                                   "eval_accuracy", "dropouts", "dropped", "seconds", "epsilon"]
    assert frame["round"].tolist() == [1, 2, 3]  # as the progress bar counts: "round 1/3" is the first
    assert frame["nodes"].tolist() == [2, 1, 2] and frame["asked"].tolist() == [2, 2, 2]
    assert frame["samples"].tolist() == [40, 30, 40]
    assert frame["loss"].tolist() == pytest.approx([1.25, 0.8, 0.6])  # weighted by samples; withheld left out
    assert frame["accuracy"].tolist() == pytest.approx([0.65, 0.8, 0.9])
    assert frame["eval_loss"].tolist() == pytest.approx([1.9, 1.1, 0.7])
    assert frame["eval_accuracy"].tolist() == pytest.approx([0.55, 0.75, 0.85])
    assert frame["dropouts"].tolist() == [0, 1, 0]
    assert frame["dropped"].tolist() == ["", "clinic (late)", ""]
    assert frame["seconds"].tolist() == [2.5, 120.0, 3.0]  # the slowest answer, or the round timeout
    assert frame["epsilon"].tolist() == [0.5, 0.5, 0.5]  # the largest ε one node charged
    assert str(frame["loss"].dtype) == "float64" and str(frame["round"].dtype) == "int64"


def test_withheld_figures_are_nan_and_a_run_without_evaluation_has_empty_columns() -> None:
    records = [RoundRecord(0, "a", "done", 5, None, None, 1.0, "withheld")]
    frame = fl.FitResult(torch.nn.Linear(2, 2), records, "r").to_dataframe()
    assert frame.shape == (1, 12)
    for column in ("loss", "accuracy", "eval_loss", "eval_accuracy", "epsilon"):
        assert math.isnan(frame[column].iloc[0]), column
    empty = fl.FitResult(torch.nn.Linear(2, 2), [], "r").to_dataframe()
    assert empty.shape == (0, 12)


def test_to_dataframe_by_node_keeps_every_row_of_the_history() -> None:
    frame = _result().to_dataframe(by="node")
    assert list(frame.columns) == ["round", "node", "status", "samples", "loss", "accuracy", "seconds", "epsilon",
                                   "error"]
    assert len(frame) == len(RECORDS)
    assert frame["round"].tolist() == [1, 1, 2, 2, 3, 3]
    late = frame[frame["status"] == "late"].iloc[0]
    assert (late["node"], late["error"]) == ("clinic", "no answer within the round")
    with pytest.raises(InvalidRequest, match="by must be 'round' or 'node'"):
        _result().to_dataframe(by="nodes")  # type: ignore[arg-type]


def test_to_csv_writes_what_the_dataframe_holds(tmp_path: Path) -> None:
    written = _result().to_csv(tmp_path / "rounds.csv")
    assert written == tmp_path / "rounds.csv"
    with written.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["round"] for r in rows] == ["1", "2", "3"]
    assert rows[1]["dropped"] == "clinic (late)" and float(rows[0]["loss"]) == pytest.approx(1.25)
    nodes = _result().to_csv(tmp_path / "nodes.csv", by="node")
    with nodes.open(newline="") as f:
        by_node = list(csv.DictReader(f))
    assert len(by_node) == 6 and by_node[4]["loss"] == ""  # withheld: an empty field


# --- what fit records, and `gridq runs show` -------------------------------------------------


def _leaf(name: str, shape: tuple[int, ...], dtype: str) -> Expression:
    return Expression(None, "n", [(InputRef(kind="dataset", name=name),  # type: ignore[arg-type]
                                   TensorSpec(shape=shape, dtype=dtype))])


def _fit(db: str, monkeypatch: pytest.MonkeyPatch, **options: object) -> fl.FitResult:
    """fit over one node whose rounds are stubbed: round 2 of 3 loses the node 'b'."""
    def one_round(grid, spec, state, data, configs, r, timeout, dp, secure):  # type: ignore[no-untyped-def]
        flat = torch.zeros(sum(v.numel() for v in state.values()))
        dropped = [RoundRecord(r, "b", "late", 0, 0.0, None, timeout, "no answer within the round")] if r == 1 else []
        return ([RoundRecord(r, "n", "done", 6, 1.0 / (r + 1), 0.5 + r / 10, 0.1, "", 0.3 if dp else None), *dropped],
                [("n", flat, 6), ("m", flat, 6)], [])

    monkeypatch.setattr(fl, "_round", one_round)
    monkeypatch.setattr(fl, "_secure_mean", lambda grid, secure, like, updates: fl.fedavg(like, updates))
    data = [(_leaf("x", (6, 2), "float32"), _leaf("y", (6,), "int64"))]
    return fl.fit(None, torch.nn.Sequential(torch.nn.Linear(2, 2)), data, rounds=3, progress=False,  # type: ignore[arg-type]
                  history_db=db, **options)  # type: ignore[arg-type]


def show(db: str, run: str) -> str:
    shown = CliRunner().invoke(app, ["runs", "show", run, "--db", db], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    return shown.output


def test_fit_records_dp_sgd_and_secure_aggregation_and_runs_show_says_so(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    dp = DPConfig(noise_multiplier=4.0, max_grad_norm=1.0, delta=1e-7, metrics_epsilon=0.1)
    guarded = _fit(db, monkeypatch, dp=dp, secure_aggregation=True, aggregators=["company", "public"])
    config = History(db).config(guarded.run_id)
    assert config["dp"] == {"noise_multiplier": 4.0, "max_grad_norm": 1.0, "delta": 1e-7, "metrics_epsilon": 0.1,
                            "loss_bound": 10.0}
    assert config["secure_aggregation"] == {"aggregators": ["company", "public"], "frac_bits": 16}
    assert (config["momentum"], config["seed"], config["round_timeout"]) == (0.0, 0, 120.0)
    out = show(db, guarded.run_id)
    assert "dp-sgd         noise multiplier 4, max grad norm 1, δ 1e-07; loss and accuracy released with noise " \
           "at ε 0.1" in out
    assert "secure agg     on: updates summed by company, public, 16 fractional bits" in out
    header = next(line for line in out.splitlines() if "train loss" in line)
    assert "┃ ε " in header and _table_rows(out)[0][4] == "0.300"  # the ε charged per round, under DP-SGD
    assert [r.epsilon for r in History(db).rounds(guarded.run_id) if r.node == "n"] == [0.3, 0.3, 0.3]

    plain = _fit(db, monkeypatch)
    out = show(db, plain.run_id)
    assert "dp-sgd         off" in out and "secure agg     off" in out
    # a run recorded before gridq kept them
    spec, _ = describe_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    old = History(db).start(spec, {"rounds": 1, "nodes": ["n"]})
    assert "dp-sgd         not recorded" in show(db, old)


def _table_rows(output: str) -> list[list[str]]:
    """The cells of the rich table's body rows."""
    return [[cell.strip() for cell in line.strip("│┃ ").split("│")] for line in output.splitlines()
            if line.startswith("│")]


def test_runs_show_numbers_rounds_from_1_as_the_progress_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    result = _fit(db, monkeypatch)
    rows = _table_rows(show(db, result.run_id))
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert rows[0][1] == "1/1" and rows[1][1] == "1/2"  # answered / asked
    assert "b (late: no answer within the round)" in rows[1][-1]
    assert rows[0][2] == "1.0000" and rows[1][2] == "0.5000"


def test_runs_show_and_plot_take_an_id_prefix_and_an_ambiguous_one_lists_the_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import orchestrator.history as history_module

    db = f"sqlite:///{tmp_path / 'runs.db'}"
    history = History(db)
    spec, _ = describe_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    given = iter(["3f2a9c0e" + "1" * 24, "3f2a9c0e" + "2" * 24, "77" + "0" * 30])
    monkeypatch.setattr(history_module.uuid, "uuid4", lambda: types.SimpleNamespace(hex=next(given)))
    first, second, other = (history.start(spec, {"rounds": 1, "nodes": ["n"]}) for _ in range(3))
    for run in (first, second, other):
        history.record(run, [RoundRecord(0, "n", "done", 6, 0.5, 0.5, 0.1, "")])
    assert history.resolve(first) == first and history.resolve("3f2a9c0e1") == first and history.resolve("7") == other
    with pytest.raises(InvalidRequest, match=rf"'3f2a' names 2 runs \({second}, {first}\); give more of the id"):
        history.resolve("3f2a")  # newest first, as `gridq runs list` shows them
    with pytest.raises(NotFound, match="no federated run 'zzz'"):
        history.resolve("zzz")
    with pytest.raises(NotFound):
        history.resolve("")
    assert f"run            {other}" in show(db, "77")
    ambiguous = CliRunner().invoke(app, ["runs", "show", "3f2a9c", "--db", db], env={"COLUMNS": "200"})
    assert ambiguous.exit_code == 1
    assert ambiguous.output.startswith(f"error: InvalidRequest: '3f2a9c' names 2 runs ({second}, {first}); give more")
    missing = CliRunner().invoke(app, ["runs", "plot", "zzz", "--db", db, "-o", str(tmp_path / "x.png")])
    assert missing.exit_code == 1 and "error: NotFound: no federated run 'zzz'" in missing.output
    plotted = CliRunner().invoke(app, ["runs", "plot", "3f2a9c0e2", "--db", db, "-o", str(tmp_path / "one.png")])
    assert plotted.exit_code == 0, plotted.output
    assert (tmp_path / "one.png").stat().st_size > 0


def test_a_history_written_before_rounds_kept_their_epsilon_takes_it(tmp_path: Path) -> None:
    import sqlite3

    file = tmp_path / "runs.db"
    with sqlite3.connect(file) as db:
        db.execute("CREATE TABLE fl_rounds (run_id VARCHAR(40) NOT NULL, round INTEGER NOT NULL, node VARCHAR(64) "
                   "NOT NULL, status VARCHAR(16) NOT NULL, samples INTEGER NOT NULL, loss FLOAT, accuracy "
                   "FLOAT, seconds FLOAT NOT NULL, error TEXT NOT NULL, PRIMARY KEY (run_id, round, node))")
        db.execute("INSERT INTO fl_rounds VALUES ('old', 0, 'hospital', 'done', 10, 0.5, 0.9, 1.0, '')")
    history = History(f"sqlite:///{file}")
    assert history.rounds("old") == [RoundRecord(0, "hospital", "done", 10, 0.5, 0.9, 1.0, "", None)]
    history.record("old", [RoundRecord(1, "hospital", "done", 10, 0.4, 0.9, 1.0, "", 0.2)])
    assert history.rounds("old")[-1].epsilon == 0.2


# --- the learning curve ---------------------------------------------------------------------------


def test_gridq_runs_plot_renders_a_readable_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    db = f"sqlite:///{tmp_path / 'runs.db'}"
    history = History(db)
    spec, _ = describe_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    run = history.start(spec, {"rounds": 3, "strategy": "fedavg", "nodes": ["clinic", "hospital"]})
    for r in range(3):
        history.record(run, [h for h in RECORDS if h.round == r])
        history.record_evaluation(run, r, {"hospital": TrainMetrics(samples=40, loss=EVALUATIONS[r].loss,
                                                                    accuracy=EVALUATIONS[r].accuracy)})
    out = tmp_path / "curve.png"
    plotted = CliRunner().invoke(app, ["runs", "plot", run, "-o", str(out), "--db", db])
    assert plotted.exit_code == 0, plotted.output
    assert f"wrote {out}: 3 rounds, 1 with dropouts" in plotted.output
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (800, 600)  # 8 × 6 inches at 100 dpi
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 10  # not blank: curves, axes and text on white
    assert (pixels < 128).mean() > 0.005 and (pixels > 250).mean() > 0.5  # mostly background, some ink
    # the plotted series are the run's figures
    fig = plot_rounds(round_rows(history.rounds(run), history.evaluated(run)))
    loss_ax, acc_ax = fig.axes
    by_label = {line.get_label(): line for ax in (loss_ax, acc_ax) for line in ax.lines}
    assert list(by_label["training loss"].get_xdata()) == [1, 2, 3]
    assert list(by_label["training loss"].get_ydata()) == pytest.approx([1.25, 0.8, 0.6])
    assert list(by_label["evaluation (global model) loss"].get_ydata()) == pytest.approx([1.9, 1.1, 0.7])
    assert list(by_label["training accuracy"].get_ydata()) == pytest.approx([0.65, 0.8, 0.9])
    assert len(loss_ax.patches) == 1  # round 2, where clinic dropped out, is marked
    bigger = CliRunner().invoke(app, ["runs", "plot", run, "-o", str(tmp_path / "big.png"), "--db", db,
                                      "--width", "10", "--height", "4", "--dpi", "150"])
    assert bigger.exit_code == 0, bigger.output
    with Image.open(tmp_path / "big.png") as image:
        assert image.size == (1500, 600)
    monkeypatch.chdir(tmp_path)  # no -o: run-<prefix>.png here
    assert CliRunner().invoke(app, ["runs", "plot", run[:6], "--db", db]).exit_code == 0
    assert (tmp_path / f"run-{run[:8]}.png").is_file()


def test_a_run_whose_figures_were_all_withheld_still_plots_and_says_why(tmp_path: Path) -> None:
    rows = round_rows([RoundRecord(0, "a", "done", 5, None, None, 1.0, "withheld"),
                       RoundRecord(1, "a", "done", 5, None, None, 1.0, "withheld")])
    fig = plot_rounds(rows, "withheld")
    assert all(not ax.lines for ax in fig.axes)
    assert any("withheld" in t.get_text() for ax in fig.axes for t in ax.texts)
    fig.savefig(tmp_path / "w.png")
    assert (tmp_path / "w.png").stat().st_size > 0
    result = fl.FitResult(torch.nn.Linear(2, 2), list(RECORDS), "f" * 32, list(EVALUATIONS))
    drawn = result.plot(tmp_path / "fit.png")
    assert (tmp_path / "fit.png").is_file() and len(drawn.axes) == 2
