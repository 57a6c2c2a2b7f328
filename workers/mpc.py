"""The MPC pool: a node's worker for encrypted ML-as-a-service (``gridq mpc start CONFIG``).

One worker per node, on the queue ``mpc.<node>``, plays whichever role a message gives it:

* **host** — keeps served models' cards (structure, parties, who may query: no numbers),
  and coordinates queries: it takes dealer bundles from its pool, starts a session at each
  party, then relays rounds, summing what the parties send (masked values only);
* **party** — keeps its shares of served models in its own database, and computes its side
  of each round (:func:`protocol.mpc.model.infer`, the same code as the tests run);
* **aggregation party** — adds up its shares of a federated round's updates (each signed
  by its node) and sends the sum, sealed, to the scientist: once per round;
* **crypto provider** — deals bundles (triples, truncation and comparison material) from
  shapes alone, each party's part sealed to it and signed, into the host's pool lists.

Rounds travel on per-session Redis lists, MAC'd with a key the host sealed to each party.
A party that does not answer within the host's ``round_timeout`` fails the query with
``NodeUnavailable``; a party whose host stops answering gives up after the same time.
Host, parties and provider must be distinct nodes: a dealer that is also a party could
unmask, and a host that is also a party would wait on itself.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from collections.abc import Iterator
from typing import Any

import torch
from celery import Celery
from sqlalchemy import JSON, Float, LargeBinary, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from protocol.contract import (
    CLAIM_CHECK_TTL_SECONDS,
    MPC_MODELS_KEY,
    PUBLIC,
    Tasks,
    mpc_queue,
)
from protocol.envelope import Envelope, MemoryNonceStore, open_envelope, seal_envelope
from protocol.errors import (
    GridError,
    InvalidRequest,
    JobFailed,
    LimitExceeded,
    NodeUnavailable,
    NotFound,
    PermissionDenied,
    UnknownSender,
    error_from_wire,
)
from protocol.identity import PublicIdentity
from protocol.messages import WireError
from protocol.mpc.dealer import Dealer, Material
from protocol.mpc.model import Need, infer, shapes_of
from protocol.mpc.wire import (
    Aggregate,
    Deal,
    ModelCard,
    MpcReply,
    QueryModel,
    RunSession,
    ServeModel,
    StoreShares,
    aggregation_label,
    open_signed,
    pack,
    pack_part,
    parse,
    seal_signed,
    unpack,
    unpack_part,
)
from workers import claims
from workers.config import NodeConfig
from workers.directory import Directory
from workers.rounds import PartyEnd, connect, pop, relay

log = logging.getLogger(__name__)
MAX_QUERY_ELEMENTS = 1 << 22  # values in one tensor of a query: 4M int64 shares = 32 MB a round


class _Base(DeclarativeBase):
    pass


class ModelRow(_Base):
    """At a host: a model it serves."""

    __tablename__ = "mpc_models"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    card: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class ShareRow(_Base):
    """At a party: its share of a model's parameters (safetensors bytes of ring tensors)."""

    __tablename__ = "mpc_shares"
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


def _pool_key(card: ModelCard, need: Need) -> str:
    return (f"gridq:mpc:pool:{card.provider}:{','.join(card.parties)}:{card.plan.frac_bits}:"
            f"{need.kind}:{need.shape}:{need.other}").replace(" ", "")


def _bundle_key(bundle: str, party: str) -> str:
    return f"gridq:mpc:bundle:{bundle}:{party}"


