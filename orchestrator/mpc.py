"""Encrypted ML-as-a-service, the scientist's side: serve a model secret-shared over
several nodes, list served models, and query one privately.

    >>> card = grid.serve(model, name="triage", parties=["hospital", "public"],          # doctest: +SKIP
    ...                   crypto_provider="university", host="company", queriers=["bob"])
    >>> grid.query("triage", x)                                                          # doctest: +SKIP
    tensor([[0.8125, ...]])

``serve`` encodes the parameters in fixed point and splits them into additive shares, one
sealed to each party: no node — host, party or provider — ever holds a weight. ``query``
does the same with the input; the parties' output shares come back sealed to the querier,
who alone reconstructs the result.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from orchestrator.transport import Pending
from protocol.contract import Tasks, mpc_queue
from protocol.errors import (
    BadSignature,
    ForbiddenOperation,
    InvalidRequest,
    NotFound,
    error_from_wire,
)
from protocol.mpc.model import Layer, ModelPlan, encode_parameters
from protocol.mpc.ring import FixedPoint
from protocol.mpc.sharing import reconstruct, share
from protocol.mpc.wire import ModelCard, MpcReply, QueryModel, ServeModel, pack, unpack
from protocol.serving import parse

if TYPE_CHECKING:
    from orchestrator.grid import Grid


def plan_of(model: torch.nn.Module, frac_bits: int = 16) -> tuple[ModelPlan, dict[str, torch.Tensor]]:
    """A model's structure and its parameters (float64), for Linear and ReLU layers (in a
    Sequential, nested or not). Anything else is refused by name: a worker runs only the
    layers it knows."""
    modules = _flatten(model)
    layers: list[Layer] = []
    params: dict[str, torch.Tensor] = {}
    for k, m in enumerate(modules):
        if isinstance(m, torch.nn.Linear):
            layers.append(Layer(kind="linear", in_features=m.in_features, out_features=m.out_features))
            params[f"{k}.weight"] = m.weight.detach().to(torch.float64)
            params[f"{k}.bias"] = (m.bias.detach() if m.bias is not None else torch.zeros(m.out_features)) \
                .to(torch.float64)
        elif isinstance(m, torch.nn.ReLU):
            layers.append(Layer(kind="relu"))
        else:
            raise ForbiddenOperation(f"layer {type(m).__name__} cannot be served encrypted; use Linear and ReLU")
    if not layers:
        raise InvalidRequest("the model has no layers")
    plan = ModelPlan(layers=tuple(layers), frac_bits=frac_bits)
    try:
        plan.check()
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return plan, params


def _flatten(model: torch.nn.Module) -> list[torch.nn.Module]:
    if isinstance(model, torch.nn.Sequential):
        return [leaf for m in model for leaf in _flatten(m)]
    return [model]


def serve(grid: Grid, model: torch.nn.Module, *, name: str, parties: Sequence[str], crypto_provider: str,
          host: str, queriers: Sequence[str] = (), frac_bits: int = 16) -> ModelCard:
    plan, params = plan_of(model, frac_bits)
    card = ModelCard(name=name, owner=grid.identity.name, host=host, parties=list(parties),
                     provider=crypto_provider, queriers=list(queriers), plan=plan)
    encoded = encode_parameters(plan, params)
    split = {k: share(v, len(parties)) for k, v in encoded.items()}
    shares = {p: grid.transport.leave(grid.transport.node_key(p).seal(pack({k: v[i] for k, v in split.items()})))
              for i, p in enumerate(parties)}
    ask(grid, host, Tasks.MPC_SERVE, ServeModel(card=card, shares=shares))
    return card


def models(grid: Grid) -> list[ModelCard]:
    """Served models whose card carries a valid signature of its host."""
    cards = []
    for raw in grid.transport.posted_models():
        try:
            entry = json.loads(raw)
            card = ModelCard.model_validate_json(entry["card"])
            grid.transport.node_key(card.host).verify(entry["card"].encode(), bytes.fromhex(entry["signature"]))
        except (BadSignature, NotFound, ValueError, KeyError, TypeError):
            continue  # malformed, or not signed by the host it names: not a model of this grid
        cards.append(card)
    return sorted(cards, key=lambda c: c.name)


def query(grid: Grid, name: str, x: torch.Tensor) -> torch.Tensor:
    card = next((c for c in models(grid) if c.name == name), None)
    if card is None:
        raise NotFound(f"no served model {name!r}; grid.models() lists them")
    batch = x.reshape(1, -1) if x.dim() == 1 else x
    if batch.dim() != 2 or batch.shape[1] != card.plan.in_features:
        raise InvalidRequest(f"model {name!r} takes inputs of {card.plan.in_features} features, not shape "
                             f"{tuple(x.shape)}")
    fp = FixedPoint(card.plan.frac_bits)
    pieces = share(fp.encode(batch), len(card.parties))
    inputs = {p: grid.transport.leave(grid.transport.node_key(p).seal(pack({"x": s})))
              for p, s in zip(card.parties, pieces, strict=True)}
    reply = ask(grid, card.host, Tasks.MPC_QUERY, QueryModel(name=name, batch=batch.shape[0], inputs=inputs))
    outputs = []
    for party in card.parties:
        tensors, _ = unpack(grid.identity.unseal(grid.transport.claim(reply.outputs[party])))
        outputs.append(tensors["y"])
    y = fp.decode(reconstruct(outputs)).to(x.dtype if x.is_floating_point() else torch.float64)
    return y[0] if x.dim() == 1 else y


def ask(grid: Grid, host: str, task: str, body: Any) -> MpcReply:
    return answer(grid, request(grid, host, task, body))


def request(grid: Grid, host: str, task: str, body: Any) -> Pending:
    """Send a signed request to ``host``'s MPC worker, without waiting (see :func:`answer`):
    ask several parties at once, then read their answers."""
    return grid.transport.ask(host, task, mpc_queue(host), body)


def answer(grid: Grid, pending: Pending) -> MpcReply:
    """The verified reply to a request; its typed error if it carries one."""
    env = grid.transport.answer(pending, "`gridq mpc start`")
    reply = parse(MpcReply, env.body_json())
    if reply.error is not None:
        raise error_from_wire(reply.error.model_dump())
    return reply
