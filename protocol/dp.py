"""Differentially private releases and their accounting, on OpenDP.

Noise comes from OpenDP's samplers (floating-point safe), never from torch or numpy RNGs:

* ``laplace``  — ε-DP, scale ``b = Δ₁ / ε``;
* ``gaussian`` — (ε, δ)-DP through zero-concentrated DP: σ is the smallest scale whose
  ρ = Δ₂² / (2σ²) converts (OpenDP's ``make_zCDP_to_approxDP`` + ``make_fix_delta``) to at
  most ε at δ.

Accounting per user × dataset (:func:`spent`): pure-ε releases compose by summing; Gaussian
releases compose by summing ρ, which is converted to (ε, δ) at the budget's δ by OpenDP.
The two parts add: (ε₁, 0) then (ε₂, δ) is (ε₁ + ε₂, δ).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import opendp.prelude as dp
import torch

from protocol.errors import InvalidRequest

dp.enable_features("contrib")


@dataclass(frozen=True)
class Charge:
    """What one release costs: ε for pure DP, ρ (zCDP) for Gaussian releases."""

    mechanism: str  # "laplace" | "gaussian"
    epsilon: float
    delta: float
    rho: float = 0.0
    scale: float = 0.0


def _space(size: int, metric: str) -> tuple[Any, Any]:
    domain = dp.vector_domain(dp.atom_domain(T=float, nan=False), size=size)
    return domain, (dp.l1_distance(T=float) if metric == "l1" else dp.l2_distance(T=float))


def laplace(values: torch.Tensor, l1: float, epsilon: float) -> tuple[torch.Tensor, Charge]:
    """Release ``values`` with ε-DP, given their L1 sensitivity."""
    _check(epsilon, 0.0)
    scale = l1 / epsilon if l1 > 0 else 0.0
    if scale == 0.0:
        return values.clone(), Charge("laplace", epsilon, 0.0, scale=0.0)
    flat = values.detach().to(torch.float64).flatten()
    measurement = dp.m.make_laplace(*_space(flat.numel(), "l1"), scale=scale)
    spent = measurement.map(l1)  # type: ignore[no-untyped-call]
    noisy = torch.tensor(measurement(flat.tolist()), dtype=torch.float64).reshape(values.shape)
    return noisy.to(values.dtype if values.is_floating_point() else torch.float64), \
        Charge("laplace", float(spent), 0.0, scale=scale)


@lru_cache(maxsize=1024)
def gaussian_scale(l2: float, epsilon: float, delta: float) -> float:
    """The smallest σ whose release is (ε, δ)-DP for sensitivity ``l2`` (binary search)."""
    space = _space(1, "l2")

    def at(scale: float) -> Any:
        return dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(dp.m.make_gaussian(*space, scale=scale)), delta)

    return float(dp.binary_search_param(at, d_in=l2, d_out=(epsilon, delta)))


def gaussian(values: torch.Tensor, l2: float, epsilon: float, delta: float) -> tuple[torch.Tensor, Charge]:
    """Release ``values`` with (ε, δ)-DP via zCDP, given their L2 sensitivity."""
    _check(epsilon, delta)
    if not 0.0 < delta < 1.0:
        raise InvalidRequest(f"delta must be in (0, 1), not {delta}")
    if l2 == 0:
        return values.clone(), Charge("gaussian", epsilon, delta, rho=0.0)
    scale = gaussian_scale(l2, epsilon, delta)
    flat = values.detach().to(torch.float64).flatten()
    measurement = dp.m.make_gaussian(*_space(flat.numel(), "l2"), scale=scale)
    rho = float(measurement.map(l2))  # type: ignore[no-untyped-call]
    noisy = torch.tensor(measurement(flat.tolist()), dtype=torch.float64).reshape(values.shape)
    return noisy.to(values.dtype if values.is_floating_point() else torch.float64), \
        Charge("gaussian", epsilon, delta, rho=rho, scale=scale)


def rho_to_approx(rho: float, delta: float) -> float:
    """ε of ρ-zCDP at δ, as OpenDP converts it."""
    if rho <= 0:
        return 0.0
    scale = 1.0 / math.sqrt(2.0 * rho)  # a Gaussian of sensitivity 1 with exactly this ρ
    measurement = dp.m.make_gaussian(*_space(1, "l2"), scale=scale)
    epsilon, _ = dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(measurement), delta).map(1.0)  # type: ignore[no-untyped-call]
    return float(epsilon)


def spent(charges: Iterable[Charge], delta: float) -> tuple[float, float]:
    """The (ε, δ) that these releases have spent together, at the budget's δ."""
    charges = list(charges)
    pure = math.fsum(c.epsilon for c in charges if c.mechanism == "laplace")  # fsum: 10 × 0.1 is 1.0
    rho = math.fsum(c.rho for c in charges if c.mechanism == "gaussian")
    return pure + rho_to_approx(rho, delta), (delta if rho > 0 else 0.0)


def _check(epsilon: float, delta: float) -> None:
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise InvalidRequest(f"epsilon must be a positive number, not {epsilon}")
