"""The dealer (crypto provider): correlated randomness that is independent of every input
and weight, so the dealer learns nothing however many bundles it deals.

A bundle is a set of named tensors, each shared among n parties additively (mod 2^64) or
by XOR (bitwise, for the binary circuits of comparison). Party i's part of every tensor
that can be random expands from one 32-byte seed (``expand(seed_i, shape, name)``); the
tensors that must satisfy a relation (c = a · b, the bits of r, ...) are random for
parties 0..n-2 and corrected in full for the last party only. So n-1 parties receive one
seed per bundle and the last one the corrections: CrypTen's trusted third party saves
traffic the same way.

What each bundle holds (names are what the protocols read):

* ``triple``  a, b, c = a·b or a@b                       — Beaver multiplication
* ``trunc``   r, r.bits (XOR), r.high = r >> f, and the comparison material below
* ``relu``    r, r.bits (XOR), comparison material, and a mul triple ``mul.a/b/c``
* comparison material: AND triples ``and<k>.a/b/c`` (XOR) for the 6 levels of the
  comparison circuit, and random bits ``bit.x`` (XOR) / ``bit.a`` (additive) for B2A.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import reduce

import torch

from protocol.mpc.ring import RING_BITS, expand, fresh_seed, logical_rshift

Material = Mapping[str, torch.Tensor]
Shape = tuple[int, ...]
LEVELS = RING_BITS.bit_length() - 1  # 6: a comparison of 64-bit words is a tree of depth log2(64)


@dataclass(frozen=True)
class Part:
    """One party's part of a bundle: a seed its random tensors expand from, plus the
    corrections that cannot be random (non-empty for the last party only)."""

    seed: bytes
    shapes: Mapping[str, Shape]
    fixed: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def materialize(self) -> dict[str, torch.Tensor]:
        out = {name: expand(self.seed, shape, name) for name, shape in self.shapes.items()}
        out.update(self.fixed)
        return out

    @property
    def nbytes(self) -> int:
        return len(self.seed) + sum(t.numel() * t.element_size() for t in self.fixed.values())


class _Bundle:
    def __init__(self, n: int, seed: Callable[[], bytes]) -> None:
        self.n = n
        self.seeds = [seed() for _ in range(n)]
        self.shapes: list[dict[str, Shape]] = [{} for _ in range(n)]
        self.fixed: dict[str, torch.Tensor] = {}

    def _draw(self, i: int, name: str, shape: Shape) -> torch.Tensor:
        self.shapes[i][name] = shape
        return expand(self.seeds[i], shape, name)

    def random(self, name: str, shape: Shape, xor: bool = False) -> torch.Tensor:
        """A uniform secret that every party's seed contributes to; returns it."""
        draws = [self._draw(i, name, shape) for i in range(self.n)]
        return reduce(operator.xor if xor else operator.add, draws)

    def shared(self, name: str, value: torch.Tensor, xor: bool = False) -> None:
        """Shares of a given value: random for parties 0..n-2, the correction for the last."""
        shape = tuple(value.shape)
        draws = [self._draw(i, name, shape) for i in range(self.n - 1)]
        self.fixed[name] = reduce(operator.xor, draws, value) if xor else value - sum(draws, torch.zeros_like(value))

    def parts(self) -> list[Part]:
        last = self.n - 1
        return [Part(self.seeds[i], self.shapes[i], self.fixed if i == last else {}) for i in range(self.n)]


class Dealer:
    """Deals bundles for ``n`` parties from its own randomness (``seed``, an argument so
    tests can fix it). One call, one bundle: a bundle is used once."""

    def __init__(self, n: int, seed: Callable[[], bytes] = fresh_seed) -> None:
        if n < 2:
            raise ValueError(f"MPC needs at least 2 parties, not {n}")
        self.n = n
        self.seed = seed

    def _bundle(self) -> _Bundle:
        return _Bundle(self.n, self.seed)

    def triple(self, shape_a: Shape, shape_b: Shape, op: str = "mul") -> list[Part]:
        """Beaver triple for ``op``: "mul" (elementwise, broadcasting) or "matmul"."""
        bundle = self._bundle()
        _triple(bundle, "", shape_a, shape_b, op)
        return bundle.parts()

    def trunc(self, shape: Shape, frac_bits: int) -> list[Part]:
        """Material for exact truncation of a tensor of ``shape`` by ``frac_bits`` bits."""
        bundle = self._bundle()
        r = _mask(bundle, shape)
        bundle.shared("r.high", logical_rshift(r, frac_bits))
        _comparisons(bundle, (2, *shape))  # x + r wrapped? and did the low f bits borrow?
        return bundle.parts()

    def relu(self, shape: Shape) -> list[Part]:
        """Material for ReLU of a tensor of ``shape``: the sign test, then x · [x ≥ 0]."""
        bundle = self._bundle()
        _mask(bundle, shape)
        _comparisons(bundle, (1, *shape))
        _triple(bundle, "mul.", shape, shape, "mul")
        return bundle.parts()


def _triple(bundle: _Bundle, prefix: str, shape_a: Shape, shape_b: Shape, op: str, xor: bool = False) -> None:
    a = bundle.random(prefix + "a", shape_a, xor)
    b = bundle.random(prefix + "b", shape_b, xor)
    c = a & b if xor else a * b if op == "mul" else a @ b if op == "matmul" else None
    if c is None:
        raise ValueError(f"a triple is for 'mul' or 'matmul', not {op!r}")
    bundle.shared(prefix + "c", c, xor)


def _mask(bundle: _Bundle, shape: Shape) -> torch.Tensor:
    """A uniform mask r, shared additively (to mask x) and bitwise (to compare with it)."""
    r = bundle.random("r", shape)
    bundle.shared("r.bits", r, xor=True)
    return r


def _comparisons(bundle: _Bundle, shape: Shape) -> None:
    """AND triples for each level of the comparison tree (two ANDs a level, stacked) and a
    random bit per comparison for converting its XOR-shared result to additive shares."""
    for level in range(LEVELS):
        _triple(bundle, f"and{level}.", (2, *shape), (2, *shape), "and", xor=True)
    bit = bundle.random("bit.x", shape, xor=True) & 1
    bundle.shared("bit.a", bit)
