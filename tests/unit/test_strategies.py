"""The server's side of federated training: FedAvg keeps the average, FedProx only changes the
nodes' objective, FedAdam steps the global model with Adam on the pseudo-gradient
g = w − average (torch's Adam: bias-corrected moments, ε added to √v̂)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from orchestrator.strategies import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    NodeUpdate,
    State,
    Strategy,
    strategy,
)
from protocol.errors import InvalidRequest, NodeUnavailable


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([0.25], dtype=torch.float64))
        self.register_buffer("seen", torch.tensor([3.0], dtype=torch.float64))


# the round averages the nodes send back, one per round
ROUNDS: list[State] = [
    {"w": torch.tensor([1.5, -3.0, 0.5]), "b": torch.tensor([0.0]), "seen": torch.tensor([4.0])},
    {"w": torch.tensor([2.0, -2.5, 0.0]), "b": torch.tensor([0.5]), "seen": torch.tensor([5.0])},
    {"w": torch.tensor([1.0, -1.0, 1.0]), "b": torch.tensor([1.0]), "seen": torch.tensor([6.0])},
]


def _adam_by_hand(w: list[float], averages: list[list[float]], lr: float, b1: float, b2: float, eps: float
                  ) -> list[list[float]]:
    """Kingma & Ba's Adam on g = w − average, elementwise, as plain floats."""
    m, v, out = [0.0] * len(w), [0.0] * len(w), []
    for t, average in enumerate(averages, start=1):
        for i, a in enumerate(average):
            g = w[i] - a
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            w[i] -= lr * m_hat / (math.sqrt(v_hat) + eps)
        out.append(list(w))
    return out


