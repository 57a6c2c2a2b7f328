"""Federated learning end to end on real Redis and real node workers: scikit-learn's digits
split over three sites (IID, and with a label skew); send/train/get on each site in turn,
then grid.fit over all three in parallel; forbidden model content refused at the node; a
site killed mid-run; trained weights governed by each site's policy."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from ops.demo_data import digits_split
from ops.local import LocalGrid
from orchestrator.history import History
from orchestrator.strategies import FedAdam
from protocol.errors import ApprovalRequired, ForbiddenOperation, PermissionDenied
from protocol.messages import KeepRelease, TrainJob
from protocol.model import ModelSpec, describe_model

SITES = ("site-a", "site-b", "site-c")
CONFIG = """
[node]
id = "{site}"
broker = "${{GRIDQ_BROKER}}"
store = "${{GRIDQ_HOME}}/{site}"
identity = "${{GRIDQ_HOME}}/keys/{site}.key"

[users.alice]
public_key_file = "${{GRIDQ_HOME}}/keys/alice.pub"
[users.bob]
public_key_file = "${{GRIDQ_HOME}}/keys/bob.pub"

[[datasets]]
name = "digits"
path = "${{GRIDQ_HOME}}/data/{site}-digits.npy"
description = "Handwritten digits: 64 pixel intensities (0-16), then the label"
tags = ["#digits"]
allowed_users = ["alice"]

