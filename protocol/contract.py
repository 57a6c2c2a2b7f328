"""The wire contract between the client, the gateway and the nodes, as plain data.

Both sides build their own Celery app from these names and settings; the client sends
tasks by name. Nothing here imports Celery.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

GATEWAY = "gateway"
PUBLIC = "public"  # recipient of answers meant for anyone: gateway answers, refusals of anonymous junk
GATEWAY_QUEUE = "gateway"
GATEWAY_IDENTITY_KEY = "gridq:gateway:identity"  # Redis key where the gateway posts its public key
# where the gateway posts the registered nodes' keys, signed (protocol.listing): a worker
# that needs a peer's key reads it there rather than asking the gateway and waiting
GATEWAY_NODES_KEY = "gridq:gateway:nodes"
# How long a node's registration or publication stays valid on its way to the gateway. It
# waits in the gateway's queue while the gateway is down, so not minutes; but a withheld
# copy must not be replayable for a day (the gateway also refuses one older than what it
# accepted since, and remembers nonces across restarts). A node registers again when it starts.
NODE_MESSAGE_TTL_SECONDS = 3600.0


def node_queue(node_id: str) -> str:
    return f"node.{node_id}"


def mpc_queue(node_id: str) -> str:
    """The queue of a node's MPC worker for its users' requests (serve, query, aggregate):
    it hosts models and coordinates their queries."""
    return f"mpc.{node_id}"


def mpc_peer_queue(node_id: str) -> str:
    """The queue of a node's MPC worker for other nodes' MPC workers (shares to keep,
    bundles to deal; the same pool pops sessions from ``mpc_session_key``). A pool of its
    own: a host waits on its parties and its dealer, so their work must never queue behind
    a host's (``workers.mpc``). Not ``mpc.<id>.…``: node ids may hold dots."""
    return f"mpc-peer.{node_id}"


def mpc_queue_for(node_id: str, task: str) -> str:
    """Where ``task`` goes at ``node_id``'s MPC worker."""
    return mpc_peer_queue(node_id) if task in MPC_FROM_PEERS else mpc_queue(node_id)


MPC_MODELS_KEY = "gridq:mpc:models"  # Redis hash: "owner/model" -> its card, signed by its owner and its host


def alive_key(queue: str) -> str:
    """Set (expiring after ``ALIVE_TTL_SECONDS``) while a worker consumes ``queue``, refreshed
    every ``ALIVE_EVERY_SECONDS`` by its main process: no key, no live worker."""
    return f"gridq:alive:{queue}"


ALIVE_EVERY_SECONDS = 5.0
ALIVE_TTL_SECONDS = 20.0  # a worker killed without a word is down after this long


def sent_key(job_id: str) -> str:
    """Set when a client sends a job, for as long as its result may be read: a ticket for an
    id never sent is NotFound at once, not 'queued' until a timeout."""
    return f"gridq:sent:{job_id}"


def cancel_key(job_id: str) -> str:
    """Who took a job up first, its node or its requester (``protocol.cancel``): the node
    sets it (SET NX) when it starts the job, the requester's ``ticket.cancel()`` to its
    signed cancellation. The first wins: a job is cancelled only before its node starts it,
    and then never runs."""
    return f"gridq:cancel:{job_id}"


def edge_nonce_key(sender: str, nonce: str) -> str:
    """Set (SET NX, expiring with its envelope) when the HTTP edge (``ops.edge``) lets an
    envelope through: a replay is refused by every edge process of the grid, after a restart too."""
    return f"gridq:edge:nonce:{sender}:{nonce}"


def dead_letter_key(queue: str) -> str:
    """The list where a worker of ``queue`` puts what it would not run (``protocol.inbox``):
    junk, and messages given up after too many deliveries; the newest ``DEAD_LETTER_MAX``."""
    return f"gridq:dead:{queue}"


DEAD_LETTER_MAX = 1000
DEAD_LETTER_TTL_SECONDS = 7 * 24 * 3600  # a dead-letter list nobody wrote to for a week goes


def in_flight_keys(queue: str) -> dict[str, str]:
    """kombu's Redis transport options naming where a consumer of ``queue`` keeps the messages
    it has taken but not yet acknowledged (kombu's defaults are one ``unacked`` hash for every
    queue): with keys of its own, a node's broker user reads and restores only its own jobs."""
    return {"unacked_key": f"gridq:unacked:{queue}", "unacked_index_key": f"gridq:unacked_index:{queue}",
            "unacked_mutex_key": f"gridq:unacked_mutex:{queue}"}


