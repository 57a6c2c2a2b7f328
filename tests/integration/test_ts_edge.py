"""Use case 1 from TypeScript, in Node, through the HTTP edge (issue 17, part 4): the built
client (``clients/ts/dist``) runs ``clients/ts/scripts/usecase1.mjs`` against the session's real
grid — Redis, gateway, the hospital (and the manual-approval ward) — as the same scientist the
Python client runs as, with the gateway's key pinned; it gets the Python client's answers for the
same expressions: raw values equal, refusals and pending jobs with the same status, DP releases
with the same noise (mechanism, ε, δ, scale, sensitivity) and finite values, charged to the
budget exactly what the Python side computes.

No skip: without ``node`` or the build (``make ts``; ``make test`` runs it first) this fails."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ops.local import LocalGrid
from orchestrator import Grid
from orchestrator.pointer import Expression
from protocol.dp import Charge, calibrate, spent
from protocol.errors import GridError
from workers.config import BudgetSection
from workers.policy.ledger import Ledger
from workers.storage.store import Store

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "ts"
SCRIPT = CLIENT / "scripts" / "usecase1.mjs"
TAGS = ["#birth-records", "#february"]
DATASET = "birth-records-feb"


@pytest.fixture(scope="module")
def ts_edge(local_grid: LocalGrid) -> Iterator[str]:
    """An edge of its own on the session's grid (as tests/integration/test_edge.py starts one)."""
    yield local_grid.start_edge(None, name="edge-ts")
    local_grid.kill("edge-ts")


def usecase1(lg: LocalGrid, edge: str, user: str, **options: Any) -> dict[str, Any]:
    """What the TS client prints for use case 1, run as ``user`` through ``edge``."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: the TypeScript client's live test needs Node 20 (see clients/ts/README.md)")
    if not (CLIENT / "dist" / "index.js").exists():
        pytest.fail("clients/ts/dist is missing: run `make ts` (npm ci, build and test of the TypeScript client) first")
    lg.ensure_keys(user)
    args = {"edge": edge, "key": str(lg.keys / f"{user}.key"), "gateway_key": lg.gateway_key(), "tags": TAGS,
            "timeout": 30, **options}
    done = subprocess.run([node, str(SCRIPT)], input=json.dumps(args), capture_output=True, text=True, timeout=180,
                          check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    assert out["identity"] == user and out["dataset"] == DATASET
    return out


def tensor(shown: dict[str, Any]) -> torch.Tensor:
    """A value the script printed (int64 as decimal strings, non-finite floats as strings)."""
    values = [int(v) if shown["dtype"] == "int64" else float(v) for v in shown["values"]]
    dtype = getattr(torch, shown["dtype"])
    return torch.tensor(values, dtype=dtype).reshape(shown["shape"])


def outcome(run: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", what ``run`` gave) or ("refused", the error's code), as the script records a step."""
    try:
        return "ok", run()
    except GridError as exc:
        return "refused", exc.code


def ts_outcome(step: dict[str, Any]) -> tuple[str, Any]:
    return ("ok", step) if step["ok"] else ("refused", step["error"]["code"])


def raw_expressions(births: Any) -> dict[str, Expression]:
    """The script's raw steps, written in Python (README.md, "Use case 1")."""
    return {
        "weight_mean": births["weight"].mean(),
        "height_over_52": (births["height"] > 52).count(),
        "weight_abs_dev": (births["weight"] - torch.full((240,), 3.5)).abs().mean(),
        "table": births,
    }


def dp_expressions(births: Any) -> dict[str, tuple[Expression, float, float]]:
    """The script's DP steps: (expression, ε, δ) (README.md, "Differential privacy and budgets")."""
    return {
        "weight_mean": (births["weight"].mean(), 0.1, 0.0),
        "height_mean": (births["height"].mean(), 0.2, 1e-7),
        "weight_over_4": ((births["weight"] > 4.0).count(), 0.1, 0.0),
        "clamped_sum": (births["weight"].clamp(0, 7).sum(), 0.1, 0.0),
        "per_row": (births["weight"], 0.5, 0.0),  # one value per row: refused, free
    }


def same_raw(ts: dict[str, Any], grid: Grid, births: Any) -> None:
    """The TS client's raw steps against the Python client's, for the same expressions."""
    for name, expr in raw_expressions(births).items():
        kind, got = outcome(expr.get)
        ts_kind, step = ts_outcome(ts["raw"][name])
        assert ts_kind == kind, (name, step, got)
        if kind == "refused":
            assert step == got, name  # the same code
        else:
            value = tensor(step["value"])
            assert value.dtype == got.dtype and torch.equal(value, got), (name, value, got)  # exactly
        assert len(ts["raw"][name]["jobs"]) == 1  # one plan, one job


