"""The MPC worker of a node: one route per message kind, through the grid's one serving path."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from protocol.contract import Tasks
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
from workers.tasks import serve_tasks

TASKS = (Tasks.MPC_SERVE, Tasks.MPC_STORE, Tasks.MPC_QUERY, Tasks.MPC_SESSION, Tasks.MPC_DEAL, Tasks.MPC_AGGREGATE,
         Tasks.MPC_KEYS)
# the kinds users send; the rest come from other nodes' workers
FROM_USERS = frozenset({"mpc_serve", "mpc_keys", "mpc_query", "mpc_aggregate"})


class MpcWorker:
    def __init__(self, config: NodeConfig, app: Celery) -> None:
        self.member = member = MpcMember(config, app)
        host, party = Host(member), Party(member)
        self.routes = {
            "mpc_serve": Route(ServeModel, host.serve), "mpc_query": Route(QueryModel, host.query),
            "mpc_keys": Route(UserKeys, host.keys),
            "mpc_store": Route(StoreShares, party.store), "mpc_session": Route(RunSession, party.session),
            "mpc_aggregate": Route(Aggregate, Aggregator(member).aggregate),
            "mpc_deal": Route(Deal, CryptoProvider(member).deal),
        }
        self.server = EnvelopeServer(member.identity, member.nonces, _failure, time_limits=(SoftTimeLimitExceeded,))

    def serve(self, task: str, raw: Any, delivery_id: str) -> Answer:
        return self.server.serve(raw, delivery_id, self._senders(raw), lambda env: self.server.reply(env, self.routes))

    def _senders(self, raw: Any) -> Mapping[str, PublicIdentity]:
        """Who may send this kind: a user of this node (serve, query, aggregate: scientists and
        owners it knows), or also another node's worker (the key as the gateway lists it)."""
        kind = raw.get("kind") if isinstance(raw, dict) else None
        return self.member.users if kind in FROM_USERS else self.member.peers


def _failure(exc: GridError, job_id: str) -> MpcReply:
    return MpcReply(error=WireError(**exc.to_wire()))


def mpc_tasks(app: Celery, config: NodeConfig) -> None:
    serve_tasks(app, TASKS, lambda: MpcWorker(config, app), config.worker.max_deliveries)
