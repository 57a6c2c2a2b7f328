"""The pure math of secure multi-party computation (no I/O): fixed-point encoding over the
ring Z_2^64, additive secret sharing among n ≥ 2 parties, and Beaver multiplication from a
dealer's correlated randomness. The channel and the randomness are arguments, never
globals, so every protocol runs in one process in tests and across workers in production.
"""

from protocol.mpc.beaver import Channel, LocalChannel, matmul, mul
from protocol.mpc.dealer import Dealer, TripleShare
from protocol.mpc.ring import FixedPoint, expand, fresh_seed
from protocol.mpc.sharing import reconstruct, share

__all__ = ["Channel", "Dealer", "FixedPoint", "LocalChannel", "TripleShare", "expand", "fresh_seed", "matmul",
           "mul", "reconstruct", "share"]
