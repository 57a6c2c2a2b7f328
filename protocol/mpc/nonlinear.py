"""Truncation, comparison and ReLU on additive shares, secure in the dealer model and exact
for any number of parties (no probabilistic wrap-around error: PySyft 0.2's local
truncation was only right for 2 parties, its issue #2706).

All three rest on one idea: open x masked by a dealer mask r (c = x + r reveals nothing,
r being uniform), then undo the mask with a comparison of the *public* c against r, whose
bits the dealer shared by XOR. The comparison is a binary circuit on bit-packed int64
words, one AND a level (Beaver AND triples), then one round converts its XOR-shared bit
into additive shares (B2A with a dealer bit shared both ways).

**Comparison** ``greater_than_public`` — [r > c] for public c, XOR-shared r (unsigned):
    g = r ∧ ¬c ("r wins at this bit"), e = ¬(r ⊕ c) ("tie at this bit"); both local.
    Combine neighbouring blocks, high block over low: (G, E) = (G_hi ⊕ E_hi·G_lo, E_hi·E_lo)
    (⊕ is OR here: a block cannot both win and tie). Six levels for 64 bits; the two ANDs
    of a level go in one round. Rounds: 6.
**B2A** — open t = b ⊕ s for the dealer's bit s; then [b] = t + [s] - 2t[s]. Rounds: 1.
**Truncation** of x (|x| < 2^62) by f bits, result ⌊x / 2^f⌋ exactly:
    1. open c = x + 2^62 + r (the offset makes x + 2^62 a non-negative 63-bit value);
    2. w = [c < r] (the masking wrapped mod 2^64) and β = [c mod 2^f < r mod 2^f] (the low
       bits borrowed), two comparisons stacked in the same 6 rounds, then B2A (1 round);
    3. ⌊(x + 2^62)/2^f⌋ = ⌊c/2^f⌋ - ⌊r/2^f⌋ - β + 2^(64-f)·w, from which each party's share
       follows locally (the dealer shared ⌊r/2^f⌋); subtract 2^(62-f). Rounds: 8.
**ReLU** of x (any int64), as x · [x ≥ 0]:
    1. open c = x + r;
    2. the sign bit of x = c - r is c₆₃ ⊕ r₆₃ ⊕ [c mod 2^63 < r mod 2^63] (the borrow into
       bit 63): one comparison over 63 bits (6 rounds), then B2A of ¬sign (1 round);
    3. a Beaver product of x with that bit (1 round; the bit has scale 1, so no truncation).
    Rounds: 9.

Fixed-point error: a product of encodings x̃ = round(x·2^f), ỹ truncated this way decodes
to xy within (|x| + |y|)·2^-(f+1) + 2^-(2f+2) + 2^-f (encoding rounding, then the floor),
as long as |xy| < 2^(62-2f) (2^30 for f = 16). Comparison and ReLU are exact.
"""

from __future__ import annotations

import torch

from protocol.mpc.beaver import Open, PartyProtocol, beaver
from protocol.mpc.dealer import LEVELS, Material
from protocol.mpc.ring import RING_BITS, logical_rshift, low_bits, ring

OFFSET_BITS = RING_BITS - 2  # truncation's offset 2^62: inputs must stay below it in magnitude


def and_bits(i: int, x: torch.Tensor, y: torch.Tensor, t: Material, prefix: str) -> PartyProtocol:
    """x ∧ y on XOR shares (a Beaver triple over GF(2), 64 bits a word at once): 1 round."""
    a, b, c = t[prefix + "a"], t[prefix + "b"], t[prefix + "c"]
    e, d = yield Open([x ^ a, y ^ b], xor=True)
    z = c ^ (e & b) ^ (d & a)
    return z ^ (e & d) if i == 0 else z


def greater_than_public(i: int, public: torch.Tensor, bits: torch.Tensor, t: Material) -> PartyProtocol:
    """XOR shares (in bit 0) of [r > c] for public words c and XOR-shared words r: 6 rounds."""
    g = bits & ~public
    e = bits ^ ~public if i == 0 else bits
    for level in range(LEVELS):
        step = 1 << level
        # bits at position p combine with the block above them, at p + step; >> brings it down
        both = yield from and_bits(i, torch.stack([e >> step, e >> step]), torch.stack([g, e]), t, f"and{level}.")
        g, e = (g >> step) ^ both[0], both[1]
    return g & 1


def b2a(i: int, bit: torch.Tensor, t: Material) -> PartyProtocol:
    """Additive shares of a bit held as XOR shares in bit 0: 1 round."""
    (opened,) = yield Open([(bit ^ t["bit.x"]) & 1], xor=True)
    share = t["bit.a"] * (1 - 2 * opened)
    return share + opened if i == 0 else share


def truncate(i: int, x: torch.Tensor, t: Material, frac_bits: int) -> PartyProtocol:
    """Shares of ⌊x / 2^f⌋, exactly, for |x| < 2^62: 8 rounds (see the module docstring)."""
    (c,) = yield Open([x + t["r"] + (1 << OFFSET_BITS if i == 0 else 0)])
    low = low_bits(frac_bits)
    compared = yield from greater_than_public(
        i, torch.stack([c, c & low]), torch.stack([t["r.bits"], t["r.bits"] & low]), t)
    bits = yield from b2a(i, compared, t)
    wrapped, borrowed = bits[0], bits[1]
    y = ring(1 << (RING_BITS - frac_bits)) * wrapped - borrowed - t["r.high"]
    return y + logical_rshift(c, frac_bits) - (1 << (OFFSET_BITS - frac_bits)) if i == 0 else y


def non_negative(i: int, x: torch.Tensor, t: Material) -> PartyProtocol:
    """Additive shares of the bit [x ≥ 0]: 8 rounds."""
    (c,) = yield Open([x + t["r"]])
    low = low_bits(RING_BITS - 1)
    borrow = yield from greater_than_public(i, (c & low)[None], (t["r.bits"] & low)[None], t)
    sign = borrow[0] ^ logical_rshift(t["r.bits"], RING_BITS - 1)
    if i == 0:
        sign = sign ^ logical_rshift(c, RING_BITS - 1) ^ 1  # party 0 adds the public c₆₃, and negates
    bit = yield from b2a(i, sign[None], t)
    return bit[0]


def relu(i: int, x: torch.Tensor, t: Material) -> PartyProtocol:
    """Shares of max(x, 0): 9 rounds."""
    keep = yield from non_negative(i, x, t)
    return (yield from beaver(i, x, keep, t, prefix="mul."))

