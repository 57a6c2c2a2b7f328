"""Additive secret sharing over Z_2^64 among n ≥ 2 parties: x = Σ x_i (mod 2^64).

Every n-1 shares are uniform and independent of x; only all n together reveal it. The
first n-1 shares are PRG expansions of fresh seeds, so a dealer can hand those parties a
seed each and send a full tensor to the last one only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from protocol.mpc.ring import expand, fresh_seed


def share(secret: torch.Tensor, n: int, seed: Callable[[], bytes] = fresh_seed) -> list[torch.Tensor]:
    """Split a ring tensor into ``n`` additive shares."""
    shares, _ = share_seeded(secret, n, seed)
    return shares


def share_seeded(secret: torch.Tensor, n: int, seed: Callable[[], bytes] = fresh_seed
                 ) -> tuple[list[torch.Tensor], list[bytes]]:
    """Shares, and the seeds that the first n-1 of them expand from."""
    if n < 2:
        raise ValueError(f"secret sharing needs at least 2 parties, not {n}")
    if secret.dtype != torch.int64:
        raise TypeError(f"shares live in the ring (int64), not {secret.dtype}: encode first")
    seeds = [seed() for _ in range(n - 1)]
    shares = [expand(s, secret.shape) for s in seeds]
    last = secret.clone()
    for s in shares:
        last -= s  # wraps modulo 2^64
    return [*shares, last], seeds


def reconstruct(shares: Sequence[torch.Tensor]) -> torch.Tensor:
    total = shares[0].clone()
    for s in shares[1:]:
        total += s
    return total
