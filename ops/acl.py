"""Broker permissions per role: one Redis 7 ACL user per kind of participant.

Without ACLs everyone who can reach Redis may do anything there: a data scientist could
FLUSHALL, delete another's results or claim-check blobs, rewrite the gateway's published
key or the MPC model cards, or pop jobs off a node's queue. Here each role gets its own
Redis user, allowed only the commands *and* keys its code uses (measured with MONITOR and
``ACL LOG`` over the three use cases; see the table in ``rules_table()``), and the
``default`` user is switched off::

    users = ensure_broker_users(home, "127.0.0.1", 6379)
    # redis-server --aclfile <home>/broker/users.acl
    # users.urls["scientist"] == "redis://scientist:<password>@127.0.0.1:6379/0"

Files, under ``<home>/broker/`` (a 0700 folder):

* ``users.acl`` (0600): Redis ``aclfile`` format, one ``user`` line per role, passwords as
  SHA-256 hashes (``#…``). Redis 7.0 does not accept comments in an ACL file: why each rule
  is there is in this module, and in ``users.rules.md`` written next to it.
* ``<role>.url`` (0600): the role's broker URL, with its password in clear (the secret a
  process of that role is given, e.g. as ``GRIDQ_BROKER``).

Idempotent: existing passwords (read back from the ``.url`` files) are kept; only the host
and port of the URLs follow the arguments.

Rules are written with Redis 7 *selectors* — ``(keys commands)`` groups that each allow
their commands on their keys only — so that a right needed on one kind of key (``SET`` of
a claim-check blob, say) does not spill onto another (``SET`` over a node's queue).
Key permissions: ``%R~`` read, ``%W~`` write, ``~`` both. Redis decides per key from the
command's key specs: ``LPUSH`` only writes (a scientist may push onto a queue with
``%W~``), ``BRPOP``/``LPOP`` read *and* write (so he may not pop), ``GETDEL`` too.

What Redis ACLs cannot express here (see also the report in ``rules_table``):

* Users of one role are indistinguishable: every scientist shares the ``scientist`` user,
  every node the ``node`` user, because keys do not carry who they belong to (result keys
  are ``celery-task-meta-<job id>``, blobs ``gridq:blob:<random>``). A scientist can read
  any result (each is a signed envelope, addressed — and sealed where it carries a value —
  to its one recipient) and take (GETDEL) any blob whose key he learns from a result; a
  node can consume any node's queue.
* Kombu keeps one ``unacked`` hash for every queue; each consuming role must read it and
  push back onto every worker queue when it restores a message a dead worker left
  (``visibility_timeout``), so gateway, node and MPC workers, and Flower, can read every
  job that is in flight.
* Celery's remote control (ping, inspect, shutdown, add_consumer) is one pub/sub channel;
  Redis cannot allow ``ping`` and forbid ``shutdown``. Only ``flower`` (the operator) and
  ``admin`` may publish there; no worker or scientist may.
* Roles allowed Lua scripts (workers and Flower: kombu's and redis-py's locks and binding
  tables need them) run commands inside the scripts under the same ACL, but a script
  can still hold the server busy until ``SCRIPT KILL``.
* ``_kombu.binding.<queue>`` tables are writable (``SADD``) by whoever may send to the queue:
  kombu declares a queue on first send and Redis cannot tell a declaration from any other
  member. gridq sends through the default exchange, which routes by queue name without
  reading these tables, so an added member reroutes nothing; the one table that does route
  (``reply.celery.pidbox``, control replies) only ``flower`` and ``admin`` may add to.
* A role that may ``SET`` a key may overwrite it: a scientist can replace a claim-check blob
  it knows the key of before its recipient takes it (a blob is sealed, but anyone can seal
  to a public key). Blobs travel with their key inside a signed envelope, not their digest.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from protocol.contract import CLAIM_CHECK_PREFIX, GATEWAY_IDENTITY_KEY, GATEWAY_QUEUE, MPC_MODELS_KEY, dead_letter_key

ROLES = ("gateway", "node", "mpc", "scientist", "flower", "admin")
ROLE_WHO = {
    "gateway": "the gateway worker (registry and search)",
    "node": "an owner's node worker, and the owner's admin API (workers.Node)",
    "mpc": "an owner's MPC worker (host, party, crypto provider, aggregation party)",
    "scientist": "a data scientist's client (orchestrator.Grid)",
    "flower": "the operator's monitoring: Celery Flower and `gridq status` (events, control ping)",
    "admin": "the broker's owner: everything (never given to a worker or a scientist)",
}


@dataclass(frozen=True)
class Rule:
    """One ACL rule (a root rule such as ``+ping`` or a selector ``(~keys +cmds)``) and why
    the role needs it."""

    rule: str
    why: str


def _queue_keys(queue: str) -> str:
    """A kombu queue's keys: the list itself and its priority lists (``queue\\x06\\x16<n>``)."""
    return f"{queue} {queue}??[0-9]"


