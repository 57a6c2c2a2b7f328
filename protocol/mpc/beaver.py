"""Beaver multiplication of secret-shared ring tensors, for n ≥ 2 parties.

Protocol (one round), with a dealer triple ([a], [b], [c]), c = a · b:

1. each party i masks its shares: e_i = x_i - a_i, d_i = y_i - b_i;
2. the masked values are opened: e = Σ e_i = x - a, d = Σ d_i = y - b (a and b are uniform,
   so e and d reveal nothing about x and y);
3. each party computes z_i = c_i + e · b_i + a_i · d, and party 0 adds e · d.

Then Σ z_i = c + e·b + a·d + e·d = (e + a)(d + b) = x · y. For a matrix product the same
steps hold with @ in place of ·, keeping the operands' order. The product of two encoded
fixed-point values carries scale 2^2f: truncation brings it back (see issue 4's next part).

A :class:`Channel` opens values: :class:`LocalChannel` sums in this process (tests, the
simulation); the MPC pool's coordinator does the same over the broker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from protocol.mpc.dealer import TripleShare


class Channel(Protocol):
    def open(self, parts: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """One round: each party sends its parts of some values; all learn each value's sum.
        ``parts[i][k]`` is party i's part of value k."""
        ...


class LocalChannel:
    """All parties in one process; counts the rounds a protocol takes."""

    def __init__(self) -> None:
        self.rounds = 0

    def open(self, parts: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        self.rounds += 1
        totals = [p.clone() for p in parts[0]]
        for party in parts[1:]:
            for total, p in zip(totals, party, strict=True):
                total += p
        return totals


Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mask(x_i: torch.Tensor, y_i: torch.Tensor, t: TripleShare) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1 at party i: the masked shares it sends to be opened."""
    return x_i - t.a, y_i - t.b


def combine(i: int, e: torch.Tensor, d: torch.Tensor, t: TripleShare, op: Op) -> torch.Tensor:
    """Step 3 at party i: its share of the product, from the opened e and d."""
    z = t.c + op(e, t.b) + op(t.a, d)
    return z + op(e, d) if i == 0 else z


def _beaver(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor], triples: Sequence[TripleShare],
            channel: Channel, op: Op) -> list[torch.Tensor]:
    if not len(x) == len(y) == len(triples) >= 2:
        raise ValueError("every party needs a share of x, of y and of the triple")
    e, d = channel.open([mask(xi, yi, t) for xi, yi, t in zip(x, y, triples, strict=True)])
    return [combine(i, e, d, t, op) for i, t in enumerate(triples)]


def mul(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor], triples: Sequence[TripleShare],
        channel: Channel) -> list[torch.Tensor]:
    """Shares of x · y (elementwise), one round."""
    return _beaver(x, y, triples, channel, torch.mul)


def matmul(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor], triples: Sequence[TripleShare],
           channel: Channel) -> list[torch.Tensor]:
    """Shares of x @ y, one round."""
    return _beaver(x, y, triples, channel, torch.matmul)
