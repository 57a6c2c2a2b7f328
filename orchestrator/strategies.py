"""What the server does in federated training, as objects (as Flower's strategies are):
how the nodes train locally, how a round's node updates combine, and what the global model
becomes from that.

    grid.fit(model, data, rounds=20, strategy=FedAvg())                 # McMahan et al., 2017
    grid.fit(model, data, rounds=20, strategy=FedProx(mu=0.01))         # Li et al., 2020
    grid.fit(model, data, rounds=20, strategy=FedAdam(lr=0.03))         # Reddi et al., 2021
    grid.fit(model, data, rounds=20, strategy=FedMedian())              # Yin et al., 2018
    grid.fit(model, data, rounds=20, strategy=FedTrimmedAvg(beta=0.2))  # Yin et al., 2018
    grid.fit(model, data, rounds=20, strategy=Krum(byzantine=1))        # Blanchard et al., 2017

A round is two steps. :meth:`Strategy.combine` turns the nodes' updates — each node's
trained weights, sample count, loss and accuracy (:class:`NodeUpdate`) — into one set of
weights: their sample-weighted mean for FedAvg, FedProx and FedAdam, a robust statistic
for FedMedian, FedTrimmedAvg and Krum, which bound what one poisoned update can do to the
model. :meth:`Strategy.aggregate` then makes the new global model of it (FedAdam steps with
Adam; the others keep it as it is).

With secure aggregation nobody sees one node's update, only the round's sum: the mean is
computed from sums of shares instead of :meth:`combine`, so the strategies that need each
update (``sees_updates``) are refused with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from protocol.errors import InvalidRequest, NodeUnavailable

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class NodeUpdate:
    """One node's answer in a round: its trained weights, flat (``protocol.model.flatten_state``
    of the global model's layout), the samples it trained on, and its training loss and
    accuracy (None if the node withheld them)."""

    node: str
    weights: torch.Tensor
    samples: int
    loss: float | None = None
    accuracy: float | None = None


def weighted_mean(updates: Sequence[NodeUpdate]) -> torch.Tensor:
    """The updates' mean, each weighted by its sample count (FedAvg's)."""
    total = sum(u.samples for u in updates)
    return sum((u.weights * (u.samples / total) for u in updates), torch.zeros_like(updates[0].weights))


def _sorted(updates: Sequence[NodeUpdate]) -> torch.Tensor:
    """The updates stacked, one row each, sorted within each coordinate."""
    return torch.stack([u.weights for u in updates]).sort(dim=0).values


class Strategy:
    """FedAvg's behaviour; subclasses change the local objective, how updates combine, or the
    server's step."""

    name: ClassVar[str] = "fedavg"
    sees_updates: ClassVar[bool] = False  # combines each node's update itself: no secure aggregation
    proximal_mu: float = 0.0  # FedProx's term in each node's local objective (0: none)

    def check(self, nodes: int) -> None:
        """Refuse a run over ``nodes`` nodes this strategy cannot combine (InvalidRequest)."""

    def start(self, model: torch.nn.Module) -> None:
        """Called once a run starts, with the global model the run trains."""

    def combine(self, updates: Sequence[NodeUpdate]) -> torch.Tensor:
        """One flat set of weights from a round's updates (one or more): their sample-weighted mean."""
        return weighted_mean(updates)

    def aggregate(self, average: State) -> State:
        """The new global weights from what the round's updates combined into."""
        return average

    def state(self) -> State:
        """What a checkpoint keeps of this strategy besides the model (tensors only)."""
        return {}

    def restore(self, state: State) -> None:
        """Take back :meth:`state`, after :meth:`start`, to resume a run from a checkpoint."""

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

    def state(self) -> State:
        """Adam's step count and moments, per parameter of the global model."""
        assert self._adam is not None
        return {f"{name}.{k}": v for name, p in self._params.items() for k, v in self._adam.state.get(p, {}).items()}

    def restore(self, state: State) -> None:
        if self._adam is None:
            raise RuntimeError("FedAdam.start(model) first, then restore its state")
        for name, p in self._params.items():
            moments = {k: state[f"{name}.{k}"].clone() for k in ("step", "exp_avg", "exp_avg_sq")
                       if f"{name}.{k}" in state}
            if moments:
                self._adam.state[p] = moments