[[datasets]]
name = "digits-skewed"
path = "${{GRIDQ_HOME}}/data/{site}-digits-skewed.npy"
description = "Handwritten digits, a few labels per site"
tags = ["#digits-skewed"]
allowed_users = ["alice"]
"""


@pytest.fixture(scope="module")
def sites(local_grid: LocalGrid) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    iid, test = digits_split(len(SITES))
    skewed, _ = digits_split(len(SITES), skew=True)
    for site, table, skew_table in zip(SITES, iid, skewed, strict=True):
        np.save(local_grid.home / "data" / f"{site}-digits.npy", table)
        np.save(local_grid.home / "data" / f"{site}-digits-skewed.npy", skew_table)
        (local_grid.home / f"{site}.toml").write_text(CONFIG.format(site=site))
        local_grid.start_node(local_grid.home / f"{site}.toml", site)
    local_grid.wait_ready(list(SITES), timeout=90)
    yield test
    for site in SITES:
        local_grid.stop_worker(site)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def accuracy(model: nn.Module, test: tuple[np.ndarray, np.ndarray]) -> float:
    with torch.no_grad():
        return float((model(torch.tensor(test[0])).argmax(1).numpy() == test[1]).mean())


def pairs(grid, tag: str = "#digits") -> list:  # type: ignore[no-untyped-def, type-arg]
    found = grid.search(tag)
    return [(found[s][0][:, :64], found[s][0][:, 64]) for s in SITES]


def round_zero_updates() -> list[tuple[torch.Tensor, int]]:
    """Each site's round-0 update of fit(mlp(), …, lr=0.05), recomputed here from the same
    data and seeds (flat weights, samples), as the sites compute it."""
    from protocol.messages import TrainConfig
    from protocol.model import build_model, flatten_state
    from workers.jobs.training import train

    spec, state = describe_model(mlp())
    iid, _ = digits_split(len(SITES))
    updates = []
    for i, table in enumerate(iid):
        local = build_model(spec, state)
        train(local, torch.tensor(table[:, :64]), torch.tensor(table[:, 64]), TrainConfig(lr=0.05, seed=i))
        updates.append((flatten_state(local.state_dict()), len(table)))
    return updates


def test_send_train_get_on_each_site_in_turn(local_grid: LocalGrid, sites) -> None:  # type: ignore[no-untyped-def]
    model = mlp()
    before = accuracy(model, sites)
    with local_grid.connect("alice") as grid:
        for x, y in pairs(grid):
            mptr = grid.send(model, x.node)
            ticket = mptr.train(x, y, epochs=3, batch_size=32, lr=0.05)
            assert ticket.wait(timeout=60).status == "done"
            model = mptr.get()  # alice is an allowed user: the weights come back
    assert before < 0.2 and accuracy(model, sites) > 0.85


def test_fit_over_three_sites_reaches_090(local_grid: LocalGrid, sites, tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    with local_grid.connect("alice") as grid:
        result = grid.fit(mlp(), pairs(grid), rounds=20, lr=0.05, batch_size=32, progress=False, history_db=db)
    assert accuracy(result.model, sites) >= 0.90
    stored = History(db).rounds(result.run_id)
    assert len(stored) == 60 and all(r.status == "done" for r in stored)
    assert sum(r.samples for r in stored if r.round == 0) == 1437  # 80 % of 1,797 digits
    assert result.rounds()[-1].loss < result.rounds()[0].loss


def test_fit_with_a_label_skew(local_grid: LocalGrid, sites, tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    with local_grid.connect("alice") as grid:
        result = grid.fit(mlp(), pairs(grid, "#digits-skewed"), rounds=20, lr=0.05, progress=False, history_db=db)
        adam = grid.fit(mlp(), pairs(grid, "#digits-skewed"), rounds=20, lr=0.05, progress=False, history_db=db,
                        strategy=FedAdam(lr=0.03))
    assert accuracy(result.model, sites) >= 0.85  # plain FedAvg reaches 0.897 on this split
    assert accuracy(adam.model, sites) >= 0.85  # FedAdam (server optimizer): 0.950 in-process, same seeds
    assert not torch.equal(adam.model[0].weight, result.model[0].weight)
    assert History(db).config(adam.run_id)["strategy"] == "fedadam"


def test_fedmedian_takes_the_median_of_the_updates_the_sites_sent(local_grid: LocalGrid, sites,  # type: ignore[no-untyped-def]
                                                                   tmp_path, capsys) -> None:
    """A robust strategy sees each site's update through real workers: one round of FedMedian
    is the coordinate-wise median of the three updates, recomputed here (same seeds, same
    data); Krum, which needs 2f + 3 sites, and FedMedian with secure aggregation (which hides
    the updates it needs) are refused before any job is sent. Its progress line says how the
    round went."""
    from orchestrator.strategies import FedMedian, Krum
    from protocol.errors import InvalidRequest
    from protocol.model import flatten_state

    db = f"sqlite:///{tmp_path / 'runs.db'}"
    with local_grid.connect("alice") as grid:
        result = grid.fit(mlp(), pairs(grid), rounds=1, lr=0.05, history_db=db, strategy=FedMedian())
        shown = capsys.readouterr().out
        summary = result.rounds()[0]
        assert f"round 1/1  train loss {summary.loss:.4f}" in shown and "nodes 3/3" in shown, shown
        with pytest.raises(InvalidRequest, match=r"Krum .* needs 5 nodes or more"):
            grid.fit(mlp(), pairs(grid), rounds=1, progress=False, history_db=db, strategy=Krum(byzantine=1))
        with pytest.raises(InvalidRequest, match="FedMedian combines each node's update, which secure aggregation"):
            grid.fit(mlp(), pairs(grid), rounds=1, progress=False, history_db=db, strategy=FedMedian(),
                     secure_aggregation=True, aggregators=["company", "public"])
    updates = [flat for flat, _ in round_zero_updates()]
    median = torch.stack(updates).median(dim=0).values  # three: the middle one, in each coordinate
    mean = torch.stack(updates).mean(dim=0)
    got = flatten_state(result.model.state_dict())
    assert (got - median).abs().max().item() < 1e-6  # float rounding of another thread count, nothing more
    assert (got - mean).abs().max().item() > 1e-3  # and not their mean
    assert History(db).config(result.run_id)["strategy"] == "fedmedian"
    assert len(History(db).runs()) == 1  # the refused runs never started


def test_each_round_trains_the_sample_of_sites_its_seed_draws(local_grid: LocalGrid, sites,  # type: ignore[no-untyped-def]
                                                               tmp_path) -> None:
    from orchestrator.fl import sampled
    from protocol.errors import InvalidRequest

    db = f"sqlite:///{tmp_path / 'runs.db'}"
    drawn = [[SITES[i] for i in sampled(len(SITES), 0.5, 1, seed=3, r=r)] for r in range(4)]
    assert all(len(d) == 2 for d in drawn) and len({tuple(d) for d in drawn}) > 1  # ⌈1.5⌉ sites, not always the same
    with local_grid.connect("alice") as grid:
        result = grid.fit(mlp(), pairs(grid), rounds=4, lr=0.05, progress=False, history_db=db, seed=3,
                          sample_fraction=0.5)
        with pytest.raises(InvalidRequest, match=r"sample_fraction must be within \(0, 1\]"):
            grid.fit(mlp(), pairs(grid), rounds=1, progress=False, history_db=db, sample_fraction=0.0)
        with pytest.raises(InvalidRequest, match=r"min_sampled within 1\.\.3 \(the nodes given\), not 4"):
            grid.fit(mlp(), pairs(grid), rounds=1, progress=False, history_db=db, sample_fraction=0.5, min_sampled=4)
        waited = grid.fit(mlp(), pairs(grid), rounds=2, lr=0.05, progress=False, history_db=db, seed=3,
                          sample_fraction=0.5, min_nodes=3)  # a round asks at least the nodes it waits for
        assert [len([h for h in waited.history if h.round == r]) for r in range(2)] == [3, 3]
    stored = History(db).rounds(result.run_id)
    assert [sorted(h.node for h in stored if h.round == r) for r in range(4)] == drawn
    assert all(h.status == "done" for h in stored)
    assert [row["asked"] for row in result.to_dataframe().to_dict("records")] == [2, 2, 2, 2]
    assert History(db).config(result.run_id)["sample_fraction"] == 0.5


def test_a_run_stopped_with_ctrl_c_resumes_from_its_checkpoint_as_if_it_had_not_stopped(  # type: ignore[no-untyped-def]
        local_grid: LocalGrid, sites, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import orchestrator.fl as fl
    from protocol.errors import InvalidRequest, NotFound
    from protocol.model import flatten_state

    db = f"sqlite:///{tmp_path / 'runs.db'}"
    run = {"rounds": 4, "lr": 0.05, "progress": False, "history_db": db}
    real_round = fl._round

    def ctrl_c_in_round_three(*args, **kwargs):  # type: ignore[no-untyped-def]
        if args[5] == 2:  # Ctrl-C while the third round's jobs run: rounds 1-2 are kept, the third is not
            raise KeyboardInterrupt
        return real_round(*args, **kwargs)

    with local_grid.connect("alice") as grid:
        straight = grid.fit(mlp(), pairs(grid), strategy=FedAdam(lr=0.03), **run)
        with monkeypatch.context() as patched:
            patched.setattr(fl, "_round", ctrl_c_in_round_three)
            stopped = grid.fit(mlp(), pairs(grid), strategy=FedAdam(lr=0.03), checkpoint_every=2, **run)
        assert stopped.interrupted and History(db).status(stopped.run_id)[0] == "interrupted"
        with pytest.raises(InvalidRequest, match="was asked otherwise \\(lr: 0.05\\)"):
            grid.fit(mlp(), pairs(grid), strategy=FedAdam(lr=0.03), checkpoint_every=2, resume=stopped.run_id,
                     **{**run, "lr": 0.1})
        with pytest.raises(NotFound, match="kept no checkpoint to resume from"):
            grid.fit(mlp(), pairs(grid), strategy=FedAdam(lr=0.03), resume=straight.run_id, **run)
        resumed = grid.fit(mlp(), pairs(grid), strategy=FedAdam(lr=0.03), checkpoint_every=2,
                           resume=stopped.run_id[:10], **run)
    assert resumed.run_id == stopped.run_id and not resumed.interrupted
    gap = (flatten_state(resumed.model.state_dict()) - flatten_state(straight.model.state_dict())).abs().max()
    assert gap.item() < 1e-5  # the same rounds, the same seeds, Adam's moments restored: the same model
    stored = History(db).rounds(stopped.run_id)
    assert len(stored) == 12 and all(h.status == "done" for h in stored)  # 4 rounds × 3 sites, none twice
    assert [s.round for s in resumed.rounds()] == [0, 1, 2, 3]
    assert History(db).status(stopped.run_id)[0] == "done"


def test_federated_evaluation_at_the_nodes(local_grid: LocalGrid, sites, tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    with local_grid.connect("alice") as grid:
        data = pairs(grid)
        result = grid.fit(mlp(), data, rounds=3, lr=0.05, progress=False, history_db=db, evaluate=data)
        ev = grid.evaluate(result.model, data)
    # the figures are what the same model gives on the same rows, computed here
    x = torch.tensor(np.concatenate(digits_split(len(SITES))[0]))
    with torch.no_grad():
        out = result.model(x[:, :64].float())
    labels = x[:, 64].long()
    assert ev.samples == len(x) == 1437 and sorted(ev.nodes) == list(SITES) and not ev.missing
    assert ev.loss == pytest.approx(float(nn.functional.cross_entropy(out, labels)), rel=1e-5)
    assert ev.accuracy == pytest.approx(float((out.argmax(1) == labels).float().mean()), abs=1e-6)
    # fit evaluated the global model after every round; the last is the model it returned
    assert len(result.evaluations) == 3 and result.evaluations[-1].accuracy == pytest.approx(ev.accuracy, abs=1e-6)
    assert result.evaluations[0].loss > result.evaluations[-1].loss
    stored = History(db).evaluations(result.run_id)
    assert sorted(stored) == [0, 1, 2] and sorted(stored[2]) == list(SITES)
    with local_grid.connect("bob") as grid:  # bob may compute on the digits, not see what a model learns of them
        with pytest.raises(ApprovalRequired, match="parked the evaluation job"):
            grid.evaluate(mlp(), pairs(grid), timeout=30)


def test_forbidden_model_content_is_refused_at_the_node(local_grid: LocalGrid, sites) -> None:  # type: ignore[no-untyped-def]
    spec, _ = describe_model(mlp())
    with local_grid.connect("alice") as grid:
        x, y = pairs(grid)[0]
        for field, target, name in (("graph", "os.system", "function 'os.system'"),
                                    ("graph", "builtins.open", "function 'builtins.open'"),
                                    ("layers", "GRU", "layer type 'GRU'")):
            raw = spec.model_dump(mode="json")
            if field == "graph":
                raw["graph"][1] = {**raw["graph"][1], "op": "call_function", "target": target}
            else:
                raw["layers"]["0"] = {"type": target, "kwargs": {}}
            job = TrainJob(model=ModelSpec.model_validate(raw), x=x.plan, y=y.plan, release=KeepRelease())
            with pytest.raises(ForbiddenOperation, match=name):
                grid.submit(x.node, job).result(timeout=30)
        with pytest.raises(ForbiddenOperation, match="GRU"):  # and the client says so before sending
            grid.send(nn.Sequential(nn.GRU(4, 4)), x.node)


def test_trained_weights_follow_the_release_policy(local_grid: LocalGrid, sites) -> None:  # type: ignore[no-untyped-def]
    with local_grid.connect("bob") as grid:  # bob may compute on the digits, not see them
        x, y = pairs(grid)[0]
        mptr = grid.send(mlp(), x.node)
        assert mptr.train(x, y, epochs=1).wait(timeout=60).status == "done"  # kept at the node
        with pytest.raises(PermissionDenied):
            mptr.get()
        started = time.monotonic()
        with pytest.raises(ApprovalRequired, match="parked the training job for its owner's approval"):
            grid.fit(mlp(), pairs(grid), rounds=1, progress=False,
                     history_db="sqlite:///:memory:")  # each site parks the job for its owner (kind "train")
        assert time.monotonic() - started < 15  # said at once, not after the round's timeout (120 s)
    owner = local_grid.owner(local_grid.home / "site-a.toml")
    try:
        assert any(r.kind == "train" and r.requester == "bob" for r in owner.requests())
    finally:
        owner.close()


def test_weights_kept_from_closed_data_stay_closed_when_trained_on_open_data(local_grid: LocalGrid,  # type: ignore[no-untyped-def]
                                                                          sites) -> None:
    from protocol.messages import RawRelease

    owner = local_grid.owner(local_grid.home / "site-a.toml")
    try:  # a dataset bob may see raw, next to the digits he may not
        table = np.load(local_grid.home / "data" / "site-a-digits.npy")[:50]
        owner.publish("bob-digits", torch.tensor(table), tags=["#bob-digits"], allowed_users=["bob"])
    finally:
        owner.close()
    with local_grid.connect("bob") as grid:
        closed = grid.search("#digits")["site-a"][0]
        trained = grid.send(mlp(), "site-a").train(closed[:, :64], closed[:, 64])
        assert trained.wait(timeout=60).status == "done"  # kept at the node: fine
        kept = trained.result().name
        opened = grid.search("#bob-digits")["site-a"][0]
        spec, _ = describe_model(mlp())
        job = TrainJob(model=spec, start=kept, x=opened[:, :64].plan, y=opened[:, 64].plan, release=RawRelease())
        ticket = grid.submit("site-a", job)
        deadline = time.monotonic() + 60
        while ticket.status in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ticket.status == "pending_approval"  # derived from the closed digits too: the owner decides


def test_dp_sgd_weights_leave_by_the_dp_door_charged_as_the_accountant_says(local_grid: LocalGrid, sites,  # type: ignore[no-untyped-def]
                                                                          tmp_path) -> None:
    from opacus.accountants import RDPAccountant

    from orchestrator import DPConfig
    from protocol.errors import BudgetExhausted

    dp = DPConfig(noise_multiplier=2.0, max_grad_norm=1.0, delta=1e-7)
    accountant = RDPAccountant()
    accountant.history = [(2.0, 32 / 479, 15)]  # 479 digits a site, batches of 32 expected: 15 steps
    per_round = accountant.get_epsilon(delta=1e-7)
    assert 0.9 < per_round < 1.0  # one round fits the default budget of ε = 1, two do not
    with local_grid.connect("bob") as grid:  # bob may not see the digits: DP-SGD is his door
        with pytest.raises(BudgetExhausted, match="ε = 0.0124 left of 1"):
            grid.fit(mlp(), pairs(grid), rounds=2, lr=0.05, dp=dp, progress=False,
                     history_db=f"sqlite:///{tmp_path / 'runs.db'}")
        for site in SITES:
            (budget,) = grid.budget(site, "digits")
            assert budget.releases == 1 and budget.spent_epsilon == pytest.approx(per_round, abs=1e-9)
    stored = History(f"sqlite:///{tmp_path / 'runs.db'}")
    rows = _all_rounds(stored)
    assert {(r.round, r.status) for r in rows} == {(0, "done"), (1, "failed")}
    assert all("BudgetExhausted" in r.error for r in rows if r.round == 1)


def test_dp_sgd_rounds_show_their_figures_only_with_noise(local_grid: LocalGrid, sites,  # type: ignore[no-untyped-def]
                                                          tmp_path) -> None:
    from orchestrator import DPConfig
    from protocol.messages import TrainConfig
    from workers.jobs.training import dp_charge

    dp = DPConfig(noise_multiplier=4.0, max_grad_norm=1.0, delta=1e-7)
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    with local_grid.connect("bob") as grid:  # bob may not see the digits: DP is his door, for the figures too
        data = pairs(grid, "#digits-skewed")  # a budget of its own: the test above spent the digits'
        closed = grid.fit(mlp(), data, rounds=1, lr=0.05, dp=dp, progress=False, history_db=db)
        noisy = grid.fit(mlp(), data, rounds=1, lr=0.05, dp=dp.model_copy(update={"metrics_epsilon": 0.1}),
                         progress=False, history_db=db)
        spent = {site: grid.budget(site, "digits-skewed")[0].spent_epsilon for site in SITES}
    assert all(r.status == "done" and r.loss is None and r.accuracy is None and "metrics_epsilon" in r.error
               for r in closed.history)
    assert closed.rounds()[0].loss is None and History(db).rounds(closed.run_id)[0].loss is None
    assert all(r.loss is not None and r.accuracy is not None for r in noisy.history)
    for r in noisy.history:  # one charge a round: DP-SGD's ε, and the figures' 0.1 with it
        sgd = dp_charge(TrainConfig(batch_size=32, lr=0.05), dp, r.samples).epsilon
        assert spent[r.node] == pytest.approx(2 * sgd + 0.1)


def test_secure_aggregation_equals_fedavg_and_hides_each_update(local_grid: LocalGrid, sites,  # type: ignore[no-untyped-def]
                                                                 tmp_path) -> None:
    import struct

    from test_broker_capture import Monitor, found_in

    from ops.local import NODE_CONFIGS
    from orchestrator.fl import fedavg
    from protocol.model import flatten_state

    for party in ("company", "public"):  # the aggregation parties: MPC pool workers
        local_grid.ensure_keys(party, "dana", "eve")
        local_grid.start_mpc(NODE_CONFIGS / f"{party}.toml")
    local_grid.wait_ready(["company", "public"], timeout=60, workers=["company-mpc", "public-mpc"])
    try:
        db = f"sqlite:///{tmp_path / 'runs.db'}"
        monitor = Monitor(local_grid.url)
        try:
            with local_grid.connect("alice") as grid:
                secure = grid.fit(mlp(), pairs(grid), rounds=2, lr=0.05, progress=False, history_db=db,
                                  secure_aggregation=True, aggregators=["company", "public"])
        finally:
            commands = monitor.stop()
        with local_grid.connect("alice") as grid:
            plain = grid.fit(mlp(), pairs(grid), rounds=2, lr=0.05, progress=False, history_db=db)
        gap = (flatten_state(secure.model.state_dict()) - flatten_state(plain.model.state_dict())).abs().max()
        assert gap.item() < 1e-3  # fixed point, 16 fractional bits: the sums are exact to ~1e-5
        assert accuracy(secure.model, sites) == pytest.approx(accuracy(plain.model, sites), abs=0.01)
        # each site's round-0 update, recomputed here (same seeds, same data), never crosses the broker
        spec, state = describe_model(mlp())
        updates = [("", flat, samples) for flat, samples in round_zero_updates()]
        patterns = [u[1][k:k + 2].numpy().tobytes() for u in updates for k in range(0, 4800, 600)]
        patterns += [struct.pack("<ff", *u[1][k:k + 2].tolist()) for u in updates for k in range(0, 4800, 600)]
        assert found_in(commands, patterns) == []
        # … and they are the very updates the sites computed: one plain round averages them exactly
        with local_grid.connect("alice") as grid:
            one = grid.fit(mlp(), pairs(grid), rounds=1, lr=0.05, progress=False, history_db=db)
        redone = flatten_state(one.model.state_dict()) - flatten_state(fedavg(state, updates))
        assert redone.abs().max().item() < 1e-6  # float rounding of another thread count, nothing more
    finally:
        for party in ("company", "public"):
            local_grid.kill(f"{party}-mpc")


def test_a_site_killed_mid_run_drops_out_and_the_run_completes(local_grid: LocalGrid, sites,  # type: ignore[no-untyped-def]
                                                                tmp_path) -> None:
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    outcome: dict[str, object] = {}

    def run() -> None:
        with local_grid.connect("alice") as grid:
            try:
                outcome["result"] = grid.fit(mlp(), pairs(grid), rounds=4, lr=0.05, round_timeout=6,
                                             progress=False, history_db=db)
            except Exception as exc:  # noqa: BLE001 - reported below
                outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    history = History(db)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(r.round >= 1 for r in _all_rounds(history)):
        time.sleep(0.05)
    local_grid.kill("site-c")
    thread.join(timeout=120)
    try:
        assert "error" not in outcome, outcome.get("error")
        result = outcome["result"]
        statuses = {(h.round, h.node): h.status for h in result.history}  # type: ignore[attr-defined]
        assert statuses[(3, "site-c")] == "late" and statuses[(3, "site-a")] == "done"
        assert all(statuses[(0, s)] == "done" for s in SITES)
        assert len(result.model.state_dict()) == 4  # type: ignore[attr-defined]
    finally:
        local_grid.start_node(local_grid.home / "site-c.toml", "site-c")
        local_grid.wait_ready(["site-c"], timeout=60)


def _all_rounds(history: History) -> list:  # type: ignore[type-arg]
    from sqlalchemy import select

    from orchestrator.history import RoundRow

    with history._sessions() as s:
        return list(s.scalars(select(RoundRow)))
