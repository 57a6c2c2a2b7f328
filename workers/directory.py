"""Other nodes' public keys, as the gateway lists them — signed by the gateway, whose key
is the one posted in Redis when it started, pinned on first contact (``protocol.pinning``):
a key posted later by whoever can write the broker is refused, not trusted. Nodes use the
directory to seal to each other (MPC parties, secure-aggregation parties) and to verify
each other's messages."""

from __future__ import annotations

import time
import uuid

import redis
from celery import Celery
from celery.exceptions import TimeoutError as ResultTimeout

from protocol.contract import GATEWAY, GATEWAY_IDENTITY_KEY, GATEWAY_QUEUE, PUBLIC, Tasks
from protocol.envelope import MemoryNonceStore, open_envelope
from protocol.errors import NodeUnavailable, UnknownSender, error_from_wire
from protocol.identity import PublicIdentity
from protocol.messages import GatewayReply
from protocol.pinning import GatewayPins, MemoryPins, broker_address, posted_gateway_key, trust_on_first_use
from protocol.serving import parse


class Directory:
    def __init__(self, app: Celery, client: redis.Redis, timeout: float, pins: GatewayPins | None = None,
                 accept: str = "restart this worker (it pins the key posted then)") -> None:
        """``pins``: where the gateway key is pinned (the node's store; without one, this
        process's memory). ``accept``: how a rotated key is accepted there."""
        self.app = app
        self.redis = client
        self.timeout = timeout
        self.pins: GatewayPins = pins if pins is not None else MemoryPins()
        self.accept = accept
        self._keys: dict[str, PublicIdentity] = {}

    def key(self, node: str) -> PublicIdentity:
        """``node``'s key; asks the gateway again for a node not seen before."""
        if node not in self._keys:
            self.refresh()
        if node not in self._keys:
            raise UnknownSender(f"{node!r} is not a node registered at the gateway")
        return self._keys[node]

    def refresh(self) -> None:
        posted = self.redis.get(GATEWAY_IDENTITY_KEY)
        if posted is None:
            raise NodeUnavailable("no gateway has started on this broker")
        address = broker_address(self.app.conf.broker_url)
        key = trust_on_first_use(self.pins, address, posted_gateway_key(posted, address), accept=self.accept)
        gateway = PublicIdentity.parse(GATEWAY, key)
        job_id = uuid.uuid4().hex
        try:
            raw = self.app.send_task(Tasks.NODES, queue=GATEWAY_QUEUE, task_id=job_id).get(
                timeout=self.timeout, disable_sync_subtasks=False)
        except ResultTimeout:
            raise NodeUnavailable(f"the gateway did not list the nodes within {self.timeout:g} s") from None
        env = open_envelope(raw, recipient=PUBLIC, keyring={GATEWAY: gateway}, nonces=MemoryNonceStore(),
                            delivery_id=job_id, now=time.time())
        reply = parse(GatewayReply, env.body_json())
        if reply.error is not None:
            raise error_from_wire(reply.error.model_dump())
        self._keys.update({n.node: PublicIdentity.parse(n.node, n.public_key) for n in reply.nodes})
