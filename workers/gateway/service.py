"""The gateway worker: the grid's registry and search, behind the ``gateway`` queue.

Nodes the operator enrolled (``gridq enrol``) send signed registrations and publications;
anyone may search. Every answer is an envelope signed by the gateway, whose public key is
posted in Redis (``ops.gateway``) so clients can check it (or pin it:
``Grid.connect(..., gateway_key=...)``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from protocol.contract import PUBLIC, Tasks
from protocol.envelope import Envelope
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
from workers.gateway.nonces import RegistryNonces
from workers.gateway.registry import Registry, not_enrolled

log = logging.getLogger(__name__)


class Gateway:
    """The registry's logic, free of Celery: one route per message. Node messages are
    verified against the node's enrolled key, their nonces kept in the registry's database
    (a replay after a restart is still a replay), and the registry refuses stale ones."""

    def __init__(self, identity: Identity, registry: Registry,
                 up: Callable[[list[str]], set[str]] | None = None,
                 registered: Callable[[], None] | None = None) -> None:
        """``up``: which of the given nodes have a live worker (``ops.gateway`` reads the
        workers' liveness keys); a search leaves the others' datasets out. None: all are.
        ``registered``: called after each registration (``ops.gateway`` posts the node
        listing again, so a node's peers find its key at once)."""
        self.identity = identity
        self.registry = registry
        self.up = up
        self.registered = registered
        self.server = EnvelopeServer(identity, RegistryNonces(registry), _failure)
        self.routes = {"register": Route(RegisterNode, self._register), "publish": Route(PublishDataset, self._publish),
                       "unpublish": Route(UnpublishDataset, self._unpublish)}

    def answer(self, task: str, payload: Any, delivery_id: str) -> Answer:
        if task == Tasks.SEARCH:
            return self._answer(lambda: self.search(payload), delivery_id)
        if task == Tasks.NODES:
            return self._answer(lambda: GatewayReply(nodes=self.registry.nodes()), delivery_id)
        return self.server.open_and_answer(payload, delivery_id, _KeyringFor(self.registry, payload), self._from_node)

    def _from_node(self, env: Envelope) -> Answer:
        """A signed registration, publication or withdrawal from a node."""
        answer = self._answer(lambda: self.server.route(env, self.routes), env.job_id)
        log.info("%s from node %r", env.kind, env.sender)
        return answer

    def _answer(self, work: Callable[[], GatewayReply], job_id: str) -> Answer:
        """The reply ``work`` gives (or its error, by the one policy), signed for anyone to read."""
        return Answer(self.server.sign(PUBLIC, job_id, self.server.guarded(work, job_id)))

    def _register(self, env: Envelope, body: RegisterNode) -> GatewayReply:
        self.registry.register(env.sender, body.public_key, list(body.datasets), issued_at=env.issued_at,
                               nonce=env.nonce)
        if self.registered is not None:
            self.registered()
        return GatewayReply()

    def _publish(self, env: Envelope, body: PublishDataset) -> GatewayReply:
        self.registry.publish(env.sender, body.dataset, issued_at=env.issued_at, nonce=env.nonce)
        return GatewayReply()

    def _unpublish(self, env: Envelope, body: UnpublishDataset) -> GatewayReply:
        self.registry.unpublish(env.sender, body.name, issued_at=env.issued_at, nonce=env.nonce)
        return GatewayReply()

    def search(self, query: Any) -> GatewayReply:
        q = parse(SearchQuery, query)
        found = self.registry.search(list(q.tags), list(q.words), q.node)
        if self.up is not None:  # a node with no live worker would only hold the jobs sent to it
            up = self.up(sorted({meta.node for meta in found}))
            found = [meta for meta in found if meta.node in up]
        return GatewayReply(datasets=found, nodes=self.registry.nodes())


def _failure(exc: GridError, job_id: str) -> GatewayReply:
    return GatewayReply(error=WireError(**exc.to_wire()))


class _KeyringFor(Mapping[str, PublicIdentity]):
    """The one key a node's message may be signed with: its sender's enrolled key.

    Looking up a sender that is not enrolled, or a registration presenting another key than
    the enrolled one, raises NotEnrolled naming the operator's command, which the envelope
    check (``open_envelope`` looks the sender up before anything else) answers as the refusal.
    """

    def __init__(self, registry: Registry, raw: Any) -> None:
        sender = raw.get("sender") if isinstance(raw, dict) else None
        self._sender = sender if isinstance(sender, str) else None
        self._key = registry.enrolled_key(self._sender) if self._sender is not None else None
        self._presented: str | None = None
        if isinstance(raw, dict) and raw.get("kind") == "register":
            try:
                presented = json.loads(raw.get("body", ""))["public_key"]
            except (ValueError, KeyError, TypeError):
                presented = None  # a malformed body: the route refuses it once the signature checks out
            self._presented = presented if isinstance(presented, str) else None

    def __getitem__(self, name: str) -> PublicIdentity:
        if name != self._sender:
            raise KeyError(name)
        if self._key is None or (self._presented is not None and self._presented != self._key):
            raise not_enrolled(name, self._key, self._presented)
        return PublicIdentity.parse(name, self._key)

    def __iter__(self) -> Iterator[str]:
        return iter([self._sender] if self._sender is not None and self._key is not None else [])

    def __len__(self) -> int:
        return len(list(iter(self)))
