"""The gateway worker: the grid's registry and search, behind the ``gateway`` queue.

Nodes send signed registrations and publications; anyone may search. Every answer is an
envelope signed by the gateway, whose public key is posted in Redis (``ops.gateway``) so
clients can check it (or pin it: ``Grid.connect(..., gateway_key=...)``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from orchestrator.registry import Registry
from protocol.contract import PUBLIC, Tasks
from protocol.envelope import Envelope, MemoryNonceStore
from protocol.errors import GridError
from protocol.identity import Identity, PublicIdentity
from protocol.messages import (
    GatewayReply,
    PublishDataset,
    RegisterNode,
    SearchQuery,
    UnpublishDataset,
    WireError,
)
from protocol.serving import Answer, EnvelopeServer, Route, parse

log = logging.getLogger(__name__)


class Gateway:
    """The registry's logic, free of Celery: one route per message."""

    def __init__(self, identity: Identity, registry: Registry) -> None:
        self.identity = identity
        self.registry = registry
        self.server = EnvelopeServer(identity, MemoryNonceStore(), _failure)
        self.routes = {"register": Route(RegisterNode, self._register), "publish": Route(PublishDataset, self._publish),
                       "unpublish": Route(UnpublishDataset, self._unpublish)}

    def serve(self, task: str, payload: Any, delivery_id: str) -> Answer:
        if task == Tasks.SEARCH:
            return self._answer(lambda: self.search(payload), delivery_id)
        if task == Tasks.NODES:
            return self._answer(lambda: GatewayReply(nodes=self.registry.nodes()), delivery_id)
        return self.server.serve(payload, delivery_id, _KeyringFor(self.registry, payload), self._from_node)

    def _from_node(self, env: Envelope) -> Answer:
        """A signed registration, publication or withdrawal from a node."""
        answer = self._answer(lambda: self.server.route(env, self.routes), env.job_id)
        log.info("%s from node %r", env.kind, env.sender)
        return answer

    def _answer(self, work: Callable[[], GatewayReply], job_id: str) -> Answer:
        """The reply ``work`` gives (or its error, by the one policy), signed for anyone to read."""
        return Answer(self.server.sign(PUBLIC, job_id, self.server.guarded(work, job_id)))

    def _register(self, env: Envelope, body: RegisterNode) -> GatewayReply:
        self.registry.register(env.sender, body.public_key, list(body.datasets))
        return GatewayReply()

    def _publish(self, env: Envelope, body: PublishDataset) -> GatewayReply:
        self.registry.publish(env.sender, body.dataset)
        return GatewayReply()

    def _unpublish(self, env: Envelope, body: UnpublishDataset) -> GatewayReply:
        self.registry.unpublish(env.sender, body.name)
        return GatewayReply()

    def search(self, query: Any) -> GatewayReply:
        q = parse(SearchQuery, query)
        return GatewayReply(datasets=self.registry.search(list(q.tags), list(q.words), q.node),
                            nodes=self.registry.nodes())


def _failure(exc: GridError, job_id: str) -> GatewayReply:
    return GatewayReply(error=WireError(**exc.to_wire()))


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
