"""The dealer (crypto provider): correlated randomness for Beaver multiplication.

For x · y the dealer draws a, b uniformly from the ring, computes c = a · b (or a @ b for a
matrix product) and shares the three among the parties. It never sees an input or a
weight: its material is independent of them. Parties 0..n-2 receive *seeds* (three 32-byte
seeds each) and expand their shares themselves; only the last party receives full tensors
(CrypTen's trusted third party saves traffic the same way).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from protocol.mpc.ring import expand, fresh_seed
from protocol.mpc.sharing import share_seeded


@dataclass(frozen=True)
class TripleShare:
    """One party's share of a Beaver triple: c = a · b (elementwise) or a @ b."""

    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor


@dataclass(frozen=True)
class SeededTriple:
    """A party's share of a triple as three seeds: what travels to parties 0..n-2."""

    seeds: tuple[bytes, bytes, bytes]
    shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

    def expand(self) -> TripleShare:
        a, b, c = (expand(s, shape) for s, shape in zip(self.seeds, self.shapes, strict=True))
        return TripleShare(a, b, c)


def materialize(part: TripleShare | SeededTriple) -> TripleShare:
    return part.expand() if isinstance(part, SeededTriple) else part


class Dealer:
    """Makes triples for ``n`` parties from its own randomness (an argument, for tests)."""

    def __init__(self, n: int, seed: Callable[[], bytes] = fresh_seed) -> None:
        if n < 2:
            raise ValueError(f"MPC needs at least 2 parties, not {n}")
        self.n = n
        self.seed = seed

    def triple(self, shape_a: tuple[int, ...], shape_b: tuple[int, ...], op: str = "mul"
               ) -> list[TripleShare | SeededTriple]:
        """Triple shares for ``op`` ("mul": elementwise, broadcasting; "matmul")."""
        a, b = expand(self.seed(), shape_a), expand(self.seed(), shape_b)
        c = a * b if op == "mul" else a @ b
        parts = [share_seeded(t, self.n, self.seed) for t in (a, b, c)]
        out: list[TripleShare | SeededTriple] = []
        for i in range(self.n - 1):
            seeds = (parts[0][1][i], parts[1][1][i], parts[2][1][i])
            out.append(SeededTriple(seeds, (tuple(a.shape), tuple(b.shape), tuple(c.shape))))
        out.append(TripleShare(parts[0][0][-1], parts[1][0][-1], parts[2][0][-1]))
        return out
