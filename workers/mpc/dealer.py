"""The crypto provider: deals bundles (Beaver triples, truncation and comparison material)
from shapes alone, each party's part sealed to it and signed, into the host's pool lists.
It never sees a value, and may not be a party of what it deals for (it could unmask)."""

from __future__ import annotations

import logging
import uuid

from protocol.contract import CLAIM_CHECK_TTL_SECONDS, mpc_bundle_key, mpc_pool_prefix
from protocol.envelope import Envelope
from protocol.errors import InvalidRequest, PermissionDenied
from protocol.mpc.dealer import Dealer
from protocol.mpc.wire import Deal, MpcReply, pack_part, seal_signed
from workers.mpc.member import MpcMember

log = logging.getLogger(__name__)


class CryptoProvider:
    def __init__(self, member: MpcMember) -> None:
        self.m = member

    def deal(self, env: Envelope, body: Deal) -> MpcReply:
        m = self.m
        if m.id in body.parties:
            raise PermissionDenied(f"{m.id!r} is a party of this computation: it cannot also be its dealer")
        if len(body.needs) != len(body.pools):
            raise InvalidRequest("one pool list per need")
        own = mpc_pool_prefix(env.sender, m.id)  # a host asks for its own pools only (its broker user's keys)
        if not all(pool.startswith(own) for pool in body.pools):
            raise PermissionDenied(f"{env.sender!r} may ask {m.id!r} to fill only its own pools ({own}…)")
        keys = [m.peer(p) for p in body.parties]
        dealer = Dealer(len(body.parties))
        for need, pool in zip(body.needs, body.pools, strict=True):
            for _ in range(body.count):
                bundle = uuid.uuid4().hex
                pipe = m.redis.pipeline()
                for party, key, part in zip(body.parties, keys, need.deal(dealer, body.frac_bits), strict=True):
                    where = mpc_bundle_key(m.id, bundle, party)
                    pipe.setex(where, CLAIM_CHECK_TTL_SECONDS, seal_signed(m.identity, key, where, pack_part(part)))
                pipe.rpush(pool, bundle)
                pipe.expire(pool, CLAIM_CHECK_TTL_SECONDS)
                pipe.execute()
        log.info("dealt %d bundle(s) of %d shape(s) for %s", body.count, len(body.needs), env.sender)
        return MpcReply()
