"""The data scientist's entry point: connect to a grid, find data, compute on it remotely.

    >>> from orchestrator import Grid
    >>> grid = Grid.connect("redis://localhost:6379/0", identity="~/.gridq/alice.key")  # doctest: +SKIP
    >>> births = grid.search("#birth-records", "#february")["hospital"][0]             # doctest: +SKIP
    >>> births["weight"].mean().get()                                                   # doctest: +SKIP
    tensor(3.4127)

Everything the grid answers is signed: gateway answers with the gateway's key (read from
Redis at connect, or pinned with ``gateway_key=``), node answers with the node's key as
registered at the gateway.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
import torch
from celery import Celery
from celery.result import AsyncResult

from orchestrator import evaluation, fl, mpc
from orchestrator.app import make_celery
from orchestrator.broker import broker_errors, shown
from orchestrator.evaluation import Evaluation
from orchestrator.fl import FitResult, ModelPointer
from orchestrator.pointer import DataPointer, Expression
from orchestrator.ticket import JobTicket
from protocol.contract import (
    CLAIM_CHECK_PREFIX,
    CLAIM_CHECK_TTL_SECONDS,
    GATEWAY,
    GATEWAY_IDENTITY_KEY,
    GATEWAY_QUEUE,
    PUBLIC,
    Tasks,
    gridq_home,
    node_queue,
)
from protocol.envelope import Envelope, MemoryNonceStore, open_envelope, seal_envelope
from protocol.errors import BrokerUnavailable, InvalidRequest, NodeUnavailable, NotFound, error_from_wire
from protocol.identity import Identity, PublicIdentity
from protocol.messages import (
    AccessRequest,
    BudgetInfo,
    BudgetQuery,
    DatasetMeta,
    GatewayReply,
    MockRequest,
    NodeInfo,
    RunJob,
    SearchQuery,
    TrainJob,
    checked,
    parse_body,
)
from protocol.model import describe_model
from protocol.mpc.wire import ModelCard
from protocol.plan import InputRef, TensorSpec

JOB_ID = re.compile(r"[A-Za-z0-9_.\-]{1,128}:[0-9a-f]{32}")


def key_path(identity: str | Path) -> Path:
    """A key file's path; a bare name (``"alice"``) is ``$GRIDQ_HOME/keys/alice.key``."""
    text = str(identity)
    if "/" not in text and not text.endswith(".key"):
        return gridq_home() / "keys" / f"{text}.key"
    return Path(text).expanduser()


