"""Truncation, comparison and ReLU on additive shares, secure in the dealer model and
correct for any number of parties (PySyft 0.2's local truncation was only right for 2
parties, its issue #2706).

Each opens x masked by a dealer mask r (c = x + r reveals nothing, r being uniform) and
undoes the mask with facts about r that the dealer shared.

**Truncation** of x by f bits, for |x| < 2^62, in 1 round:
    1. open c = x + 2^62 + r; x' = x + 2^62 lies in [0, 2^63), so its top bit is 0;
    2. then x' + r wrapped past 2^64 exactly when r's top bit is 1 and c's is 0:
       w = r₆₃ · (1 - c₆₃), linear in the dealer's shares of r₆₃ (no comparison needed);
    3. ⌊c/2^f⌋ - ⌊r/2^f⌋ + 2^(64-f)·w = ⌊x'/2^f⌋ + β, where β ∈ {0, 1} is the borrow of the
       low f bits, c mod 2^f < r mod 2^f; each party's share follows locally (the dealer
       shared ⌊r/2^f⌋); subtract 2^(62-f).
    The result is ⌊x/2^f⌋ or ⌊x/2^f⌋ + 1: off by at most one unit in the last place, never
    by a wrap-around (no failure probability, unlike probabilistic truncation). Making it
    an exact floor would cost a comparison of the low f bits (7 more rounds): not worth 2^-f.

**Comparison** ``greater_than_public`` — [r > c] for public c and XOR-shared r (unsigned):
    g = r ∧ ¬c ("r wins at this bit"), e = ¬(r ⊕ c) ("tie at this bit"); both local.
    Each level combines neighbouring bits, the high one over the low one:
    (G, E) = (G_hi ⊕ E_hi·G_lo, E_hi·E_lo) (⊕ is OR here: a block cannot both win and tie),
    two ANDs with a common operand, so one Beaver AND triple (a, b₁, b₂) opens 3 words per
    word of input, not 4. Results are then compacted (:mod:`protocol.mpc.bits`): each
    level works on half as many words as the one before. 6 levels for 64 bits: 6 rounds,
    and about 6 words opened per element in all.
**B2A** — open t = b ⊕ s for the dealer's bits s (64 to a word); then, per element,
    [b] = t + [s] - 2t[s] with the dealer's additive shares of s. 1 round.
**ReLU** of x (any int64), as x · [x ≥ 0], in 9 rounds:
    1. open c = x + r;
    2. x's sign bit is c₆₃ ⊕ r₆₃ ⊕ [c mod 2^63 < r mod 2^63] (the borrow into bit 63): one
       comparison over the low 63 bits (6 rounds), then B2A of the negated sign (1 round);
    3. a Beaver product of x with that bit (1 round; the bit has scale 1: no truncation).

Fixed-point error: a product of encodings x̃ = round(x·2^f), ỹ decodes, after truncation,
to xy within (|x| + |y|)·2^-(f+1) + 2^-(2f+2) + 2^-f, as long as |xy| < 2^(62-2f) (2^30
for f = 16). Comparison and ReLU are exact.
"""

from __future__ import annotations

import torch

from protocol.mpc.beaver import Open, PartyProtocol, beaver
from protocol.mpc.bits import LEVELS, WORD, compact_even, padded, pair, unpack_bits
from protocol.mpc.dealer import Material
from protocol.mpc.ring import RING_BITS, logical_rshift, low_bits, ring

OFFSET_BITS = RING_BITS - 2  # truncation's offset 2^62: inputs must stay below it in magnitude


def and_common(i: int, left: torch.Tensor, rights: torch.Tensor, t: Material, prefix: str) -> PartyProtocol:
    """left ∧ rights[k] for each k, on XOR shares, 64 bits a word: 1 round. The dealer's
    triple (a, b, c = a ∧ b) has one ``a`` for the common operand."""
    a, b, c = t[prefix + "a"], t[prefix + "b"], t[prefix + "c"]
    e, d = yield Open([left ^ a, rights ^ b], xor=True)
    z = c ^ (e & b) ^ (d & a)
    return z ^ (e & d) if i == 0 else z


def greater_than_public(i: int, public: torch.Tensor, bits: torch.Tensor, t: Material) -> PartyProtocol:
    """XOR shares of [r > c], element by element, for public words c and XOR-shared words r
    (flattened): packed 64 results a word (:func:`~protocol.mpc.bits.unpack_bits`). 6 rounds."""
    pad = padded(public.numel()) - public.numel()
    c = torch.cat([public.reshape(-1), public.new_zeros(pad)])
    r = torch.cat([bits.reshape(-1), bits.new_zeros(pad)])
    g = r & ~c
    e = r ^ ~c if i == 0 else r
    for level in range(LEVELS):
        last = level == LEVELS - 1
        # bit p combines with the block above it, at p + 1: >> 1 brings that one down
        both = yield from and_common(i, e >> 1, g[None] if last else torch.stack([g, e]), t, f"and{level}.")
        g = pair(compact_even((g >> 1) ^ both[0]))
        if not last:
            e = pair(compact_even(both[1]))
    return g


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bits (0/1 int64, flattened) into words, 64 a word: XOR-linear, like everything here."""
    flat = bits.reshape(-1)
    flat = torch.cat([flat, flat.new_zeros(padded(flat.numel()) - flat.numel())])
    return (flat.reshape(-1, WORD) << torch.arange(WORD)).sum(dim=1)  # disjoint bits: sum is XOR


def b2a(i: int, words: torch.Tensor, count: int, t: Material) -> PartyProtocol:
    """Additive shares of ``count`` bits held XOR-shared in packed words: 1 round."""
    (opened,) = yield Open([words ^ t["bit.x"]], xor=True)
    bits = unpack_bits(opened, count)
    share = t["bit.a"] * (1 - 2 * bits)
    return share + bits if i == 0 else share


def truncate(i: int, x: torch.Tensor, t: Material, frac_bits: int) -> PartyProtocol:
    """Shares of ⌊x / 2^f⌋ (+1 at most), for |x| < 2^62: 1 round (see the module docstring)."""
    (c,) = yield Open([x + t["r"] + (1 << OFFSET_BITS if i == 0 else 0)])
    wrapped = t["r.top"] * (1 - logical_rshift(c, RING_BITS - 1))
    y = ring(1 << (RING_BITS - frac_bits)) * wrapped - t["r.high"]
    return y + logical_rshift(c, frac_bits) - (1 << (OFFSET_BITS - frac_bits)) if i == 0 else y


def non_negative(i: int, x: torch.Tensor, t: Material) -> PartyProtocol:
    """Additive shares of the bit [x ≥ 0], elementwise: 8 rounds."""
    (c,) = yield Open([x + t["r"]])
    low = low_bits(RING_BITS - 1)
    borrow = yield from greater_than_public(i, c & low, t["r.bits"] & low, t)
    sign = borrow ^ pack_bits(logical_rshift(t["r.bits"], RING_BITS - 1))
    if i == 0:  # party 0 adds the public c₆₃, and negates
        sign = sign ^ pack_bits(logical_rshift(c, RING_BITS - 1) ^ 1)
    bit = yield from b2a(i, sign, x.numel(), t)
    return bit.reshape(x.shape)


def relu(i: int, x: torch.Tensor, t: Material) -> PartyProtocol:
    """Shares of max(x, 0): 9 rounds."""
    keep = yield from non_negative(i, x, t)
    return (yield from beaver(i, x, keep, t, prefix="mul."))
