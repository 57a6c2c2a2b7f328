"""Differentially private releases and their accounting, on OpenDP: each mechanism an
object that knows how its noise is calibrated, drawn and what it costs, and how its
charges compose with others (as Opacus' accountants do).

Noise comes from OpenDP's samplers (floating-point safe), never from torch or numpy RNGs:

* :data:`LAPLACE`  — ε-DP, scale ``b = Δ₁ / ε``; its charges add up;
* :data:`GAUSSIAN` — (ε, δ)-DP through zero-concentrated DP: σ is the smallest scale whose
  ρ = Δ₂² / (2σ²) converts (OpenDP's ``make_zCDP_to_approxDP`` + ``make_fix_delta``) to at
  most ε at δ; its charges add up as ρ, converted to (ε, δ) at what is left of the
  budget's δ;
* :data:`DP_SGD`   — DP-SGD's (ε, δ), by Opacus' RDP accountant (its noise is drawn in
  training, by Opacus); its charges add up by basic composition, ε and δ alike.

The parts add (:func:`spent`): (ε₁, 0) then (ε₂, δ) is (ε₁ + ε₂, δ).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch
from numpy.typing import NDArray
from opendp.combinators import make_fix_delta, make_zCDP_to_approxDP
from opendp.domains import atom_domain, vector_domain
from opendp.measurements import make_gaussian, make_laplace
from opendp.metrics import l1_distance, l2_distance, symmetric_distance
from opendp.mod import Measurement, OpenDPException, Transformation, binary_search_param, enable_features
from opendp.transformations import then_clamp, then_mean, then_sum

from protocol.errors import InvalidRequest, SensitivityUnknown

# OpenDP by its modules, not opendp.prelude: the prelude also imports its scikit-learn
# extras (scikit-learn and SciPy: 0.7 s and ~70 MB in every process that uses this module)
enable_features("contrib")


@dataclass(frozen=True)
class Charge:
    """What one release costs: ε for pure DP, ρ (zCDP) for Gaussian releases, (ε, δ) for
    DP-SGD. ``mechanism`` is its mechanism's name, as ledgers store it and replies show it."""

    mechanism: str  # "laplace" | "gaussian" | "dpsgd": MECHANISMS' keys
    epsilon: float
    delta: float
    rho: float = 0.0
    scale: float = 0.0

    @property
    def kind(self) -> Mechanism:
        return MECHANISMS[self.mechanism]


@dataclass
class Spend:
    """Charges being composed, each by its mechanism's rule (:meth:`Mechanism.compose`)."""

    epsilons: list[float] = field(default_factory=list)  # pure ε and basic-composition ε, added
    deltas: list[float] = field(default_factory=list)  # basic-composition δ, added
    rhos: list[float] = field(default_factory=list)  # zCDP ρ, added, converted once at the end

    def at(self, delta: float) -> tuple[float, float]:
        """The (ε, δ) spent, the zCDP part converted at what is left of the budget's ``delta``."""
        pure, used = math.fsum(self.epsilons), math.fsum(self.deltas)  # fsum: 10 × 0.1 is 1.0
        rho = math.fsum(self.rhos)
        if rho <= 0:
            return pure, used
        left = delta - used
        if left <= 0:
            return math.inf, delta + used
        return pure + rho_to_approx(rho, left), delta


class Mechanism:
    """A DP mechanism: the charge of a release, its noise, and how its charges compose."""

    name: ClassVar[str]
    metric: ClassVar[str] = ""  # the sensitivity it is calibrated to: "l1" or "l2"

    def compose(self, spend: Spend, charge: Charge) -> None:
        """Add ``charge`` to ``spend`` by this mechanism's composition rule."""
        raise NotImplementedError

    def stored_delta(self, charge_delta: float, budget_delta: float) -> float:
        """The δ of a running total of its charges read back from a ledger: the budget's,
        unless its charges carry their own."""
        return budget_delta

    def measurement(self, size: int, scale: float) -> Measurement:
        raise NotImplementedError

    def noise(self, values: torch.Tensor, charge: Charge) -> torch.Tensor:
        """``values`` with this mechanism's noise at ``charge``'s scale (OpenDP's samplers; float64)."""
        flat = values.detach().to(torch.float64).flatten()
        if charge.scale == 0.0:
            return flat.reshape(values.shape)
        noisy = self.measurement(flat.numel(), charge.scale)(flat.tolist())
        return torch.tensor(noisy, dtype=torch.float64).reshape(values.shape)


