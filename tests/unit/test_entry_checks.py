"""Inputs are checked where they enter (issue 16, part 5), and Ctrl-C in ``grid.fit`` is
safe (part 6). Each mistake is a typed GridError naming its fix, found before anything is
sent: these run with no grid at all (an Expression with no grid, ``grid=None``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import orchestrator.fl as fl
from ops.cli import app
from ops.keys import read_identity, write_identity
from orchestrator.grid import key_path, read_key
from orchestrator.history import History, RoundRecord
from orchestrator.mpc import encoded, query
from orchestrator.pointer import Expression
from protocol.errors import ForbiddenOperation, InvalidRequest
from protocol.model import describe_model
from protocol.mpc.ring import FixedPoint
from protocol.plan import InputRef, TensorSpec
from workers.config import load_config

X = (InputRef(kind="dataset", name="x"), TensorSpec(shape=(6, 2), dtype="float32"))
Y = (InputRef(kind="dataset", name="y"), TensorSpec(shape=(6,), dtype="int64"))


def _leaf(*inputs: tuple[InputRef, TensorSpec]) -> Expression:
    return Expression(None, "n", list(inputs))  # type: ignore[arg-type]  # no grid: nothing may be sent


# --- releases -------------------------------------------------------------------------------


def test_a_delta_without_an_epsilon_is_refused_not_released_exactly() -> None:
    """`get(delta=1e-7)` used to return the exact value: a DP release asked for by half."""
    total = _leaf(X).sum()
    for ask in (lambda: total.get(delta=1e-7), lambda: total.submit(delta=1e-7)):
        with pytest.raises(InvalidRequest, match=r"delta=1e-07 asks for a differentially private release, which "
                                                 r"needs an epsilon too: get\(epsilon=0\.2, delta=1e-07\)"):
            ask()


# --- encrypted queries ----------------------------------------------------------------------


def test_a_query_input_must_be_a_tensor_of_finite_numbers() -> None:
    with pytest.raises(InvalidRequest, match=r"torch\.Tensor, not a list: pass torch\.tensor\(x"):
        query(None, "dana/risk", [0.5, 1.0])  # type: ignore[arg-type]
    for bad in (float("nan"), float("inf")):
        with pytest.raises(InvalidRequest, match=r"1 NaN or infinite value\(s\).*torch\.nan_to_num"):
            query(None, "dana/risk", torch.tensor([0.5, bad]))  # type: ignore[arg-type]


def test_fixed_point_refuses_nan_which_would_wrap_to_minus_2_to_the_63() -> None:
    fp = FixedPoint(16)
    with pytest.raises(ValueError, match="do not fit"):
        fp.encode(torch.tensor([1.0, float("nan")]))
    with pytest.raises(InvalidRequest, match="scale the values down"):
        encoded(fp, torch.tensor([1e15]), "the query's input")
    assert encoded(fp, torch.tensor([1.5]), "x").item() == 1.5 * 2 ** 16


# --- federated training ----------------------------------------------------------------------


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("rounds", [0, -1, 2.5, True])
def test_fit_needs_at_least_one_whole_round(rounds: object) -> None:
    x, y = _leaf(X), _leaf(Y)
    with pytest.raises(InvalidRequest, match="rounds must be a whole number of at least 1"):
        fl.fit(None, _model(), [(x, y)], rounds=rounds, progress=False)  # type: ignore[arg-type]


def test_fit_data_is_a_list_of_pairs_and_says_so() -> None:
    """`fit(model, (x, y))` failed with 'too many values to unpack'."""
    x, y = _leaf(X), _leaf(Y)
    for pair in ((x, y), [x, y]):
        with pytest.raises(InvalidRequest, match=r"pass \[\(x, y\)\], not \(x, y\)"):
            fl.fit(None, _model(), pair, rounds=1, progress=False)  # type: ignore[arg-type]
    for wrong in ([x], [(x,)], [], [(x, y, y)], "xy"):
        with pytest.raises(InvalidRequest, match="non-empty list of .x, y. pairs"):
            fl.fit(None, _model(), wrong, rounds=1, progress=False)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="evaluate is a list of"):
        fl.fit(None, _model(), [(x, y)], rounds=1, progress=False, evaluate=(x, y))  # type: ignore[arg-type]


def test_ctrl_c_stops_between_rounds_returns_the_model_and_records_why(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 0 completes (every weight becomes 1); Ctrl-C arrives in round 1: fit returns the
    model of round 0, no traceback, and `gridq runs` says the run was interrupted."""
    db = f"sqlite:///{tmp_path / 'runs.db'}"

    def one_round(grid, spec, state, data, configs, r, *rest):  # type: ignore[no-untyped-def]
        if r == 1:
            raise KeyboardInterrupt
        flat = torch.ones(sum(v.numel() for v in state.values()))
        return [RoundRecord(r, "n", "done", 6, 0.5, 0.75, 0.1, "")], [("n", flat, 6)], []

    monkeypatch.setattr(fl, "_round", one_round)
    result = fl.fit(None, _model(), [(_leaf(X), _leaf(Y))], rounds=5, progress=False,  # type: ignore[arg-type]
                    history_db=db)
    assert result.interrupted and len(result.rounds()) == 1
    assert all(bool((p == 1).all()) for p in result.model.parameters())  # round 0's model, not the start
    status, reason = History(db).status(result.run_id)
    assert status == "interrupted" and "after 1 of 5 rounds" in reason
    listed = CliRunner().invoke(app, ["runs", "list", "--db", db], env={"COLUMNS": "250"})
    assert "1/5" in listed.output and "interrupted" in listed.output
    shown = CliRunner().invoke(app, ["runs", "show", result.run_id, "--db", db], env={"COLUMNS": "200"})
    assert "interrupted: stopped with Ctrl-C after 1 of 5 rounds" in shown.output