class Grid:
    """A connection to a grid, acting as one identity."""

    def __init__(self, app: Celery, broker: redis.Redis, identity: Identity,
                 gateway_key: PublicIdentity, timeout: float = 60.0, *, url: str = "") -> None:
        self.app = app
        self.url = url
        self.identity = identity
        self.timeout = timeout
        self._redis = broker
        self._gateway = gateway_key
        self._nonces = MemoryNonceStore()
        self._node_keys: dict[str, PublicIdentity] = {}
        self._mocks: dict[tuple[str, str], torch.Tensor] = {}

    @classmethod
    def connect(cls, url: str | None = None, identity: str | Path | Identity | None = None, *,
                gateway_key: str | None = None, timeout: float = 60.0) -> Grid:
        """Connect to the grid whose broker is at ``url`` (default: ``$GRIDQ_BROKER``), as the
        identity in a key file: a path, or a name such as ``"alice"`` for
        ``$GRIDQ_HOME/keys/alice.key`` (``GRIDQ_HOME`` defaults to ``~/.gridq``)."""
        url = url or os.environ.get("GRIDQ_BROKER")
        if not url:
            raise InvalidRequest("no broker URL: pass Grid.connect(url, ...) or set GRIDQ_BROKER "
                                 "(`gridq up` prints the line to paste)")
        if identity is None:
            raise InvalidRequest("whose identity? pass identity=\"alice\" (a key in $GRIDQ_HOME/keys) or a key file")
        me = identity if isinstance(identity, Identity) else Identity.read(key_path(identity))
        client = redis.Redis.from_url(url)
        if gateway_key is None:
            with broker_errors(url):
                posted = client.get(GATEWAY_IDENTITY_KEY)
            if posted is None:
                raise NodeUnavailable(f"no gateway has started on {shown(url)}: run `gridq gateway start` "
                                      "(or `gridq up`) first")
            gateway_key = json.loads(posted)["public_key"]
        return cls(make_celery(url), client, me, PublicIdentity.parse(GATEWAY, gateway_key), timeout, url=url)

    def close(self) -> None:
        self._redis.close()
        self.app.close()

    def __enter__(self) -> Grid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the registry -----------------------------------------------------------------------

    def search(self, *tags: str, words: tuple[str, ...] | list[str] = (), node: str | None = None
               ) -> dict[str, list[DataPointer]]:
        """Datasets carrying every tag (``"#february"``) and every word of their description."""
        query = checked(SearchQuery, tags=list(tags), words=list(words), node=node)
        reply = self._ask_gateway(Tasks.SEARCH, query.model_dump(mode="json"))
        found: dict[str, list[DataPointer]] = {}
        for meta in reply.datasets:
            found.setdefault(meta.node, []).append(self._pointer(meta))
        return found

    def datasets(self) -> list[DataPointer]:
        return [p for ptrs in self.search().values() for p in ptrs]

    def nodes(self) -> list[NodeInfo]:
        return list(self._ask_gateway(Tasks.NODES).nodes)

    def budget(self, node: str, dataset: str | None = None) -> list[BudgetInfo]:
        """Your privacy budget at ``node``: on one dataset, or on each one it publishes."""
        ticket = self._submit(node, BudgetQuery(dataset=dataset))
        return list(ticket.reply().budgets)

    # --- federated learning (orchestrator.fl) -------------------------------------------------

    def send(self, model: torch.nn.Module, node: str) -> ModelPointer:
        """A pointer to ``model`` at ``node``: train it there with ``.train(x, y, ...)``."""
        self._node_key(node)
        return ModelPointer(self, model, node)

    def fit(self, model: torch.nn.Module, data: Sequence[tuple[Expression, Expression]], *, rounds: int,
            **options: Any) -> FitResult:
        """Train ``model`` by federated averaging over ``data`` — (x, y) pointers, one pair per
        node — for ``rounds`` rounds, nodes in parallel. Options: local_epochs, batch_size,
        lr, optimizer, loss, momentum, strategy ("fedavg"; "fedprox" with proximal_mu;
        "fedadam" with server_lr, server_betas, server_eps), min_nodes, round_timeout, seed,
        progress, history_db, dp (a DPConfig: DP-SGD), secure_aggregation with aggregators
        (MPC pool nodes that add up shares of the updates), evaluate ((x, y) pointers to
        held-out data at nodes: the global model is evaluated there after every round)."""
        return fl.fit(self, model, data, rounds=rounds, **options)

    def evaluate(self, model: torch.nn.Module, data: Sequence[tuple[Expression, Expression]], *,
                 loss: str = "cross_entropy", timeout: float | None = None) -> Evaluation:
        """``model``'s loss (and accuracy, for classification) on ``data`` — (x, y) pointers,
        one pair per node — computed at the nodes in parallel, weighted by their samples. The
        figures are released as trained weights are (allowed users, or the owner's approval)."""
        spec, state = describe_model(model)
        return evaluation.evaluate(self, spec, state, data, loss=loss, timeout=self.timeout if timeout is None
                                   else timeout, label=f"[evaluation of {self.identity.name}]")

    # --- encrypted ML-as-a-service (orchestrator.mpc) ----------------------------------------

    def serve(self, model: torch.nn.Module, *, name: str, parties: Sequence[str], crypto_provider: str,
              host: str, queriers: Sequence[str] = (), frac_bits: int = 16) -> ModelCard:
        """Serve ``model`` (Linear and ReLU layers) secret-shared among ``parties``: ``host``
        keeps its structure and coordinates queries, ``crypto_provider`` deals the
        correlated randomness, and ``queriers`` (and you) may query it."""
        return mpc.serve(self, model, name=name, parties=parties, crypto_provider=crypto_provider, host=host,
                         queriers=queriers, frac_bits=frac_bits)

    def models(self) -> list[ModelCard]:
        """The models served encrypted on this grid."""
        return mpc.models(self)

    def query(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The served model's output on ``x`` (one row or a batch), computed on shares:
        nobody but you sees ``x`` or the result."""
        return mpc.query(self, name, x)

    def ticket(self, job_id: str) -> JobTicket:
        """Pick up a job submitted earlier (by this process or another one)."""
        node, _, rest = job_id.partition(":")
        if not JOB_ID.fullmatch(job_id):
            raise InvalidRequest(f"{job_id!r} is not a job id: they read '<node>:<32 hex digits>', as "
                                 "ticket.id prints them")
        self._node_key(node)  # a node this grid knows
        return JobTicket(self, job_id)

    # --- internals used by pointers and tickets -------------------------------------------

    def _pointer(self, meta: DatasetMeta) -> DataPointer:
        return DataPointer(self, meta.node, InputRef(kind="dataset", name=meta.name),
                           TensorSpec(shape=meta.shape, dtype=meta.dtype), meta)

    def _mock(self, node: str, dataset: str) -> torch.Tensor:
        key = (node, dataset)
        if key not in self._mocks:
            self._mocks[key] = self._submit(node, MockRequest(dataset=dataset)).value()
        return self._mocks[key]

    def _submit(self, node: str, job: RunJob | TrainJob | BudgetQuery | AccessRequest | MockRequest) -> JobTicket:
        self._node_key(node)  # an unknown node fails now, not after a timeout
        job_id = f"{node}:{uuid.uuid4().hex}"
        self._send(node, Tasks.RUN_JOB, node_queue(node), job, job_id)
        return JobTicket(self, job_id)

    def _send(self, node: str, task: str, queue: str, body: Any, job_id: str) -> AsyncResult:
        """Sign ``body`` for ``node`` and send it as ``task``."""
        env = seal_envelope(self.identity, recipient=node, kind=body.kind, job_id=job_id,
                            body=body.model_dump(mode="json"), now=time.time())
        with broker_errors(self.url):
            return self.app.send_task(task, args=[env.model_dump(mode="json")], queue=queue, task_id=job_id)

    def _node_key(self, node: str) -> PublicIdentity:
        """A node's key as the gateway lists it."""
        if node not in self._node_keys:
            self.nodes()
        if node not in self._node_keys:
            raise NotFound(f"node {node!r} is not registered at the gateway; registered: "
                           f"{', '.join(sorted(self._node_keys)) or 'none'} (`gridq status` lists them)")
        return self._node_keys[node]

    def _ask_gateway(self, task: str, *args: Any) -> GatewayReply:
        job_id = uuid.uuid4().hex
        with broker_errors(self.url):
            result = self.app.send_task(task, args=list(args), queue=GATEWAY_QUEUE, task_id=job_id)
        try:
            with broker_errors(self.url):
                raw = result.get(timeout=self.timeout, interval=0.05)
        except BrokerUnavailable:
            raise
        except Exception as exc:  # celery's TimeoutError, or a crash reported by the worker
            raise NodeUnavailable(f"the gateway did not answer in {self.timeout:.0f} s ({exc!r:.200}); "
                                  "is `gridq gateway start` running?") from None
        env = open_envelope(raw, recipient=PUBLIC, keyring={GATEWAY: self._gateway}, nonces=self._nonces,
                            delivery_id=job_id, now=time.time())
        body = parse_body(env.body_json())
        assert isinstance(body, GatewayReply)
        if body.error is not None:
            raise error_from_wire(body.error.model_dump())
        for info in body.nodes:
            self._node_keys[info.node] = PublicIdentity.parse(info.node, info.public_key)
        return body

    def _verify_reply(self, raw: Any, node: str, job_id: str) -> Envelope:
        key = self._node_key(node)
        # a refusal of a message that named no sender is addressed to anyone; it carries no value
        recipient = PUBLIC if isinstance(raw, dict) and raw.get("recipient") == PUBLIC else self.identity.name
        return open_envelope(raw, recipient=recipient, keyring={node: key},
                             nonces=self._nonces, delivery_id=job_id, now=time.time())

    def _leave(self, data: bytes) -> str:
        """Leave sealed bytes in Redis by claim-check, for the one they are sealed to; the key."""
        key = f"{CLAIM_CHECK_PREFIX}{uuid.uuid4().hex}"
        with broker_errors(self.url):
            self._redis.set(key, data, ex=CLAIM_CHECK_TTL_SECONDS)
        return key

    def _claim(self, key: str) -> bytes:
        """Fetch (and delete) a sealed value left by claim-check."""
        with broker_errors(self.url):
            data = self._redis.getdel(key)
        if data is None:
            raise NotFound(f"the released value {key!r} has expired from the broker; run the job again")
        return data.encode() if isinstance(data, str) else data
