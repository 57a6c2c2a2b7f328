"""The pure math of secure multi-party computation (no I/O): fixed-point encoding over the
ring Z_2^64, additive secret sharing among n ≥ 2 parties, Beaver multiplication, exact
truncation, comparison and ReLU from a dealer's correlated randomness. The channel and the
randomness are arguments, never globals, so every protocol runs in one process in tests
and across workers in production.
"""

from protocol.mpc.beaver import Channel, LocalChannel, Open, PartyProtocol, matmul, mul, run_local
from protocol.mpc.dealer import Dealer, Material, Part
from protocol.mpc.nonlinear import non_negative, relu, truncate
from protocol.mpc.ring import FixedPoint, expand, fresh_seed
from protocol.mpc.sharing import reconstruct, share

__all__ = ["Channel", "Dealer", "FixedPoint", "LocalChannel", "Material", "Open", "Part", "PartyProtocol",
           "expand", "fresh_seed", "matmul", "mul", "non_negative", "reconstruct", "relu", "run_local", "share",
           "truncate"]
