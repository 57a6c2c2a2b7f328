"""Starting a node's Celery worker from its config (``gridq node start CONFIG``)."""

from __future__ import annotations

from pathlib import Path

import torch

from protocol.contract import mpc_queue, node_queue
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
    own_in_flight(app, node_queue(config.id))
    app.worker_main([
        "worker", "--queues", node_queue(config.id), "--hostname", f"{config.id}@%h",
        "--pool", "prefork", "--concurrency", str(config.worker.concurrency),
        "--task-events", "--without-mingle", "--without-gossip", "--loglevel", loglevel,
    ])


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
    own_in_flight(app, mpc_queue(config.id))
    app.worker_main([
        "worker", "--queues", mpc_queue(config.id), "--hostname", f"{config.id}-mpc@%h",
        "--pool", "prefork", "--concurrency", "1",
        "--task-events", "--without-mingle", "--without-gossip", "--loglevel", loglevel,
    ])
