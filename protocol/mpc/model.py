"""Private inference of a model made of Linear and ReLU layers, on shares.

The :class:`ModelPlan` (layer structure, no numbers) is public to the parties; weights and
bias are shared among them, encoded in fixed point, the weight stored transposed so a
layer is ``x @ Wᵀ + b``. A query's input arrives shared; each party runs :func:`infer`,
whose output share goes to the querier only. Per layer:

* Linear — Beaver matrix product (1 round), exact truncation (8 rounds), add the bias share;
* ReLU — 9 rounds (:mod:`protocol.mpc.nonlinear`).

:func:`material_needed` lists the dealer bundles a query uses, in order, so the crypto
provider can deal (or pre-deal) them without seeing anything but shapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from protocol.mpc.beaver import PartyProtocol, beaver
from protocol.mpc.dealer import Dealer, Material, Part, Shape
from protocol.mpc.nonlinear import relu, truncate
from protocol.mpc.ring import FixedPoint

MAX_LAYERS = 64
MAX_FEATURES = 1 << 16


class Layer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["linear", "relu"]
    in_features: int = Field(0, ge=0, le=MAX_FEATURES)
    out_features: int = Field(0, ge=0, le=MAX_FEATURES)


class Need(BaseModel):
    """One dealer bundle: what for, and for which shapes (all the dealer ever learns)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["matmul", "trunc", "relu"]
    shape: tuple[int, ...] = Field(max_length=4)
    other: tuple[int, ...] = Field((), max_length=4)  # matmul: the right operand's shape

    def deal(self, dealer: Dealer, frac_bits: int) -> list[Part]:
        if self.kind == "matmul":
            return dealer.triple(self.shape, self.other, "matmul")
        if self.kind == "trunc":
            return dealer.trunc(self.shape, frac_bits)
        return dealer.relu(self.shape)


class ModelPlan(BaseModel):
    """A served model's structure: what every party and the host know of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: tuple[Layer, ...] = Field(min_length=1, max_length=MAX_LAYERS)
    frac_bits: int = Field(16, ge=8, le=24)

    @property
    def in_features(self) -> int:
        return next(layer.in_features for layer in self.layers if layer.kind == "linear")

    @property
    def out_features(self) -> int:
        return [layer.out_features for layer in self.layers if layer.kind == "linear"][-1]

    def parameter_names(self) -> list[str]:
        return [f"{k}.{p}" for k, layer in enumerate(self.layers) if layer.kind == "linear" for p in ("weight", "bias")]

    def check(self) -> None:
        """Layers chain (each Linear takes what the previous one gives) and start with a Linear."""
        if self.layers[0].kind != "linear":
            raise ValueError("a served model starts with a Linear layer")
        width = self.layers[0].in_features
        for k, layer in enumerate(self.layers):
            if layer.kind == "linear":
                if layer.in_features != width or min(layer.in_features, layer.out_features) < 1:
                    raise ValueError(f"layer {k}: Linear({layer.in_features}, {layer.out_features}) does not "
                                     f"follow a layer of width {width}")
                width = layer.out_features

    def material_needed(self, batch: int) -> list[Need]:
        needs: list[Need] = []
        for layer in self.layers:
            out = (batch, layer.out_features)
            if layer.kind == "linear":
                needs += [Need(kind="matmul", shape=(batch, layer.in_features),
                               other=(layer.in_features, layer.out_features)),
                          Need(kind="trunc", shape=out)]
            else:
                needs.append(Need(kind="relu", shape=needs[-1].shape))
        return needs


def encode_parameters(plan: ModelPlan, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ring encodings of a model's parameters as the parties store them (weights transposed)."""
    fp = FixedPoint(plan.frac_bits)
    return {name: fp.encode(params[name].T.contiguous() if name.endswith("weight") else params[name])
            for name in plan.parameter_names()}


def infer(i: int, plan: ModelPlan, params: dict[str, torch.Tensor], x: torch.Tensor,
          materials: Iterator[Material]) -> PartyProtocol:
    """Party i's side of a private forward pass of ``x`` (its share, batch × in_features)."""
    h = x
    for k, layer in enumerate(plan.layers):
        if layer.kind == "linear":
            h = yield from beaver(i, h, params[f"{k}.weight"], next(materials), torch.matmul)
            h = yield from truncate(i, h, next(materials), plan.frac_bits)
            h = h + params[f"{k}.bias"]
        else:
            h = yield from relu(i, h, next(materials))
    return h


def shapes_of(plan: ModelPlan) -> dict[str, Shape]:
    """The shape of each stored (encoded, transposed) parameter."""
    out: dict[str, Shape] = {}
    for k, layer in enumerate(plan.layers):
        if layer.kind == "linear":
            out[f"{k}.weight"] = (layer.in_features, layer.out_features)
            out[f"{k}.bias"] = (layer.out_features,)
    return out