def test_fedadam_steps_like_adam_for_three_rounds() -> None:
    model, server = Tiny(), FedAdam(lr=0.1, betas=(0.5, 0.75), eps=0.01)
    server.start(model)
    got = [server.aggregate(average) for average in ROUNDS]
    for key in ("w", "b"):
        start = Tiny().state_dict()[key].tolist()
        expected = _adam_by_hand(start, [r[key].tolist() for r in ROUNDS], 0.1, 0.5, 0.75, 0.01)
        for round_, want in zip(got, expected, strict=True):
            torch.testing.assert_close(round_[key], torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(got[-1]["w"], model.w.detach())  # the global model is stepped in place
    assert all(torch.equal(g["seen"], r["seen"]) for g, r in zip(got, ROUNDS, strict=True))  # buffers: as averaged


def test_fedadam_first_round_moves_lr_toward_the_average_not_onto_it() -> None:
    model, server = Tiny(), FedAdam(lr=0.1, betas=(0.9, 0.99), eps=1e-3)
    server.start(model)
    new = server.aggregate(ROUNDS[0])
    # bias-corrected first step: −lr·g/(|g| + ε) with g = w − average = [−0.5, 1.0, 0.0]
    expected = [1.0 + 0.1 * 0.5 / 0.501, -2.0 - 0.1 * 1.0 / 1.001, 0.5]
    torch.testing.assert_close(new["w"], torch.tensor(expected, dtype=torch.float64))
    assert new["w"] is not model.w and not new["w"].requires_grad  # a copy, detached


def test_fedadam_needs_start_first() -> None:
    with pytest.raises(RuntimeError, match=r"start\(model\) first"):
        FedAdam().aggregate(ROUNDS[0])


def test_fedavg_keeps_the_average_and_leaves_the_model_alone() -> None:
    model, server = Tiny(), FedAvg()
    server.start(model)
    assert server.aggregate(ROUNDS[0]) is ROUNDS[0]
    torch.testing.assert_close(model.w.detach(), Tiny().w.detach())
    assert server.config() == {"strategy": "fedavg"} and server.proximal_mu == 0.0


def test_fedprox_carries_mu_and_aggregates_as_fedavg() -> None:
    server = FedProx(mu=0.25)
    assert server.proximal_mu == 0.25 and server.config() == {"strategy": "fedprox", "proximal_mu": 0.25}
    assert server.aggregate(ROUNDS[1]) is ROUNDS[1]


def test_fedadam_config_records_the_server_optimizer() -> None:
    assert FedAdam(lr=0.05, betas=(0.8, 0.9), eps=1e-4).config() == {
        "strategy": "fedadam", "server_lr": 0.05, "server_betas": [0.8, 0.9], "server_eps": 1e-4}


@pytest.mark.parametrize("make", [
    lambda: FedProx(mu=0.0), lambda: FedProx(mu=-0.1), lambda: FedProx(mu=math.nan),
    lambda: FedAdam(lr=0.0), lambda: FedAdam(lr=-0.01), lambda: FedAdam(lr=math.nan), lambda: FedAdam(eps=0.0),
    lambda: FedAdam(betas=(1.0, 0.99)), lambda: FedAdam(betas=(0.9, -0.1)), lambda: FedAdam(betas=(0.9, 1.5)),
])
def test_invalid_parameters_are_refused(make: Callable[[], Strategy]) -> None:
    with pytest.raises(InvalidRequest, match=r"needs (mu|lr) > 0"):
        make()


def test_strategies_by_name() -> None:
    assert type(strategy("fedavg")) is FedAvg
    adam = strategy("fedadam")
    assert isinstance(adam, FedAdam) and (adam.lr, adam.betas, adam.eps) == (0.03, (0.9, 0.99), 1e-3)
    given: Strategy = FedProx(mu=0.5)
    assert strategy(given) is given
    with pytest.raises(InvalidRequest, match="μ is yours to choose"):
        strategy("fedprox")
    with pytest.raises(InvalidRequest, match="'FedAvg' is not known"):
        strategy("FedAvg")  # names are lower case


# --- robust combinations: what one poisoned update can do -----------------------------------------

HONEST = [torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([1.2, -1.8, 0.4, 3.1]),
          torch.tensor([0.9, -2.1, 0.6, 2.9]), torch.tensor([1.1, -1.9, 0.5, 3.2])]
POISON = torch.tensor([1e6, -1e6, 1e6, -1e6])  # a node that sends what it likes


def updates(*weights: torch.Tensor, samples: int = 100) -> list[NodeUpdate]:
    return [NodeUpdate(f"n{i}", w, samples) for i, w in enumerate(weights)]


def within_honest_range(combined: torch.Tensor) -> bool:
    stacked = torch.stack(HONEST)
    return bool(((stacked.min(0).values <= combined) & (combined <= stacked.max(0).values)).all())


def test_one_poisoned_update_drags_the_mean_but_not_the_robust_strategies() -> None:
    poisoned = updates(*HONEST, POISON)
    mean = FedAvg().combine(poisoned)
    assert (mean - torch.stack(HONEST).mean(0)).abs().min() > 1e5  # every coordinate dragged off by the poison
    for robust in (FedMedian(), FedTrimmedAvg(beta=0.2), Krum(byzantine=1)):
        combined = robust.combine(poisoned)
        assert within_honest_range(combined), (robust, combined)


def test_fedmedian_is_the_coordinate_wise_median() -> None:
    odd = FedMedian().combine(updates(*HONEST[:3]))
    torch.testing.assert_close(odd, torch.tensor([1.0, -2.0, 0.5, 3.0]))
    even = FedMedian().combine(updates(*HONEST))  # the mean of the two middle values
    torch.testing.assert_close(even, torch.tensor([1.05, -1.95, 0.5, 3.05]))
    # unweighted: a node with 100× the samples is one voice
    torch.testing.assert_close(FedMedian().combine([NodeUpdate("big", POISON, 10_000), *updates(*HONEST[:2])]),
                               torch.tensor([1.2, -2.0, 0.5, 3.0]))


def test_fedtrimmedavg_cuts_beta_n_at_each_end() -> None:
    five = updates(*HONEST, POISON)
    torch.testing.assert_close(FedTrimmedAvg(beta=0.2).combine(five),  # 1 of 5 cut at each end, 3 averaged
                               torch.sort(torch.stack([*HONEST, POISON]), 0).values[1:4].mean(0))
    torch.testing.assert_close(FedTrimmedAvg(beta=0.0).combine(five), torch.stack([*HONEST, POISON]).mean(0))
    with pytest.raises(InvalidRequest, match=r"beta within \[0, 0.5\)"):
        FedTrimmedAvg(beta=0.5)


def test_krum_picks_the_update_nearest_its_neighbours() -> None:
    five = updates(*HONEST, POISON)
    # scores by hand: each update's squared distances to its n − f − 2 = 2 nearest others
    stacked = torch.stack([*HONEST, POISON]).double()
    d = torch.cdist(stacked, stacked) ** 2
    scores = [sorted(d[i].tolist())[1:3] for i in range(5)]
    best = min(range(5), key=lambda i: sum(scores[i]))
    torch.testing.assert_close(Krum(byzantine=1).combine(five), stacked[best].float())
    multi = Krum(byzantine=1, keep=3).combine(five)  # Multi-Krum: the mean of the 3 best
    order = sorted(range(5), key=lambda i: sum(scores[i]))[:3]
    assert 4 not in order
    torch.testing.assert_close(multi, stacked[order].mean(0).float())


def test_krum_needs_2f_plus_3_nodes_at_the_start_and_in_every_round() -> None:
    with pytest.raises(InvalidRequest, match=r"needs 5 nodes or more \(2·byzantine \+ 3\), and 4 were given"):
        Krum(byzantine=1).check(4)
    Krum(byzantine=1).check(5)
    with pytest.raises(NodeUnavailable, match="needs 5 updates a round, and 4 nodes answered: raise min_nodes to 5"):
        Krum(byzantine=1).combine(updates(*HONEST))
    for bad in ({"byzantine": -1}, {"keep": 0}, {"byzantine": 1.5}, {"byzantine": True}):
        with pytest.raises(InvalidRequest, match="Krum needs byzantine ≥ 0 and keep ≥ 1"):
            Krum(**bad)  # type: ignore[arg-type]


def test_averaging_strategies_combine_by_samples_and_robust_ones_see_each_update() -> None:
    weighted = [NodeUpdate("a", torch.tensor([0.0, 4.0]), 300), NodeUpdate("b", torch.tensor([4.0, 0.0]), 100)]
    for averaging in (FedAvg(), FedProx(mu=0.1), FedAdam()):
        torch.testing.assert_close(averaging.combine(weighted), torch.tensor([1.0, 3.0]))
        assert not averaging.sees_updates  # secure aggregation may compute their mean instead
    assert all(s.sees_updates for s in (FedMedian(), FedTrimmedAvg(), Krum()))
    assert type(strategy("fedmedian")) is FedMedian and type(strategy("fedtrimmedavg")) is FedTrimmedAvg
    with pytest.raises(InvalidRequest, match="Krum's number of poisoned updates it withstands is yours to choose"):
        strategy("krum")
    assert FedTrimmedAvg(beta=0.1).config() == {"strategy": "fedtrimmedavg", "beta": 0.1}
    assert Krum(byzantine=2, keep=3).config() == {"strategy": "krum", "byzantine": 2, "keep": 3}


def test_fedadam_resumed_from_its_state_steps_as_if_it_had_not_stopped() -> None:
    model, server = Tiny(), FedAdam(lr=0.1, betas=(0.5, 0.75), eps=0.01)
    server.start(model)
    straight = [server.aggregate(average) for average in ROUNDS]
    first, half = Tiny(), FedAdam(lr=0.1, betas=(0.5, 0.75), eps=0.01)
    half.start(first)
    kept = half.aggregate(ROUNDS[0])
    saved = half.state()
    assert set(saved) == {f"{p}.{k}" for p in ("w", "b") for k in ("step", "exp_avg", "exp_avg_sq")}
    again, resumed = Tiny(), FedAdam(lr=0.1, betas=(0.5, 0.75), eps=0.01)
    again.load_state_dict(kept)
    resumed.start(again)
    resumed.restore(saved)
    for average, want in zip(ROUNDS[1:], straight[1:], strict=True):
        got = resumed.aggregate(average)
        torch.testing.assert_close(got["w"], want["w"])
        torch.testing.assert_close(got["b"], want["b"])
    fresh = FedAdam(lr=0.1, betas=(0.5, 0.75), eps=0.01)  # without its state, it would not
    restart = Tiny()
    restart.load_state_dict(kept)
    fresh.start(restart)
    assert not torch.allclose(fresh.aggregate(ROUNDS[1])["w"], straight[1]["w"])


def test_sampled_nodes_are_a_fraction_at_least_a_minimum_and_the_same_for_the_same_seed() -> None:
    from orchestrator.fl import sampled

    assert sampled(5, 1.0, 1, seed=0, r=3) == [0, 1, 2, 3, 4]
    rounds = [sampled(10, 0.3, 1, seed=7, r=r) for r in range(20)]
    assert all(len(s) == 3 and s == sorted(set(s)) and all(0 <= i < 10 for i in s) for s in rounds)
    assert len({tuple(s) for s in rounds}) > 10  # drawn anew each round
    assert rounds == [sampled(10, 0.3, 1, seed=7, r=r) for r in range(20)]  # and again the same, for the same seed
    assert rounds != [sampled(10, 0.3, 1, seed=8, r=r) for r in range(20)]
    assert len(sampled(10, 0.05, 4, seed=0, r=0)) == 4  # ⌈0.5⌉ = 1, but at least min_sampled