class MpcMember:
    """One node's MPC worker logic, free of Celery: one method per message."""

    def __init__(self, config: NodeConfig, app: Celery) -> None:
        self.config = config
        self.id = config.id
        self.identity = config.identity()
        self.app = app
        self.redis = connect(config.node.broker, max(config.mpc.round_timeout, config.mpc.deal_timeout))
        self.users = config.keyring()
        self.nonces = MemoryNonceStore()
        self.directory = Directory(app, self.redis, config.mpc.round_timeout)
        engine = create_engine(config.database_url)
        _Base.metadata.create_all(engine)
        self._db = sessionmaker(engine, expire_on_commit=False)

    # --- who is who ---------------------------------------------------------------------------

    def peer(self, name: str) -> PublicIdentity:
        """A configured user's key, else a node's as the gateway lists it (signed by the gateway)."""
        if name in self.users:
            return self.users[name]
        try:
            return self.directory.key(name)
        except UnknownSender:
            raise UnknownSender(f"{name!r} is neither a user of {self.id!r} nor a node registered at the gateway"
                                ) from None

    def _open(self, raw: Any, delivery_id: str, senders: dict[str, PublicIdentity] | None = None) -> Envelope:
        sender = raw.get("sender") if isinstance(raw, dict) else None
        keyring = senders if senders is not None else ({sender: self.peer(sender)} if isinstance(sender, str) else {})
        return open_envelope(raw, recipient=self.id, keyring=keyring, nonces=self.nonces,
                             delivery_id=delivery_id, now=time.time())

    def _send(self, node: str, task: str, body: Any, job_id: str, ttl: float = 600.0) -> Any:
        env = seal_envelope(self.identity, recipient=node, kind=body.kind, job_id=job_id,
                            body=body.model_dump(mode="json"), now=time.time(), ttl=ttl)
        return self.app.send_task(task, args=[env.model_dump(mode="json")], queue=mpc_queue(node), task_id=job_id)

    def _reply(self, to: str, job_id: str, reply: MpcReply) -> dict[str, Any]:
        env = seal_envelope(self.identity, recipient=to, kind=reply.kind, job_id=job_id,
                            body=reply.model_dump(mode="json"), now=time.time())
        return env.model_dump(mode="json")

    def _blob(self, key: str) -> bytes:
        """Take a sealed value left by claim-check under a key a message named."""
        return claims.take(self.redis, key)

    def _put_blob(self, data: bytes) -> str:
        return claims.leave(self.redis, data)

    def handle(self, method: str, raw: Any, delivery_id: str) -> dict[str, Any]:
        """Run one message; every refusal or failure answers as a typed error, signed."""
        claimed = raw.get("sender") if isinstance(raw, dict) else None
        sender = claimed if isinstance(claimed, str) else PUBLIC
        try:
            return getattr(self, method)(raw, delivery_id)  # type: ignore[no-any-return]
        except GridError as exc:
            log.warning("mpc %s %s refused: %s", method, delivery_id, exc)
            to = sender if sender in self.users or sender in self.directory else PUBLIC
            return self._reply(to, delivery_id, MpcReply(error=WireError(**exc.to_wire())))

    # --- host: serve and query ----------------------------------------------------------------

    def serve(self, raw: Any, job_id: str) -> dict[str, Any]:
        env = self._open(raw, job_id, senders=self.users)  # only this host's users may serve models
        body = parse(ServeModel, env.body_json())
        card = body.card
        if card.host != self.id or card.owner != env.sender:
            raise InvalidRequest(f"this card names host {card.host!r} and owner {card.owner!r}; it was sent to "
                                 f"{self.id!r} by {env.sender!r}")
        _check_roles(card)
        try:
            card.plan.check()
        except ValueError as exc:
            raise InvalidRequest(f"model {card.name!r}: {exc}") from None
        if set(body.shares) != set(card.parties):
            raise InvalidRequest(f"shares are for {sorted(body.shares)}, the parties are {sorted(card.parties)}")
        with self._db.begin() as s:
            existing = s.get(ModelRow, card.name)
        if existing is not None and existing.card.get("owner") != card.owner:
            raise PermissionDenied(f"model {card.name!r} on {self.id!r} belongs to {existing.card.get('owner')!r}; "
                                   "choose another name")
        pending = {p: self._send(p, Tasks.MPC_STORE, StoreShares(card=card, share=body.shares[p]),
                                 f"{job_id}:{p}") for p in card.parties}
        for party, result in pending.items():
            self._expect_ok(party, result, self.config.mpc.round_timeout)
        with self._db.begin() as s:
            s.merge(ModelRow(name=card.name, card=card.model_dump(mode="json"), created_at=time.time()))
        text = json.dumps(card.model_dump(mode="json"), sort_keys=True)
        self.redis.hset(MPC_MODELS_KEY, card.name, json.dumps({
            "card": text, "signature": self.identity.sign(text.encode()).hex()}))
        self._refill(card, batch=1)
        log.info("serving model %r for %s over %s", card.name, env.sender, card.parties)
        return self._reply(env.sender, job_id, MpcReply())

    def _expect_ok(self, node: str, result: Any, timeout: float) -> None:
        try:
            raw = result.get(timeout=timeout, disable_sync_subtasks=False)
        except Exception:  # celery's TimeoutError, or the worker's crash
            raise NodeUnavailable(f"party {node!r} did not answer within {timeout:g} s; is its `gridq mpc start` "
                                  "running?") from None
        env = self._open(raw, result.id, senders={node: self.peer(node)})
        reply = parse(MpcReply, env.body_json())
        if reply.error is not None:
            raise error_from_wire(reply.error.model_dump())

    def query(self, raw: Any, job_id: str) -> dict[str, Any]:
        env = self._open(raw, job_id, senders=self.users)
        body = parse(QueryModel, env.body_json())
        with self._db.begin() as s:
            row = s.get(ModelRow, body.name)
        if row is None:
            raise NotFound(f"host {self.id!r} serves no model {body.name!r}")
        card = ModelCard.model_validate(row.card)
        if env.sender != card.owner and env.sender not in card.queriers:
            raise PermissionDenied(f"{env.sender!r} may not query model {card.name!r}; its owner "
                                   f"{card.owner!r} lets {sorted(card.queriers)} query it")
        if set(body.inputs) != set(card.parties):
            raise InvalidRequest(f"input shares are for {sorted(body.inputs)}, the parties are {sorted(card.parties)}")
        widest = max(max(layer.in_features, layer.out_features) for layer in card.plan.layers)
        if body.batch * widest > MAX_QUERY_ELEMENTS:
            raise LimitExceeded(f"a batch of {body.batch} through layers {widest} wide is "
                                f"{body.batch * widest} values a tensor; the limit is {MAX_QUERY_ELEMENTS}")
        needs = card.plan.material_needed(body.batch)
        bundles = self._take_bundles(card, needs)
        outputs = self._coordinate(card, body, bundles, env.sender, job_id)
        self._refill(card, body.batch)
        return self._reply(env.sender, job_id, MpcReply(outputs=outputs))

    def _take_bundles(self, card: ModelCard, needs: list[Need]) -> list[str]:
        keys = [_pool_key(card, n) for n in needs]
        taken: list[str | None] = [_text(self.redis.lpop(k)) for k in keys]
        missing = [i for i, b in enumerate(taken) if b is None]
        if missing:  # a cold pool: ask the provider now, and wait for it
            self._ask_deal(card, [needs[i] for i in missing], [keys[i] for i in missing], count=1)
            deadline = time.monotonic() + self.config.mpc.deal_timeout
            for i in missing:
                got = pop(self.redis, keys[i], max(0.01, deadline - time.monotonic()))
                if got is None:
                    raise NodeUnavailable(f"crypto provider {card.provider!r} did not deal within "
                                          f"{self.config.mpc.deal_timeout:g} s; is its `gridq mpc start` running?")
                taken[i] = got.decode()
        return [b for b in taken if b is not None]

    def _refill(self, card: ModelCard, batch: int) -> None:
        """Top the pool up for this batch size, without waiting: the next query finds it ready."""
        target = self.config.mpc.pool_size
        needs = card.plan.material_needed(batch)
        short = [(n, k) for n in needs if (k := _pool_key(card, n)) and self.redis.llen(k) < target]
        if short:
            self._ask_deal(card, [n for n, _ in short], [k for _, k in short], count=target)

    def _ask_deal(self, card: ModelCard, needs: list[Need], pools: list[str], count: int) -> None:
        self._send(card.provider, Tasks.MPC_DEAL, Deal(parties=card.parties, frac_bits=card.plan.frac_bits,
                                                       needs=needs, pools=pools, count=count), uuid.uuid4().hex)

    def _coordinate(self, card: ModelCard, body: QueryModel, bundles: list[str], querier: str, job_id: str
                    ) -> dict[str, str]:
        session = secrets.token_hex(16)
        keys = {p: secrets.token_bytes(32) for p in card.parties}
        timeout = self.config.mpc.round_timeout
        querier_key = self.users[querier].text()
        for i, party in enumerate(card.parties):
            sealed_key = self._put_blob(self.peer(party).seal(keys[party]))
            self._send(party, Tasks.MPC_SESSION, RunSession(
                session=session, card=card, index=i, batch=body.batch, bundles=bundles, input=body.inputs[party],
                mac_key=sealed_key, querier=querier, querier_key=querier_key, round_timeout=timeout),
                f"{job_id}:{party}", ttl=timeout)
        metas = relay(self.redis, session, keys, timeout)
        if any(m.get("kind") != "out" for m in metas):
            raise JobFailed(f"parties of model {card.name!r} ended without an output")
        return {p: m["blob"] for p, m in zip(card.parties, metas, strict=True)}

    # --- party: keep shares, compute rounds -----------------------------------------------------

    def store(self, raw: Any, job_id: str) -> dict[str, Any]:
        env = self._open(raw, job_id)
        body = parse(StoreShares, env.body_json())
        if env.sender != body.card.host or self.id not in body.card.parties:
            raise PermissionDenied(f"{env.sender!r} is not the host of model {body.card.name!r} on this party")
        shares, _ = unpack(self.identity.unseal(self._blob(body.share)))
        expected = shapes_of(body.card.plan)
        got = {k: tuple(v.shape) for k, v in shares.items() if v.dtype == torch.int64}
        if got != expected:
            raise InvalidRequest(f"shares of {body.card.name!r} have shapes {got}; its plan needs {expected}")
        with self._db.begin() as s:
            s.merge(ShareRow(model=body.card.name, data=pack(shares)))
        log.info("keeping shares of model %r for host %r", body.card.name, env.sender)
        return self._reply(env.sender, job_id, MpcReply())

    def session(self, raw: Any, job_id: str) -> dict[str, Any]:
        env = self._open(raw, job_id)
        body = parse(RunSession, env.body_json())
        card = body.card
        if env.sender != card.host or card.parties[body.index] != self.id:
            raise PermissionDenied(f"{env.sender!r} is not the host of model {card.name!r} on this party")
        key = self.identity.unseal(self._blob(body.mac_key))
        end = PartyEnd(self.redis, body.session, self.id, key, body.round_timeout, f"host {card.host!r}")
        try:
            with self._db.begin() as s:
                row = s.scalar(select(ShareRow).where(ShareRow.model == card.name))
            if row is None:
                raise NotFound(f"party {self.id!r} holds no shares of model {card.name!r}")
            params, _ = unpack(row.data)
            inputs, _ = unpack(self.identity.unseal(self._blob(body.input)))
            x = inputs.get("x")
            if x is None or x.dtype != torch.int64 or tuple(x.shape) != (body.batch, card.plan.in_features):
                raise InvalidRequest(f"the input share must be int64 of shape ({body.batch}, "
                                     f"{card.plan.in_features}), as the query says")
            output = end.run(infer(body.index, card.plan, params, x, self._materials(card, body.bundles)))
            sealed = PublicIdentity.parse(body.querier, body.querier_key).seal(pack({"y": output}))
            end.send({"kind": "out", "blob": self._put_blob(sealed)}, {})
            return self._reply(env.sender, job_id, MpcReply())
        except GridError as exc:
            end.send({"kind": "error", "code": exc.code, "message": exc.message}, {})
            raise
        except Exception as exc:  # a bug or a bad bundle: tell the host now rather than let it time out
            log.exception("session %s failed", body.session)
            end.send({"kind": "error", "code": JobFailed.code, "message": f"{type(exc).__name__}: {exc}"[:500]}, {})
            raise JobFailed(f"party {self.id!r} failed: {type(exc).__name__}") from None

    def _materials(self, card: ModelCard, bundles: list[str]) -> Iterator[Material]:
        provider = self.peer(card.provider)
        for bundle in bundles:
            where = _bundle_key(bundle, self.id)
            yield unpack_part(open_signed(self.identity, provider, where,
                                         claims.take_internal(self.redis, where))).materialize()

    # --- secure aggregation party -------------------------------------------------------------

    def aggregate(self, raw: Any, job_id: str) -> dict[str, Any]:
        """Add up this party's shares of a round's updates; the sum goes to the requester, sealed."""
        env = self._open(raw, job_id, senders=self.users)  # a scientist this node knows
        body = parse(Aggregate, env.body_json())
        marker = f"gridq:mpc:aggregated:{self.id}:{body.round}"
        if not self.redis.set(marker, env.sender, nx=True, ex=24 * 3600):
            raise PermissionDenied(f"round {body.round} was already added up by {self.id!r}: a second sum over "
                                   "other nodes would give an update away")
        total: torch.Tensor | None = None
        for node, key in sorted(body.shares.items()):
            data = open_signed(self.identity, self.directory.key(node), aggregation_label(body.round, node),
                               self._blob(key))
            part = unpack(data)[0]["s"]
            if part.dtype != torch.int64 or (total is not None and part.shape != total.shape):
                raise InvalidRequest(f"the share of {node!r} is not a ring tensor of the round's shape")
            total = part if total is None else total + part
        assert total is not None
        sealed = self.users[env.sender].seal(pack({"sum": total}))
        log.info("added up %d shares of round %s for %r", len(body.shares), body.round, env.sender)
        return self._reply(env.sender, job_id, MpcReply(outputs={self.id: self._put_blob(sealed)}))

    # --- crypto provider ----------------------------------------------------------------------

    def deal(self, raw: Any, job_id: str) -> dict[str, Any]:
        env = self._open(raw, job_id)
        body = parse(Deal, env.body_json())
        if self.id in body.parties:
            raise PermissionDenied(f"{self.id!r} is a party of this computation: it cannot also be its dealer")
        if len(body.needs) != len(body.pools):
            raise InvalidRequest("one pool list per need")
        keys = [self.peer(p) for p in body.parties]
        dealer = Dealer(len(body.parties))
        for need, pool in zip(body.needs, body.pools, strict=True):
            for _ in range(body.count):
                bundle = uuid.uuid4().hex
                pipe = self.redis.pipeline()
                for party, key, part in zip(body.parties, keys, need.deal(dealer, body.frac_bits), strict=True):
                    where = _bundle_key(bundle, party)
                    pipe.set(where, seal_signed(self.identity, key, where, pack_part(part)), ex=CLAIM_CHECK_TTL_SECONDS)
                pipe.rpush(pool, bundle)
                pipe.expire(pool, CLAIM_CHECK_TTL_SECONDS)
                pipe.execute()
        log.info("dealt %d bundle(s) of %d shape(s) for %s", body.count, len(body.needs), env.sender)
        return self._reply(env.sender, job_id, MpcReply())


