"""The use case continues with differential privacy: carol, who may not see the births raw,
gets DP averages within the stated error, her budget shrinks, and once it is spent she is
refused with what is left and what was asked."""

from __future__ import annotations

import math
import uuid

import pytest
import torch

from ops.local import LocalGrid
from protocol.contract import Tasks, node_queue
from protocol.envelope import seal_envelope
from protocol.errors import BudgetExhausted, InvalidRequest, PermissionDenied, SensitivityUnknown
from protocol.messages import DPRelease, RunJob
from workers.policy.ledger import Ledger
from workers.storage.store import Store
from workers.storage.tables import ChargeRow

WEIGHT_RANGE, HEIGHT_RANGE = 7.0, 45.0  # the hospital's declared bounds: [0, 7] kg, [20, 65] cm


def _ledger(lg: LocalGrid) -> tuple[Store, Ledger]:
    store = Store(lg.home / "hospital", f"sqlite:///{lg.home / 'hospital' / 'node.db'}")
    from workers.config import BudgetSection

    return store, Ledger(store, "hospital", BudgetSection())


def test_carol_gets_dp_averages_until_her_budget_is_spent(local_grid: LocalGrid, births_feb):
    n = births_feb.shape[0]
    with local_grid.connect("carol") as grid:
        births = grid.search("#birth-records", "#february")["hospital"][0]
        with pytest.raises(PermissionDenied, match="differentially private"):
            births["weight"].mean().get()
        weight = births["weight"].mean().get(epsilon=0.1)
        assert weight.noise.mechanism == "laplace" and weight.noise.epsilon == pytest.approx(0.1)
        assert weight.noise.sensitivity == pytest.approx(WEIGHT_RANGE / n)
        assert weight.noise.scale == pytest.approx(WEIGHT_RANGE / n / 0.1)
        # P(|Laplace(b)| > b·ln(1e6)) = 1e-6: the false-failure probability of this bound
        assert abs(weight.item() - births_feb[:, 0].mean().item()) <= weight.noise.scale * math.log(1e6)
        height = births["height"].mean().get(epsilon=0.2, delta=1e-7)
        assert height.noise.mechanism == "gaussian" and height.noise.delta == 1e-7
        assert height.noise.sensitivity == pytest.approx(HEIGHT_RANGE / n)
        # 5.3 σ: a normal exceeds it with probability ≈ 1.2e-7
        assert abs(height.item() - births_feb[:, 1].mean().item()) <= 5.3 * height.noise.scale
        (info,) = grid.budget("hospital", "birth-records-feb")
        assert info.user == "carol" and info.epsilon == 1.0 and info.releases == 2
        assert 0.1 < info.spent_epsilon < 0.3  # 0.1 pure + the zCDP cost of the Gaussian at δ = 1e-6
        released = 2
        with pytest.raises(BudgetExhausted, match=r"carol.*left of 1 .*asks ε = 0.1") as refused:
            for _ in range(20):
                births["weight"].mean().get(epsilon=0.1)
                released += 1
        assert released < 12 and "birth-records-feb" in str(refused.value)
        (after,) = grid.budget("hospital", "birth-records-feb")
        assert after.releases == released and after.spent_epsilon <= 1.0 + 1e-9
        # a histogram-style count, and a clamped sum, have known sensitivity too — but no budget is left
        with pytest.raises(BudgetExhausted):
            (births["weight"] > 4.0).count().get(epsilon=0.05)
    store, ledger = _ledger(local_grid)
    try:
        assert ledger.info("carol", "birth-records-feb").releases == released
    finally:
        store.close()


def test_dp_refusals_name_what_is_missing(local_grid: LocalGrid):
    with local_grid.connect("bob") as grid:
        births = grid.search("#birth-records", "#february")["hospital"][0]
        with pytest.raises(SensitivityUnknown, match="matmul"):
            (births["weight"] @ births["height"]).get(epsilon=0.5)
        with pytest.raises(SensitivityUnknown, match="one value per row"):
            births["weight"].get(epsilon=0.5)
        kept = births.mean(dim=0).submit().result()
        with pytest.raises(SensitivityUnknown, match="kept result"):
            kept.sum().get(epsilon=0.5)
        with pytest.raises(InvalidRequest, match="epsilon"):
            births["weight"].mean().get(epsilon=0)
        (info,) = grid.budget("hospital", "birth-records-feb")
        assert info.releases == 0  # refusals cost nothing