class Laplace(Mechanism):
    name = "laplace"
    metric = "l1"

    def measurement(self, size: int, scale: float) -> Measurement:
        return make_laplace(*_space(size, "l1"), scale=scale)

    def calibrate(self, l1: float, epsilon: float) -> Charge:
        """ε-DP for L1 sensitivity ``l1``: scale Δ₁/ε, and the ε OpenDP's privacy map gives it."""
        _check(epsilon, 0.0)
        scale = l1 / epsilon
        cost = float(self.measurement(1, scale).map(l1)) if scale > 0 else epsilon  # type: ignore[no-untyped-call]
        return Charge(self.name, cost, 0.0, scale=scale)

    def compose(self, spend: Spend, charge: Charge) -> None:
        spend.epsilons.append(charge.epsilon)


class Gaussian(Mechanism):
    name = "gaussian"
    metric = "l2"

    def measurement(self, size: int, scale: float) -> Measurement:
        return make_gaussian(*_space(size, "l2"), scale=scale)

    def calibrate(self, l2: float, epsilon: float, delta: float) -> Charge:
        """(ε, δ)-DP for L2 sensitivity ``l2`` via zCDP: the smallest σ that buys it, and its ρ."""
        _check(epsilon, delta)
        if not 0.0 < delta < 1.0:
            raise InvalidRequest(f"a Gaussian release needs delta in (0, 1), not {delta}")
        if l2 == 0:
            return Charge(self.name, epsilon, delta, rho=0.0, scale=0.0)
        scale = gaussian_scale(l2, epsilon, delta)
        rho = float(self.measurement(1, scale).map(l2))  # type: ignore[no-untyped-call]
        return Charge(self.name, epsilon, delta, rho=rho, scale=scale)

    def compose(self, spend: Spend, charge: Charge) -> None:
        spend.rhos.append(charge.rho)


class DPSGD(Mechanism):
    """DP-SGD: Poisson-sampled batches, clipped per-sample gradients and Gaussian noise,
    drawn by Opacus in training; what it costs is its RDP accountant's (ε, δ)."""

    name = "dpsgd"

    def cost(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
             also_epsilon: float = 0.0) -> Charge:
        """The charge of ``steps`` steps at this noise and sampling rate, known before training
        (``also_epsilon``: a pure-ε release made with it, the private figures, added by basic
        composition into one charge)."""
        return Charge(self.name, rdp_epsilon(noise_multiplier, sample_rate, steps, delta) + also_epsilon, delta)

    def noise(self, values: torch.Tensor, charge: Charge) -> torch.Tensor:
        raise InvalidRequest("dpsgd draws no noise here: Opacus adds it to the gradients, in training")

    def compose(self, spend: Spend, charge: Charge) -> None:
        spend.epsilons.append(charge.epsilon)
        spend.deltas.append(charge.delta)

    def stored_delta(self, charge_delta: float, budget_delta: float) -> float:
        return charge_delta  # each DP-SGD charge carries the δ of its accountant


LAPLACE, GAUSSIAN, DP_SGD = Laplace(), Gaussian(), DPSGD()
MECHANISMS: dict[str, Mechanism] = {m.name: m for m in (LAPLACE, GAUSSIAN, DP_SGD)}


def _space(size: int, metric: str) -> tuple[Any, Any]:
    domain = vector_domain(atom_domain(T=float, nan=False), size=size)
    return domain, (l1_distance(T=float) if metric == "l1" else l2_distance(T=float))


def calibrate(l1: float, l2: float, epsilon: float, delta: float = 0.0) -> Charge:
    """The charge — mechanism, noise scale, cost — of an (ε, δ) release of a value with these
    sensitivities, decided before anything is computed: Laplace for pure ε (δ = 0), else
    Gaussian."""
    _check(epsilon, delta)
    if delta == 0.0:
        return LAPLACE.calibrate(l1, epsilon)
    if not 0.0 < delta < 1.0:
        raise InvalidRequest(f"delta must be in (0, 1), not {delta}")
    return GAUSSIAN.calibrate(l2, epsilon, delta)


