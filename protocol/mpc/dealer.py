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
* ``trunc``   r, r.high = r >> f and r.top = r >> 63 (r's top bit), all additive
* ``relu``    r, r.bits (XOR), comparison material, and a mul triple ``mul.a/b/c``
* comparison material: AND triples ``and<k>.a/b/c`` (XOR, a common operand a) for the 6
  levels of the comparison circuit, and random bits ``bit.x`` (XOR, packed 64 a word) /
  ``bit.a`` (additive, one per element) for B2A.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import reduce

import torch

from protocol.mpc.bits import LEVELS, WORD, level_words, padded, unpack_bits
from protocol.mpc.ring import RING_BITS, expand, fresh_seed, logical_rshift

Material = Mapping[str, torch.Tensor]
Shape = tuple[int, ...]


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
        """Material for truncating a tensor of ``shape`` by ``frac_bits`` bits: a mask r, and
        shares of its high part r >> f and of its top bit."""
        bundle = self._bundle()
        r = bundle.random("r", shape)
        bundle.shared("r.high", logical_rshift(r, frac_bits))
        bundle.shared("r.top", logical_rshift(r, RING_BITS - 1))
        return bundle.parts()

    def relu(self, shape: Shape) -> list[Part]:
        """Material for ReLU of a tensor of ``shape``: a mask r shared additively and bitwise,
        the comparison's AND triples and B2A bits, then a triple for x · [x ≥ 0]."""
        bundle = self._bundle()
        r = bundle.random("r", shape)
        bundle.shared("r.bits", r, xor=True)
        _comparisons(bundle, math.prod(shape))
        _triple(bundle, "mul.", shape, shape, "mul")
        return bundle.parts()


def _triple(bundle: _Bundle, prefix: str, shape_a: Shape, shape_b: Shape, op: str) -> None:
    a = bundle.random(prefix + "a", shape_a)
    b = bundle.random(prefix + "b", shape_b)
    c = a * b if op == "mul" else a @ b if op == "matmul" else None
    if c is None:
        raise ValueError(f"a triple is for 'mul' or 'matmul', not {op!r}")
    bundle.shared(prefix + "c", c)


def _comparisons(bundle: _Bundle, count: int) -> None:
    """For each level of the comparison tree, an AND triple with a common operand (two ANDs
    a level, one on the last) on that level's words; and random bits, packed for the XOR
    side and one per element for the additive side, to convert the results (B2A)."""
    for level, words in enumerate(level_words(count)):
        rights = 1 if level == LEVELS - 1 else 2
        a = bundle.random(f"and{level}.a", (words,), xor=True)
        b = bundle.random(f"and{level}.b", (rights, words), xor=True)
        bundle.shared(f"and{level}.c", a & b, xor=True)
    bits = bundle.random("bit.x", (padded(count) // WORD,), xor=True)
    bundle.shared("bit.a", unpack_bits(bits, count))
