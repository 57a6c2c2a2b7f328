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

The owner signs the card (host, parties, provider, queriers with their keys) and each
share for it; the querier signs each query and each input share for it
(:mod:`protocol.mpc.cards`). Keys this client trusts without asking anyone: its own, and
public key files handed over out of band, ``$GRIDQ_HOME/trusted/NAME.pub``. A card whose
owner has such a file must carry that key; a querier named without one gets the key its
host knows for them.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from orchestrator.session import Session
from orchestrator.transport import Pending, replied
from protocol.contract import Tasks, gridq_home, mpc_query_key, mpc_queue, mpc_queue_for
from protocol.errors import (
    ForbiddenOperation,
    GridError,
    InvalidRequest,
    NotFound,
)
from protocol.identity import Identity, PublicIdentity, unreadable_key
from protocol.mpc.cards import (
    ModelCard,
    Query,
    SignedCard,
    SignedQuery,
    check_roles,
    input_label,
    output_label,
    share_label,
)
from protocol.mpc.model import Layer, ModelPlan, encode_parameters
from protocol.mpc.ring import FixedPoint
from protocol.mpc.sharing import reconstruct, share
from protocol.mpc.wire import MpcReply, QueryModel, ServeModel, UserKeys, open_signed, pack, seal_signed, unpack
from protocol.spans import Tally

log = logging.getLogger(__name__)
Trusted = Sequence[PublicIdentity]  # keys the caller vouches for, by their names


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


def encoded(fp: FixedPoint, values: torch.Tensor, what: str) -> torch.Tensor:
    """``values`` in fixed point, refused if they are not real numbers it can hold."""
    real(values, what)
    try:
        return fp.encode(values)
    except ValueError as exc:
        raise InvalidRequest(f"{what}: {exc}; scale the values down") from None


def real(values: torch.Tensor, what: str) -> None:
    """Refuse what fixed point cannot carry: a NaN would encode as -2^63 and come back as
    an answer of -5e8 or so, silently; an infinity does not fit at all."""
    if values.is_complex() or values.dtype == torch.bool:
        raise InvalidRequest(f"{what} must hold real numbers, not {values.dtype}: pass a float tensor")
    finite = values.isfinite() if values.is_floating_point() else torch.ones_like(values, dtype=torch.bool)
    if not bool(finite.all()):
        raise InvalidRequest(f"{what} holds {int((~finite).sum())} NaN or infinite value(s), which no encrypted "
                             "computation can carry: replace them (torch.nan_to_num, or drop the rows) and ask again")


def _flatten(model: torch.nn.Module) -> list[torch.nn.Module]:
    if isinstance(model, torch.nn.Sequential):
        return [leaf for m in model for leaf in _flatten(m)]
    return [model]


def serve(session: Session, model: torch.nn.Module, *, name: str, parties: Sequence[str], crypto_provider: str,
          host: str, queriers: Sequence[str | PublicIdentity] = (), frac_bits: int = 16) -> ModelCard:
    plan, params = plan_of(model, frac_bits)
    fp = FixedPoint(plan.frac_bits)
    for key, value in params.items():  # before anything is sent: a NaN weight would serve garbage
        encoded(fp, value, f"the model's parameter {key!r}")
    me = session.identity
    card = ModelCard(name=name, owner=me.name, owner_key=me.public.text(), host=host, parties=list(parties),
                     provider=crypto_provider, plan=plan, issued_at=time.time())
    check_roles(card)  # before asking anyone anything
    card = ModelCard.model_validate({**card.model_dump(), "queriers": querier_keys(session, host, queriers)})
    shares = sealed_shares(session, me, card, params)
    ask(session, host, Tasks.MPC_SERVE, ServeModel(card=SignedCard.sign(me, card), shares=shares))
    return card


def sealed_shares(session: Session, signer: Identity, card: ModelCard, params: dict[str, torch.Tensor]
                  ) -> dict[str, str]:
    """Each party's additive share of ``params`` (float), sealed to that party and signed by
    ``signer`` — the owner — for this card and this party (left by claim-check: the keys)."""
    encoded = encode_parameters(card.plan, params)
    split = {k: share(v, len(card.parties)) for k, v in encoded.items()}
    return {p: session.leave(seal_signed(signer, session.node_key(p), share_label(card, p),
                                         pack({k: v[i] for k, v in split.items()})))
            for i, p in enumerate(card.parties)}


def querier_keys(session: Session, host: str, queriers: Sequence[str | PublicIdentity]) -> dict[str, str]:
    """The key of each querier, as the owner signs it into the card: given, or known here
    (:func:`known_key`), else the one ``host`` knows for them (it vouches, once, at serving)."""
    keys: dict[str, str] = {}
    unknown: list[str] = []
    for q in queriers:
        key = q if isinstance(q, PublicIdentity) else known_key(session, q)
        if key is None:
            unknown.append(str(q))
        else:
            keys[key.name] = key.text()
    if unknown:
        given = ask(session, host, Tasks.MPC_KEYS, UserKeys(names=unknown)).keys
        missing = [n for n in unknown if n not in given]
        if missing:
            raise InvalidRequest(f"host {host!r} gave no key for {missing}")
        keys.update({n: PublicIdentity.parse(n, given[n]).text() for n in unknown})
    return keys


