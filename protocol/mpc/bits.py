"""Bit-packed words for the comparison circuit: 64 bits of XOR-shared data per int64.

Every function here is a fixed permutation or selection of bits, so it commutes with XOR:
applied to each party's XOR share, it yields XOR shares of the result. That is what lets
the circuit shrink its words between levels without a round.

A level of the comparison tree combines each pair of neighbouring bits into one; the
results sit in the even bits. :func:`compact_even` gathers them into the low half of the
word, and :func:`pair` puts two such halves into one word, so the next level has half as
many words. After 6 levels, word w holds the results of elements 64w … 64w+63 in order.
"""

from __future__ import annotations

import torch

from protocol.mpc.ring import RING_BITS, ring

WORD = RING_BITS
LEVELS = WORD.bit_length() - 1  # 6: a 64-bit comparison is a tree of depth log2(64)
_EVEN = ring(0x5555555555555555)
_GATHER = [(1, ring(0x3333333333333333)), (2, ring(0x0F0F0F0F0F0F0F0F)), (4, ring(0x00FF00FF00FF00FF)),
           (8, ring(0x0000FFFF0000FFFF)), (16, ring(0x00000000FFFFFFFF))]


def padded(count: int) -> int:
    """Elements are padded to a multiple of 64, so every level can pair its words."""
    return -(-max(count, 1) // WORD) * WORD


def level_words(count: int) -> list[int]:
    """Words entering each level of the tree for ``count`` elements."""
    return [padded(count) >> level for level in range(LEVELS)]


def compact_even(x: torch.Tensor) -> torch.Tensor:
    """The 32 even bits of each word, in order, in its low 32 bits (the rest zero)."""
    x = x & _EVEN  # bit 63 is now 0, so >> below shifts in zeros
    for shift, mask in _GATHER:
        x = (x ^ (x >> shift)) & mask  # the moved bits land where x has none: ^ is |
    return x


def pair(x: torch.Tensor) -> torch.Tensor:
    """Words holding 32 bits each, two by two into one word: (M,) → (M/2,)."""
    halves = x.reshape(-1, 2)
    return halves[:, 0] ^ (halves[:, 1] << 32)


def unpack_bits(words: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` bits of packed words, as one int64 (0 or 1) per element."""
    bits = (words[:, None] >> torch.arange(WORD)) & 1
    return bits.reshape(-1)[:count]