WORKER_QUEUES = f"{_queue_keys(GATEWAY_QUEUE)} node.* mpc.*"  # every queue a gridq worker consumes
BLOB = f"{CLAIM_CHECK_PREFIX}*"
RESULT = "celery-task-meta-*"  # Celery's Redis result backend: one key (and channel) per task id
SCRIPT = "+evalsha +script|load +script|exists"


def _keys(prefix: str, patterns: str) -> str:
    return " ".join(f"{prefix}{p}" for p in patterns.split())


def _bindings(queues: str) -> str:
    """The kombu binding tables (and their ``permanent`` twins) of ``queues``."""
    return " ".join(f"{t}{q}" for q in queues.split() if "?" not in q
                    for t in ("_kombu.binding.", "_kombu.binding_permanent."))


def _connection() -> list[Rule]:
    return [
        Rule("+ping", "redis-py and kombu health checks"),
        Rule("+multi +exec +discard", "kombu and Celery send pipelines as transactions (commands inside are "
                                      "checked one by one)"),
    ]


def _sender(queues: str, what: str) -> list[Rule]:
    """Sending Celery tasks to ``queues`` (never receiving from them)."""
    return [
        Rule(f"({_keys('%W~', queues)} +lpush +llen)",
             f"send {what}: kombu LPUSHes the message onto the queue (LLEN when it declares it); write-only, "
             "so no BRPOP/LPOP/DEL"),
        Rule(f"({_keys('%W~', _bindings(queues))} +sadd)",
             "kombu declares the queue's binding table on first send (SADD)"),
    ]


def _results_reader() -> list[Rule]:
    return [
        Rule(f"(%R~{RESULT} +get +mget)", "read task results (Celery's result backend; gather() polls with MGET)"),
        Rule(f"(&{RESULT} +subscribe +unsubscribe)", "the result backend wakes a waiting client by pub/sub on the "
                                                    "result's channel"),
    ]


def _gateway_key_reader() -> list[Rule]:
    return [Rule(f"(%R~{GATEWAY_IDENTITY_KEY} +get +exists)",
                 "read the gateway's posted public key, to verify its signed answers")]


def _claim_check() -> list[Rule]:
    return [Rule(f"(~{BLOB} +set +getdel)",
                 "claim-check: leave sealed bytes (SET with a TTL) and take those sealed to oneself (GETDEL)")]


def _events(db: int) -> list[Rule]:
    return [Rule(f"(&/{db}.celeryev/* +publish)",
                 "Celery task and worker events (heartbeats, task-started…), which Flower shows")]


def _consumer(db: int, queues: str) -> list[Rule]:
    """What a Celery worker consuming ``queues`` with acks_late needs from kombu."""
    return [
        Rule(f"({_keys('~', queues)} +brpop +llen)", "consume its own queues (BRPOP); LLEN when kombu declares them"),
        Rule(f"({_keys('%W~', _bindings(queues))} +sadd)", "kombu declares the binding of the queues it consumes"),
        *_unacked(),
        *_restorer(),
        *_dead_letters(queues),
        *_results_writer(),
        *_events(db),
        *_control_listener(db),
        *_binding_scripts("celery.pidbox"),
    ]


def _dead_letters(queues: str) -> list[Rule]:
    keys = " ".join(f"%W~{dead_letter_key(q)}" for q in queues.split() if "?" not in q)
    return [Rule(f"({keys} +lpush +ltrim)", "put what it will not run (junk, a job given up) on its queues' "
                                           "dead-letter lists, trimmed to their bound (protocol.inbox)")]


def _unacked() -> list[Rule]:
    return [
        Rule("(~unacked ~unacked_index +hset +hget +hdel +zadd +zrem +zrange +watch +unwatch)",
             "kombu's ack emulation: a delivered message is kept in the `unacked` hash (and `unacked_index` "
             "zset) until acknowledged, and put back from there if its worker dies"),
        Rule(f"(~unacked_mutex +set +get +del {SCRIPT})",
             "the lock (SET NX, released by a redis-py Lua script) that lets one consumer at a time restore "
             "messages whose visibility timeout passed"),
    ]


