"""An MPC party: keeps its shares of served models and computes its side of each query's
rounds (:func:`protocol.mpc.model.infer`, the same code the tests run).

The owner's signed card is the authority, pinned here with the shares: a session runs only
if it comes from the card's host, for a query signed by a querier the card allows (with the
key the card gives them), made for this very card, not run here before; the input share
opens only if that querier signed it for that query. Whatever the session's sender says
about the model is not read (:mod:`protocol.mpc.cards`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import torch

from protocol.contract import mpc_bundle_key
from protocol.envelope import Envelope
from protocol.errors import GridError, InvalidRequest, NotFound, PermissionDenied, ReplayedNonce, StaleMessage
from protocol.mpc.cards import (
    CLOCK_SKEW_SECONDS,
    QUERY_TTL_SECONDS,
    ModelCard,
    SignedCard,
    check_roles,
    input_label,
    output_label,
    share_label,
)
from protocol.mpc.dealer import Material
from protocol.mpc.model import infer, shapes_of
from protocol.mpc.wire import MpcReply, RunSession, StoreShares, open_signed, pack, seal_signed, unpack, unpack_part
from protocol.serving import unexpected
from protocol.spans import Tally
from workers.mpc.member import MpcMember
from workers.mpc.rounds import PartyEnd
from workers.storage import claims

log = logging.getLogger(__name__)


class Party:
    def __init__(self, member: MpcMember) -> None:
        self.m = member
        self.parsed: dict[tuple[str, str], tuple[dict[str, Any], ModelCard, dict[str, torch.Tensor]]] = {}

    def store(self, env: Envelope, body: StoreShares) -> MpcReply:
        """Keep this party's share of a model, pinned to the card its owner signed."""
        m = self.m
        card = body.card.verify(m.users.get(body.card.card.owner))  # an owner this node knows: its key
        if m.id not in card.parties:
            raise PermissionDenied(f"{m.id!r} is not a party of model {card.qualified!r}")
        if env.sender != card.host:
            raise PermissionDenied(f"{env.sender!r} is not the host of model {card.qualified!r}: its owner's card "
                                   f"names {card.host!r}")
        check_roles(card)
        try:
            card.plan.check()
        except ValueError as exc:
            raise InvalidRequest(f"model {card.qualified!r}: {exc}") from None
        data = open_signed(m.identity, card.owner_identity(), share_label(card, m.id), m.take(body.share))
        shares, _ = unpack(data)  # signed by the owner for this card and this party, or refused above
        expected = shapes_of(card.plan)
        got = {k: tuple(v.shape) for k, v in shares.items() if v.dtype == torch.int64}
        if got != expected:
            raise InvalidRequest(f"shares of {card.qualified!r} have shapes {got}; its plan needs {expected}")
        m.store.hold(card.owner, card.name, body.card.model_dump(mode="json"), pack(shares),
                     lambda pinned: _may_replace(SignedCard.model_validate(pinned).card, card, m.id))
        log.info("keeping shares of model %r from host %r", card.qualified, env.sender)
        return MpcReply()

    def session(self, env: Envelope, body: RunSession) -> MpcReply:
        """Compute this party's side of one query; the output share goes to the querier, sealed."""
        m, q = self.m, body.query.query
        tally = Tally()
        card, params = self._pinned(q.owner, q.model)
        tally.lap("load the pinned card and shares")
        if env.sender != card.host:  # refused before anything is opened or sent on a round channel
            raise PermissionDenied(f"{env.sender!r} is not the host of model {card.qualified!r}: the card its "
                                   f"owner signed, pinned at {m.id!r}, names {card.host!r}")
        key = m.identity.unseal(m.take(body.round_key))
        with PartyEnd(m.redis, card.host, body.session, list(card.parties), m.id, key, body.round_timeout) as end:
            tally.lap("take the round key, subscribe")
            try:
                if body.index >= len(card.parties) or card.parties[body.index] != m.id:
                    raise PermissionDenied(f"{m.id!r} is not party {body.index} of model {card.qualified!r}")
                check_roles(card)
                querier = body.query.verify(card, time.time())
                needed = len(card.plan.material_needed(q.batch))
                if len(body.bundles) != needed:
                    raise InvalidRequest(f"the host sent {len(body.bundles)} dealer bundle(s); a batch of {q.batch} "
                                         f"through {card.qualified!r} takes {needed}")
                tally.lap("check the session and the query's signature")
                if not m.store.remember(q.querier, f"mpc-query:{q.id}", env.job_id,
                                        q.issued_at + QUERY_TTL_SECONDS + CLOCK_SKEW_SECONDS):
                    raise ReplayedNonce(f"query {q.id} of {q.querier!r} ran at {m.id!r} already: a query runs once")
                tally.lap("record the query id (replays)")
                inputs, _ = unpack(open_signed(m.identity, querier, input_label(q.id, m.id), m.take(body.input)))
                x = inputs.get("x")
                if x is None or x.dtype != torch.int64 or tuple(x.shape) != (q.batch, card.plan.in_features):
                    raise InvalidRequest(f"the input share must be int64 of shape ({q.batch}, "
                                         f"{card.plan.in_features}), as the query says")
                tally.lap("take and open the input share")
                materials = list(self._materials(card, body.bundles))  # all opened and checked before any round
                tally.lap("take and open the dealer's bundles")
                output = end.run(infer(body.index, card.plan, params, x, iter(materials)))
                tally.lap("the protocol (rounds)")
            except Exception as exc:  # tell the other parties now, rather than let them wait out the round timeout
                error = exc if isinstance(exc, GridError) else unexpected(exc, m.id, env.job_id)
                end.abort(error)
                raise error from None
        sealed = seal_signed(m.identity, querier, output_label(q.id, m.id), pack({"y": output}))
        reply = MpcReply(outputs={m.id: m.leave(sealed)})
        tally.lap("seal and leave the output share")
        tally.flush()
        return reply

    def _pinned(self, owner: str, model: str) -> tuple[ModelCard, dict[str, Any]]:
        """The pinned card and shares, parsed once per card: each query reads the card alone
        and reuses what was parsed while it is the one pinned."""
        cached = self.parsed.get((owner, model))
        if cached is None or cached[0] != self.m.store.pinned(owner, model):
            held = self.m.store.held(owner, model)  # card and share of one row: never one card's plan, another's share
            if held is None:
                raise NotFound(f"party {self.m.id!r} holds no shares of model {owner}/{model}")
            cached = self.parsed[owner, model] = (held[0], SignedCard.model_validate(held[0]).card, unpack(held[1])[0])
        return cached[1], cached[2]

    def _materials(self, card: ModelCard, bundles: list[str]) -> Iterator[Material]:
        m = self.m
        provider = m.peer(card.provider)
        for bundle in bundles:
            where = mpc_bundle_key(card.provider, bundle, m.id)
            yield unpack_part(open_signed(m.identity, provider, where, claims.take_internal(m.redis, where))
                              ).materialize()


def _may_replace(pinned: ModelCard, card: ModelCard, party: str) -> None:
    """A pinned card gives way only to a newer one signed by the same owner key (the same
    card again is a redelivery): no one else's card, and no older card of the owner's."""
    if pinned.owner_key != card.owner_key:
        raise PermissionDenied(f"model {card.qualified!r} is pinned at {party!r} to another key of {card.owner!r}: "
                               "only the key that served it first may replace it")
    if pinned.digest() != card.digest() and card.issued_at <= pinned.issued_at:
        raise StaleMessage(f"the card of {card.qualified!r} was issued at {card.issued_at:.3f}, not after the one "
                           f"pinned at {party!r} ({pinned.issued_at:.3f}): an older card cannot come back")
