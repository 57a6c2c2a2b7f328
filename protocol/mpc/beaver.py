"""How MPC protocols run, and Beaver multiplication for n ≥ 2 parties.

Every protocol is written once, from one party's point of view, as a generator: it yields
an :class:`Open` (its parts of some values to be opened) and receives the opened sums.
:func:`run_local` drives all n parties in one process through a :class:`Channel`
(tests, simulation); the MPC pool drives the very same generators across workers, one per
party, with the coordinator summing what they send. Protocols compose with ``yield from``.

Beaver multiplication (one round), with a dealer triple ([a], [b], [c]), c = a · b:

1. each party i masks its shares: e_i = x_i - a_i, d_i = y_i - b_i;
2. the masked values are opened: e = x - a, d = y - b (a and b are uniform, so e and d
   reveal nothing about x and y);
3. each party computes z_i = c_i + e · b_i + a_i · d, and party 0 adds e · d.

Then Σ z_i = c + e·b + a·d + e·d = (e + a)(d + b) = x · y. For a matrix product the same
steps hold with @ in place of ·, keeping the operands' order. The product of two encoded
fixed-point values carries scale 2^2f: :mod:`protocol.mpc.nonlinear` truncates it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Protocol

import torch

from protocol.mpc.dealer import Material


@dataclass(frozen=True)
class Open:
    """A party's parts of values to open in one round: summed mod 2^64, or XORed."""

    parts: list[torch.Tensor]
    xor: bool = False


PartyProtocol = Generator[Open, list[torch.Tensor], torch.Tensor]


class Channel(Protocol):
    def open(self, parts: Sequence[Sequence[torch.Tensor]], xor: bool = False) -> list[torch.Tensor]:
        """One round: ``parts[i][k]`` is party i's part of value k; every party learns the
        value (the sum of the parts, or their XOR)."""
        ...


def combine_parts(parts: Sequence[Sequence[torch.Tensor]], xor: bool = False) -> list[torch.Tensor]:
    """What opening computes: each value's parts summed (or XORed) over the parties."""
    join = operator.xor if xor else operator.add
    return [reduce(join, column) for column in zip(*parts, strict=True)]


class LocalChannel:
    """All parties in one process; counts the rounds a protocol takes."""

    def __init__(self) -> None:
        self.rounds = 0

    def open(self, parts: Sequence[Sequence[torch.Tensor]], xor: bool = False) -> list[torch.Tensor]:
        self.rounds += 1
        return combine_parts(parts, xor)


def run_local(parties: Sequence[PartyProtocol], channel: Channel) -> list[torch.Tensor]:
    """Drive one protocol instance per party in lockstep; returns each party's output share."""
    requests: list[Open | None] = [next(p) for p in parties]  # protocols open at least once
    results: list[torch.Tensor | None] = [None] * len(parties)
    while True:
        pending = [r for r in requests if r is not None]
        if not pending:
            return [r for r in results if r is not None]
        if len(pending) != len(parties):
            raise RuntimeError("parties fell out of step: one finished while another opens a value")
        opened = channel.open([r.parts for r in pending], pending[0].xor)
        for i, party in enumerate(parties):
            try:
                requests[i] = party.send(opened)
            except StopIteration as done:
                requests[i], results[i] = None, done.value


Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def beaver(i: int, x: torch.Tensor, y: torch.Tensor, t: Material, op: Op = torch.mul, prefix: str = ""
           ) -> PartyProtocol:
    """Party i's side of x ⊙ y, with its part ``t`` of a triple named ``prefix``a/b/c."""
    a, b, c = t[prefix + "a"], t[prefix + "b"], t[prefix + "c"]
    e, d = yield Open([x - a, y - b])
    z = c + op(e, b) + op(a, d)
    return z + op(e, d) if i == 0 else z


def mul(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor], triples: Sequence[Material],
        channel: Channel) -> list[torch.Tensor]:
    """Shares of x · y (elementwise), one round."""
    return run_local([beaver(i, *args) for i, args in enumerate(zip(x, y, triples, strict=True))], channel)


def matmul(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor], triples: Sequence[Material],
           channel: Channel) -> list[torch.Tensor]:
    """Shares of x @ y, one round."""
    return run_local([beaver(i, xi, yi, t, torch.matmul) for i, (xi, yi, t) in
                      enumerate(zip(x, y, triples, strict=True))], channel)
