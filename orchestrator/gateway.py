"""The gateway worker: the grid's registry and search, behind the ``gateway`` queue.

Nodes send signed registrations and publications; anyone may search. Every answer is an
envelope signed by the gateway, whose public key is posted in Redis at start so clients
can check it (or pin it: ``Grid.connect(..., gateway_key=...)``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import Any

import redis
from celery import Celery
from celery.app import trace

from orchestrator.app import make_celery
from orchestrator.registry import Registry
from protocol.contract import GATEWAY, GATEWAY_IDENTITY_KEY, GATEWAY_QUEUE, PUBLIC, Tasks
from protocol.envelope import MemoryNonceStore, open_envelope, seal_envelope
from protocol.errors import GridError, InvalidRequest
from protocol.identity import Identity, PublicIdentity
from protocol.messages import (
    GatewayReply,
    PublishDataset,
    RegisterNode,
    SearchQuery,
    UnpublishDataset,
    WireError,
    parse_body,
)

log = logging.getLogger(__name__)


class Gateway:
    """The registry's logic, free of Celery: one method per message."""

    def __init__(self, identity: Identity, registry: Registry) -> None:
        self.identity = identity
        self.registry = registry
        self.nonces = MemoryNonceStore()

    def from_node(self, raw: Any, delivery_id: str) -> dict[str, Any]:
        """Handle a signed registration, publication or withdrawal from a node."""
        try:
            env = open_envelope(raw, recipient=GATEWAY, keyring=_KeyringFor(self.registry, raw),
                                nonces=self.nonces, delivery_id=delivery_id, now=time.time())
            body = parse_body(env.body_json(), env.job_id)
            if isinstance(body, RegisterNode):
                self.registry.register(env.sender, body.public_key, list(body.datasets))
            elif isinstance(body, PublishDataset):
                self.registry.publish(env.sender, body.dataset)
            elif isinstance(body, UnpublishDataset):
                self.registry.unpublish(env.sender, body.name)
            else:
                raise InvalidRequest(f"the gateway does not take {body.kind!r} messages")
            log.info("%s from node %r", body.kind, env.sender)
            return self._sign(delivery_id, GatewayReply())
        except GridError as exc:
            log.warning("refused node message %s: %s", delivery_id, exc)
            return self._sign(delivery_id, GatewayReply(error=WireError(**exc.to_wire())))

    def search(self, query: Any, delivery_id: str) -> dict[str, Any]:
        try:
            q = SearchQuery.model_validate(query)
        except ValueError as exc:
            return self._sign(delivery_id, GatewayReply(
                error=WireError(code=InvalidRequest.code, message=f"malformed search: {exc}"[:4000])))
        found = self.registry.search(list(q.tags), list(q.words), q.node)
        return self._sign(delivery_id, GatewayReply(datasets=found, nodes=self.registry.nodes()))

    def nodes(self, delivery_id: str) -> dict[str, Any]:
        return self._sign(delivery_id, GatewayReply(nodes=self.registry.nodes()))

    def _sign(self, job_id: str, reply: GatewayReply) -> dict[str, Any]:
        env = seal_envelope(self.identity, recipient=PUBLIC, kind=reply.kind, job_id=job_id,
                            body=reply.model_dump(mode="json"), now=time.time())
        return env.model_dump(mode="json")


class _KeyringFor(dict[str, PublicIdentity]):
    """A node's pinned key; on its first registration, the key it presents (TOFU)."""

    def __init__(self, registry: Registry, raw: Any) -> None:
        super().__init__()
        sender = raw.get("sender") if isinstance(raw, dict) else None
        if not isinstance(sender, str):
            return
        key = registry.pinned_key(sender)
        if key is None and raw.get("kind") == "register":
            try:
                key = json.loads(raw.get("body", ""))["public_key"]
            except (ValueError, KeyError, TypeError):
                return
        if isinstance(key, str):
            try:
                self[sender] = PublicIdentity.parse(sender, key)
            except GridError:
                return


def make_gateway_app(broker: str, identity: Identity, database_url: str) -> Celery:
    identity = replace(identity, name=GATEWAY)  # the gateway signs as "gateway", whatever its key file says
    app = make_celery(broker, name="gridq-gateway")
    holder: dict[str, Gateway] = {}

    def gateway() -> Gateway:  # built in the worker process, after the fork
        if "g" not in holder:
            holder["g"] = Gateway(identity, Registry(database_url))
        return holder["g"]

    def node_message(name: str) -> None:
        @app.task(name=name, bind=True)
        def handle(self: Any, envelope: Any) -> dict[str, Any]:
            return gateway().from_node(envelope, self.request.id)

    for name in (Tasks.REGISTER, Tasks.PUBLISH, Tasks.UNPUBLISH):
        node_message(name)

    @app.task(name=Tasks.SEARCH, bind=True)
    def search(self: Any, query: Any) -> dict[str, Any]:
        return gateway().search(query, self.request.id)

    @app.task(name=Tasks.NODES, bind=True)
    def nodes(self: Any) -> dict[str, Any]:
        return gateway().nodes(self.request.id)

    return app


def start_gateway(broker: str, identity: Identity, database_url: str, loglevel: str = "INFO") -> None:
    """Post the gateway's public key in Redis, then serve the gateway queue until stopped."""
    client = redis.Redis.from_url(broker)
    app = make_gateway_app(broker, identity, database_url)
    client.set(GATEWAY_IDENTITY_KEY, json.dumps({"name": GATEWAY, "public_key": identity.public.text()}))
    client.close()
    trace.LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"  # not the reply: the logs need no body
    app.worker_main([
        "worker", "--queues", GATEWAY_QUEUE, "--hostname", "gateway@%h", "--pool", "prefork",
        "--concurrency", "1", "--task-events", "--without-mingle", "--without-gossip",
        "--loglevel", loglevel,
    ])
