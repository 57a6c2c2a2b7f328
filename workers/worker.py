"""Starting a node's Celery worker from its config (``gridq node start CONFIG``)."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from protocol.broker import GRIDQ_BROKER
from protocol.contract import ALIVE_EVERY_SECONDS, ALIVE_TTL_SECONDS, alive_key, mpc_peer_queue, mpc_queue, node_queue
from protocol.errors import NodeUnavailable
from workers.beacon import Posting, keep_posted
from workers.broker import redis_client
from workers.config import NodeConfig, load_config
from workers.inbox import own_in_flight
from workers.jobs.training import warm_up
from workers.mpc import mpc_tasks
from workers.node import Node, make_celery, worker_tasks
from workers.policy.approvals import sweep_every


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
    node.expire_requests()  # requests left undecided past [approval] expire_after: their requesters are told
    node.refresh_parked()  # the word that a job waits, signed again where it would expire (it lasts a day)
    node.close()  # the worker processes open their own connections after the fork
    worker_tasks(app, config)
    _keep_sweeping(config)
    _serve(app, node_queue(config.id), f"{config.id}@%h", config.worker.concurrency, loglevel)


def _keep_sweeping(config: NodeConfig) -> None:
    """While the worker serves, close the requests left undecided past ``[approval]
    expire_after`` and tell their requesters (``Node.expire_requests``), and keep the word
    that a job waits for its owner valid (``Node.refresh_parked``), every ``sweep_every``
    seconds, from a thread of the main process: with a Celery app and a node of its own,
    opened for each sweep and closed after it (no connection is shared with the pool's
    processes, or outlives a sweep)."""
    every = sweep_every(config.approval.expire_after)
    stop = threading.Event()

    def sweep() -> None:
        app = make_celery(config)
        while not stop.wait(every):
            try:
                node = Node(config, app)
                try:
                    node.expire_requests()
                    node.refresh_parked()
                finally:
                    node.close()
            except Exception as exc:  # the broker down, the database busy: again at the next sweep
                log.warning("the approval queue's sweep failed, tried again in %.1f s: %s", every, exc)

    def ready(**_: object) -> None:
        threading.Thread(target=sweep, name="approval queue sweep", daemon=True).start()

    worker_ready.connect(ready, weak=False)
    worker_shutdown.connect(lambda **_: stop.set(), weak=False)


log = logging.getLogger(__name__)
MPC_ROLES = ("both", "users", "peers")
PEER_START_SECONDS = 60.0


def start_mpc(config_path: str | Path, loglevel: str = "INFO", serve: str = "both") -> None:
    """Register with the gateway, then serve the node's MPC queues: ``mpc.<id>`` for its
    users (a host: serve, query; secure aggregation) and ``mpc-peer.<id>`` for other nodes'
    MPC workers (a party: keep shares, run sessions; a crypto provider: deal). Each has a
    pool of its own — a host's query waits on its parties and dealer, and would wait forever
    on one that hosts for it in turn if both shared one pool (``workers.mpc``) — so ``both``
    (the default) runs the peers' pool as a child process of this one, ready before the
    users' pool starts, and stops with it."""
    if serve not in MPC_ROLES:
        raise ValueError(f"serve one of {', '.join(MPC_ROLES)}, not {serve!r}")
    config = load_config(config_path).for_mpc()
    config.keyring()  # a missing user key file stops the worker here, not each query later
    torch.set_num_threads(config.worker.torch_threads)
    app = make_celery(config)
    if serve == "peers":
        mpc_tasks(app, config, peers=True)
        _serve(app, mpc_peer_queue(config.id), f"{config.id}-mpc-peer@%h", config.mpc.sessions, loglevel)
        return
    node = Node(config, app)
    node.register()
    node.close()
    if serve == "both":
        _start_peers(config_path, loglevel, config.node.broker, mpc_peer_queue(config.id))
    mpc_tasks(app, config, peers=False)
    _serve(app, mpc_queue(config.id), f"{config.id}-mpc@%h", 1, loglevel)


def _start_peers(config_path: str | Path, loglevel: str, broker: str, queue: str) -> None:
    """``gridq mpc start --serve peers`` as a child that dies with this process (Linux:
    PR_SET_PDEATHSIG) and is stopped when this worker stops; once it serves, this one
    starts. If the child ends, this worker ends too: one command, one unit to supervise."""
    child = subprocess.Popen([sys.executable, "-m", "ops.cli", "mpc", "start", str(config_path), "--loglevel",
                              loglevel, "--serve", "peers"], preexec_fn=_die_with_parent)
    with redis_client(broker) as client:
        deadline = time.monotonic() + PEER_START_SECONDS
        # its own post (its pid), not one a killed predecessor left to expire
        while client.get(alive_key(queue)) != str(child.pid).encode():
            if child.poll() is not None or time.monotonic() > deadline:
                child.kill()
                raise NodeUnavailable(f"the MPC worker for other nodes ({queue}) did not start within "
                                      f"{PEER_START_SECONDS:g} s; its log is above")
            time.sleep(0.2)

    stopped = threading.Event()

    def stopping(**_: object) -> None:
        stopped.set()
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()

    def watch() -> None:
        code = child.wait()
        if stopped.is_set():
            return
        log.error("the MPC worker for other nodes (%s) ended with code %s: stopping this one too", queue, code)
        os.kill(os.getpid(), signal.SIGTERM)

    worker_shutdown.connect(stopping, weak=False)
    threading.Thread(target=watch, name="mpc peers", daemon=True).start()


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the parent still stops it when it stops cleanly


def _serve(app: Celery, queue: str, hostname: str, concurrency: int, loglevel: str) -> None:
    """Serve ``queue`` (and only it) until stopped, saying so on the broker while it does
    (``alive_key``: refreshed from the moment the worker is ready, deleted when it stops)."""
    own_in_flight(app, queue)
    beacon: list[Posting] = []

    def ready(**_: object) -> None:
        # its pid: whoever started this worker tells its post from one left by a worker killed before it
        url = app.conf.get(GRIDQ_BROKER) or app.conf.broker_url  # the gridq URL (broker_url is kombu's form of it)
        beacon.append(keep_posted(url, alive_key(queue), str(os.getpid()), every=ALIVE_EVERY_SECONDS,
                                  ttl=ALIVE_TTL_SECONDS))

    def stopping(**_: object) -> None:
        for posting in beacon:
            posting.stop()

    worker_ready.connect(ready, weak=False)
    worker_shutdown.connect(stopping, weak=False)
    # the pool's processes share the parent's pages copy-on-write; a collection in one of them
    # would write to every object it walks, copying those pages (117 → 32 MB private a process, measured)
    gc.collect()
    gc.freeze()
    app.worker_main([
        "worker", "--queues", queue, "--hostname", hostname, "--pool", "prefork", "--concurrency", str(concurrency),
        "--task-events", "--without-mingle", "--without-gossip", "--loglevel", loglevel,
    ])
