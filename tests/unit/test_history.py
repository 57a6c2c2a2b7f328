"""The history of federated runs: kept per node and round, read back by `gridq runs`."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from typer.testing import CliRunner

from ops.cli import app
from orchestrator.history import History, RoundRecord, RoundSummary, summarize
from protocol.messages import TrainMetrics
from protocol.model import describe_model


def _run(history: History) -> str:
    spec, _ = describe_model(nn.Sequential(nn.Linear(4, 2)))
    run_id = history.start(spec, {"rounds": 3, "strategy": "fedadam", "nodes": ["a", "b"], "lr": 0.05})
    history.record(run_id, [RoundRecord(0, "a", "done", 30, 1.0, 0.5, 0.1, ""),
                            RoundRecord(0, "b", "done", 10, 2.0, 0.9, 0.1, "")])
    history.record(run_id, [RoundRecord(1, "a", "done", 30, 0.5, 0.8, 0.1, ""),
                            RoundRecord(1, "b", "late", 0, 0.0, None, 120.0, "no answer within the round")])
    return run_id


def test_rounds_are_weighted_by_samples_and_name_their_dropouts(tmp_path: Path) -> None:
    history = History(f"sqlite:///{tmp_path / 'runs.db'}")
    run_id = _run(history)
    first, second = summarize(history.rounds(run_id))
    assert first == RoundSummary(round=0, nodes=2, loss=1.25, accuracy=0.6, dropped=[])
    assert (second.nodes, second.loss, second.dropped) == (1, 0.5, ["b"])
    assert history.config(run_id)["strategy"] == "fedadam"


def test_gridq_runs_lists_and_shows_a_run(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    run_id = _run(History(db))
    listed = CliRunner().invoke(app, ["runs", "list", "--db", db], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    assert run_id in listed.output and "fedadam" in listed.output and "2/3" in listed.output
    narrow = CliRunner().invoke(app, ["runs", "list", "--db", db], env={"COLUMNS": "80"})
    assert run_id in narrow.output  # whole, to paste into `gridq runs show`
    shown = CliRunner().invoke(app, ["runs", "show", run_id, "--db", db], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "b (late: no answer within the round)" in shown.output
    assert "1.2500" in shown.output and "0.600" in shown.output
    missing = CliRunner().invoke(app, ["runs", "show", "nope", "--db", db])
    assert missing.exit_code == 1 and "no federated run 'nope'" in missing.output


def test_withheld_figures_are_none_in_the_history_and_shown_as_a_dash(tmp_path: Path) -> None:
    """A node that withholds a round's loss and accuracy (DP-SGD without private figures, a
    user who may not see the rows): the round averages the nodes that released them."""
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    history = History(db)
    spec, _ = describe_model(nn.Sequential(nn.Linear(4, 2)))
    run_id = history.start(spec, {"rounds": 2, "nodes": ["a", "b"]})
    history.record(run_id, [RoundRecord(0, "a", "done", 30, None, None, 0.1, "withheld"),
                            RoundRecord(0, "b", "done", 10, 2.0, 0.9, 0.1, "")])
    history.record(run_id, [RoundRecord(1, "a", "done", 30, None, None, 0.1, "withheld"),
                            RoundRecord(1, "b", "done", 10, None, None, 0.1, "withheld")])
    first, second = summarize(history.rounds(run_id))
    assert first == RoundSummary(round=0, nodes=2, loss=2.0, accuracy=0.9, dropped=[])
    assert second == RoundSummary(round=1, nodes=2, loss=None, accuracy=None, dropped=[])
    for args in (["runs", "show", run_id], ["runs", "list"]):
        shown = CliRunner().invoke(app, [*args, "--db", db], env={"COLUMNS": "200"})
        assert shown.exit_code == 0, shown.output
        assert "—" in shown.output


def test_a_history_written_before_figures_could_be_withheld_takes_them(tmp_path: Path) -> None:
    """runs.db files of earlier versions declare loss NOT NULL; opening one relaxes it and
    keeps its rounds."""
    import sqlite3

    file = tmp_path / "runs.db"
    with sqlite3.connect(file) as db:
        db.execute("CREATE TABLE fl_rounds (run_id VARCHAR(40) NOT NULL, round INTEGER NOT NULL, node VARCHAR(64) "
                   "NOT NULL, status VARCHAR(16) NOT NULL, samples INTEGER NOT NULL, loss FLOAT NOT NULL, accuracy "
                   "FLOAT, seconds FLOAT NOT NULL, error TEXT NOT NULL, PRIMARY KEY (run_id, round, node))")
        db.execute("INSERT INTO fl_rounds VALUES ('old', 1, 'hospital', 'done', 10, 0.5, 0.9, 1.0, '')")
    history = History(f"sqlite:///{file}")
    history.record("new", [RoundRecord(1, "clinic", "done", 20, None, None, 1.0, "withheld")])
    assert [r.loss for r in history.rounds("old")] == [0.5] and [r.loss for r in history.rounds("new")] == [None]


def test_a_checkpoint_keeps_the_model_and_the_strategy_and_a_resume_drops_what_came_after(tmp_path: Path) -> None:
    import torch

    history = History(f"sqlite:///{tmp_path / 'runs.db'}")
    run_id = _run(history)  # rounds 0 and 1 recorded
    assert history.checkpoint(run_id) is None
    weights = {"0.weight": torch.arange(8.0).reshape(2, 4), "0.bias": torch.tensor([0.5, -0.5])}
    history.save_checkpoint(run_id, 0, weights, {"0.weight.step": torch.tensor(1.0)})
    history.record_evaluation(run_id, 1, {"a": TrainMetrics(samples=5, loss=0.1, accuracy=1.0)})
    kept = history.checkpoint(run_id)
    assert kept is not None and kept.round == 0 and set(kept.model) == set(weights)
    assert all(torch.equal(kept.model[k], v) for k, v in weights.items())
    assert torch.equal(kept.strategy["0.weight.step"], torch.tensor(1.0))
    history.finish(run_id, "interrupted", "Ctrl-C")
    history.reopen(run_id)  # round 1 came after the checkpoint: it is run again
    assert {r.round for r in history.rounds(run_id)} == {0} and history.evaluations(run_id) == {}
    assert history.status(run_id) == ("running", "resumed after round 1")
    assert history.checkpoint(run_id).round == 0  # type: ignore[union-attr]
