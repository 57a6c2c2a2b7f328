"""The MPC worker of a node: one route per message kind, through the grid's one serving path.
Two pools, one per queue: users' requests (``mpc.<id>``: serve, query, keys, aggregate) and
other nodes' workers' (``mpc-peer.<id>``: store, deal). The hot path skips Celery: each
process of the users' pool also pops queries from the node's query list, each of the peers'
pool sessions from its session list, in a thread of its own (``workers.mpc.lists``)."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Mapping
from typing import Any

from celery import Celery, states
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_process_shutdown

from protocol import spans
from protocol.contract import MPC_FROM_PEERS, Tasks, mpc_ack_key, mpc_query_key, mpc_session_key
from protocol.errors import GridError
from protocol.identity import PublicIdentity
from protocol.messages import WireError
from protocol.mpc.wire import Aggregate, Deal, MpcReply, QueryModel, RunSession, ServeModel, StoreShares, UserKeys
from protocol.serving import Answer, EnvelopeServer, Route
from workers.config import NodeConfig
from workers.mpc.aggregator import Aggregator
from workers.mpc.dealer import CryptoProvider
from workers.mpc.host import Host
from workers.mpc.lists import ListConsumer
from workers.mpc.member import MpcMember
from workers.mpc.party import Party
from workers.tasks import OUTCOME_EVENT, OUTCOME_FIELD, answer_tasks, outcome

log = logging.getLogger(__name__)

FROM_USERS = (Tasks.MPC_SERVE, Tasks.MPC_QUERY, Tasks.MPC_KEYS, Tasks.MPC_AGGREGATE)
# a store arrives as a task; its sender (a host) waits for the answer on an ack list (sessions come on a
# list and are acked by answer_popped)
ACKED = frozenset({"mpc_store"})


class MpcWorker:
    def __init__(self, config: NodeConfig, app: Celery, peers: bool) -> None:
        """``peers``: serve other nodes' MPC workers (else: this node's users)."""
        self.member = member = MpcMember(config, app)
        self.peers = peers
        spans.set_role("party" if peers else "host")
        if peers:
            party = Party(member)
            self.routes = {"mpc_store": Route(StoreShares, party.store),
                           "mpc_deal": Route(Deal, CryptoProvider(member).deal)}
            # the hot path's list and the one kind taken there (workers.mpc.lists)
            self.list_key, self.list_routes = mpc_session_key(member.id), {"mpc_session": Route(RunSession,
                                                                                                  party.session)}
        else:
            host = Host(member)
            self.routes = {"mpc_serve": Route(ServeModel, host.serve), "mpc_query": Route(QueryModel, host.query),
                           "mpc_keys": Route(UserKeys, host.keys),
                           "mpc_aggregate": Route(Aggregate, Aggregator(member).aggregate)}
            # a query comes on the list from Python clients, as a task through the HTTP edge
            self.list_key, self.list_routes = mpc_query_key(member.id), {"mpc_query": self.routes["mpc_query"]}
        self.server = EnvelopeServer(member.identity, member.nonces, _failure, time_limits=(SoftTimeLimitExceeded,))
        self._events: Any = None  # this process's event dispatcher for what it pops (made in the popping thread)

    def answer(self, task: str, raw: Any, delivery_id: str) -> Answer:
        """Users' requests are signed by a user of this node (a scientist or owner it knows);
        peers' by a node, with its key as the gateway lists it."""
        senders: Mapping[str, PublicIdentity] = self.member.peers if self.peers else self.member.users
        answer = self.server.open_and_answer(raw, delivery_id, senders, lambda env: self.server.reply(env, self.routes))
        if self.peers and isinstance(raw, dict) and raw.get("kind") in ACKED:
            self._ack(raw.get("sender"), delivery_id, answer)
        return answer

    def answer_popped(self, raw: Any, delivery_id: str) -> None:
        """Serve a message popped from this pool's list (its one kind only). A session's signed
        answer, a refusal too, goes on its host's ack list; a query's is stored as a task's
        result, where its querier waits for it, and Flower hears of it as of a task."""
        senders: Mapping[str, PublicIdentity] = self.member.peers if self.peers else self.member.users
        started = time.monotonic()
        answer = self.server.open_and_answer(raw, delivery_id, senders,
                                             lambda env: self.server.reply(env, self.list_routes))
        if self.peers:
            self._ack(raw.get("sender"), delivery_id, answer)
            return
        self.member.app.backend.store_result(delivery_id, answer.signed, states.SUCCESS)
        self._announce(delivery_id, time.monotonic() - started, answer.signed)

    def _announce(self, job_id: str, runtime: float, signed: Mapping[str, Any]) -> None:
        """Tell Flower of a query popped from the list as a worker tells it of a task: received,
        succeeded (the outcome, never the reply). The querier has the answer already: a broker
        that will not take the events costs a warning."""
        app = self.member.app
        try:
            if self._events is None:
                self._events = app.events.Dispatcher(app.connection_for_write(), enabled=True,
                                                     hostname=f"{self.member.id}-mpc@{socket.gethostname()}")
            self._events.send("task-received", uuid=job_id, name=Tasks.MPC_QUERY, args="(popped from its list)",
                              kwargs="{}", retries=0, retry=False)
            self._events.send("task-succeeded", uuid=job_id, result="", runtime=runtime, retry=False)
            self._events.send(OUTCOME_EVENT, uuid=job_id, retry=False, **{OUTCOME_FIELD: outcome(signed)})
        except Exception as exc:
            log.warning("%s: could not tell Flower of it: %r", job_id, exc)

    def _ack(self, host: Any, delivery_id: str, answer: Answer) -> None:
        """Put the signed answer where its host pops it (refusals too: the host fails at once
        rather than at its timeout). Whoever the message claims sent it: the answer is signed
        for that name and bound to this job, useless to anyone else."""
        if not isinstance(host, str) or not host or ":" in host or len(host) > 128:
            return
        m = self.member
        key = mpc_ack_key(host, m.id, delivery_id)
        pipe = m.redis.pipeline(transaction=False)
        pipe.rpush(key, json.dumps(answer.signed))
        pipe.expire(key, int(m.config.mpc.round_timeout) + 60)
        pipe.execute()


def _failure(exc: GridError, job_id: str) -> MpcReply:
    return MpcReply(error=WireError(**exc.to_wire()))


def mpc_tasks(app: Celery, config: NodeConfig, peers: bool) -> None:
    """The tasks of one of a node's two MPC pools: its users' (``peers=False``) or its peers'."""
    tasks = MPC_FROM_PEERS if peers else FROM_USERS
    role = answer_tasks(app, tasks, lambda: MpcWorker(config, app, peers), config.worker.max_deliveries)
    consumers: list[ListConsumer] = []

    def start_popping(**_: object) -> None:  # after answer_tasks' own handler: the role is built
        worker = role()
        consumers.append(ListConsumer(worker.member.redis, worker.list_key, worker.answer_popped).start())

    def stop_popping(**_: object) -> None:  # a warm shutdown lets what runs end, as it would a task
        for consumer in consumers:
            consumer.stop(wait=config.mpc.round_timeout)

    worker_process_init.connect(start_popping, weak=False)
    worker_process_shutdown.connect(stop_popping, weak=False)
