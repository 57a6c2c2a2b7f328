"""Running the gateway worker: the registry's logic (``workers.gateway.service.Gateway``) in
the grid's one worker shell (``workers.tasks.answer_tasks``), its public key posted where
clients read it."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

import redis
from celery import Celery

from orchestrator.app import make_celery
from protocol.contract import (
    GATEWAY,
    GATEWAY_IDENTITY_KEY,
    GATEWAY_NODES_KEY,
    GATEWAY_QUEUE,
    Tasks,
    alive_key,
    node_queue,
)
from protocol.identity import Identity
from protocol.listing import LISTING_EVERY_SECONDS, LISTING_MAX_AGE_SECONDS, sign_listing
from workers.beacon import keep_posted
from workers.broker import redis_client
from workers.gateway.registry import Registry
from workers.gateway.service import Gateway
from workers.inbox import own_in_flight
from workers.tasks import answer_tasks

log = logging.getLogger(__name__)
GATEWAY_TASKS = (Tasks.REGISTER, Tasks.PUBLISH, Tasks.UNPUBLISH, Tasks.SEARCH, Tasks.NODES)
REPOST_SECONDS = 10.0


def make_gateway_app(broker: str, identity: Identity, database_url: str) -> Celery:
    identity = replace(identity, name=GATEWAY)  # the gateway signs as "gateway", whatever its key file says
    app = make_celery(broker, name="gridq-gateway")

    def gateway() -> Gateway:  # in each pool process
        registry = Registry(database_url)
        return Gateway(identity, registry, NodesUp(broker), registered=NodeListing(broker, identity, registry).post)

    answer_tasks(app, GATEWAY_TASKS, gateway)
    own_in_flight(app, GATEWAY_QUEUE)
    return app


class NodeListing:
    """The registered nodes' keys, signed as of now (``protocol.listing``): what the gateway
    posts under ``GATEWAY_NODES_KEY``."""

    def __init__(self, broker: str, identity: Identity, registry: Registry) -> None:
        self.broker, self.identity, self.registry = broker, identity, registry
        self._client: redis.Redis | None = None

    def signed(self) -> str:
        return sign_listing(self.identity, self.registry.nodes(), time.time())

    def post(self) -> None:
        """Post it now; a broker that is down gets it at the next repost."""
        try:
            if self._client is None:
                self._client = redis_client(self.broker)
            self._client.setex(GATEWAY_NODES_KEY, int(LISTING_MAX_AGE_SECONDS), self.signed())
        except redis.RedisError as exc:
            log.warning("could not post the node listing: %s", exc)


class NodesUp:
    """Which nodes have a live worker: those whose queue's liveness key is set (``workers.beacon``)."""

    def __init__(self, broker: str) -> None:
        self.client = redis_client(broker)

    def __call__(self, nodes: list[str]) -> set[str]:
        if not nodes:
            return set()
        seen = self.client.mget([alive_key(node_queue(n)) for n in nodes])
        return {n for n, mark in zip(nodes, seen, strict=True) if mark is not None}


def start_gateway(broker: str, identity: Identity, database_url: str, loglevel: str = "INFO") -> None:
    """Post the gateway's public key in Redis, then serve the gateway queue until stopped."""
    app = make_gateway_app(broker, identity, database_url)
    # again and again: a broker that lost it (restarted without its append-only file, or flushed) has it back soon
    keep_posted(broker, GATEWAY_IDENTITY_KEY, json.dumps({"name": GATEWAY, "public_key": identity.public.text()}),
                every=REPOST_SECONDS)
    # the listing also goes out after each registration (above); reposted, it stays recent and drops unenrolled
    # nodes; it expires when it would be too old to trust: a gateway that stopped leaves none behind
    listing = NodeListing(broker, identity, Registry(database_url))

    def signed() -> str:  # in the main process: no database connection left open for the pool's forks
        try:
            return listing.signed()
        finally:
            listing.registry.engine.dispose()

    keep_posted(broker, GATEWAY_NODES_KEY, signed, every=LISTING_EVERY_SECONDS, ttl=LISTING_MAX_AGE_SECONDS)
    app.worker_main([
        "worker", "--queues", GATEWAY_QUEUE, "--hostname", "gateway@%h", "--pool", "prefork",
        "--concurrency", "1", "--task-events", "--without-mingle", "--without-gossip",
        "--loglevel", loglevel,
    ])