# MPC keys name the member whose they are first (host, provider) or last (party), so that
# each node's broker user can be given its own keys only (ops/acl.py); node ids hold no ':'.
def mpc_round_channel(host: str, session: str, sender: str, receiver: str) -> str:
    """The pub/sub channel on which ``sender`` sends its round messages to ``receiver`` in one
    MPC session started by ``host`` (a channel per pair: each node may publish only as the
    sender and subscribe only as the receiver)."""
    return f"gridq:mpc:round:{host}:{session}:{sender}:{receiver}"


def mpc_pool_prefix(host: str, provider: str) -> str:
    """Where ``host``'s pools of bundles dealt by ``provider`` are: the only pools it may ask
    ``provider`` to fill."""
    return f"gridq:mpc:pool:{host}:{provider}:"


def mpc_pool_key(host: str, provider: str, parties: list[str], frac_bits: int, need: str) -> str:
    """A host's list of ready dealer bundles for one need (shape and kind of material)."""
    return f"{mpc_pool_prefix(host, provider)}{','.join(parties)}:{frac_bits}:{need}".replace(" ", "")


def mpc_bundle_key(provider: str, bundle: str, party: str) -> str:
    """One party's part of a dealer bundle, sealed to it and signed by the provider."""
    return f"gridq:mpc:bundle:{provider}:{bundle}:{party}"


def mpc_ack_key(host: str, party: str, job_id: str) -> str:
    """Where ``party`` puts its signed answer to a request of ``host``'s it waits on (keep
    these shares): on a list the host pops, not in Celery's result backend."""
    return f"gridq:mpc:ack:{host}:{job_id}:{party}"


def mpc_query_key(host: str) -> str:
    """The list a host's MPC worker pops queries from, pushed by its users: a query's one
    message on the hot path (``workers.mpc.lists``); the answer is stored as a task's is."""
    return f"gridq:mpc:queries:{host}"


def mpc_session_key(party: str) -> str:
    """The list a party's MPC worker pops sessions from, pushed by the hosts of the models it
    holds shares of: one hop, not a Celery task a query (``workers.mpc.lists``)."""
    return f"gridq:mpc:sessions:{party}"


# held by a host while it sends one session to all its parties: sessions reach every party in one order
MPC_DISPATCH_LOCK = "gridq:mpc:dispatch"


def mpc_aggregated_key(party: str, round_id: str) -> str:
    """Set once when an aggregation party adds up a federated round: a second sum is refused."""
    return f"gridq:mpc:aggregated:{party}:{round_id}"


class Tasks:
    """Task names: the only way the sides address each other's code."""

    RUN_JOB = "gridq.node.run_job"
    REGISTER = "gridq.gateway.register"
    PUBLISH = "gridq.gateway.publish"
    UNPUBLISH = "gridq.gateway.unpublish"
    SEARCH = "gridq.gateway.search"
    NODES = "gridq.gateway.nodes"
    MPC_SERVE = "gridq.mpc.serve"
    MPC_STORE = "gridq.mpc.store"
    MPC_QUERY = "gridq.mpc.query"
    MPC_DEAL = "gridq.mpc.deal"
    MPC_AGGREGATE = "gridq.mpc.aggregate"
    MPC_KEYS = "gridq.mpc.keys"


# what other nodes' MPC workers send a node's (on mpc_peer_queue); users send the rest (on mpc_queue)
MPC_FROM_PEERS = (Tasks.MPC_STORE, Tasks.MPC_DEAL)  # sessions: on mpc_session_key

PENDING_APPROVAL = "PENDING_APPROVAL"  # the Celery state of a job parked for the owner's approval

# Celery's success log line without the task's return value (``celery.app.trace.LOG_SUCCESS``):
# a reply envelope is for its requester, through the result backend, not for the logs
QUIET_SUCCESS_LOG = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"

# How a process someone waits on (a scientist's client, an owner's command) retries the
# result backend before saying the broker is unavailable. Celery's default, 20 tries a
# second apart, kept them ~19 s on a dead broker per call; a broker restart takes well
# under the ~3 s here. Workers keep Celery's default: they have nobody waiting.
INTERACTIVE_RESULT_RETRY: dict[str, float] = {"max_retries": 4, "interval_start": 0.0, "interval_step": 0.5,
                                              "interval_max": 1.0}

CLAIM_CHECK_PREFIX = "gridq:blob:"
CLAIM_CHECK_THRESHOLD = 256 * 1024  # sealed values above this travel by claim-check
CLAIM_CHECK_TTL_SECONDS = 3600