def known_key(session: Session, name: str) -> PublicIdentity | None:
    """A key this client trusts for ``name`` without asking the grid: its own, or the public
    key file ``$GRIDQ_HOME/trusted/NAME.pub`` (what ``gridq keys new`` writes as NAME.pub,
    handed over by its owner)."""
    if name == session.identity.name:
        return session.identity.public
    file = trusted_folder() / f"{name}.pub"
    try:
        text = file.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise unreadable_key(file, exc) from None
    return PublicIdentity.parse(name, text.strip())


def trusted_folder() -> Path:
    return gridq_home() / "trusted"


def models(session: Session, trusted: Trusted = ()) -> list[ModelCard]:
    """Served models whose card its owner signed and its host countersigned, listed under its
    owner's name. If the owner's key is known here (``trusted``, or :func:`known_key`), the
    card must carry it: a host's card under another's name is not listed."""
    given = {k.name: k for k in trusted}
    cards: dict[str, ModelCard] = {}
    for raw in session.transport.posted_models():
        try:
            entry = json.loads(raw)
            signed = SignedCard.model_validate_json(entry["card"])
            owner = signed.card.owner
            card = signed.verify(given.get(owner) or known_key(session, owner))
            session.node_key(card.host).verify(entry["card"].encode(), bytes.fromhex(entry["signature"]))
        except (GridError, ValueError, KeyError, TypeError) as exc:
            log.warning("a model listing is not its owner's card, left out: %s", exc)
            continue  # malformed, or not signed by the owner (and host) it names: not a model of this grid
        if card.qualified not in cards or cards[card.qualified].issued_at < card.issued_at:
            cards[card.qualified] = card  # the owner's newest card, wherever a host listed it
    return sorted(cards.values(), key=lambda c: (c.name, c.owner))


def find(session: Session, name: str, trusted: Trusted = ()) -> ModelCard:
    """The listed card of ``owner/model``, or of ``model`` if one owner serves that name."""
    owner, _, model = name.rpartition("/")
    found = [c for c in models(session, trusted) if c.name == model and owner in ("", c.owner)]
    if not found:
        raise NotFound(f"no served model {name!r}; grid.models() lists them")
    if len(found) > 1:
        raise InvalidRequest(f"{len(found)} owners serve a model {model!r}; name the one you mean: "
                             + " or ".join(repr(c.qualified) for c in found))
    return found[0]


def query(session: Session, name: str, x: torch.Tensor, trusted: Trusted = ()) -> torch.Tensor:
    """``name`` is ``owner/model``, or ``model`` if one owner serves that name."""
    if not isinstance(x, torch.Tensor):
        raise InvalidRequest(f"a query's input is a torch.Tensor, not a {type(x).__name__}: pass "
                             "torch.tensor(x, dtype=torch.float64) — one row, or a batch of rows")
    real(x, "the query's input")  # before anything is asked of the grid
    tally = Tally()
    card = find(session, name, trusted)
    batch = x.reshape(1, -1) if x.dim() == 1 else x
    if batch.dim() != 2 or batch.shape[1] != card.plan.in_features:
        raise InvalidRequest(f"model {name!r} takes inputs of {card.plan.in_features} features, not shape "
                             f"{tuple(x.shape)}")
    tally.lap("find the model's card")
    fp = FixedPoint(card.plan.frac_bits)
    signed, inputs = signed_query(session, card, share(encoded(fp, batch, "the query's input"), len(card.parties)))
    tally.lap("share the input, seal each share, sign the query")
    # one push on the host's query list, not a Celery task: the hot path (workers.mpc.lists)
    pending = session.transport.push(card.host, mpc_queue(card.host), mpc_query_key(card.host),
                                  QueryModel(query=signed, inputs=inputs))
    reply = answer(session, pending)
    tally.lap("ask the host (send, wait, verify the reply)")
    outputs = []
    for party in card.parties:
        sealed = session.claim(reply.outputs[party])  # signed by the party, for this query
        label = output_label(signed.query.id, party)
        tensors, _ = unpack(open_signed(session.identity, session.node_key(party), label, sealed))
        outputs.append(tensors["y"])
    y = fp.decode(reconstruct(outputs)).to(x.dtype if x.is_floating_point() else torch.float64)
    tally.lap("take and open the output shares, reconstruct")
    tally.flush()
    return y[0] if x.dim() == 1 else y


def signed_query(session: Session, card: ModelCard, pieces: Sequence[torch.Tensor]
                 ) -> tuple[SignedQuery, dict[str, str]]:
    """A query of ``card`` signed by this client, and each party's input share sealed to it
    and signed for this query: a share copied into another session does not open."""
    me = session.identity
    q = Query(querier=me.name, owner=card.owner, model=card.name, card=card.digest(), batch=pieces[0].shape[0],
              id=secrets.token_hex(16), issued_at=time.time())
    inputs = {p: session.leave(seal_signed(me, session.node_key(p), input_label(q.id, p), pack({"x": s})))
              for p, s in zip(card.parties, pieces, strict=True)}
    return SignedQuery.sign(me, q), inputs


def ask(session: Session, host: str, task: str, body: Any) -> MpcReply:
    return answer(session, request(session, host, task, body))


def request(session: Session, host: str, task: str, body: Any) -> Pending:
    """Send a signed request to ``host``'s MPC worker, without waiting (see :func:`answer`):
    ask several parties at once, then read their answers."""
    return session.transport.ask(host, task, mpc_queue_for(host, task), body)


def answer(session: Session, pending: Pending) -> MpcReply:
    """The verified reply to a request; its typed error if it carries one."""
    return replied(session.transport.answer(pending, "`gridq mpc start`"), MpcReply)
