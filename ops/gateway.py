"""Running the gateway worker: the registry's logic (``orchestrator.gateway.Gateway``) in
the grid's one worker shell (``workers.tasks.serve_tasks``), its public key posted where
clients read it."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import replace

import redis
from celery import Celery

from orchestrator.app import make_celery
from orchestrator.gateway import Gateway
from orchestrator.registry import Registry
from protocol.contract import GATEWAY, GATEWAY_IDENTITY_KEY, GATEWAY_QUEUE, Tasks
from protocol.identity import Identity
from workers.inbox import own_in_flight
from workers.tasks import serve_tasks

log = logging.getLogger(__name__)
GATEWAY_TASKS = (Tasks.REGISTER, Tasks.PUBLISH, Tasks.UNPUBLISH, Tasks.SEARCH, Tasks.NODES)
REPOST_SECONDS = 10.0


def make_gateway_app(broker: str, identity: Identity, database_url: str) -> Celery:
    identity = replace(identity, name=GATEWAY)  # the gateway signs as "gateway", whatever its key file says
    app = make_celery(broker, name="gridq-gateway")
    serve_tasks(app, GATEWAY_TASKS, lambda: Gateway(identity, Registry(database_url)))
    own_in_flight(app, GATEWAY_QUEUE)
    return app


def post_key(broker: str, identity: Identity, every: float | None = None) -> threading.Event:
    """Post the gateway's public key now and (with ``every``) again every ``every`` seconds
    from a daemon thread, so that a broker that lost it (restarted without its append-only
    file, or flushed) has it back within that time; the returned event stops the thread."""
    posted = json.dumps({"name": GATEWAY, "public_key": identity.public.text()})
    stop = threading.Event()

    def post() -> None:
        with redis.Redis.from_url(broker) as client:
            client.set(GATEWAY_IDENTITY_KEY, posted)

    def again() -> None:
        while not stop.wait(every):
            try:
                post()
            except redis.RedisError as exc:  # the broker is down: the worker says so too; try again later
                log.warning("could not re-post the gateway key: %s", exc)

    post()
    if every is not None:
        threading.Thread(target=again, name="gateway-key", daemon=True).start()
    return stop


def start_gateway(broker: str, identity: Identity, database_url: str, loglevel: str = "INFO") -> None:
    """Post the gateway's public key in Redis, then serve the gateway queue until stopped."""
    app = make_gateway_app(broker, identity, database_url)
    post_key(broker, identity, every=REPOST_SECONDS)
    app.worker_main([
        "worker", "--queues", GATEWAY_QUEUE, "--hostname", "gateway@%h", "--pool", "prefork",
        "--concurrency", "1", "--task-events", "--without-mingle", "--without-gossip",
        "--loglevel", loglevel,
    ])
