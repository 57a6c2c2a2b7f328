"""An MPC party: keeps its shares of served models and computes its side of each query's
rounds (:func:`protocol.mpc.model.infer`, the same code the tests run)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from protocol.contract import mpc_bundle_key
from protocol.envelope import Envelope
from protocol.errors import GridError, InvalidRequest, NotFound, PermissionDenied
from protocol.identity import PublicIdentity
from protocol.mpc.dealer import Material
from protocol.mpc.model import infer, shapes_of
from protocol.mpc.wire import ModelCard, MpcReply, RunSession, StoreShares, open_signed, pack, unpack, unpack_part
from protocol.serving import unexpected
from workers import claims
from workers.mpc.member import MpcMember
from workers.rounds import PartyEnd

log = logging.getLogger(__name__)


class Party:
    def __init__(self, member: MpcMember) -> None:
        self.m = member

    def store(self, env: Envelope, body: StoreShares) -> MpcReply:
        """Keep this party's shares of a model its host serves."""
        m = self.m
        if env.sender != body.card.host or m.id not in body.card.parties:
            raise PermissionDenied(f"{env.sender!r} is not the host of model {body.card.name!r} on this party")
        shares, _ = unpack(m.identity.unseal(m.take(body.share)))
        expected = shapes_of(body.card.plan)
        got = {k: tuple(v.shape) for k, v in shares.items() if v.dtype == torch.int64}
        if got != expected:
            raise InvalidRequest(f"shares of {body.card.name!r} have shapes {got}; its plan needs {expected}")
        m.store.keep_shares(body.card.name, pack(shares))
        log.info("keeping shares of model %r for host %r", body.card.name, env.sender)
        return MpcReply()

    def session(self, env: Envelope, body: RunSession) -> MpcReply:
        """Compute this party's side of one query; the output share goes to the querier, sealed."""
        m, card = self.m, body.card
        if env.sender != card.host or card.parties[body.index] != m.id:
            raise PermissionDenied(f"{env.sender!r} is not the host of model {card.name!r} on this party")
        key = m.identity.unseal(m.take(body.mac_key))
        end = PartyEnd(m.redis, body.session, m.id, key, body.round_timeout, f"host {card.host!r}")
        try:
            data = m.store.shares(card.name)
            if data is None:
                raise NotFound(f"party {m.id!r} holds no shares of model {card.name!r}")
            params, _ = unpack(data)
            inputs, _ = unpack(m.identity.unseal(m.take(body.input)))
            x = inputs.get("x")
            if x is None or x.dtype != torch.int64 or tuple(x.shape) != (body.batch, card.plan.in_features):
                raise InvalidRequest(f"the input share must be int64 of shape ({body.batch}, "
                                     f"{card.plan.in_features}), as the query says")
            output = end.run(infer(body.index, card.plan, params, x, self._materials(card, body.bundles)))
            sealed = PublicIdentity.parse(body.querier, body.querier_key).seal(pack({"y": output}))
            end.send({"kind": "out", "blob": m.leave(sealed)}, {})
            return MpcReply()
        except Exception as exc:  # tell the host now, rather than let it wait out the round timeout
            error = exc if isinstance(exc, GridError) else unexpected(exc, m.id, env.job_id)
            end.send({"kind": "error", "code": error.code, "message": error.message[:500]}, {})
            raise error from None

    def _materials(self, card: ModelCard, bundles: list[str]) -> Iterator[Material]:
        m = self.m
        provider = m.peer(card.provider)
        for bundle in bundles:
            where = mpc_bundle_key(bundle, m.id)
            yield unpack_part(open_signed(m.identity, provider, where, claims.take_internal(m.redis, where))
                              ).materialize()
