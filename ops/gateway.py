"""Running the gateway worker: the registry's logic (``orchestrator.gateway.Gateway``) in
the grid's one worker shell (``workers.tasks.serve_tasks``), its public key posted where
clients read it."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import redis
from celery import Celery

from orchestrator.app import make_celery
from orchestrator.gateway import Gateway
from orchestrator.registry import Registry
from protocol.contract import GATEWAY, GATEWAY_IDENTITY_KEY, GATEWAY_QUEUE, Tasks, alive_key, node_queue
from protocol.identity import Identity
from workers.beacon import keep_posted
from workers.inbox import own_in_flight
from workers.tasks import serve_tasks

log = logging.getLogger(__name__)
GATEWAY_TASKS = (Tasks.REGISTER, Tasks.PUBLISH, Tasks.UNPUBLISH, Tasks.SEARCH, Tasks.NODES)
REPOST_SECONDS = 10.0


def make_gateway_app(broker: str, identity: Identity, database_url: str) -> Celery:
    identity = replace(identity, name=GATEWAY)  # the gateway signs as "gateway", whatever its key file says
    app = make_celery(broker, name="gridq-gateway")
    serve_tasks(app, GATEWAY_TASKS, lambda: Gateway(identity, Registry(database_url), NodesUp(broker)))
    own_in_flight(app, GATEWAY_QUEUE)
    return app


class NodesUp:
    """Which nodes have a live worker: those whose queue's liveness key is set (``workers.beacon``)."""

    def __init__(self, broker: str) -> None:
        self.client = redis.Redis.from_url(broker)

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
    app.worker_main([
        "worker", "--queues", GATEWAY_QUEUE, "--hostname", "gateway@%h", "--pool", "prefork",
        "--concurrency", "1", "--task-events", "--without-mingle", "--without-gossip",
        "--loglevel", loglevel,
    ])