def test_a_redelivered_dp_job_is_charged_once(local_grid: LocalGrid):
    with local_grid.connect("ana") as grid:
        births = grid.search("#birth-records", "#february")["hospital"][0]
        job = RunJob(plan=births["height"].mean().plan, release=DPRelease(epsilon=0.3))
        job_id = f"hospital:{uuid.uuid4().hex}"
        env = seal_envelope(grid.identity, recipient="hospital", kind="run", job_id=job_id,
                            body=job.model_dump(mode="json"), now=__import__("time").time()).model_dump(mode="json")
        values = []
        for _ in range(2):  # the broker delivers the same message twice (same task id)
            grid.transport.mark_sent([job_id])
            grid.app.send_task(Tasks.RUN_JOB, args=[env], queue=node_queue("hospital"), task_id=job_id)
            values.append(grid.ticket(job_id).private_value(timeout=30).value)
            grid.app.backend.forget(job_id)
        assert torch.equal(values[0], values[1])  # the same reply, not a second draw
        (info,) = grid.budget("hospital", "birth-records-feb")
        assert info.releases == 1 and info.spent_epsilon == pytest.approx(0.3)
    store, _ = _ledger(local_grid)
    try:
        with store.session() as s:
            assert s.query(ChargeRow).filter_by(job_id=job_id).count() == 1
    finally:
        store.close()


def test_mock_twins_let_a_plan_be_tried_locally_for_free(local_grid: LocalGrid, births_feb, hospital_admin):
    with local_grid.connect("bob") as grid:
        births = grid.search("#birth-records", "#february")["hospital"][0]
        twin = births.mock()  # drawn within the declared bounds, the same every time
        assert twin.shape == births_feb.shape and twin.dtype == births_feb.dtype
        assert (twin[:, 0] >= 0).all() and (twin[:, 0] <= 7).all()
        assert (twin[:, 1] >= 20).all() and (twin[:, 1] <= 65).all()
        assert not torch.equal(twin, births_feb)
        assert torch.equal(births.mock(), twin)
        tried = births["weight"].clamp(0, 7).mean().mock()  # runs here, on the twin
        assert tried.item() == pytest.approx(twin[:, 0].mean().item())
        (budget,) = grid.budget("hospital", "birth-records-feb")
        assert budget.releases == 0  # trying costs nothing
    supplied = torch.tensor([[3.0, 50.0], [3.5, 52.0]], dtype=births_feb.dtype)  # rows like the data's (float64)
    hospital_admin.publish("with-twin", births_feb, columns=["weight", "height"], tags=["#twin"],
                           bounds={"weight": (0.0, 7.0), "height": (20.0, 65.0)}, mock=supplied)
    with local_grid.connect("bob") as grid:
        import time

        deadline = time.monotonic() + 10
        while "hospital" not in grid.search("#twin") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert torch.equal(grid.search("#twin")["hospital"][0].mock(), supplied)  # the owner's own twin


def test_the_owner_sets_budgets_from_the_cli(local_grid: LocalGrid):
    from typer.testing import CliRunner

    from ops.cli import app
    from ops.local import NODE_CONFIGS

    env = {"GRIDQ_HOME": str(local_grid.home), "GRIDQ_BROKER": local_grid.url, "COLUMNS": "200"}
    config = str(NODE_CONFIGS / "hospital.toml")
    runner = CliRunner()
    # ana spent 0.3 in test_a_redelivered_dp_job_is_charged_once: 0.05 more is what she may now spend
    done = runner.invoke(app, ["budget", "set", config, "ana", "birth-records-feb", "--epsilon", "0.35"], env=env)
    assert done.exit_code == 0 and "ε 0.3 spent of 0.35" in done.output, done.output
    with local_grid.connect("ana") as grid:
        births = grid.search("#birth-records", "#february")["hospital"][0]
        with pytest.raises(BudgetExhausted, match="0.05 left of 0.35"):
            births["weight"].mean().get(epsilon=0.1)
        births["weight"].mean().get(epsilon=0.05)
    shown = runner.invoke(app, ["budget", "show", config, "--user", "ana"], env=env)
    assert shown.exit_code == 0
    row = next(line for line in shown.output.splitlines() if "birth-records-feb" in line)
    cells = [c.strip() for c in row.split("│")]
    assert cells[3:7] == ["0.35", "0.35", "1e-06", "2"]  # ε spent, ε budget, δ, releases
    missing = runner.invoke(app, ["budget", "set", config, "ana", "no-such-data", "--epsilon", "1"], env=env)
    assert missing.exit_code == 1 and "NotFound" in missing.output
