"""A secure-aggregation party: adds up its shares of a federated round's updates (each
signed by the node that trained it) and sends the sum, sealed, to the scientist — once a
round, so no second sum over other nodes can give one node's update away."""

from __future__ import annotations

import logging

import torch

from protocol.contract import mpc_aggregated_key
from protocol.envelope import Envelope
from protocol.errors import InvalidRequest, PermissionDenied
from protocol.mpc.wire import (
    Aggregate,
    MpcReply,
    aggregation_label,
    open_signed,
    pack,
    seal_signed,
    sum_label,
    unpack,
)
from workers.mpc.member import MpcMember

log = logging.getLogger(__name__)
ROUND_MARKER_SECONDS = 24 * 3600


class Aggregator:
    def __init__(self, member: MpcMember) -> None:
        self.m = member

    def aggregate(self, env: Envelope, body: Aggregate) -> MpcReply:
        m = self.m
        if not m.redis.set(mpc_aggregated_key(m.id, body.round), env.sender, nx=True, ex=ROUND_MARKER_SECONDS):
            raise PermissionDenied(f"round {body.round} was already added up by {m.id!r}: a second sum over "
                                   "other nodes would give an update away")
        total: torch.Tensor | None = None
        for node, key in sorted(body.shares.items()):
            data = open_signed(m.identity, m.directory.key(node), aggregation_label(body.round, node), m.take(key))
            part = unpack(data)[0]["s"]
            if part.dtype != torch.int64 or (total is not None and part.shape != total.shape):
                raise InvalidRequest(f"the share of {node!r} is not a ring tensor of the round's shape")
            total = part if total is None else total + part
        if total is None:
            raise InvalidRequest("an aggregation names the shares of at least one node")
        sealed = seal_signed(m.identity, m.users[env.sender], sum_label(body.round, m.id), pack({"sum": total}))
        log.info("added up %d shares of round %s for %r", len(body.shares), body.round, env.sender)
        return MpcReply(outputs={m.id: m.leave(sealed)})