def same_kept(ts: dict[str, Any], grid: Grid, births: Any) -> None:
    """births[:, 0].sum().submit() from both sides; and the TS client's ticket, picked up from Python."""
    kept = ts["kept"]
    assert kept["ok"], kept
    ticket = births[:, 0].sum().submit()
    assert (kept["status"], kept["again"]) == (ticket.wait().status, grid.ticket(ticket.id).status) == ("done", "done")
    ptr = ticket.result()
    assert kept["pointer"] == {"node": "hospital", "kind": ptr.kind, "shape": list(ptr.shape), "dtype": ptr.dtype}
    ts_kind, step = ts_outcome(kept["released"])
    kind, got = outcome(ptr.get)
    assert ts_kind == kind, (step, got)
    theirs = grid.ticket(kept["job_id"])  # a TS ticket, picked up from Python ("from any process")
    assert theirs.wait(timeout=30).status == "done"
    if kind == "ok":
        assert torch.equal(tensor(step["value"]), got) and torch.equal(theirs.result().get(), got)
    else:
        assert step == got
        assert outcome(theirs.result().get) == ("refused", got)
    assert kept["jobs"][0] == kept["job_id"] and kept["job_id"].startswith("hospital:")
    assert ts_outcome(ts["kept_again_unknown"]) == outcome(lambda: grid.ticket("hospital:" + "0" * 32))


def ledger_totals(lg: LocalGrid, user: str) -> list[Charge]:
    """What the hospital's ledger holds as spent by ``user`` on the dataset (a running total per
    mechanism) — the Python side's own record, read from its database."""
    store = Store(lg.home / "hospital", f"sqlite:///{lg.home / 'hospital' / 'node.db'}")
    try:
        ledger = Ledger(store, "hospital", BudgetSection())
        with store.session() as s:
            totals: list[Charge] = ledger._state(s, user, DATASET)[2]
        return totals
    finally:
        store.close()


def room(lg: LocalGrid, user: str, grid: Grid, epsilon: float) -> None:
    """At least ``epsilon`` left of ``user``'s budget (other tests of the session spend it too):
    the owner raises it if not, as `gridq budget set` does."""
    (info,) = grid.budget("hospital", DATASET)
    if info.epsilon - info.spent_epsilon < epsilon:
        store = Store(lg.home / "hospital", f"sqlite:///{lg.home / 'hospital' / 'node.db'}")
        try:
            Ledger(store, "hospital", BudgetSection()).set(user, DATASET, info.spent_epsilon + epsilon, info.delta)
        finally:
            store.close()


def charges(dp: dict[str, Any], asked: dict[str, tuple[Any, float, float]]) -> list[Charge]:
    """What the Python side computes each of these DP releases costs, from the (ε, δ) asked and the
    sensitivity the node stated (calibrated as the node calibrates: protocol.dp.calibrate)."""
    out = []
    for name, step in dp.items():
        if step["ok"]:
            sensitivity, (_, epsilon, delta) = step["noise"]["sensitivity"], asked[name]
            out.append(calibrate(sensitivity, sensitivity, epsilon, delta))
    return out


def budget_dict(info: Any) -> dict[str, Any]:
    return info.model_dump(mode="json")


# --- the tests --------------------------------------------------------------------------------------