def add_noise(values: torch.Tensor, charge: Charge) -> torch.Tensor:
    """Apply the charge's mechanism to ``values`` with OpenDP's samplers (float64 out)."""
    return charge.kind.noise(values, charge)


def laplace(values: torch.Tensor, l1: float, epsilon: float) -> tuple[torch.Tensor, Charge]:
    """Release ``values`` with ε-DP, given their L1 sensitivity."""
    charge = LAPLACE.calibrate(l1, epsilon)
    return add_noise(values, charge), charge


@lru_cache(maxsize=1024)
def gaussian_scale(l2: float, epsilon: float, delta: float) -> float:
    """The smallest σ whose release is (ε, δ)-DP for sensitivity ``l2`` (binary search)."""
    space = _space(1, "l2")

    def at(scale: float) -> Any:
        return make_fix_delta(make_zCDP_to_approxDP(make_gaussian(*space, scale=scale)), delta)

    return float(binary_search_param(at, d_in=l2, d_out=(epsilon, delta)))


def gaussian(values: torch.Tensor, l2: float, epsilon: float, delta: float) -> tuple[torch.Tensor, Charge]:
    """Release ``values`` with (ε, δ)-DP via zCDP, given their L2 sensitivity."""
    charge = GAUSSIAN.calibrate(l2, epsilon, delta)
    return add_noise(values, charge), charge


@lru_cache(maxsize=256)
def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Opacus' RDP accountant's ε (~0.2 s a call here: cached, as rounds repeat their settings).
    Opacus is loaded on first use: most processes never train with DP."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta=delta))


def rho_to_approx(rho: float, delta: float) -> float:
    """ε of ρ-zCDP at δ, as OpenDP converts it."""
    if rho <= 0:
        return 0.0
    scale = 1.0 / math.sqrt(2.0 * rho)  # a Gaussian of sensitivity 1 with exactly this ρ
    measurement = make_gaussian(*_space(1, "l2"), scale=scale)
    epsilon, _ = make_fix_delta(make_zCDP_to_approxDP(measurement), delta).map(1.0)  # type: ignore[no-untyped-call]
    return float(epsilon)


def spent(charges: Iterable[Charge], delta: float) -> tuple[float, float]:
    """The (ε, δ) that these releases have spent together, at the budget's δ, each charge
    composed by its mechanism's rule (:class:`Spend`)."""
    spend = Spend()
    for charge in charges:
        charge.kind.compose(spend, charge)
    return spend.at(delta)


# --- bounded aggregates over rows ----------------------------------------------------------------

@lru_cache(maxsize=4096)
def _aggregate(kind: str, n: int, lo: float, hi: float) -> Transformation:
    """OpenDP's clamp, then its sum or mean, over ``n`` rows: float-safe (its stability map
    accounts for the rounding of the summation it performs)."""
    domain = vector_domain(atom_domain(T=float, nan=False), size=n)
    aggregate = then_mean() if kind == "mean" else then_sum()  # type: ignore[no-untyped-call]
    try:
        return (domain, symmetric_distance()) >> then_clamp((lo, hi)) >> aggregate  # type: ignore[no-any-return]
    except OpenDPException as exc:
        raise SensitivityUnknown(f"the {kind} of {n} values within [{lo:g}, {hi:g}] has no float-safe bound "
                                 f"({exc.message})") from None


def aggregate_sensitivity(kind: str, n: int, lo: float, hi: float) -> float:
    """How far the ``kind`` ("sum" or "mean") of ``n`` rows, each clamped to [lo, hi], moves
    when one row is replaced (a symmetric distance of 2 between datasets of one size)."""
    return float(_aggregate(kind, n, lo, hi).map(2))  # type: ignore[no-untyped-call]


def bounded_aggregate(kind: str, values: NDArray[np.float64], lo: float, hi: float) -> float:
    """The ``kind`` of ``values`` (no NaN), each clamped to [lo, hi] — computed by OpenDP,
    the computation :func:`aggregate_sensitivity` bounds. A NumPy array crosses into OpenDP
    as one buffer (a list, value by value: 25× slower)."""
    return float(_aggregate(kind, len(values), lo, hi)(values))


def _check(epsilon: float, delta: float) -> None:
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise InvalidRequest(f"epsilon must be a positive number, not {epsilon}")
