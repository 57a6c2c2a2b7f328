"""The MPC host: keeps served models' cards (structure, parties, who may query: no numbers),
as their owners signed them, and coordinates queries — takes dealer bundles from its pool,
starts a session at each party and waits for their output shares, sealed to the querier
(the parties exchange the rounds among themselves: the host sees none). It authorises
nothing the parties rely on: each party checks a session against the owner's card it pinned
and the querier's signed query that travels with it.

A host waits — for its parties' answers, its dealer's bundles — but only on
lists its peers fill from their own pool (``mpc-peer.<id>``), never on a Celery result and
never on work queued behind its own: two nodes that host for each other both finish. It
sends each session to all its parties under one grid-wide lock, so every party sees
sessions in one order and one session pool process a party is enough: no two sessions each
hold one party while waiting for the other's."""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from typing import Any

from protocol.contract import MPC_DISPATCH_LOCK, MPC_MODELS_KEY, Tasks, mpc_ack_key, mpc_pool_key
from protocol.envelope import Envelope, open_envelope
from protocol.errors import (
    InvalidRequest,
    JobFailed,
    LimitExceeded,
    NodeUnavailable,
    NotFound,
    PermissionDenied,
    error_from_wire,
)
from protocol.mpc.cards import ModelCard, SignedCard, check_roles
from protocol.mpc.model import Need
from protocol.mpc.wire import Deal, MpcReply, QueryModel, RunSession, ServeModel, StoreShares, UserKeys
from protocol.serving import parse
from protocol.spans import Tally
from workers.locks import held
from workers.mpc.member import MpcMember
from workers.mpc.rounds import pop

log = logging.getLogger(__name__)
MAX_QUERY_ELEMENTS = 1 << 22  # values in one tensor of a query: 4M int64 shares = 32 MB a round
DISPATCH_LOCK_SECONDS = 2.0  # held while a session goes out to its parties (milliseconds); waited for as long


def pool_key(card: ModelCard, need: Need) -> str:
    need_label = f"{need.kind}:{need.shape}:{need.other}"
    return mpc_pool_key(card.host, card.provider, list(card.parties), card.plan.frac_bits, need_label)


