"""Starting a node's Celery worker from its config (``gridq node start CONFIG``)."""

from __future__ import annotations

from pathlib import Path

import torch
from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from protocol.contract import ALIVE_EVERY_SECONDS, ALIVE_TTL_SECONDS, alive_key, mpc_queue, node_queue
from workers.beacon import Posting, keep_posted
from workers.config import load_config
from workers.inbox import own_in_flight
from workers.mpc import mpc_tasks
from workers.node import Node, make_celery, worker_tasks
from workers.training import warm_up


def start_node(config_path: str | Path, loglevel: str = "INFO") -> None:
    """Load the config's datasets, register with the gateway, then serve the node's queue
    (and only it) until stopped."""
    config = load_config(config_path)
    torch.set_num_threads(config.worker.torch_threads)  # also before the fork: see WorkerSection
    warm_up()
    app = make_celery(config)
    node = Node(config, app)
    node.load_config_datasets()
    node.register()
    node.resume_decisions()  # answers the owner decided while this worker or the broker was down
    node.close()  # the worker processes open their own connections after the fork
    worker_tasks(app, config)
    _serve(app, node_queue(config.id), f"{config.id}@%h", config.worker.concurrency, loglevel)


def start_mpc(config_path: str | Path, loglevel: str = "INFO") -> None:
    """Register with the gateway, then serve the node's MPC queue (``mpc.<id>``): host,
    party or crypto provider, as the messages it receives ask."""
    config = load_config(config_path).for_mpc()
    config.keyring()  # a missing user key file stops the worker here, not each query later
    torch.set_num_threads(config.worker.torch_threads)
    app = make_celery(config)
    node = Node(config, app)
    node.register()
    node.close()
    mpc_tasks(app, config)
    _serve(app, mpc_queue(config.id), f"{config.id}-mpc@%h", 1, loglevel)


def _serve(app: Celery, queue: str, hostname: str, concurrency: int, loglevel: str) -> None:
    """Serve ``queue`` (and only it) until stopped, saying so on the broker while it does
    (``alive_key``: refreshed from the moment the worker is ready, deleted when it stops)."""
    own_in_flight(app, queue)
    beacon: list[Posting] = []

    def ready(**_: object) -> None:
        beacon.append(keep_posted(app.conf.broker_url, alive_key(queue), "1", every=ALIVE_EVERY_SECONDS,
                                  ttl=ALIVE_TTL_SECONDS))

    def stopping(**_: object) -> None:
        for posting in beacon:
            posting.stop()

    worker_ready.connect(ready, weak=False)
    worker_shutdown.connect(stopping, weak=False)
    app.worker_main([
        "worker", "--queues", queue, "--hostname", hostname, "--pool", "prefork", "--concurrency", str(concurrency),
        "--task-events", "--without-mingle", "--without-gossip", "--loglevel", loglevel,
    ])