def _restorer() -> list[Rule]:
    return [Rule(f"({_keys('%W~', WORKER_QUEUES)} +lpush +rpush)",
                 "put a message back on its queue: its own on a lost worker or a shutdown, and any worker "
                 "queue when restoring from the shared `unacked` hash after the visibility timeout")]


def _results_writer() -> list[Rule]:
    return [
        Rule(f"(~{RESULT} +setex +set +get +mget)", "store task results and states (STARTED, PENDING_APPROVAL…); "
                                                  "read those of tasks it sent"),
        Rule(f"(&{RESULT} +publish +subscribe +unsubscribe)", "announce a stored result on its channel; wait for "
                                                            "results of tasks it sent"),
    ]


def _control_listener(db: int) -> list[Rule]:
    return [
        Rule(f"(&/{db}.celery.pidbox +psubscribe +punsubscribe)",
             "listen for remote-control broadcasts (ping from `gridq status`/Flower)"),
        Rule("(%R~_kombu.binding.reply.celery.pidbox +smembers)", "route a control reply to its asker"),
        Rule("(%W~*.reply.celery.pidbox +lpush)", "answer a control broadcast (pong) on the asker's reply queue"),
        Rule("(~*@*.celery.pidbox* +llen +del)", "declare, and at shutdown delete, its own control queue"),
        Rule("(~_kombu.binding.celery.pidbox ~_kombu.binding_permanent.celery.pidbox +sadd +srem)",
             "bind (and unbind at shutdown) its control queue to the broadcast exchange"),
    ]


def _binding_scripts(*exchanges: str) -> list[Rule]:
    """kombu's Lua scripts that keep expiring queues' binding tables alive and sweep dead ones."""
    tables = " ".join(f"~_kombu.binding.{e}" for e in exchanges)
    return [
        Rule(f"({tables} ~_kombu.binding_deadlines {SCRIPT} +sadd +zadd +time)",
             "kombu refreshes the binding table of an expiring queue (a control or event queue) by a script"),
        Rule(f"(~_kombu.binding_deadlines %R~_kombu.binding_permanent.* {SCRIPT} +zrangebyscore +zrem +exists +time)",
             "kombu sweeps binding tables no consumer refreshed in time (script)"),
        Rule("(~_kombu.binding.celery.pidbox ~_kombu.binding.reply.celery.pidbox ~_kombu.binding.celeryev +del)",
             "… deleting only these expiring tables"),
    ]


def rules(role: str, db: int = 0) -> list[Rule]:
    """The ACL rules of ``role``, each with its reason."""
    if role == "admin":
        return [Rule("~* &* +@all", "the broker's owner: MONITOR, ACL, inspection and repairs")]
    if role == "scientist":
        return [
            *_connection(),
            *_gateway_key_reader(),
            *_sender(WORKER_QUEUES, "searches (gateway), jobs (node.*) and MPC requests (mpc.*)"),
            *_results_reader(),
            *_claim_check(),
            Rule(f"(%R~{MPC_MODELS_KEY} +hgetall)", "list the models served by MPC (cards signed by their host)"),
            Rule(f"(&/{db}.celeryev/task.sent +publish)", "the task-sent event (Flower shows queued jobs); only "
                                                         "that event"),
        ]
    if role == "gateway":
        return [
            *_connection(),
            Rule(f"(%W~{GATEWAY_IDENTITY_KEY} +set)", "post the gateway's public key at start"),
            *_consumer(db, _queue_keys(GATEWAY_QUEUE)),
        ]
    if role == "node":
        return [
            *_connection(),
            *_gateway_key_reader(),
            *_sender(_queue_keys(GATEWAY_QUEUE), "registrations and publications to the gateway, and node listings"),
            *_claim_check(),
            *_consumer(db, "node.*"),
        ]
    if role == "mpc":
        return [
            *_connection(),
            *_gateway_key_reader(),
            *_sender(f"{_queue_keys(GATEWAY_QUEUE)} mpc.*", "node listings (gateway) and messages to the other "
                                                           "MPC workers (store, session, deal)"),
            *_claim_check(),
            Rule(f"(%W~{MPC_MODELS_KEY} +hset)", "a host publishes the card of a model it serves"),
            Rule("(~gridq:mpc:session:* +rpush +blpop +expire +del)",
                 "the rounds of an MPC session: parties push their parts up, the host pushes opened values down"),
            Rule("(~gridq:mpc:pool:* +rpush +lpop +blpop +llen +expire)",
                 "pools of dealer bundles: the crypto provider fills them, the host takes from them"),
            Rule("(~gridq:mpc:bundle:* +set +getdel)", "a dealer bundle's part for each party, sealed and signed"),
            Rule("(%W~gridq:mpc:aggregated:* +set)", "secure aggregation: a round is added up once (SET NX)"),
            *_consumer(db, "mpc.*"),
        ]
    if role == "flower":
        return [
            *_connection(),
            *_gateway_key_reader(),
            *_sender(_queue_keys(GATEWAY_QUEUE), "the registered nodes, asked of the gateway by `gridq status`"),
            Rule(f"({_keys('%W~', WORKER_QUEUES)} +llen)", "queue lengths (`gridq status`, Flower's broker page)"),
            Rule(f"(%R~{dead_letter_key('*')} +lrange +llen)", "read the dead-letter lists (`gridq dead-letters`)"),
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
            *_unacked(),
            *_restorer(),
            *_binding_scripts("reply.celery.pidbox", "celeryev"),
        ]
    raise ValueError(f"unknown role {role!r}; the roles are {', '.join(ROLES)}")


