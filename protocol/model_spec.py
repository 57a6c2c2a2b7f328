"""A model's structure as it travels: layers by qualified name and the traced graph that
calls them (:class:`ModelSpec`). Schemas only, without torch, so that the processes that
only carry or check messages (the gateway, the CLI) need not load it; describing a torch
module and rebuilding one is :mod:`protocol.model`'s."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_NODES = 512

Scalar = int | float | bool | str | None


class NodeRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    node: Annotated[str, Field(max_length=128)]


Leaf = Annotated[NodeRef | Scalar, Field(union_mode="left_to_right")]
Arg = Annotated[Leaf | list[Leaf | list[Leaf]], Field(union_mode="left_to_right")]  # torch.cat([a, b]), (2, 2)


class GraphNode(BaseModel):
    """One step of the traced forward: an input, a layer call, a function or method call."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Annotated[str, Field(max_length=128)]
    op: Literal["placeholder", "call_module", "call_function", "call_method", "output"]
    target: Annotated[str, Field(max_length=128)]
    args: Annotated[list[Arg], Field(max_length=16)] = []
    kwargs: Annotated[dict[str, Arg], Field(max_length=16)] = {}


class LayerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Annotated[str, Field(max_length=32)]
    kwargs: Annotated[dict[str, Scalar | list[int]], Field(max_length=16)] = {}


class ModelSpec(BaseModel):
    """A model's structure: layers by qualified name, and the graph that calls them."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    layers: Annotated[dict[str, LayerSpec], Field(max_length=MAX_NODES)]
    graph: Annotated[list[GraphNode], Field(min_length=2, max_length=MAX_NODES)]
