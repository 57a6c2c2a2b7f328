"""What every MPC role of a node works with: its identity and users, the broker (for
rounds, pools and claim-checks), the gateway's directory of node keys, and its store."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

from celery import Celery
from pydantic import BaseModel

from protocol.contract import mpc_queue
from protocol.envelope import MemoryNonceStore, seal_envelope
from protocol.errors import UnknownSender
from protocol.identity import PublicIdentity
from workers import claims
from workers.config import NodeConfig
from workers.directory import Directory
from workers.rounds import connect
from workers.store import Store


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
        self.directory = Directory(app, self.redis, config.mpc.round_timeout)
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

    def send(self, node: str, task: str, body: BaseModel, job_id: str, ttl: float = 600.0) -> Any:
        """Send a signed message to another node's MPC worker; its AsyncResult."""
        env = seal_envelope(self.identity, recipient=node, kind=body.kind, job_id=job_id,  # type: ignore[attr-defined]
                            body=body.model_dump(mode="json"), now=time.time(), ttl=ttl)
        return self.app.send_task(task, args=[env.model_dump(mode="json")], queue=mpc_queue(node), task_id=job_id)

    def take(self, key: str) -> bytes:
        """Take a sealed value left by claim-check under a key a message named."""
        return claims.take(self.redis, key)

    def leave(self, data: bytes) -> str:
        return claims.leave(self.redis, data)


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