def acl_line(role: str, password: str, db: int = 0) -> str:
    digest = hashlib.sha256(password.encode()).hexdigest()
    return f"user {role} on #{digest} resetkeys resetchannels -@all " + " ".join(r.rule for r in rules(role, db))


DEFAULT_OFF = "user default off resetkeys resetchannels -@all"  # unauthenticated connections can do nothing


@dataclass(frozen=True)
class BrokerUsers:
    """The broker's ACL file and each role's URL."""

    folder: Path
    acl_file: Path
    urls: dict[str, str]


def broker_folder(home: Path) -> Path:
    return Path(home) / "broker"


def ensure_broker_users(home: Path, host: str = "127.0.0.1", port: int = 6379, db: int = 0) -> BrokerUsers:
    """Write ``<home>/broker/users.acl`` and one ``<role>.url`` per role (all 0600), reusing
    passwords already there; return the URLs."""
    folder = broker_folder(home)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    passwords = {role: _password(folder / f"{role}.url") for role in ROLES}
    acl_file = folder / "users.acl"
    _write_private(acl_file, "\n".join([DEFAULT_OFF, *(acl_line(r, passwords[r], db) for r in ROLES)]) + "\n")
    (folder / "users.rules.md").write_text(rules_table(db))
    urls = {}
    for role in ROLES:
        urls[role] = f"redis://{role}:{passwords[role]}@{host}:{port}/{db}"
        _write_private(folder / f"{role}.url", urls[role] + "\n")
    return BrokerUsers(folder, acl_file, urls)


def open_broker_urls(home: Path, url: str) -> None:
    """A broker without ACLs (the test grid): every role's URL file holds the one open URL, so
    configs that read ``<home>/broker/<role>.url`` work the same on both kinds of grid."""
    folder = broker_folder(home)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for role in ROLES:
        _write_private(folder / f"{role}.url", url + "\n")


def role_url(home: Path, role: str) -> str | None:
    """``role``'s broker URL as written under ``<home>/broker``, or None if there is none (a
    grid without ACLs): what a command run as that role connects with by default."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; the roles are {', '.join(ROLES)}")
    path = broker_folder(home) / f"{role}.url"
    return path.read_text().strip() if path.exists() else None


def rules_table(db: int = 0) -> str:
    """Every role's rules and why, as a Markdown table (the comments the ACL file cannot hold)."""
    out = ["# Broker ACL users (generated by ops/acl.py; `users.acl` holds the same rules)", "",
           "`user default off`: a connection that does not log in as one of these can do nothing.", ""]
    for role in ROLES:
        out += [f"## {role}: {ROLE_WHO[role]}", "", "| rule | why |", "|---|---|"]
        out += [f"| `{r.rule.replace('|', '&#124;')}` | {r.why} |" for r in rules(role, db)]
        out.append("")
    return "\n".join(out)


def _password(url_file: Path) -> str:
    if url_file.exists():
        old = urlsplit(url_file.read_text().strip()).password
        if old:
            return old
    return secrets.token_urlsafe(32)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.acl", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("home", type=Path, help="where <home>/broker/ is written (e.g. ~/.gridq)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6379)
    parser.add_argument("--db", type=int, default=0)
    args = parser.parse_args(argv)
    users = ensure_broker_users(args.home.expanduser(), args.host, args.port, args.db)
    print(f"redis-server --aclfile {users.acl_file}")
    for role in ROLES:
        print(f"{role:10s} {users.folder / f'{role}.url'}")


if __name__ == "__main__":
    main()
