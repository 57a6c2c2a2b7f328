"""The server's side of federated training: FedAvg keeps the average, FedProx only changes the
nodes' objective, FedAdam steps the global model with Adam on the pseudo-gradient
g = w − average (torch's Adam: bias-corrected moments, ε added to √v̂)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from orchestrator.strategies import FedAdam, FedAvg, FedProx, State, Strategy, strategy
from protocol.errors import InvalidRequest


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
