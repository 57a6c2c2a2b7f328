"""What every MPC role of a node works with: its identity and users, the broker (for
rounds, pools and claim-checks), the gateway's directory of node keys, and its store."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping

from celery import Celery
from pydantic import BaseModel

from protocol.broker import parse_broker
from protocol.contract import alive_key, mpc_peer_queue, mpc_queue_for, mpc_session_key
from protocol.envelope import MemoryNonceStore, seal_envelope
from protocol.errors import NodeUnavailable, UnknownSender
from protocol.identity import PublicIdentity
from workers.config import NodeConfig
from workers.directory import Directory
from workers.mpc.rounds import connect
from workers.storage import claims
from workers.storage.store import Store


class MpcMember:
    """One node's MPC worker: the state its roles (host, party, aggregator, dealer) share."""

    def __init__(self, config: NodeConfig, app: Celery) -> None:
        self.config = config
        self.id = config.id
        self.identity = config.identity()
        self.app = app
        self.redis = connect(config.node.broker, max(config.mpc.round_timeout, config.mpc.deal_timeout))
        self.users = config.keyring()
        self.nonces = MemoryNonceStore()  # replays within this process; envelopes expire soon after
        self.directory = Directory(config.node.broker, self.redis)
        self.store = Store(config.node.store, config.database_url)  # the node's database, its SQLite settings
        self.peers = Peers(self)

    def peer(self, name: str) -> PublicIdentity:
        """A configured user's key, else a node's as the gateway lists it (signed by the gateway)."""
        if name in self.users:
            return self.users[name]
        try:
            return self.directory.key(name)
        except UnknownSender:
            raise UnknownSender(f"{name!r} is neither a user of {self.id!r} nor a node registered at the gateway"
                                ) from None

    def send(self, node: str, task: str, body: BaseModel, job_id: str, ttl: float = 600.0) -> None:
        """Send a signed message to another node's MPC worker. Its answer is not waited for
        here: what a host needs back comes on lists (rounds, pools, acks)."""
        env = seal_envelope(self.identity, recipient=node, kind=body.kind, job_id=job_id,  # type: ignore[attr-defined]
                            body=body.model_dump(mode="json"), now=time.time(), ttl=ttl)
        self.app.send_task(task, args=[env.model_dump(mode="json")], queue=mpc_queue_for(node, task), task_id=job_id,
                           ignore_result=True)

    def hand_out(self, sessions: Mapping[str, tuple[str, BaseModel]], ttl: float) -> None:
        """Push each party its signed session, ``{party: (job_id, body)}``, on its session
        list (``workers.mpc.lists``), all in one round trip. A list no party pops empties
        itself after ``ttl`` and a minute; an envelope older than ``ttl`` is refused anyway."""
        pipe = self.redis.pipeline(transaction=False)
        for party, (job_id, body) in sessions.items():
            env = seal_envelope(self.identity, recipient=party, kind=body.kind,  # type: ignore[attr-defined]
                                job_id=job_id, body=body.model_dump(mode="json"), now=time.time(), ttl=ttl)
            key = mpc_session_key(party)
            pipe.rpush(key, json.dumps(env.model_dump(mode="json")))
            pipe.expire(key, int(ttl) + 60)
        pipe.execute()

    def require_live(self, nodes: list[str], role: str) -> None:
        """Fail now, rather than at a timeout, if one of ``nodes`` has no MPC worker serving
        its peers (``workers.beacon`` keeps ``alive_key`` set while one does)."""
        seen = self.redis.mget([alive_key(mpc_peer_queue(n)) for n in nodes])
        down = [n for n, mark in zip(nodes, seen, strict=True) if mark is None]
        if down:
            verb = "has" if len(down) == 1 else "have"
            raise NodeUnavailable(f"{role} {', '.join(map(repr, down))} of this model {verb} no MPC worker running "
                                  "(`gridq mpc start` on that node)")

    def take(self, key: str) -> bytes:
        """Take a sealed value left by claim-check under a key a message named."""
        return claims.take(self.redis, key)

    def leave(self, data: bytes) -> str:
        broker = parse_broker(self.config.node.broker)
        return claims.leave(self.redis, data, broker.wait_replicas, broker.wait_timeout)


class Peers(Mapping[str, PublicIdentity]):
    """Keys of whoever may send to an MPC worker: its users, and the nodes the gateway lists
    (looked up as messages arrive)."""

    def __init__(self, member: MpcMember) -> None:
        self.member = member

    def __getitem__(self, name: str) -> PublicIdentity:
        return self.member.peer(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.member.users)

    def __len__(self) -> int:
        return len(self.member.users)
