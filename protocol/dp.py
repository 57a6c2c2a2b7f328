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

import numpy as np
import torch
from numpy.typing import NDArray
from opendp.combinators import make_fix_delta, make_zCDP_to_approxDP
from opendp.domains import atom_domain, vector_domain
from opendp.measurements import make_gaussian, make_laplace
from opendp.metrics import l1_distance, l2_distance, symmetric_distance
from opendp.mod import OpenDPException, Transformation, binary_search_param, enable_features
from opendp.transformations import then_clamp, then_mean, then_sum

from protocol.errors import InvalidRequest, SensitivityUnknown

# OpenDP by its modules, not opendp.prelude: the prelude also imports its scikit-learn
# extras (scikit-learn and SciPy: 0.7 s and ~70 MB in every process that uses this module)
enable_features("contrib")


@dataclass(frozen=True)
class Charge:
    """What one release costs: ε for pure DP, ρ (zCDP) for Gaussian releases."""

    mechanism: str  # "laplace" | "gaussian" | "dpsgd" (an (ε, δ) from DP-SGD's accountant)
    epsilon: float
    delta: float
    rho: float = 0.0
    scale: float = 0.0


def _space(size: int, metric: str) -> tuple[Any, Any]:
    domain = vector_domain(atom_domain(T=float, nan=False), size=size)
    return domain, (l1_distance(T=float) if metric == "l1" else l2_distance(T=float))


def calibrate(l1: float, l2: float, epsilon: float, delta: float = 0.0) -> Charge:
    """The mechanism and noise scale for an (ε, δ) release of a value with these
    sensitivities, and what it will cost — decided before anything is computed."""
    _check(epsilon, delta)
    if delta == 0.0:
        scale = l1 / epsilon
        cost = float(make_laplace(*_space(1, "l1"), scale=scale).map(l1)) if scale > 0 else epsilon  # type: ignore[no-untyped-call]
        return Charge("laplace", cost, 0.0, scale=scale)
    if not 0.0 < delta < 1.0:
        raise InvalidRequest(f"delta must be in (0, 1), not {delta}")
    if l2 == 0:
        return Charge("gaussian", epsilon, delta, rho=0.0, scale=0.0)
    scale = gaussian_scale(l2, epsilon, delta)
    rho = float(make_gaussian(*_space(1, "l2"), scale=scale).map(l2))  # type: ignore[no-untyped-call]
    return Charge("gaussian", epsilon, delta, rho=rho, scale=scale)


def add_noise(values: torch.Tensor, charge: Charge) -> torch.Tensor:
    """Apply the calibrated mechanism to ``values`` with OpenDP's samplers (float64 out)."""
    flat = values.detach().to(torch.float64).flatten()
    if charge.scale == 0.0:
        return flat.reshape(values.shape)
    make = make_laplace if charge.mechanism == "laplace" else make_gaussian
    metric = "l1" if charge.mechanism == "laplace" else "l2"
    measurement = make(*_space(flat.numel(), metric), scale=charge.scale)
    return torch.tensor(measurement(flat.tolist()), dtype=torch.float64).reshape(values.shape)


def laplace(values: torch.Tensor, l1: float, epsilon: float) -> tuple[torch.Tensor, Charge]:
    """Release ``values`` with ε-DP, given their L1 sensitivity."""
    charge = calibrate(l1, 0.0, epsilon)
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
    if not 0.0 < delta < 1.0:
        raise InvalidRequest(f"a Gaussian release needs delta in (0, 1), not {delta}")
    charge = calibrate(0.0, l2, epsilon, delta)
    return add_noise(values, charge), charge


def rho_to_approx(rho: float, delta: float) -> float:
    """ε of ρ-zCDP at δ, as OpenDP converts it."""
    if rho <= 0:
        return 0.0
    scale = 1.0 / math.sqrt(2.0 * rho)  # a Gaussian of sensitivity 1 with exactly this ρ
    measurement = make_gaussian(*_space(1, "l2"), scale=scale)
    epsilon, _ = make_fix_delta(make_zCDP_to_approxDP(measurement), delta).map(1.0)  # type: ignore[no-untyped-call]
    return float(epsilon)


def spent(charges: Iterable[Charge], delta: float) -> tuple[float, float]:
    """The (ε, δ) that these releases have spent together, at the budget's δ: Laplace ε
    add up, Gaussian releases compose in zCDP and convert at what is left of δ, and (ε, δ)
    charges (DP-SGD, from its accountant) add up by basic composition."""
    charges = list(charges)
    pure = math.fsum(c.epsilon for c in charges if c.mechanism in ("laplace", "dpsgd"))  # fsum: 10 × 0.1 is 1.0
    approx_delta = math.fsum(c.delta for c in charges if c.mechanism == "dpsgd")
    rho = math.fsum(c.rho for c in charges if c.mechanism == "gaussian")
    if rho <= 0:
        return pure, approx_delta
    left = delta - approx_delta
    if left <= 0:
        return math.inf, delta + approx_delta
    return pure + rho_to_approx(rho, left), delta


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