@dataclass
class FedMedian(Strategy):
    """The coordinate-wise median of the nodes' weights (unweighted; with an even count, the
    mean of the two middle values): an update far from the others, however far, moves no
    coordinate beyond the range of the honest ones while fewer than half are poisoned."""

    name: ClassVar[str] = "fedmedian"
    sees_updates: ClassVar[bool] = True

    def combine(self, updates: Sequence[NodeUpdate]) -> torch.Tensor:
        ranked, n = _sorted(updates), len(updates)
        return ranked[n // 2] if n % 2 else (ranked[n // 2 - 1] + ranked[n // 2]) / 2


@dataclass
class FedTrimmedAvg(Strategy):
    """In each coordinate, the ⌊beta·n⌋ largest and smallest of the n nodes' values are
    dropped and the rest averaged (unweighted): up to ⌊beta·n⌋ poisoned updates are cut."""

    name: ClassVar[str] = "fedtrimmedavg"
    sees_updates: ClassVar[bool] = True
    beta: float = 0.2

    def __post_init__(self) -> None:
        if not 0 <= self.beta < 0.5:
            raise InvalidRequest(f"FedTrimmedAvg needs beta within [0, 0.5), the share cut at each end, "
                                 f"not {self.beta}")

    def combine(self, updates: Sequence[NodeUpdate]) -> torch.Tensor:
        cut = int(self.beta * len(updates))
        return _sorted(updates)[cut:len(updates) - cut].mean(dim=0)

    def config(self) -> dict[str, Any]:
        return {"strategy": self.name, "beta": self.beta}


@dataclass
class Krum(Strategy):
    """Krum: with at most ``byzantine`` (f) poisoned updates among n, each update is scored by
    the sum of its squared distances to its n − f − 2 nearest others, and the one with the
    lowest score becomes the round's weights; with ``keep`` = m > 1 (Multi-Krum), the mean of
    the m lowest. Needs n ≥ 2f + 3 updates in every round."""

    name: ClassVar[str] = "krum"
    sees_updates: ClassVar[bool] = True
    byzantine: int = 1
    keep: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.byzantine, bool) or not isinstance(self.byzantine, int) or self.byzantine < 0 \
                or isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1:
            raise InvalidRequest(f"Krum needs byzantine ≥ 0 and keep ≥ 1, whole numbers (got byzantine="
                                 f"{self.byzantine!r}, keep={self.keep!r})")

    def needed(self) -> int:
        return max(2 * self.byzantine + 3, self.keep)

    def check(self, nodes: int) -> None:
        if nodes < self.needed():
            raise InvalidRequest(f"Krum with byzantine={self.byzantine}, keep={self.keep} needs {self.needed()} nodes "
                                 f"or more (2·byzantine + 3), and {nodes} were given")

    def combine(self, updates: Sequence[NodeUpdate]) -> torch.Tensor:
        n = len(updates)
        if n < self.needed():
            raise NodeUnavailable(f"Krum with byzantine={self.byzantine} needs {self.needed()} updates a round, "
                                  f"and {n} nodes answered: raise min_nodes to {self.needed()} to wait for them")
        stacked = torch.stack([u.weights for u in updates]).double()
        distances = torch.cdist(stacked, stacked) ** 2
        nearest = distances.sort(dim=1).values[:, 1:n - self.byzantine - 1]  # column 0: itself, at 0
        best = nearest.sum(dim=1).argsort()[:self.keep]
        return stacked[best].mean(dim=0).to(updates[0].weights.dtype)

    def config(self) -> dict[str, Any]:
        return {"strategy": self.name, "byzantine": self.byzantine, "keep": self.keep}


BY_NAME: dict[str, type[Strategy]] = {"fedavg": FedAvg, "fedadam": FedAdam, "fedmedian": FedMedian,
                                      "fedtrimmedavg": FedTrimmedAvg}
KNOWN = "FedAvg(), FedProx(mu=…), FedAdam(lr=…), FedMedian(), FedTrimmedAvg(beta=…) or Krum(byzantine=…)"


def strategy(given: Strategy | str) -> Strategy:
    """A strategy object; a name is taken for its defaults (FedProx's μ and Krum's f are the choice)."""
    if isinstance(given, Strategy):
        return given
    if given == "fedprox":
        raise InvalidRequest("FedProx's μ is yours to choose: strategy=FedProx(mu=0.01)")
    if given == "krum":
        raise InvalidRequest("Krum's number of poisoned updates it withstands is yours to choose: "
                             "strategy=Krum(byzantine=1)")
    if given not in BY_NAME:
        raise InvalidRequest(f"strategy {given!r} is not known; use {KNOWN} from orchestrator")
    return BY_NAME[given]()
