"""What the server does in federated training, as objects (as Flower's strategies are):
how the nodes train locally, and what a round's sample-weighted average becomes.

    grid.fit(model, data, rounds=20, strategy=FedAvg())             # McMahan et al., 2017
    grid.fit(model, data, rounds=20, strategy=FedProx(mu=0.01))     # Li et al., 2020
    grid.fit(model, data, rounds=20, strategy=FedAdam(lr=0.03))     # Reddi et al., 2021

The average itself is computed the same way for all of them — in the clear from the nodes'
sealed updates, or from sums of shares with secure aggregation — so a strategy never sees
one node's update, only the round's average.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from protocol.errors import InvalidRequest

State = dict[str, torch.Tensor]


class Strategy:
    """FedAvg's behaviour; subclasses change the local objective or the server's step."""

    name: ClassVar[str] = "fedavg"
    proximal_mu: float = 0.0  # FedProx's term in each node's local objective (0: none)

    def start(self, model: torch.nn.Module) -> None:
        """Called once a run starts, with the global model the run trains."""

    def aggregate(self, average: State) -> State:
        """The new global weights from the round's sample-weighted average."""
        return average

    def config(self) -> dict[str, Any]:
        """What the run history records of this strategy."""
        return {"strategy": self.name}


@dataclass
class FedAvg(Strategy):
    """The new global model is the round's average."""


@dataclass
class FedProx(Strategy):
    """FedAvg whose nodes add (μ/2)·‖w − w_global‖² to their loss: local training stays near
    the global model, which helps when the nodes' data differ (label skew)."""

    name: ClassVar[str] = "fedprox"
    mu: float = 0.01

    def __post_init__(self) -> None:
        if not self.mu > 0:
            raise InvalidRequest(f"FedProx needs mu > 0 (its proximal term's weight), not {self.mu}; "
                                 "mu = 0 is FedAvg")
        self.proximal_mu = self.mu

    def config(self) -> dict[str, Any]:
        return {"strategy": self.name, "proximal_mu": self.mu}


@dataclass
class FedAdam(Strategy):
    """The change a round's average would make is taken as a negative gradient, and torch's
    Adam steps with it (``lr`` is the server's learning rate η, ``eps`` Adam's ε). Unlike
    Algorithm 2 of Reddi et al. (2021), whose τ is added to √v uncorrected, torch's Adam
    corrects both moments for their zero start: early rounds take steps of about η, where
    the paper's would be (1 − β₁) times smaller. Buffers (BatchNorm's statistics) are not
    optimized: they take the average as it is."""

    name: ClassVar[str] = "fedadam"
    lr: float = 0.03
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-3
    _params: dict[str, torch.nn.Parameter] = field(default_factory=dict, init=False, repr=False)
    _adam: torch.optim.Adam | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.lr > 0 and self.eps > 0 and all(0 <= b < 1 for b in self.betas)):
            raise InvalidRequest("FedAdam needs lr > 0, eps > 0 and betas within [0, 1) "
                                 f"(got lr={self.lr}, betas={self.betas}, eps={self.eps})")

    def start(self, model: torch.nn.Module) -> None:
        self._params = dict(model.named_parameters())  # the global model's: updated in place
        self._adam = torch.optim.Adam(self._params.values(), lr=self.lr, betas=self.betas, eps=self.eps)

    def aggregate(self, average: State) -> State:
        if self._adam is None:
            raise RuntimeError("FedAdam.start(model) first: the server's Adam steps on the global model")
        with torch.no_grad():
            for name, p in self._params.items():
                p.grad = p - average[name].to(p.dtype)
        self._adam.step()
        return {k: self._params[k].detach().clone() if k in self._params else v for k, v in average.items()}

    def config(self) -> dict[str, Any]:
        return {"strategy": self.name, "server_lr": self.lr, "server_betas": list(self.betas), "server_eps": self.eps}


BY_NAME: dict[str, type[Strategy]] = {"fedavg": FedAvg, "fedadam": FedAdam}


def strategy(given: Strategy | str) -> Strategy:
    """A strategy object; a name is taken for its defaults (FedProx has none: its μ is the choice)."""
    if isinstance(given, Strategy):
        return given
    if given == "fedprox":
        raise InvalidRequest("FedProx's μ is yours to choose: strategy=FedProx(mu=0.01)")
    if given not in BY_NAME:
        raise InvalidRequest(f"strategy {given!r} is not known; use FedAvg(), FedProx(mu=…) or FedAdam(lr=…) "
                             "from orchestrator")
    return BY_NAME[given]()