# How long a job's answer stays readable: its time to live in the result backend, and the
# expiry a node signs into the reply (a client refuses an expired reply, so a result kept
# longer than that is dead weight: Celery's default, a day, kept ~11 GB at 100 jobs/s).
# A ticket is read at once or picked up with grid.ticket(id) within this; a node's
# ``[retention] results`` sets another. A parked job's answer (PENDING_APPROVAL) has no TTL:
# it waits for the owner.
RESULT_TTL_SECONDS = 600.0
RESTORE_LOCK_SECONDS = 10  # how long a dead worker's restore lock outlives it (kombu: 300)


def celery_settings(
    *, time_limit: float = 300.0, visibility_timeout: float | None = None, restore_interval: float = 10.0,
    result_expires: float = RESULT_TTL_SECONDS,
) -> dict[str, Any]:
    """Celery settings chosen on purpose; every gridq process uses these.

    * ``task_acks_late`` + ``task_reject_on_worker_lost``: a job is acknowledged only once
      it has finished, so a worker killed mid-job gives it back to the queue instead of
      losing it. Jobs run twice then, so every job is idempotent by its job id.
    * ``worker_prefetch_multiplier=1``: a worker holds one job at a time; the default (4)
      would strand jobs behind a long one and lose more to a crash.
    * ``visibility_timeout`` longer than the hard time limit: Redis hands an unacknowledged
      job out again after this long, so a job still running must never reach it.
    * ``unacked_restore_interval``/``throttle``: how often kombu looks for jobs abandoned by
      a dead worker (default ~100 s); we look every ``restore_interval`` seconds.
    * ``unacked_mutex_expire``: a restore pass takes milliseconds under its lock; a worker
      killed inside one leaves the lock behind, and kombu's 300 s would hold up every restore
      of that queue, the killed worker's own jobs included, for five minutes.
    * ``task_time_limit``/``task_soft_time_limit``: a runaway plan is stopped, not waited on.
    * JSON and msgpack only: nothing pickled crosses the broker (kombu refuses the rest).
    * ``worker_send_task_events``/``task_send_sent_event``: Flower sees every job.
      Task arguments are envelopes (plans and ids): Flower shows nothing secret.
    * ``task_annotations`` ``resultrepr_maxsize=0``: a task's return value (a reply
      envelope) is left out of its ``task-succeeded`` event — Flower shows the job's
      outcome instead (``answered``, ``refused: <code>``: ``workers.tasks.outcome``) — and
      out of the worker's success log line (the workers also log success without
      it: ``celery.app.trace.LOG_SUCCESS``). Replies are read from the result backend only.
    * ``task_track_started``: a ticket can tell ``queued`` from ``running``.
    * ``result_expires``: :data:`RESULT_TTL_SECONDS` (not Celery's day): as long as the
      signed answer stays valid.
    * ``worker_proc_alive_timeout``: each pool process builds its role (store, keys, broker
      connections) at start, in ``worker_process_init``; Celery's 4 s for a process to come
      up is short for that on a loaded two-core machine.
    * ``control_queue_expires``/``event_queue_expires`` off: kombu keeps the bindings of an
      expiring queue (a worker's control queue, a ping's reply queue, Flower's event queue)
      alive with Lua scripts, and no broker user but the admin may run scripts (one could
      hold Redis busy for everyone). These queues are deleted when their consumer leaves.
    """
    visibility = visibility_timeout if visibility_timeout is not None else max(2 * time_limit, 600.0)
    if visibility <= time_limit:
        raise ValueError(f"visibility_timeout {visibility} must exceed the time limit {time_limit}")
    return {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": time_limit,
        "task_soft_time_limit": max(1.0, time_limit - 5.0),
        "broker_transport_options": {
            "visibility_timeout": visibility,
            "unacked_restore_interval": restore_interval,
            "unacked_restore_throttle": 1,
            "unacked_mutex_expire": RESTORE_LOCK_SECONDS,
        },
        "result_backend_transport_options": {"visibility_timeout": visibility},
        "task_serializer": "msgpack",
        "result_serializer": "json",
        "accept_content": ["msgpack", "json"],
        "result_accept_content": ["msgpack", "json"],
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "worker_proc_alive_timeout": 30.0,
        "control_queue_expires": None,
        "event_queue_expires": None,
        "task_annotations": {"*": {"resultrepr_maxsize": 0}},
        "result_expires": int(result_expires),
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "enable_utc": True,
    }


def gridq_home() -> Path:
    """Where a participant keeps keys (``keys/``), node configs (``nodes/``), data and the run
    history: ``$GRIDQ_HOME``, else ``~/.gridq``. Shared by the client, the nodes and the CLI."""
    return Path(os.environ.get("GRIDQ_HOME") or "~/.gridq").expanduser()
