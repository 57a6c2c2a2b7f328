"""The ring Z_2^64, held in ``torch.int64`` (whose arithmetic wraps modulo 2^64), fixed-point
encoding into it, and the PRG that expands a short seed into ring elements.

    >>> fp = FixedPoint(frac_bits=16)
    >>> fp.decode(fp.encode(torch.tensor([1.5, -2.25]))).tolist()
    [1.5, -2.25]

Encoding rounds to the nearest multiple of 2^-f, so |decode(encode(x)) - x| ≤ 2^-(f+1).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch

RING_BITS = 64


@dataclass(frozen=True)
class FixedPoint:
    """Reals as ring elements: x ↦ round(x · 2^f). |x| must stay below 2^(63-f)."""

    frac_bits: int = 16

    @property
    def scale(self) -> int:
        return 1 << self.frac_bits

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        scaled = torch.round(x.to(torch.float64) * self.scale)
        limit = float(2 ** (RING_BITS - 1))
        if scaled.numel() and scaled.abs().max().item() >= limit:
            raise ValueError(f"values up to {scaled.abs().max().item() / self.scale:g} do not fit in "
                             f"{RING_BITS}-bit fixed point with {self.frac_bits} fractional bits")
        return scaled.to(torch.int64)

    def decode(self, v: torch.Tensor, scale_power: int = 1) -> torch.Tensor:
        """Back to reals; ``scale_power=2`` for an untruncated product (scale 2^2f)."""
        return v.to(torch.float64) / float(self.scale) ** scale_power


def fresh_seed() -> bytes:
    """32 bytes from the operating system's CSPRNG: a seed nobody else can predict."""
    return os.urandom(32)


def expand(seed: bytes, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Uniform ring elements of ``shape`` from ``seed`` (SHAKE-256 as the PRG): sending a
    32-byte seed instead of the tensor it expands to is how the dealer saves traffic."""
    count = 1
    for d in shape:
        count *= int(d)
    data = bytearray(hashlib.shake_256(seed).digest(8 * count)) if count else bytearray()
    return torch.frombuffer(data, dtype=torch.int64).reshape(tuple(shape)) if count else \
        torch.zeros(tuple(shape), dtype=torch.int64)