def _check_roles(card: ModelCard) -> None:
    if len(set(card.parties)) != len(card.parties) or len(card.parties) < 2:
        raise InvalidRequest(f"a model is shared among at least 2 distinct parties, not {card.parties}")
    if card.provider in card.parties:
        raise InvalidRequest(f"the crypto provider {card.provider!r} cannot also hold shares: it could unmask them")
    if card.host in card.parties:
        raise InvalidRequest(f"the host {card.host!r} cannot also hold shares; choose another node as host")


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def mpc_tasks(app: Celery, config: NodeConfig) -> None:
    holder: dict[str, MpcMember] = {}

    def member() -> MpcMember:  # built in the worker process, after the fork
        if "m" not in holder:
            holder["m"] = MpcMember(config, app)
        return holder["m"]

    for task, method in ((Tasks.MPC_SERVE, "serve"), (Tasks.MPC_STORE, "store"), (Tasks.MPC_QUERY, "query"),
                         (Tasks.MPC_SESSION, "session"), (Tasks.MPC_DEAL, "deal"),
                         (Tasks.MPC_AGGREGATE, "aggregate")):
        _register(app, task, method, member)


def _register(app: Celery, task: str, method: str, member: Any) -> None:
    @app.task(name=task, bind=True)
    def run(self: Any, envelope: Any) -> dict[str, Any]:
        return member().handle(method, envelope, self.request.id)  # type: ignore[no-any-return]