def test_a_run_that_fails_is_recorded_as_failed_and_one_that_ends_as_done(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    data = [(_leaf(X), _leaf(Y))]
    monkeypatch.setattr(fl, "_round", lambda *a: ([RoundRecord(a[5], "n", "done", 6, 0.5, None, 0.1, "")],
                                                   [("n", torch.zeros(6), 6)], []))
    done = fl.fit(None, _model(), data, rounds=2, progress=False, history_db=db)  # type: ignore[arg-type]
    assert History(db).status(done.run_id) == ("done", "") and not done.interrupted
    monkeypatch.setattr(fl, "_round", lambda *a: ([RoundRecord(a[5], "n", "late", 0, 0.0, None, 1.0, "")], [], []))
    from protocol.errors import NodeUnavailable

    with pytest.raises(NodeUnavailable):
        fl.fit(None, _model(), data, rounds=2, progress=False, history_db=db)  # type: ignore[arg-type]
    (failed,) = [run for run, _, _ in History(db).runs() if run != done.run_id]
    assert History(db).status(failed)[0] == "failed" and "NodeUnavailable: round 0" in History(db).status(failed)[1]


# --- models ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [torch.nn.LSTM(4, 8), torch.nn.GRU(4, 8)])
def test_a_recurrent_layer_is_refused_by_name_not_with_a_trace_error(layer: torch.nn.Module) -> None:
    with pytest.raises(ForbiddenOperation, match=rf"the model is a {type(layer).__name__}, which is not allowed; "
                                                 "build the model from AvgPool2d"):
        describe_model(layer)


def test_an_untraceable_forward_names_the_fix_and_a_module_list_still_travels() -> None:
    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else self.fc(-x)

    with pytest.raises(InvalidRequest, match="no `if` or loop that depends on a tensor's values"):
        describe_model(Branchy())

    class Listed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU()])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    assert set(describe_model(Listed())[0].layers) == {"layers.0", "layers.1"}


# --- keys ------------------------------------------------------------------------------------


def test_keys_new_refuses_a_name_that_leaves_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    refused = CliRunner().invoke(app, ["keys", "new", "../evil", "--dir", str(folder)])
    assert refused.exit_code == 1 and "'../evil' cannot name an identity" in refused.output
    assert not (tmp_path / "evil.key").exists() and not folder.exists()
    with pytest.raises(InvalidRequest):
        write_identity(folder, "a/b")


def test_a_key_file_others_can_read_is_refused_as_ssh_does(tmp_path: Path) -> None:
    write_identity(tmp_path, "zoe")
    secret = tmp_path / "zoe.key"
    for mode in (0o644, 0o640, 0o604):
        os.chmod(secret, mode)
        for read in (read_identity, read_key):
            with pytest.raises(InvalidRequest, match=rf"UNPROTECTED KEY FILE: {secret} has mode {mode:04o}.*"
                                                     rf"`chmod 600 {secret}`"):
                read(secret)
    os.chmod(secret, 0o600)
    assert read_key(secret).name == "zoe"


def test_a_node_whose_key_file_others_can_read_does_not_start(tmp_path: Path) -> None:
    write_identity(tmp_path, "lab")
    os.chmod(tmp_path / "lab.key", 0o644)
    (tmp_path / "lab.toml").write_text('[node]\nid = "lab"\nstore = "store"\nidentity = "lab.key"\n')
    with pytest.raises(InvalidRequest, match="UNPROTECTED KEY FILE"):
        load_config(tmp_path / "lab.toml").identity()


def test_a_public_key_given_as_an_identity_says_which_file_to_give(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """It used to be 'not a gridq key file: JSONDecodeError(...)'."""
    write_identity(tmp_path / "keys", "zoe")
    monkeypatch.setenv("GRIDQ_HOME", str(tmp_path))
    for given in (tmp_path / "keys" / "zoe.pub", "zoe.pub"):
        with pytest.raises(InvalidRequest, match=r"zoe\.pub is a public key, which cannot sign: an identity is the "
                                                 r"secret key file \(zoe\.key\)"):
            read_key(key_path(given))
