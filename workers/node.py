"""The data owner's node: its datasets, its store, and its link to the gateway.

    >>> node = Node.from_config("hospital.toml")                       # doctest: +SKIP
    >>> node.publish("births-mar", table, columns=["weight", "height"],
    ...              tags=["#march", "#birth-records"], allowed_users=["alice"])
    >>> [d.name for d in node.datasets()]
    ['birth-records-feb', 'births-mar']

Only metadata (name, shape, dtype, columns, description, tags, bounds) ever leaves the node.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
from celery import Celery

from protocol.broker import connection_settings, parse_broker
from protocol.cancel import STARTED
from protocol.codec import dtype_name, parse_dtype
from protocol.contract import (
    GATEWAY,
    GATEWAY_QUEUE,
    NODE_MESSAGE_TTL_SECONDS,
    PENDING_APPROVAL,
    Tasks,
    cancel_key,
    celery_settings,
    node_queue,
)
from protocol.envelope import MAX_TTL_SECONDS, seal_envelope
from protocol.errors import BrokerUnavailable, InvalidRequest, NodeUnavailable, NotFound
from protocol.identity import PublicIdentity
from protocol.messages import (
    DatasetMeta,
    JobStatus,
    PublishDataset,
    RegisterNode,
    RequestStatus,
    UnpublishDataset,
    checked,
)
from workers.broker import broker_errors, interactive, redis_client, replicated_results
from workers.config import Bounds, NodeConfig, load_config
from workers.directory import Directory
from workers.jobs.context import NodeContext
from workers.jobs.runner import JobRunner
from workers.policy.approvals import Requests, refusal
from workers.policy.bounds import declared_pairs, enforce
from workers.policy.ledger import Ledger
from workers.storage import claims
from workers.storage.datasets import load_table
from workers.storage.store import FINISHED, PublicationRow, RequestRow, Store
from workers.tasks import answer_tasks, without_expiry

log = logging.getLogger(__name__)


def make_celery(config: NodeConfig) -> Celery:
    """The node's Celery app: the shared settings, its own queue as default."""
    app = Celery(f"gridq-node-{config.id}", set_as_current=False)
    w = config.worker
    app.conf.update(connection_settings(config.node.broker, celery_settings(
        time_limit=w.time_limit, visibility_timeout=w.visibility_timeout, restore_interval=w.restore_interval,
        result_expires=config.retention.results)))
    app.conf.task_default_queue = node_queue(config.id)
    return replicated_results(app)


