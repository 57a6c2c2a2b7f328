"""Use case 3 from TypeScript, in Node, through the HTTP edge: dana serves a small model
secret-shared on the live MPC pool (the company hosts it, hospital and public hold shares, the
university deals randomness); bob queries it with the built client (``clients/ts/dist``) by
running ``clients/ts/scripts/usecase3.mjs`` through a real edge, with the gateway's key pinned —
his input shared and sealed to the parties in Node, the output shares opened and added up there.
What Node prints is the plaintext model's output, and the Python client's ``grid.query``, within
1e-3 (fixed point with 16 fractional bits), for a batch and for a single row; a user who is no
querier of the model gets the same typed refusal from either client.

No skip: without ``node`` or the build (``make ts``; ``make test`` runs it first) this fails."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_mpc_service
import torch

from ops.local import LocalGrid
from protocol.errors import PermissionDenied

pytestmark = pytest.mark.integration
# the demo MPC pool (tests/conftest.py: company, university, hospital, public, clinic), as
# test_mpc_service.py has it; it runs right after that module, on the same pool
mpc_grid = test_mpc_service.mpc_grid
ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "ts"
SCRIPT = CLIENT / "scripts" / "usecase3.mjs"
MODEL = "ts-mlp"
PARTIES = ["hospital", "public"]
X = [[1.0, 2.0, -0.5, 3.0], [-1.5, 0.25, 4.0, -2.0]]


@pytest.fixture(scope="module")
def mpc_edge(mpc_grid: LocalGrid) -> Iterator[str]:
    """An edge of its own on the session's grid, the MPC pool behind it."""
    yield mpc_grid.start_edge(None, name="edge-ts-mpc")
    mpc_grid.kill("edge-ts-mpc")


def small_model() -> torch.nn.Sequential:
    """Linear(4, 2) → ReLU → Linear(2, 2), fixed weights: on X's two rows the ReLU passes one
    hidden unit and zeroes the other, each way round."""
    first, second = torch.nn.Linear(4, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[0.5, -1.25, 2.0, 0.1], [-0.3, 0.7, 0.05, 0.5]]))
        first.bias.copy_(torch.tensor([0.25, -0.5]))
        second.weight.copy_(torch.tensor([[1.5, -0.75], [-0.4, 2.25]]))
        second.bias.copy_(torch.tensor([0.1, -0.2]))
    return torch.nn.Sequential(first, torch.nn.ReLU(), second)


@pytest.fixture(scope="module")
def served(mpc_grid: LocalGrid) -> torch.nn.Sequential:
    """dana's model, served on the pool for bob (and bob alone) to query."""
    model = small_model()
    with mpc_grid.connect("dana") as owner:
        owner.serve(model, name=MODEL, parties=PARTIES, crypto_provider="university", host="company",
                    queriers=["bob"])
    return model


def usecase3(lg: LocalGrid, edge: str, user: str, inputs: list[Any]) -> dict[str, Any]:
    """What the TS client prints for use case 3, run as ``user`` through ``edge``."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: the TypeScript client's live test needs Node 20 (see clients/ts/README.md)")
    if not (CLIENT / "dist" / "index.js").exists():
        pytest.fail("clients/ts/dist is missing: run `make ts` (npm ci, build and test of the TypeScript client) first")
    lg.ensure_keys(user)
    args = {"edge": edge, "key": str(lg.keys / f"{user}.key"), "gateway_key": lg.gateway_key(),
            "model": f"dana/{MODEL}", "inputs": inputs, "timeout": 60}
    done = subprocess.run([node, str(SCRIPT)], input=json.dumps(args), capture_output=True, text=True, timeout=120,
                          check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    assert out["identity"] == user and len(out["outputs"]) == len(inputs)
    return out


def tensor(shown: dict[str, Any]) -> torch.Tensor:
    """A value the script printed (float values; non-finite ones as strings)."""
    values = [float(v) for v in shown["values"]]
    return torch.tensor(values, dtype=getattr(torch, shown["dtype"])).reshape(shown["shape"])


def test_use_case_3_from_typescript_equals_the_plaintext_model_and_the_python_client(
        mpc_grid: LocalGrid, mpc_edge: str, served: torch.nn.Sequential) -> None:
    x = torch.tensor(X)
    with torch.no_grad():
        expected = served(x)
        hidden = served[0](x)
    assert (hidden < 0).tolist() == [[True, False], [False, True]]  # the ReLU bites, on each row another unit

    ts = usecase3(mpc_grid, mpc_edge, "bob", [X, X[0]])  # a batch of 2 rows, then a single row

    assert ts["model"] == {"name": MODEL, "owner": "dana", "host": "company", "parties": PARTIES,
                           "provider": "university", "queriers": ["bob"], "frac_bits": 16,
                           "layers": [{"kind": "linear", "in_features": 4, "out_features": 2},
                                      {"kind": "relu", "in_features": 0, "out_features": 0},
                                      {"kind": "linear", "in_features": 2, "out_features": 2}]}
    batch, one = ts["outputs"]
    assert batch["ok"] and one["ok"], ts["outputs"]
    y_ts, one_ts = tensor(batch["value"]), tensor(one["value"])
    assert y_ts.shape == expected.shape == (2, 2) and one_ts.shape == expected[0].shape == (2,)
    assert batch["value"]["dtype"] == one["value"]["dtype"] == "float32"  # as the input's, as Python's
    assert (y_ts - expected).abs().max().item() < 1e-3
    assert (one_ts - expected[0]).abs().max().item() < 1e-3

    with mpc_grid.connect("bob") as grid:  # the Python client, on the broker, the same queries
        y_py, one_py = grid.query(f"dana/{MODEL}", x), grid.query(f"dana/{MODEL}", x[0])
    assert (y_py - expected).abs().max().item() < 1e-3 and (one_py - expected[0]).abs().max().item() < 1e-3
    assert (y_ts - y_py).abs().max().item() < 1e-3
    assert (one_ts - one_py).abs().max().item() < 1e-3


def test_a_user_who_is_no_querier_is_refused_alike_from_typescript(
        mpc_grid: LocalGrid, mpc_edge: str, served: torch.nn.Sequential) -> None:
    ts = usecase3(mpc_grid, mpc_edge, "eve", [X[0]])  # a user the company knows, not a querier of this model
    (refused,) = ts["outputs"]
    assert not refused["ok"]
    with mpc_grid.connect("eve") as grid, pytest.raises(PermissionDenied) as python:
        grid.query(f"dana/{MODEL}", torch.tensor(X[0]))
    assert refused["error"]["code"] == python.value.code == "permission_denied"
    assert f"may not query model '{MODEL}'" in refused["error"]["message"]