class Host:
    def __init__(self, member: MpcMember) -> None:
        self.m = member

    def serve(self, env: Envelope, body: ServeModel) -> MpcReply:
        """Serve a model its owner (a user of this host) signed and secret-shared among the parties."""
        m = self.m
        card = body.card.verify(m.users[env.sender])  # the owner's key as this host knows it
        if card.host != m.id or card.owner != env.sender:
            raise InvalidRequest(f"this card names host {card.host!r} and owner {card.owner!r}; it was sent to "
                                 f"{m.id!r} by {env.sender!r}")
        check_roles(card)
        try:
            card.plan.check()
        except ValueError as exc:
            raise InvalidRequest(f"model {card.name!r}: {exc}") from None
        if set(body.shares) != set(card.parties):
            raise InvalidRequest(f"shares are for {sorted(body.shares)}, the parties are {sorted(card.parties)}")
        for user, key in card.queriers.items():
            if user in m.users and m.users[user].text() != key:
                raise InvalidRequest(f"the card gives querier {user!r} a key other than {m.id!r} knows for them; "
                                     "they could not query here")
        existing = self._served(card.name)
        if existing is not None and existing.owner != card.owner:
            raise PermissionDenied(f"model {card.name!r} on {m.id!r} belongs to {existing.owner!r}; "
                                   "choose another name")
        m.require_live(list(card.parties), "party")
        asked = {p: f"{env.job_id}:{p}" for p in card.parties}
        for party, job_id in asked.items():
            m.send(party, Tasks.MPC_STORE, StoreShares(card=body.card, share=body.shares[party]), job_id)
        self._acks(asked, m.config.mpc.round_timeout)
        m.store.serve_card(card.name, body.card.model_dump(mode="json"))
        self._post(body.card)
        self._refill(card, batch=1)
        log.info("serving model %r for %s over %s", card.name, env.sender, card.parties)
        return MpcReply()

    def keys(self, env: Envelope, body: UserKeys) -> MpcReply:
        """The keys this host knows for users an owner names as queriers (the owner signs them
        into its card: this host vouches for them only if the owner has no key of its own)."""
        unknown = [n for n in body.names if n not in self.m.users]
        if unknown:
            raise NotFound(f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not a user of "
                           f"host {self.m.id!r}: only its users can query there. Add them to its config "
                           "([users]), or pass their public keys (keys/NAME.pub in $GRIDQ_HOME)")
        return MpcReply(keys={n: self.m.users[n].text() for n in body.names})

    def _served(self, name: str) -> ModelCard | None:
        found = self.m.store.served_card(name)
        return None if found is None else SignedCard.model_validate(found).card

    def _post(self, signed: SignedCard) -> None:
        """List the card grid-wide under ``owner/name``: the owner's signed card, countersigned
        by this host. Clients check both signatures (any host may write the listing)."""
        text = json.dumps(signed.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        self.m.redis.hset(MPC_MODELS_KEY, signed.card.qualified, json.dumps({
            "card": text, "signature": self.m.identity.sign(text.encode()).hex()}))

    def _acks(self, asked: dict[str, str], timeout: float, protocol: bool = False) -> dict[str, MpcReply]:
        """Each party's signed answer to the request sent it under ``asked[party]`` (a job id),
        popped from its ack list as it comes; the first error is raised. ``timeout`` bounds a
        wait for one answer; for a session (``protocol``) the wait goes on as long as every
        party's MPC worker is live: a party whose peer goes silent says so itself, within its
        round timeout."""
        m = self.m
        waiting = {mpc_ack_key(m.id, node, job_id): node for node, job_id in asked.items()}
        replies: dict[str, MpcReply] = {}
        while waiting:
            got = m.redis.blpop(list(waiting), timeout=timeout)
            if got is None:
                if protocol:
                    m.require_live(list(waiting.values()), "party")
                    continue
                late = ", ".join(map(repr, waiting.values()))
                raise NodeUnavailable(f"party {late} did not answer within {timeout:g} s; is its `gridq mpc start` "
                                      "running?")
            node = waiting.pop(_text(got[0]) or "")
            env = open_envelope(json.loads(got[1]), recipient=m.id, keyring={node: m.peer(node)}, nonces=m.nonces,
                                delivery_id=asked[node], now=time.time())
            reply = replies[node] = parse(MpcReply, env.body_json())
            if reply.error is not None:
                raise error_from_wire(reply.error.model_dump())
        return replies

    def query(self, env: Envelope, body: QueryModel) -> MpcReply:
        """Run one private inference: the outputs' shares come back sealed to the querier."""
        m, q = self.m, body.query.query
        tally = Tally()
        card = self._served(q.model)
        if card is None or card.owner != q.owner:
            raise NotFound(f"host {m.id!r} serves no model {q.owner}/{q.model}")
        if env.sender != q.querier:
            raise PermissionDenied(f"{env.sender!r} sent a query signed for {q.querier!r}")
        body.query.verify(card, time.time())  # the parties check it too: this is to fail early
        if set(body.inputs) != set(card.parties):
            raise InvalidRequest(f"input shares are for {sorted(body.inputs)}, the parties are {sorted(card.parties)}")
        widest = max(max(layer.in_features, layer.out_features) for layer in card.plan.layers)
        if q.batch * widest > MAX_QUERY_ELEMENTS:
            raise LimitExceeded(f"a batch of {q.batch} through layers {widest} wide is "
                                f"{q.batch * widest} values a tensor; the limit is {MAX_QUERY_ELEMENTS}")
        tally.lap("load the card, check the query")
        bundles = self._take_bundles(card, card.plan.material_needed(q.batch))
        tally.lap("take dealer bundles from the pool")
        outputs = self._coordinate(card, body, bundles, env.job_id, tally)
        self._refill(card, q.batch)
        tally.lap("top the pool up (ask the dealer)")
        tally.flush()
        return MpcReply(outputs=outputs)

    def _take_bundles(self, card: ModelCard, needs: list[Need]) -> list[str]:
        m = self.m
        keys = [pool_key(card, n) for n in needs]
        taken: list[str | None] = [_text(m.redis.lpop(k)) for k in keys]
        missing = [i for i, b in enumerate(taken) if b is None]
        if missing:  # a cold pool: ask the provider now, and wait for it
            m.require_live([card.provider], "crypto provider")
            self._ask_deal(card, [needs[i] for i in missing], [keys[i] for i in missing], count=1)
            deadline = time.monotonic() + m.config.mpc.deal_timeout
            for i in missing:
                got = pop(m.redis, keys[i], max(0.01, deadline - time.monotonic()))
                if got is None:
                    raise NodeUnavailable(f"crypto provider {card.provider!r} did not deal within "
                                          f"{m.config.mpc.deal_timeout:g} s; is its `gridq mpc start` running?")
                taken[i] = got.decode()
        return [b for b in taken if b is not None]

    def _refill(self, card: ModelCard, batch: int) -> None:
        """Top the pool up for this batch size, without waiting: the next query finds it ready."""
        target = self.m.config.mpc.pool_size
        needs = card.plan.material_needed(batch)
        pipe = self.m.redis.pipeline(transaction=False)
        for need in needs:
            pipe.llen(pool_key(card, need))
        # below half: a deal is asked for every few queries, not after each (a signed message each time)
        short = [(n, pool_key(card, n)) for n, length in zip(needs, pipe.execute(), strict=True)
                 if length <= target // 2]
        if short:
            self._ask_deal(card, [n for n, _ in short], [k for _, k in short], count=target)

    def _ask_deal(self, card: ModelCard, needs: list[Need], pools: list[str], count: int) -> None:
        self.m.send(card.provider, Tasks.MPC_DEAL, Deal(parties=card.parties, frac_bits=card.plan.frac_bits,
                                                        needs=needs, pools=pools, count=count), uuid.uuid4().hex)

    def _coordinate(self, card: ModelCard, body: QueryModel, bundles: list[str], job_id: str, tally: Tally
                    ) -> dict[str, str]:
        """Start the session at every party: they run its rounds among themselves and each
        answers with its output share, sealed to the querier."""
        m = self.m
        session, key = secrets.token_hex(16), secrets.token_bytes(32)
        timeout = m.config.mpc.round_timeout
        m.require_live(list(card.parties), "party")
        tally.lap("start: check the parties are live")
        asked = {party: f"{job_id}:{party}" for party in card.parties}
        sessions = {party: (asked[party], RunSession(
            session=session, query=body.query, index=i, bundles=bundles, input=body.inputs[party],
            round_key=m.leave(m.peer(party).seal(key)), round_timeout=timeout)) for i, party in enumerate(card.parties)}
        tally.lap("start: seal and leave the round key for each party")
        with held(m.redis, MPC_DISPATCH_LOCK, DISPATCH_LOCK_SECONDS, wait=DISPATCH_LOCK_SECONDS):
            tally.lap("start: take the dispatch lock")
            m.hand_out(sessions, ttl=timeout)
            tally.lap("start: sign each party's session, push it on the party's list")
        tally.lap("start: release the dispatch lock")
        replies = self._acks(asked, timeout, protocol=True)
        tally.lap("wait for the parties' answers")
        missing = [p for p in card.parties if p not in replies[p].outputs]
        if missing:
            raise JobFailed(f"parties {missing} of model {card.qualified!r} ended without an output")
        return {p: replies[p].outputs[p] for p in card.parties}


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