class Node:
    """A data owner's node, for use from Python (the worker uses the same object)."""

    def __init__(self, config: NodeConfig, app: Celery | None = None) -> None:
        self.config = config
        self.id = config.id
        self.identity = config.identity()
        self.store = Store(config.node.store, config.database_url)
        self.ledger = Ledger(self.store, config.id, config.budget)
        self._app = app
        self._redis: redis.Redis | None = None
        self._directory: Directory | None = None

    @classmethod
    def from_config(cls, path: str | Path) -> Node:
        return cls(load_config(path))

    @property
    def app(self) -> Celery:
        if self._app is None:
            self._app = interactive(make_celery(self.config))  # the owner's: the worker passes its own
        return self._app

    def close(self) -> None:
        self.store.close()
        if self._redis is not None:
            self._redis.close()

    # --- the owner's API -----------------------------------------------------------------

    def publish(self, name: str, data: torch.Tensor | np.ndarray | str | Path, *, description: str = "",
                tags: list[str] | tuple[str, ...] = (), allowed_users: list[str] | tuple[str, ...] = (),
                columns: list[str] | None = None, bounds: Bounds | None = None,
                mock: torch.Tensor | np.ndarray | str | Path | None = None, dtype: str | None = None,
                clamp: bool = False, replace: bool = False, notify: bool = True) -> DatasetMeta:
        """Publish a dataset: the values stay here, the metadata goes to the gateway.

        ``bounds`` (per column name, or one ``(lo, hi)`` for every value) are what DP
        releases rest on; they are public, like the shape, and a contract: a table with a
        value outside them (or a NaN) is refused, unless ``clamp=True`` clamps it to them
        (recorded at the node, see :meth:`publications`). A CSV loads as float64; ``dtype``
        casts the data (and its twin) to another. ``mock`` is a synthetic twin with the same
        kind of rows, which scientists may download (else one is drawn within the bounds).
        A name already published is refused unless ``replace=True``, which sets data and
        policy together (what the ledger charged on the name stays charged)."""
        self.check_users(allowed_users, f"allowed_users of {name!r}")
        tensor, columns = _table(data, columns, dtype)
        if columns and (tensor.ndim != 2 or tensor.shape[1] != len(columns)):
            raise InvalidRequest(f"{len(columns)} column names given for data of shape {tuple(tensor.shape)}")
        pairs = declared_pairs(bounds, columns, name)
        tensor, clamped = enforce(name, tensor, pairs, columns, clamp)
        meta = checked(DatasetMeta, node=self.id, name=name, shape=tuple(tensor.shape),
                       dtype=dtype_name(tensor.dtype), columns=columns, description=description, tags=list(tags),
                       bounds=pairs)
        twin = None if mock is None else _twin(mock, tensor.dtype, dtype is not None)
        if twin is not None and (tuple(twin.shape[1:]) != tuple(tensor.shape[1:]) or twin.dtype != tensor.dtype):
            raise InvalidRequest(
                f"the mock twin of {name!r} must have rows like the data's: {tuple(tensor.shape[1:])} "
                f"{tensor.dtype}, not {tuple(twin.shape[1:])} {twin.dtype}")
        self.store.put_dataset(meta, tensor, list(allowed_users), twin, replace=replace, clamped=clamped)
        if clamped:
            log.warning("%s: %d value(s) outside the declared bounds clamped to them at publish", name, clamped)
        if notify:
            self._tell_gateway(PublishDataset(dataset=meta))
        return meta

    def check_users(self, names: Iterable[str], what: str) -> None:
        """Refuse names that are not users of this node (``[users]`` in its config): a typo in
        an allowed user or a budget would otherwise grant nothing to anyone, silently."""
        unknown = sorted(set(names) - set(self.config.users))
        if unknown:
            raise NotFound(f"{what}: {', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not a "
                           f"user of node {self.id!r} (its users: {', '.join(sorted(self.config.users)) or 'none'}). "
                           "Check the spelling, or add [users.NAME] with their public key to the node's config and "
                           "restart the node")

    def publications(self, name: str | None = None) -> list[PublicationRow]:
        """This node's record of publications (of ``name``, or of every dataset): when, how
        many rows, how many values were clamped, whether it replaced one. Never sent anywhere."""
        return self.store.publications(name)

    def datasets(self) -> list[DatasetMeta]:
        return [DatasetMeta.model_validate(row.meta) for row in self.store.dataset_rows()]

    def unpublish(self, name: str) -> None:
        self.store.remove_dataset(name)
        self._tell_gateway(UnpublishDataset(name=name))

    def load_config_datasets(self) -> list[DatasetMeta]:
        """(Re)load the datasets the config names from their files, without telling anyone.
        The config holds data and policy together, so each one replaces what was published."""
        return [self.publish(ds.name, ds.path, description=ds.description, tags=ds.tags,
                             allowed_users=ds.allowed_users, columns=ds.columns, bounds=ds.bounds, mock=ds.mock,
                             dtype=ds.dtype, clamp=ds.clamp, replace=True, notify=False)
                for ds in self.config.datasets]

    def register(self) -> None:
        """Announce this node, its public key and its datasets' metadata to the gateway."""
        self._tell_gateway(RegisterNode(public_key=self.identity.public.text(), datasets=self.datasets()))

    # --- the approval queue ----------------------------------------------------------------

    def requests(self, status: str | None = "pending") -> list[RequestRow]:
        """Requests waiting for a decision (``status=None``: every request, decided, expired or
        cancelled too). One left undecided past ``[approval] expire_after`` is ``expired``
        here at once; its requester is told by the worker (:meth:`expire_requests`)."""
        requests = self._requests()
        requests.expire_due()
        return requests.list(status)

    def request(self, job_id: str) -> RequestRow:
        requests = self._requests()
        requests.expire_due()
        return requests.get(job_id)

    def expire_requests(self) -> int:
        """Close every request left undecided past ``[approval] expire_after`` as expired, and
        answer each request closed without its owner's decision (expired, or cancelled by its
        requester) whose requester has not been told yet: their tickets raise
        ``RequestExpired`` or ``JobCancelled``. The worker runs this at its start and every
        ``workers.policy.approvals.sweep_every`` seconds; how many were answered."""
        requests = self._requests()
        requests.expire_due()
        answered = 0
        for request in requests.unanswered():
            self._answer(request)
            answered += 1
        return answered

    def refresh_parked(self, within: float = MAX_TTL_SECONDS / 2) -> int:
        """Sign again the word that a job waits for its owner's decision where it expires
        within ``within`` seconds: that word is an envelope, valid a day at most
        (protocol.envelope.MAX_TTL_SECONDS), while a request may wait ``[approval]
        expire_after`` (a week by default, or for ever) — without it, a waiting ticket would
        read an expired answer. The worker's sweep runs this; how many were signed again."""
        runner = None
        refreshed = 0
        for request in self._requests().list("pending"):
            job = self.store.job(request.job_id)
            if job is None or job.status != JobStatus.PENDING_APPROVAL or job.reply is None \
                    or job.reply["expires_at"] > time.time() + within:
                continue
            runner = runner or self.runner()
            signed = runner.repark(request.job_id, request.requester)
            if signed is None:  # decided meanwhile
                continue
            with broker_errors(self.id, self.config.node.broker):
                without_expiry(self.app.backend, partial(self.app.backend.store_result, request.job_id, signed,
                                                         PENDING_APPROVAL))
            decided = self.store.job(request.job_id)
            if decided is not None and decided.status != JobStatus.PENDING_APPROVAL and decided.reply is not None:
                self._deliver(request.job_id, decided.reply)  # decided while we wrote: its answer, not the word
            refreshed += 1
        return refreshed

    def approve(self, job_id: str) -> dict[str, Any]:
        """Run the request as it was asked and complete the requester's ticket. Approving a
        request approved before sends its answer again: the broker may have been down."""
        self._reachable()  # before the decision is recorded: it is final, and its answer goes by the broker
        return self._answer(self._decide(job_id, "approved"))

    def deny(self, job_id: str, reason: str) -> None:
        """Refuse the request; the requester's ticket raises RequestDenied with ``reason``."""
        if not reason.strip():
            raise InvalidRequest("say why the request is denied: the requester reads the reason")
        self._reachable()
        self._answer(self._decide(job_id, "denied", reason))

    def resume_decisions(self, within: float = 24 * 3600) -> int:
        """Deliver the answer to every request decided in the last ``within`` seconds (a
        parked job's state waits in the result backend until then): one decided while the
        broker went down, or the worker stopped, between the decision and its answer gets it
        now — a decision and the job it resumes never come apart. Run at every start; the
        number delivered (a job whose reply was pruned since is not: it was answered)."""
        decided = [r for r in Requests(self.store).list(None)
                   if r.status != RequestStatus.PENDING and (r.decided_at or 0) > time.time() - within]
        delivered = 0
        for request in decided:
            try:
                self._answer(request)
                delivered += 1
            except NotFound:  # answered, and its reply pruned since ([retention] replies): nothing to resume
                continue
        return delivered

    def _decide(self, job_id: str, status: str, decision: str = "") -> RequestRow:
        requests = self._requests()
        request = requests.get(job_id)
        if request.status == status:  # decided so before: its answer is sent again
            return request
        try:
            return requests.decide(request.job_id, status, decision)
        except InvalidRequest:  # closed already: expired (maybe just now: its requester hears at once) or cancelled
            self.expire_requests()
            raise

    def _requests(self) -> Requests:
        return Requests(self.store, self.config.approval.expire_after)

    def _answer(self, request: RequestRow) -> dict[str, Any]:
        """The answer to a decided request — computed once (a job runs once), then recorded —
        stored where the requester's ticket reads it."""
        job = self.store.job(request.job_id)
        if job is not None and job.reply is None and job.status in FINISHED:  # never run twice
            raise NotFound(f"{request.job_id} was answered ({job.status}) and its answer is no longer kept "
                           f"(the node keeps replies {self.config.retention.replies:.0f} s: [retention] replies)")
        if job is not None and job.reply is not None and job.status != JobStatus.PENDING_APPROVAL:
            signed = job.reply
        elif request.status == RequestStatus.APPROVED:
            signed = self.runner().run_approved(request.job_id)
        else:  # denied, expired or cancelled: it never runs
            signed = self.runner().refuse(request.job_id, refusal(request, self.id))
        self._deliver(request.job_id, signed)
        return signed

    def _deliver(self, job_id: str, signed: dict[str, Any]) -> None:
        """Store a job's signed answer where its requester's ticket reads it (the result backend)."""
        with broker_errors(self.id, self.config.node.broker):
            self.app.backend.store_result(job_id, signed, "SUCCESS")

    # --- the worker's side -----------------------------------------------------------------

    def runner(self) -> JobRunner:
        return JobRunner(NodeContext(self.id, self.identity, self.config.keyring(), self.store, self.ledger,
                                     self.config.approval, self._claim_check, self._claim_take, self._node_key,
                                     self.config.worker.memory_limit_mb * 2**20, self.config.worker.slots_per_user,
                                     self.config.retention, take_up=self._take_up), deliver=self._deliver)

    @property
    def _broker(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis_client(self.config.node.broker)
        return self._redis

    def _claim_check(self, sealed: bytes) -> str:
        broker = parse_broker(self.config.node.broker)
        return claims.leave(self._broker, sealed, broker.wait_replicas, broker.wait_timeout)

    def _claim_take(self, key: str) -> bytes:
        return claims.take(self._broker, key)

    def _take_up(self, job_id: str) -> bytes | None:
        """Mark the job started (``SET NX``) unless its requester's cancellation came first
        (protocol.cancel): None if the node was first, else what is there. The mark lasts as
        long as the job may run and its answer be read: a cancel() meanwhile finds it.

        Fails closed: if the key can be neither set nor read (the broker gone, or a broker
        ACL without the node's rule for it), the job does not run — a cancellation there
        would go unseen — and its requester reads a retryable NodeUnavailable."""
        key = cancel_key(job_id)
        ttl = int(self.config.worker.time_limit + self.config.retention.results) + 1
        try:
            with self._broker.pipeline(transaction=False) as pipe:
                pipe.set(key, STARTED, nx=True, ex=ttl)
                pipe.get(key)
                first, there = pipe.execute()
        except redis.RedisError as exc:
            log.error("job %s: its cancel key could not be set (%s: %s); it does not run. A broker ACL without the "
                      "node's rule for %s? (ops/acl.py; `gridq acl init` writes it)", job_id, type(exc).__name__, exc,
                      cancel_key(f"{self.id}:*"))
            raise NodeUnavailable(f"node {self.id!r} could not check on the broker whether this job was cancelled "
                                  f"({type(exc).__name__}), so it did not run it: send it again; if this keeps "
                                  "happening, tell the node's owner (its log says why)", job_id=job_id) from None
        return None if first else (there or b"")

    def _node_key(self, node: str) -> PublicIdentity:
        if self._directory is None:
            # the gateway key is pinned in the node's own database, not taken afresh from the broker
            self._directory = Directory(self.config.node.broker, self._broker, pins=self.store,
                                        accept=f"`gridq trust-gateway --node {self.id}`")
        return self._directory.key(node)

    def _tell_gateway(self, body: RegisterNode | PublishDataset | UnpublishDataset) -> None:
        # Fire and forget: the message waits in the gateway's queue if the gateway is down.
        job_id = uuid.uuid4().hex
        env = seal_envelope(self.identity, recipient=GATEWAY, kind=body.kind, job_id=job_id,
                            body=body.model_dump(mode="json"), now=time.time(), ttl=NODE_MESSAGE_TTL_SECONDS)
        task = {"register": Tasks.REGISTER, "publish": Tasks.PUBLISH, "unpublish": Tasks.UNPUBLISH}[body.kind]
        try:
            with broker_errors(self.id, self.config.node.broker):
                self.app.send_task(task, args=[env.model_dump(mode="json")], queue=GATEWAY_QUEUE, task_id=job_id)
        except BrokerUnavailable as exc:
            if body.kind == "register":
                raise
            raise BrokerUnavailable(f"{exc.message} The node has recorded the change; the gateway learns of it when "
                                    "the node registers again (node.register(), or its worker's next start).") from None

    def _reachable(self) -> None:
        """BrokerUnavailable now if the broker does not answer a ping."""
        with broker_errors(self.id, self.config.node.broker):
            self._broker.ping()


def _table(data: torch.Tensor | np.ndarray | str | Path, columns: list[str] | None,
           dtype: str | None) -> tuple[torch.Tensor, list[str]]:
    """The data to publish as a tensor (a file's columns if none are given), in ``dtype``
    if its owner declared one."""
    if isinstance(data, str | Path):
        tensor, file_columns = load_table(Path(data))
        columns = columns or file_columns
    else:
        tensor = torch.as_tensor(data)
    return tensor if dtype is None else _cast(tensor, parse_dtype(dtype)), list(columns or [])


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The owner's declared dtype; a NaN or an infinity has no integer to become."""
    if tensor.is_floating_point() and not dtype.is_floating_point and not bool(tensor.isfinite().all()):
        raise InvalidRequest(f"the data holds NaN or infinite values, which {dtype_name(dtype)} cannot hold")
    return tensor.to(dtype)


def _twin(mock: torch.Tensor | np.ndarray | str | Path, data: torch.dtype, declared: bool) -> torch.Tensor:
    """The owner's mock twin: in the data's dtype if the owner declared one, or if it is a
    CSV (which has no dtype of its own); else as it comes, to be checked against the data."""
    if not isinstance(mock, str | Path):
        twin = torch.as_tensor(mock)
    else:
        twin = load_table(Path(mock))[0]
        declared = declared or Path(mock).suffix.lower() == ".csv"
    return _cast(twin, data) if declared else twin


def worker_tasks(app: Celery, config: NodeConfig) -> None:
    """Register the node's task on ``app``, served by a JobRunner built in each pool
    process after the fork (no database connection is shared across processes)."""

    def runner() -> JobRunner:
        torch.set_num_threads(config.worker.torch_threads)
        return Node(config, app).runner()

    answer_tasks(app, [Tasks.RUN_JOB], runner, config.worker.max_deliveries)