def test_use_case_1_from_typescript_gives_the_python_client_s_answers(local_grid: LocalGrid, ts_edge: str,
                                                                      births_feb: torch.Tensor) -> None:
    user = "alice"  # README.md's scientist: allowed to see birth-records-feb raw
    with local_grid.connect(user, timeout=30) as grid:
        room(local_grid, user, grid, 1.5)  # both clients' DP releases below, with room to spare
        found = grid.search(*TAGS)
        births = found["hospital"][0]
        (before,) = grid.budget("hospital", DATASET)
        totals = ledger_totals(local_grid, user)

        ts = usecase1(local_grid, ts_edge, user)

        (after_ts,) = grid.budget("hospital", DATASET)
        # the search: the same datasets, with the same metadata
        assert {node: [p["name"] for p in ptrs] for node, ptrs in ts["found"].items()} == \
            {node: [p.name for p in ptrs] for node, ptrs in found.items()}
        meta = ts["found"]["hospital"][0]
        assert (meta["shape"], meta["dtype"], meta["columns"], meta["description"], sorted(meta["tags"])) == \
            (list(births.shape), births.dtype, list(births.columns), births.description, sorted(births.tags))

        # raw: exactly the Python client's values — and the hospital's own
        same_raw(ts, grid, births)
        assert tensor(ts["raw"]["weight_mean"]["value"]).item() == births_feb[:, 0].mean().item()
        assert torch.equal(tensor(ts["raw"]["table"]["value"]), births_feb)
        same_kept(ts, grid, births)

        # DP: the same mechanism and noise as the Python client's release of the same expression;
        # finite values (the noise differs); the same refusal for a plan the DP door does not take
        py_dp, asked = {}, dp_expressions(births)
        for name, (expr, epsilon, dp_delta) in asked.items():
            py_dp[name] = outcome(lambda e=expr, eps=epsilon, d=dp_delta: e.get(epsilon=eps, delta=d))
        for name, (kind, got) in py_dp.items():
            ts_kind, step = ts_outcome(ts["dp"][name])
            assert ts_kind == kind, (name, step, got)
            if kind == "refused":
                assert step == got == "sensitivity_unknown", name
                continue
            assert step["noise"] == got.noise.model_dump(mode="json"), name
            value = tensor(step["value"])
            assert value.shape == got.value.shape and bool(torch.isfinite(value).all()), (name, value)
        assert ts["dp"]["weight_mean"]["noise"]["mechanism"] == "laplace"
        assert ts["dp"]["height_mean"]["noise"]["mechanism"] == "gaussian"
        assert abs(tensor(ts["dp"]["weight_mean"]["value"]).item() - births_feb[:, 0].mean().item()) <= \
            ts["dp"]["weight_mean"]["noise"]["scale"] * math.log(1e6)  # P(|Laplace(b)| > b·ln 1e6) = 1e-6
        (after_py,) = grid.budget("hospital", DATASET)

    # the budget: what the TS client read before and after is what Python reads, and what was
    # spent in between is what the Python side computes for those releases (Laplace ε add up,
    # Gaussian ρ compose and convert at the budget's δ) — and then the same again for Python's own
    ts_charges, delta = charges(ts["dp"], asked), before.delta
    assert len(ts_charges) == 4 and ts["dp"]["clamped_sum"]["job_id"].startswith("hospital:")
    assert ts["budget_before"] == [budget_dict(before)] and ts["budget_after"] == [budget_dict(after_ts)]
    assert after_ts.releases == before.releases + len(ts_charges)
    expected = spent([*totals, *ts_charges], delta)
    assert after_ts.spent_epsilon == pytest.approx(expected[0], abs=1e-9) and after_ts.spent_delta == expected[1]
    assert after_ts.spent_epsilon > before.spent_epsilon
    py_charges = charges({name: {"ok": kind == "ok", "noise": got.noise.model_dump() if kind == "ok" else None}
                          for name, (kind, got) in py_dp.items()}, asked)
    assert py_charges == ts_charges  # each release costs the same from either client
    expected = spent([*totals, *ts_charges, *py_charges], delta)
    assert after_py.spent_epsilon == pytest.approx(expected[0], abs=1e-9)
    assert after_py.releases == after_ts.releases + len(py_charges)


def test_refusals_and_pending_jobs_from_typescript_match_python(local_grid: LocalGrid, ts_edge: str,
                                                               ward: Path) -> None:
    """carol may compute on birth-records-feb but see nothing of it raw; at the ward (manual
    approval) her job waits for the owner: the same statuses from both clients."""
    user = "carol"
    ts = usecase1(local_grid, ts_edge, user, dp=False, pending={"tags": ["#ward"], "node": "ward"})
    assert "dp" not in ts
    with local_grid.connect(user, timeout=30) as grid:
        births = grid.search(*TAGS)["hospital"][0]
        same_raw(ts, grid, births)
        assert all(ts_outcome(ts["raw"][name]) == ("refused", "permission_denied") for name in ts["raw"])
        same_kept(ts, grid, births)  # kept at the node: done; released: refused
        assert ts_outcome(ts["kept"]["released"]) == ("refused", "permission_denied")

        ward_births = grid.search("#ward")["ward"][0]
        ticket = ward_births["weight"].mean().submit()
        deadline = time.monotonic() + 30
        while ticket.status in ("queued", "running") and time.monotonic() < deadline:  # until the node has decided
            time.sleep(0.1)
        pending = ts["pending"]
        assert pending["ok"], pending
        assert pending["status"] == ticket.status == "pending_approval"
        assert grid.ticket(pending["job_id"]).status == "pending_approval"  # the TS job, as Python sees it
