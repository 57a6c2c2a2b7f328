"""The MPC worker of a node: one route per message kind, through the grid's one serving path.
Two pools, one per queue: users' requests (``mpc.<id>``: serve, query, keys, aggregate) and
other nodes' workers' (``mpc-peer.<id>``: store, deal; and sessions, popped from the node's
session list by a thread in each of the pool's processes: ``workers.mpc.sessions``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_process_shutdown

from protocol import spans
from protocol.contract import MPC_FROM_PEERS, Tasks, mpc_ack_key
from protocol.errors import GridError
from protocol.identity import PublicIdentity
from protocol.messages import WireError
from protocol.mpc.wire import Aggregate, Deal, MpcReply, QueryModel, RunSession, ServeModel, StoreShares, UserKeys
from protocol.serving import Answer, EnvelopeServer, Route
from workers.config import NodeConfig
from workers.mpc.aggregator import Aggregator
from workers.mpc.dealer import CryptoProvider
from workers.mpc.host import Host
from workers.mpc.member import MpcMember
from workers.mpc.party import Party
from workers.mpc.sessions import SessionLoop
from workers.tasks import serve_tasks

FROM_USERS = (Tasks.MPC_SERVE, Tasks.MPC_QUERY, Tasks.MPC_KEYS, Tasks.MPC_AGGREGATE)
ACKED = frozenset({"mpc_store", "mpc_session"})  # the kinds whose sender (a host) waits for the answer on an ack list


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
            self.session_routes = {"mpc_session": Route(RunSession, party.session)}
        else:
            host = Host(member)
            self.routes = {"mpc_serve": Route(ServeModel, host.serve), "mpc_query": Route(QueryModel, host.query),
                           "mpc_keys": Route(UserKeys, host.keys),
                           "mpc_aggregate": Route(Aggregate, Aggregator(member).aggregate)}
        self.server = EnvelopeServer(member.identity, member.nonces, _failure, time_limits=(SoftTimeLimitExceeded,))

    def serve(self, task: str, raw: Any, delivery_id: str) -> Answer:
        """Users' requests are signed by a user of this node (a scientist or owner it knows);
        peers' by a node, with its key as the gateway lists it."""
        senders: Mapping[str, PublicIdentity] = self.member.peers if self.peers else self.member.users
        answer = self.server.serve(raw, delivery_id, senders, lambda env: self.server.reply(env, self.routes))
        if self.peers and isinstance(raw, dict) and raw.get("kind") in ACKED:
            self._ack(raw.get("sender"), delivery_id, answer)
        return answer

    def session(self, raw: Any, delivery_id: str) -> None:
        """Run a session popped from this node's session list (only sessions are taken there);
        its signed answer, a refusal too, goes on its host's ack list."""
        answer = self.server.serve(raw, delivery_id, self.member.peers,
                                   lambda env: self.server.reply(env, self.session_routes))
        self._ack(raw.get("sender"), delivery_id, answer)

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
    role = serve_tasks(app, tasks, lambda: MpcWorker(config, app, peers), config.worker.max_deliveries)
    if not peers:
        return
    loops: list[SessionLoop] = []

    def start_sessions(**_: object) -> None:  # after serve_tasks' own handler: the role is built
        worker = role()
        loops.append(SessionLoop(worker.member.redis, config.id, worker.session).start())

    def stop_sessions(**_: object) -> None:  # a warm shutdown lets a running session end, as it would a task
        for loop in loops:
            loop.stop(wait=config.mpc.round_timeout)

    worker_process_init.connect(start_sessions, weak=False)
    worker_process_shutdown.connect(stop_sessions, weak=False)
